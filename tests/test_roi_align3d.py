"""RoIAlign3D against torchvision.ops.roi_align frame by frame (the specification), on CPU and CUDA.

Tolerances follow the project rule: the kernel's error against a float64 reference may be at most twice
the error of torchvision doing the same computation in the kernel's precision, plus a rounding floor.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stssa_kernels
from stssa_kernels import RoIAlign3d, roi_align3d
from stssa_kernels.ops.roi_align3d import _is_channels_last

try:  # the reference is torchvision's roi_align; a torch without torchvision runs the other tests
    import torchvision

    from stssa_kernels.reference import roi_align3d_ref
    from stssa_kernels.reference.roi_align3d import roi_align3d_ref_loop
except ImportError:
    torchvision = None

CUDA = torch.cuda.is_available() and stssa_kernels.HAS_CUDA_KERNELS
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the CUDA kernels")
needs_tv = pytest.mark.skipif(torchvision is None, reason="needs torchvision (the reference)")


def make_boxes(k, n, h, w, scale, gen, per_frame_t=None, dtype=torch.float64, device="cpu"):
    """Random boxes in image coordinates (feature size / scale), some crossing the border."""
    img_h, img_w = h / scale, w / scale

    def one(size):
        x1 = torch.rand(size, generator=gen, dtype=torch.float64) * img_w * 1.1 - 0.1 * img_w
        y1 = torch.rand(size, generator=gen, dtype=torch.float64) * img_h * 1.1 - 0.1 * img_h
        bw = torch.rand(size, generator=gen, dtype=torch.float64) * img_w * 0.8
        bh = torch.rand(size, generator=gen, dtype=torch.float64) * img_h * 0.8
        return torch.stack([x1, y1, x1 + bw, y1 + bh], -1)

    idx = torch.randint(0, n, (k,), generator=gen).to(torch.float64)
    if per_frame_t is None:
        boxes = torch.cat([idx[:, None], one((k,))], 1)
    else:
        boxes = torch.cat([idx[:, None, None].expand(k, per_frame_t, 1), one((k, per_frame_t))], 2)
    return boxes.to(device=device, dtype=dtype)


def err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(out, ref64, baseline, floor):
    """err(out) <= 2 * err(baseline in the same precision) + floor."""
    e, eb = err(out, ref64), err(baseline, ref64)
    assert e <= 2 * eb + floor, f"kernel error {e:.3g} > 2 x baseline error {eb:.3g} + {floor:.1g}"


SHAPES = [  # N, C, T, H, W, K
    (1, 1, 1, 7, 7, 1),
    (2, 3, 5, 9, 11, 7),
    (3, 5, 4, 16, 13, 10),
]


@needs_tv
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
@pytest.mark.parametrize("scale", [1.0, 1 / 16])
def test_matches_torchvision_float64(shape, aligned, sampling_ratio, scale):
    n, c, t, h, w, k = shape
    gen = torch.Generator().manual_seed(hash((shape, aligned, sampling_ratio, scale)) % 2**31)
    x = torch.randn(n, c, t, h, w, dtype=torch.float64, generator=gen)
    boxes = make_boxes(k, n, h, w, scale, gen)
    out = roi_align3d(x, boxes, (3, 4), scale, sampling_ratio, aligned)
    ref = roi_align3d_ref(x, boxes, (3, 4), scale, sampling_ratio, aligned)
    assert out.shape == (k, c, t, 3, 4) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@needs_tv
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_float32_error_rule(aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(2, 6, 3, 15, 17, dtype=torch.float64, generator=gen)
    boxes = make_boxes(9, 2, 15, 17, 1 / 16, gen)
    ref64 = roi_align3d_ref(x64, boxes, 7, 1 / 16, sampling_ratio, aligned)
    x32, b32 = x64.float(), boxes.float()
    out = roi_align3d(x32, b32, 7, 1 / 16, sampling_ratio, aligned)
    base = roi_align3d_ref(x32, b32, 7, 1 / 16, sampling_ratio, aligned)
    assert out.dtype == torch.float32
    assert_within_rule(out, ref64, base, floor=1e-6)


@needs_tv
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_accumulates_in_fp32(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, 12, 12, generator=gen).to(dtype)
    boxes = make_boxes(5, 2, 12, 12, 1.0, gen)
    ref64 = roi_align3d_ref(x.double(), boxes, 5, 1.0, -1, True)
    out = roi_align3d(x, boxes, 5, 1.0, -1, True)
    assert out.dtype == dtype
    # PyTorch in this precision = the exact result rounded once to `dtype` (fp32 accumulation).
    assert_within_rule(out, ref64, ref64.to(dtype), floor=torch.finfo(dtype).eps)


@needs_tv
def test_loop_and_fold_references_agree():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 10, 10, dtype=torch.float64, generator=gen)
    boxes = make_boxes(6, 2, 10, 10, 1.0, gen, per_frame_t=4)
    torch.testing.assert_close(roi_align3d_ref(x, boxes, 3), roi_align3d_ref_loop(x, boxes, 3), rtol=0, atol=0)


def _layouts(x):
    yield "contiguous", x
    yield "channels_last_3d", x.contiguous(memory_format=torch.channels_last_3d)
    wide = torch.randn(x.shape[0], x.shape[1] * 2, x.shape[2], x.shape[3], x.shape[4] + 3, dtype=x.dtype)
    wide[:, ::2, :, :, 1:-2] = x
    yield "strided slice", wide[:, ::2, :, :, 1:-2]
    yield "permuted T/C", x.transpose(1, 2).contiguous().transpose(1, 2)


@needs_tv
@pytest.mark.parametrize("per_frame", [False, True])
def test_layouts_read_in_place(per_frame):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 3, 11, 9, dtype=torch.float64, generator=gen)
    boxes = make_boxes(7, 2, 11, 9, 1.0, gen, per_frame_t=3 if per_frame else None)
    ref = roi_align3d_ref(x, boxes, (2, 3), 1.0, 2, True)
    for name, xv in _layouts(x):
        torch.testing.assert_close(roi_align3d(xv, boxes, (2, 3), 1.0, 2, True), ref, rtol=0, atol=1e-12, msg=name)
        xg = xv.detach().requires_grad_()
        roi_align3d(xg, boxes, (2, 3), 1.0, 2, True).pow(2).sum().backward()
        xr = x.clone().requires_grad_()
        roi_align3d_ref(xr, boxes, (2, 3), 1.0, 2, True).pow(2).sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad, rtol=0, atol=1e-12, msg=name)


@needs_tv
def test_per_frame_boxes_equal_torchvision_per_frame():
    gen = torch.Generator().manual_seed(5)
    n, c, t, h, w = 2, 3, 5, 13, 12
    x = torch.randn(n, c, t, h, w, dtype=torch.float64, generator=gen)
    boxes = make_boxes(4, n, h, w, 0.5, gen, per_frame_t=t)
    out = roi_align3d(x, boxes, 4, 0.5, -1, False)
    for f in range(t):
        expect = torchvision.ops.roi_align(x[:, :, f], boxes[:, f], 4, 0.5, -1, False)
        torch.testing.assert_close(out[:, :, f], expect, rtol=0, atol=1e-12)


@needs_tv
def test_list_of_boxes_like_torchvision():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 2, 8, 8, dtype=torch.float64, generator=gen)
    per_clip = [make_boxes(m, 1, 8, 8, 1.0, gen)[:, 1:] for m in (2, 0, 3)]
    out = roi_align3d(x, per_clip, 2)
    for f in range(2):
        torch.testing.assert_close(out[:, :, f], torchvision.ops.roi_align(x[:, :, f], per_clip, 2), rtol=0, atol=1e-12)
    assert roi_align3d(x, [], 2).shape == (0, 2, 2, 2, 2)


@pytest.mark.parametrize("per_frame", [False, True])
@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck(per_frame, aligned):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 3, 6, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    boxes = make_boxes(4, 2, 6, 7, 1.0, gen, per_frame_t=3 if per_frame else None)
    fn = lambda inp: roi_align3d(inp, boxes, (2, 3), 1.0, 2, aligned)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@needs_tv
def test_backward_matches_torchvision_float32():
    gen = torch.Generator().manual_seed(8)
    x64 = torch.randn(2, 4, 3, 10, 10, dtype=torch.float64, generator=gen)
    boxes = make_boxes(8, 2, 10, 10, 1.0, gen)
    g64 = torch.randn(8, 4, 3, 7, 7, dtype=torch.float64, generator=gen)

    def grad_of(fn, x, b, g):
        x = x.clone().requires_grad_()
        fn(x, b, 7, 1.0, -1, True).backward(g)
        return x.grad

    ref = grad_of(roi_align3d_ref, x64, boxes, g64)
    out = grad_of(roi_align3d, x64.float(), boxes.float(), g64.float())
    base = grad_of(roi_align3d_ref, x64.float(), boxes.float(), g64.float())
    assert_within_rule(out, ref, base, floor=1e-6)


def test_deterministic_mode_cpu():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 2, 9, 9, generator=gen, requires_grad=True)
    boxes = make_boxes(12, 2, 9, 9, 1.0, gen, dtype=torch.float32)
    grads = []
    for det in (False, True, True):
        torch.use_deterministic_algorithms(det)
        try:
            x.grad = None
            roi_align3d(x, boxes, 3, 1.0, 2, True).sum().backward()
            grads.append(x.grad.clone())
        finally:
            torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[1], grads[2]) and torch.equal(grads[0], grads[1])


def test_opcheck():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 2, 8, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    for boxes in (make_boxes(3, 2, 8, 9, 1.0, gen), make_boxes(3, 2, 8, 9, 1.0, gen, per_frame_t=2)):
        torch.library.opcheck(torch.ops.stssa.roi_align3d.default, (x, boxes, 0.5, 3, 2, -1, True))
    g = torch.randn(3, 3, 2, 3, 2, dtype=torch.float64, generator=gen)
    torch.library.opcheck(torch.ops.stssa._roi_align3d_backward.default,
                          (g, make_boxes(3, 2, 8, 9, 1.0, gen), 0.5, 3, 2, 2, 3, 2, 8, 9, 2, False))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 4, 10, 10, generator=gen, requires_grad=True)
    boxes = make_boxes(5, 2, 10, 10, 1 / 16, gen, dtype=torch.float32)
    mod = RoIAlign3d(7, 1 / 16, 2, True)

    def f(inp, b):
        return mod(inp, b).relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, boxes)
    (gc,) = torch.autograd.grad(out, x)
    (ge,) = torch.autograd.grad(f(x, boxes), x)
    torch.testing.assert_close(out, f(x, boxes))
    torch.testing.assert_close(gc, ge)


@needs_tv
def test_autocast_cpu_bf16():
    gen = torch.Generator().manual_seed(12)
    conv = torch.nn.Conv3d(3, 4, 1)
    x = torch.randn(2, 3, 2, 12, 12, generator=gen)
    boxes = make_boxes(4, 2, 12, 12, 1.0, gen, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feat = conv(x)
        out = roi_align3d(feat, boxes, 3, 1.0, 2, True)
    assert feat.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    ref64 = roi_align3d_ref(feat.double(), boxes.double(), 3, 1.0, 2, True)
    assert_within_rule(out, ref64, ref64.bfloat16(), floor=torch.finfo(torch.bfloat16).eps)


def test_empty_inputs():
    x = torch.randn(2, 3, 4, 5, 5, requires_grad=True)
    out = roi_align3d(x, torch.zeros(0, 5), (2, 3))
    assert out.shape == (0, 3, 4, 2, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any()
    assert roi_align3d(torch.randn(2, 0, 4, 5, 5), torch.tensor([[0.0, 0, 0, 2, 2]]), 2).shape == (1, 0, 4, 2, 2)
    assert roi_align3d(torch.randn(2, 3, 0, 5, 5), torch.tensor([[1.0, 0, 0, 2, 2]]), 2).shape == (1, 3, 0, 2, 2)
    assert roi_align3d(torch.randn(0, 3, 2, 5, 5), torch.zeros(0, 5), 2).shape == (0, 3, 2, 2, 2)


@needs_tv
def test_zero_size_boxes_match_torchvision():
    x = torch.randn(1, 2, 2, 6, 6, dtype=torch.float64)
    boxes = torch.tensor([[0.0, 2.0, 3.0, 2.0, 3.0], [0.0, 1.0, 1.0, 4.0, 1.0]], dtype=torch.float64)
    for aligned in (False, True):
        torch.testing.assert_close(roi_align3d(x, boxes, 2, aligned=aligned),
                                   roi_align3d_ref(x, boxes, 2, aligned=aligned), rtol=0, atol=1e-12)


@needs_tv
def test_64bit_offsets_cpu():
    # channel stride 2^31: element offsets past int32 without allocating 8 GB (untouched pages are free).
    c_stride = 2**31
    storage = torch.empty(c_stride + 64, dtype=torch.float16)
    view = storage.as_strided((1, 2, 1, 4, 4), (0, c_stride, 16, 4, 1))
    vals = torch.randn(2, 1, 4, 4).half()
    storage[:16].copy_(vals[0].flatten())
    storage[c_stride:c_stride + 16].copy_(vals[1].flatten())
    boxes = torch.tensor([[0.0, 0.3, 0.6, 3.1, 2.9]])
    out = roi_align3d(view, boxes, 2, 1.0, 2, True)
    ref = roi_align3d_ref(vals[None].double(), boxes.double(), 2, 1.0, 2, True)
    assert_within_rule(out, ref, ref.half(), floor=1e-3)


def test_module():
    m = RoIAlign3d((7, 7), spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
    assert "output_size=(7, 7)" in repr(m)
    x = torch.randn(1, 2, 3, 16, 16)
    assert m(x, torch.tensor([[0.0, 10, 10, 100, 200]])).shape == (1, 2, 3, 7, 7)


def small_far_boxes(k, n, img, gen, dtype=torch.float64):
    """Far-away people: 8-68 px boxes on an img x img frame (the benchmark's small-box workload)."""
    size = 8 + 60 * torch.rand(k, 2, generator=gen, dtype=torch.float64)
    xy = (img - size) * torch.rand(k, 2, generator=gen, dtype=torch.float64)
    idx = (torch.arange(k) % n).to(torch.float64)
    return torch.cat([idx[:, None], xy, xy + size], 1).to(dtype)


@needs_tv
@pytest.mark.parametrize("c", [1, 7, 17, 50])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "strided"])
def test_small_boxes_channel_blocks_match_torchvision(c, layout):
    # channel counts around the kernels' 16-channel blocks, in every layout, forward and backward
    gen = torch.Generator().manual_seed(30 + c)
    n, t, h, w = 2, 3, 16, 16
    x = torch.randn(n, c, t, h, w, dtype=torch.float64, generator=gen)
    boxes = small_far_boxes(9, n, 256, gen)
    if layout == "channels_last_3d":
        xv = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        xv = torch.randn(n, c, t, h, 2 * w, dtype=torch.float64, generator=gen)[..., ::2]
        xv.copy_(x)
    else:
        xv = x
    xg = xv.detach().requires_grad_()
    out = roi_align3d(xg, boxes, 7, 1 / 16, -1, True)
    xr = x.clone().requires_grad_()
    ref = roi_align3d_ref_loop(xr, boxes, 7, 1 / 16, -1, True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=0, atol=1e-12)


def _layout_cases():
    x = torch.randn(2, 5, 3, 6, 7)
    yield "contiguous", x
    yield "channels_last_3d", x.contiguous(memory_format=torch.channels_last_3d)
    yield "channels_last_3d C=1", torch.randn(2, 1, 3, 6, 7).contiguous(memory_format=torch.channels_last_3d)
    yield "channels_last_3d 1x1", torch.randn(2, 5, 3, 1, 1).contiguous(memory_format=torch.channels_last_3d)
    yield "channels_last_3d T=1", torch.randn(2, 5, 1, 6, 7).contiguous(memory_format=torch.channels_last_3d)
    yield "slice", torch.randn(2, 10, 3, 6, 7)[:, ::2]
    yield "permuted T/C", x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("name, x", list(_layout_cases()))
def test_output_layout_follows_input_and_fake_agrees(name, x):
    from torch._subclasses.fake_tensor import FakeTensorMode

    boxes = torch.tensor([[0.0, 1.0, 1.0, 5.0, 4.0], [1.0, 0.0, 2.0, 6.0, 6.0]])
    out = roi_align3d(x, boxes, (2, 3))
    assert out.is_contiguous(memory_format=torch.channels_last_3d if _is_channels_last(x) else torch.contiguous_format)
    with FakeTensorMode() as mode:
        fx, fb = mode.from_tensor(x), mode.from_tensor(boxes)
        fake = torch.ops.stssa.roi_align3d(fx, fb, 1.0, 2, 3, -1, False)
    assert fake.shape == out.shape and fake.stride() == out.stride(), name
    # grad_input gets input's layout, in the real and the fake backward
    xg = x.detach().requires_grad_()
    roi_align3d(xg, boxes, (2, 3)).sum().backward()
    assert xg.grad.stride() == torch.empty_like(x, memory_format=torch.preserve_format).stride() or \
        xg.grad.is_contiguous(memory_format=torch.channels_last_3d if _is_channels_last(x) else torch.contiguous_format)
    g = torch.randn(out.shape)
    real_b = torch.ops.stssa._roi_align3d_backward(g, boxes, 1.0, 2, 3, *x.shape, -1, False, False,
                                                   _is_channels_last(x))
    with FakeTensorMode() as mode:
        fake_b = torch.ops.stssa._roi_align3d_backward(mode.from_tensor(g), mode.from_tensor(boxes), 1.0, 2, 3,
                                                       *x.shape, -1, False, False, _is_channels_last(x))
    assert fake_b.stride() == real_b.stride(), name


@pytest.mark.parametrize("per_frame", [False, True])
def test_public_function_on_meta_and_fake_tensors(per_frame):
    """Shape inference (a model on the meta device, FakeTensorMode) runs the public function: the value
    checks, which read the boxes, are skipped for tensors without data; shapes, dtypes and strides are
    the real call's, the backward's too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 5, 3, 6, 7).contiguous(memory_format=torch.channels_last_3d)
    boxes = torch.tensor([[0.0, 1.0, 1.0, 5.0, 4.0], [1.0, 0.0, 2.0, 6.0, 6.0]])
    if per_frame:
        boxes = boxes[:, None].repeat(1, 3, 1)
    xg = x.clone().requires_grad_()
    out = roi_align3d(xg, boxes, (2, 3), 0.5)
    out.sum().backward()
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x).requires_grad_()
        fake = roi_align3d(fx, mode.from_tensor(boxes), (2, 3), 0.5)
        fake.sum().backward()
    mx = x.to("meta").requires_grad_()
    meta = roi_align3d(mx, boxes.to("meta"), (2, 3), 0.5)
    meta.sum().backward()
    for name, o, gx in (("fake", fake, fx.grad), ("meta", meta, mx.grad)):
        assert (o.shape, o.dtype, o.stride()) == (out.shape, out.dtype, out.stride()), name
        assert (gx.shape, gx.stride()) == (xg.grad.shape, xg.grad.stride()), name


@needs_tv
def test_channels_last_output_values_agree_with_contiguous():
    # the two layouts take different kernels (channel vectors / per-plane): same math, other rounding order
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(2, 40, 3, 16, 16, generator=gen)
    boxes = small_far_boxes(6, 2, 256, gen, torch.float32)
    a = roi_align3d(x, boxes, 7, 1 / 16, -1, True)
    b = roi_align3d(x.contiguous(memory_format=torch.channels_last_3d), boxes, 7, 1 / 16, -1, True)
    assert b.is_contiguous(memory_format=torch.channels_last_3d)
    ref64 = roi_align3d_ref(x.double(), boxes.double(), 7, 1 / 16, -1, True)
    base = roi_align3d_ref(x, boxes, 7, 1 / 16, -1, True)
    for out in (a, b):
        assert_within_rule(out, ref64, base, floor=1e-6)


def test_backward_race_free_any_thread_count():
    # every grad_input element is owned by one task: the result is bitwise the same for 1 and 2 threads
    gen = torch.Generator().manual_seed(32)
    x = torch.randn(2, 37, 4, 16, 16, generator=gen)
    boxes = small_far_boxes(20, 2, 256, gen, torch.float32)
    g = torch.randn(20, 37, 4, 7, 7, generator=gen)
    grads = []
    old = torch.get_num_threads()
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        try:
            xg = x.clone().requires_grad_()
            roi_align3d(xg, boxes, 7, 1 / 16, -1, True).backward(g)
            grads.append(xg.grad)
        finally:
            torch.set_num_threads(old)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("hw", [(16, 16), (7, 9)])
def test_large_outputs_streamed_equal_small_ones(hw):
    # fp32 outputs above 32 MiB (the kernel's streaming-store threshold) are written with non-temporal
    # stores; the values must be bitwise those of the same boxes in small calls (plain stores). (7, 9):
    # planes of 63 values, so grad_input planes start unaligned and take the plain-copy fallback in turn.
    h, w = hw
    gen = torch.Generator().manual_seed(41)
    n, c = 3, 1024
    t, k, part = (12, 24, 4) if hw == (16, 16) else (48, 8, 2)
    x = torch.randn(n, c, t, h, w, generator=gen)
    boxes = small_far_boxes(k, n, 16 * max(h, w), gen, torch.float32)
    boxes[::2] = make_boxes(k, n, 16 * h, 16 * w, 1.0, gen, dtype=torch.float32)[::2]
    out = roi_align3d(x, boxes, 7, 1 / 16, -1, True)
    assert out.numel() * 4 > 32 << 20
    parts = [roi_align3d(x, boxes[i:i + part], 7, 1 / 16, -1, True) for i in range(0, k, part)]
    assert parts[0].numel() * 4 < 32 << 20
    assert torch.equal(out, torch.cat(parts))
    g = torch.randn(out.shape, generator=gen)
    grad = torch.ops.stssa._roi_align3d_backward(g, boxes, 1 / 16, 7, 7, n, c, t, h, w, -1, True, False, False)
    assert grad.numel() * 4 > 32 << 20
    for b in range(n):  # each clip's gradient alone: a grad_input below the threshold
        sel = boxes[:, 0] == b
        bx = boxes[sel].clone()
        bx[:, 0] = 0
        one = torch.ops.stssa._roi_align3d_backward(g[sel].contiguous(), bx, 1 / 16, 7, 7, 1, c, t, h, w, -1, True,
                                                    False, False)
        assert torch.equal(grad[b], one[0])


def test_deterministic_flag_is_decided_in_python():
    # the stable ABI cannot read torch.use_deterministic_algorithms: the autograd formula passes it
    from torch.utils._python_dispatch import TorchDispatchMode

    flags = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.stssa._roi_align3d_backward.default:
                kwargs = kwargs or {}  # trailing arguments equal to their default may be dropped
                flags.append(args[12] if len(args) > 12 else kwargs.get("deterministic", False))
            return func(*args, **(kwargs or {}))

    x = torch.randn(1, 2, 2, 6, 6, requires_grad=True)
    boxes = torch.tensor([[0.0, 1.0, 1.0, 5.0, 4.0]])
    for det in (False, True):
        torch.use_deterministic_algorithms(det)
        try:
            with Record():
                roi_align3d(x, boxes, 2).sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
    assert flags == [False, True]


# --- bad input --------------------------------------------------------------------------------------

BOX = torch.tensor([[0.0, 1.0, 1.0, 4.0, 4.0]])


@pytest.mark.parametrize("call, exc, match", [
    (lambda x: roi_align3d(x[0], BOX, 2), ValueError, r"input must be \[N, C, T, H, W\]"),
    (lambda x: roi_align3d(x.long(), BOX, 2), TypeError, "input must be float"),
    (lambda x: roi_align3d(x, BOX, 0), ValueError, "output_size must be positive"),
    (lambda x: roi_align3d(x, BOX, (2, -1)), ValueError, "output_size must be positive"),
    (lambda x: roi_align3d(x, BOX, "a"), ValueError, "output_size"),
    (lambda x: roi_align3d(x, BOX[:, 1:], 2), ValueError, r"boxes must be \[K, 5\]"),
    (lambda x: roi_align3d(x, BOX.long(), 2), TypeError, "boxes must be a floating-point"),
    (lambda x: roi_align3d(x, torch.tensor([[2.0, 1, 1, 4, 4]]), 2), ValueError, r"batch index .* \[0, 2\)"),
    (lambda x: roi_align3d(x, torch.tensor([[-1.0, 1, 1, 4, 4]]), 2), ValueError, "batch index"),
    (lambda x: roi_align3d(x, torch.tensor([[0.5, 1, 1, 4, 4]]), 2), ValueError, "batch index"),
    (lambda x: roi_align3d(x, torch.tensor([[0.0, 1, float("nan"), 4, 4]]), 2), ValueError, "NaN or infinite"),
    (lambda x: roi_align3d(x, torch.tensor([[0.0, 1, 1, float("inf"), 4]]), 2), ValueError, "NaN or infinite"),
    (lambda x: roi_align3d(x, torch.tensor([[0.0, 4, 1, 1, 4]]), 2), ValueError, "x2 >= x1"),
    (lambda x: roi_align3d(x, torch.zeros(1, 4, 5), 2), ValueError, r"per-frame boxes must be \[K, T, 5\]"),
    (lambda x: roi_align3d(x, torch.tensor([[[0.0, 1, 1, 2, 2], [1.0, 1, 1, 2, 2], [0.0, 1, 1, 2, 2]]]), 2),
     ValueError, "same batch index on every frame"),
    (lambda x: roi_align3d(x, [torch.zeros(2, 5)], 2), ValueError, r"boxes\[0\] must be a Tensor\[L, 4\]"),
    (lambda x: roi_align3d(x, "boxes", 2), TypeError, "boxes must be a Tensor or a list"),
    (lambda x: roi_align3d(x, torch.tensor([[0.0, 0, 0, 1e9, 1e9]]), 2), ValueError, "sampling_ratio > 0"),
    (lambda x: roi_align3d(x, BOX, 2, spatial_scale=0.0), ValueError, "spatial_scale"),
    (lambda x: roi_align3d(x, BOX, 2, sampling_ratio=1.5), TypeError, "sampling_ratio"),
    (lambda x: roi_align3d(x, BOX, 2, sampling_ratio=1025), ValueError, "sampling_ratio must be at most 1024"),
    (lambda x: roi_align3d(x, BOX, 2, sampling_ratio=3 * 10**9), ValueError, "sampling_ratio must be at most 1024"),
    (lambda x: roi_align3d(x, BOX, (2**31, 1)), ValueError, r"output_size must be at most 2147483647"),
    (lambda x: roi_align3d(x[..., :0], BOX, 2), ValueError, "height and width must be positive"),
    (lambda x: roi_align3d(x, BOX.to("meta"), 2), ValueError, "boxes is on meta"),
])
def test_bad_input(call, exc, match):
    x = torch.randn(2, 2, 3, 6, 6)
    with pytest.raises(exc, match=match):
        call(x)


def test_direct_op_call_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="rois must be"):
        torch.ops.stssa.roi_align3d(torch.randn(1, 1, 2, 4, 4), torch.zeros(1, 4), 1.0, 2, 2, -1, False)
    with pytest.raises(RuntimeError, match=r"output_size must be in \[1, 2147483647\], got \(0, 2\)"):
        torch.ops.stssa.roi_align3d(torch.randn(1, 1, 2, 4, 4), torch.zeros(1, 5), 1.0, 0, 2, -1, False)
    # int arguments past int's range or a sample grid whose count overflows int: errors, not wrapped values
    x0 = torch.randn(1, 0, 2, 4, 4)  # no channels: the output would be empty, the arguments still count
    with pytest.raises(RuntimeError, match=r"output_size must be in \[1, 2147483647\], got \(4294967298, 1\)"):
        torch.ops.stssa.roi_align3d(x0, torch.zeros(1, 5), 1.0, 2**32 + 2, 1, -1, False)
    with pytest.raises(RuntimeError, match="sampling_ratio must be at most 1024 samples per bin side, got 46341"):
        torch.ops.stssa.roi_align3d(x0, torch.zeros(1, 5), 1.0, 2, 2, 46341, False)
    with pytest.raises(RuntimeError, match="_roi_align3d_backward: sampling_ratio must be at most 1024"):
        torch.ops.stssa._roi_align3d_backward(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 5), 1.0, 2, 2, 1, 1, 2, 4, 4,
                                              2000, False, False, False)


def test_unchecked_bad_batch_index_gives_nan_not_garbage():
    # What torch.compile'd code gets, where the wrapper's data-dependent checks are skipped.
    out = torch.ops.stssa.roi_align3d(torch.randn(1, 2, 2, 4, 4), torch.tensor([[3.0, 0, 0, 2, 2]]), 1.0, 2, 2, -1, False)
    assert torch.isnan(out).all()


# --- property-based ---------------------------------------------------------------------------------

@needs_tv
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3), c=st.integers(1, 4), t=st.integers(1, 4), h=st.integers(1, 12), w=st.integers(1, 12),
    k=st.integers(0, 6), ph=st.integers(1, 4), pw=st.integers(1, 4), sampling_ratio=st.integers(-1, 3),
    aligned=st.booleans(), per_frame=st.booleans(), scale=st.sampled_from([1.0, 0.5, 1 / 16]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torchvision(n, c, t, h, w, k, ph, pw, sampling_ratio, aligned, per_frame, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, t, h, w, dtype=torch.float64, generator=gen, requires_grad=True)
    boxes = make_boxes(k, n, h, w, scale, gen, per_frame_t=t if per_frame else None)
    out = roi_align3d(x, boxes, (ph, pw), scale, sampling_ratio, aligned)
    xr = x.detach().clone().requires_grad_()
    ref = roi_align3d_ref(xr, boxes, (ph, pw), scale, sampling_ratio, aligned)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-12)


# --- CUDA ----------------------------------------------------------------------------------------------

@needs_tv
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("per_frame", [False, True])
def test_cuda_matches_torchvision(dtype, layout, per_frame):
    gen = torch.Generator().manual_seed(20)
    n, c, t, h, w = 3, 37, 5, 16, 15
    x64 = torch.randn(n, c, t, h, w, dtype=torch.float64, generator=gen)
    boxes = make_boxes(11, n, h, w, 1 / 16, gen, per_frame_t=t if per_frame else None)
    ref64 = roi_align3d_ref(x64, boxes, 7, 1 / 16, -1, True)
    x = x64.to("cuda", dtype)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    bdev = boxes.to("cuda", torch.float64 if dtype == torch.float64 else torch.float32)
    out = roi_align3d(x, bdev, 7, 1 / 16, -1, True)
    base = ref64.to(dtype) if dtype in (torch.float16, torch.bfloat16) else \
        roi_align3d_ref(x64.to("cuda", dtype), bdev, 7, 1 / 16, -1, True)
    assert_within_rule(out.cpu(), ref64, base.cpu(), floor=torch.finfo(dtype).eps)
    # backward: atomic (default) and deterministic kernels vs float64
    g64 = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    xr = x64.clone().requires_grad_()
    roi_align3d_ref(xr, boxes, 7, 1 / 16, -1, True).backward(g64)
    grads = []
    for det in (False, True, True):
        torch.use_deterministic_algorithms(det)
        try:
            xg = x.detach().requires_grad_()
            roi_align3d(xg, bdev, 7, 1 / 16, -1, True).backward(g64.to("cuda", dtype))
            grads.append(xg.grad.cpu())
        finally:
            torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[1], grads[2])
    tol = 64 * torch.finfo(dtype).eps * max(1.0, xr.grad.abs().max().item())
    for gr in grads:
        assert err(gr, xr.grad) <= tol


@gpu
@pytest.mark.gpu
def test_cuda_autocast_and_compile():
    x = torch.randn(2, 3, 4, 16, 16, device="cuda")
    conv = torch.nn.Conv3d(3, 8, 1).cuda()
    boxes = torch.tensor([[0.0, 10, 20, 150, 200], [1.0, 0, 0, 255, 255]], device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = roi_align3d(conv(x), boxes, 7, 1 / 16, -1, True)
    assert out.dtype == torch.float16
    f = torch.compile(lambda a, b: roi_align3d(a, b, 7, 1 / 16, 2, True), fullgraph=True)
    torch.testing.assert_close(f(x, boxes), roi_align3d(x, boxes, 7, 1 / 16, 2, True))


@needs_tv
@gpu
@pytest.mark.gpu
def test_cuda_64bit_indexing():
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs ~10 GB of free GPU memory")
    # N*C*T*H*W = 2^31 + ...: offsets of the last clip pass int32.
    x = torch.empty(9, 1024, 16, 128, 128, dtype=torch.float16, device="cuda")
    x[-1].normal_()
    boxes = torch.tensor([[8.0, 3.0, 5.0, 100.0, 90.0]], device="cuda")
    out = roi_align3d(x, boxes, 7, 1.0, 2, True)
    ref = torchvision.ops.roi_align(x[-1].float().transpose(0, 1).contiguous(), boxes.clone().index_fill_(1, torch.tensor([0], device="cuda"), 0),
                                    7, 1.0, 2, True)
    torch.testing.assert_close(out[0].transpose(0, 1).float(), ref, atol=2e-3, rtol=2e-3)
    assert math.isfinite(out.float().sum().item())


def _roi_benchmark():
    from _samples import benchmark_module
    return benchmark_module("roi_align3d")


@pytest.mark.parametrize("argv,says", [
    (["--pause-probe", "ava_t8"], "SHAPE:BOXES"), (["--pause-probe", "nope:far"], "SHAPE:BOXES"),
    (["--pause-probe", "ava_t8:far", "--pause-s", "-1"], "--pause-s")])
def test_benchmark_pause_probe_rejects_bad_arguments(argv, says, capsys):
    with pytest.raises(SystemExit):
        _roi_benchmark().main(["--device", "cpu", *argv])
    assert says in capsys.readouterr().err


def test_benchmark_floors_count_pixels_and_cache_lines():
    """benchmarks/roi_align3d.py's memory floors: unique pixels under the boxes (+1 bilinear neighbour)
    and the same in whole 64-byte lines (a 16-pixel fp32 row is one line), both plus the output."""
    B = _roi_benchmark()
    # image box (8, 8)-(24, 24) at scale 1/16 covers map pixels [0, 1] (+1 neighbour): a 3 x 3 patch
    boxes = torch.tensor([[0.0, 8.0, 8.0, 24.0, 24.0]])
    shape = (1, 2, 3, 16, 16)  # N, C, T, H, W
    out = 1 * 2 * 3 * B.OUT * B.OUT * 4
    assert B.floor_bytes(boxes, shape, 4) == 9 * 2 * 3 * 4 + out
    assert B.line_floor_bytes(boxes, shape, 4) == 3 * 64 * 2 * 3 + out  # 3 rows, one line each
    # a box spanning both halves of a 32-pixel row touches two lines per row
    wide = torch.tensor([[0.0, 8.0, 8.0, 400.0, 24.0]])
    assert B.line_floor_bytes(wide, (1, 1, 1, 16, 32), 4) == 3 * 2 * 64 + B.OUT * B.OUT * 4


@needs_tv
@pytest.mark.parametrize("t,k,dtype", [(8, 90, torch.float32), (8, 90, torch.float64), (700, 3, torch.float32)])
def test_many_boxes_or_frames_per_clip_match_torchvision(t, k, dtype):
    # the planar forward buffers a clip's results for all frames in groups of boxes (1 MiB of fp32 per
    # thread): more boxes than one group (t=8: 41 per group) or frames than fit one box (t=700: groups of 1)
    gen = torch.Generator().manual_seed(40 + t + k)
    n, c, h, w = 2, 17, 8, 8
    x = torch.randn(n, c, t, h, w, dtype=torch.float64, generator=gen)
    boxes = make_boxes(k, n, h, w, 1 / 16, gen)
    boxes[: k // 2, 0] = 0  # most boxes in one clip
    ref = roi_align3d_ref_loop(x, boxes, 7, 1 / 16, -1, True)
    out = roi_align3d(x.to(dtype), boxes.to(dtype), 7, 1 / 16, -1, True)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    else:
        base = roi_align3d_ref_loop(x.float(), boxes.float(), 7, 1 / 16, -1, True)
        assert_within_rule(out, ref, base, 1e-6)


def test_forward_mode_ad_is_a_clear_error():
    """No forward formula: an error, not the zero tangents (func.jvp) or None (forward_ad) it gave."""
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(1, 2, 2, 6, 6, dtype=torch.float64)
    b = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]], dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="roi_align3d: forward-mode AD"):
        torch.func.jvp(lambda a: roi_align3d(a, b, 2), (x,), (torch.randn_like(x),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="roi_align3d: forward-mode AD"):
        roi_align3d(fwAD.make_dual(x, torch.randn_like(x)), b, 2)


@needs_tv
def test_samples_exactly_on_the_map_edge_are_kept():
    """A sample torchvision places exactly on -1 (or on H/W) is in range: computing it as start + (i + 0.5)
    * (bin / grid) put it an ulp outside and dropped it (bin (1, 1): 5.33 instead of 10.67). Then a sweep
    of AVA-like integer boxes at stride 16 with odd sampling grids, fp32, forward and backward."""
    x = (torch.arange(25.0) + 1).reshape(1, 1, 1, 5, 5)
    rois = torch.tensor([[0, -48.0, -16.0, 32.0, 128.0]])
    xr = x.clone().requires_grad_()
    out = roi_align3d(xr, rois, 3, 1 / 16, 3, True)
    xt = x[:, :, 0].clone().requires_grad_()
    ref = torchvision.ops.roi_align(xt, rois, 3, 1 / 16, 3, True)
    torch.testing.assert_close(out[:, :, 0], ref, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), xr)[0][:, :, 0], torch.autograd.grad(ref.sum(), xt)[0],
                               rtol=0, atol=2 ** -23)
    gen = torch.Generator().manual_seed(8)
    feats = torch.randn(2, 3, 1, 16, 16, generator=gen)
    xy = torch.randint(-32, 256, (400, 2), generator=gen).float()
    wh = torch.randint(8, 200, (400, 2), generator=gen).float()
    boxes = torch.cat([torch.randint(0, 2, (400, 1), generator=gen).float(), xy, xy + wh], 1)
    for sr in (3, 5, 6):
        a = feats.clone().requires_grad_()
        o = roi_align3d(a, boxes, 7, 1 / 16, sr, True)
        o64 = roi_align3d_ref(feats.double(), boxes.double(), 7, 1 / 16, sr, True)
        base = torchvision.ops.roi_align(feats[:, :, 0], boxes, 7, 1 / 16, sr, True)[:, :, None]
        assert_within_rule(o.detach(), o64, base, floor=1e-6)


def test_unsampled_inf_pixels_do_not_reach_the_output():
    """Pixels between sparse samples have zero weight in a bin's band: 0 * inf must not make NaN
    (torchvision reads per sample and never touches them)."""
    x = torch.ones(1, 2, 1, 16, 16)
    x[..., 8, 8] = float("inf")  # samples at 4 and 12 with sampling_ratio 2 over a 16-pixel bin
    box = torch.tensor([[0, 0.0, 0.0, 16.0, 16.0]])
    for xx in (x, x.contiguous(memory_format=torch.channels_last_3d), x.half()):
        out = roi_align3d(xx, box, 1, 1.0, 2, False)
        torch.testing.assert_close(out.float(), torch.ones(1, 2, 1, 1, 1))
    # the backward likewise: a NaN output gradient reaches the sampled pixels only
    g = torch.full((1, 2, 1, 1, 1), float("nan"))
    g_in = torch.ops.stssa._roi_align3d_backward(g, box, 1.0, 1, 1, 1, 2, 1, 16, 16, 2, False, False, False)
    assert torch.isnan(g_in[..., 4, 4]).all() and (g_in[..., 8, 8] == 0).all() and (g_in[..., 0, 0] == 0).all()
