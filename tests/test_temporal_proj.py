"""Tests of ``stssa_kernels.temporal_proj`` (fused temporal Q/K/V projections).

Reference: ``temporal_proj_ref`` (one ``F.conv3d`` per projection) in float64. Tolerance rule: the
op's error against float64 must be at most twice the error of the same computation done by PyTorch in
the op's precision (``F.conv3d`` in that dtype), plus a rounding floor of a few ulps of the output
scale. The Triton kernels are tested on CPU tensors in ``test_temporal_proj_interpret.py``
(TRITON_INTERPRET=1) and on a GPU by the ``gpu`` tests here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import stssa_kernels
from _numerics import assert_by_rule
from _samples import STSSA_KT, StssaOpLog, temporal_proj_inputs, temporal_proj_sample_inputs
from stssa_kernels import TemporalProjection, temporal_proj
from stssa_kernels.ops import temporal_proj as tp_ops
from stssa_kernels.reference import temporal_proj_ref

use_backend = tp_ops.DISPATCH.force

CPU_BACKENDS = ["gemm", "conv", "conv_kt"]


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """The tensors here are tiny: one intra-op thread avoids OpenMP hand-off costs that dominate (and,
    on a busy 2-core machine, multiply by 100x) every small CPU conv/GEMM."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
make = temporal_proj_inputs


def f64(ts):
    return [None if t is None else t.detach().double() for t in ts]


def assert_rule(out, ref64, torch_lp, what=""):
    assert_by_rule(out, ref64, torch_lp, what)


def check_forward(x, ws, bs):
    """The op vs float64 reference by the rule, and its documented output layout."""
    out = temporal_proj(x, ws, bs)
    ref = temporal_proj_ref(x.double(), f64(ws), f64(bs) if bs is not None else None)
    lp = temporal_proj_ref(x, ws, bs)
    ntot = sum(w.shape[0] for w in ws)
    for i, (o, r, l) in enumerate(zip(out, ref, lp)):
        assert o.shape == r.shape and o.dtype == x.dtype
        assert_rule(o, r, l, f"out[{i}]")
        B, N, T, H, W = o.shape
        assert o.stride() == (T * H * W * ntot, 1, H * W * ntot, W * ntot, ntot), "channels-last packed layout"
    return out


def check_backward(x, ws, bs, seed=1):
    """Gradients of x, every weight and every bias vs float64 autograd of the reference, by the rule."""
    leaves = lambda x, ws, bs: [x] + list(ws) + [b for b in bs if b is not None]  # noqa: E731
    xs, wss, bss = x.detach().requires_grad_(), [w.detach().requires_grad_() for w in ws], \
        [None if b is None else b.detach().requires_grad_() for b in bs]
    out = temporal_proj(xs, wss, bss)
    g = torch.Generator().manual_seed(seed)
    gys = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(x.device) for o in out]
    grads = torch.autograd.grad(out, leaves(xs, wss, bss), [gy.to(x.dtype) for gy in gys])

    x64 = x.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in ws]
    b64 = [None if b is None else b.detach().double().requires_grad_() for b in bs]
    ref = torch.autograd.grad(temporal_proj_ref(x64, w64, b64), leaves(x64, w64, b64), gys)

    xl, wl, bl = x.detach().requires_grad_(), [w.detach().requires_grad_() for w in ws], \
        [None if b is None else b.detach().requires_grad_() for b in bs]
    lp = torch.autograd.grad(temporal_proj_ref(xl, wl, bl), leaves(xl, wl, bl), [gy.to(x.dtype) for gy in gys])
    names = ["x"] + [f"weights[{i}]" for i in range(len(ws))] + [f"biases[{i}]" for i, b in enumerate(bs) if b is not None]
    for name, a, r, l in zip(names, grads, ref, lp):
        assert a.shape == r.shape and a.dtype == x.dtype, name
        assert_rule(a, r, l, f"grad {name}")


# ------------------------------------------------------------------------------------------------
# Equivalence with F.conv3d
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("kt", [1, 3, 7])
def test_single_projection_matches_conv3d(T, kt):
    x, ws, bs = make(T=T, out_channels=(6,), kernel_sizes=(kt,))
    check_forward(x, ws, bs)
    check_backward(x, ws, bs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 5])
def test_stssa_mix_float64_exact(backend, T):
    """Three 7-tap + three 1-tap projections of different widths, some without bias, in float64:
    every backend equals the reference to rounding (T < 7 makes taps all-padding)."""
    x, ws, bs = make(C=7, T=T, out_channels=(5, 3, 9, 4, 1, 6), kernel_sizes=STSSA_KT,
                     bias=(True, False, True, True, False, True), dtype=torch.float64)
    with use_backend(backend):
        out = temporal_proj(x, ws, bs)
    for o, r in zip(out, temporal_proj_ref(x, ws, bs)):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixed_kernel_sizes_by_rule(backend, dtype):
    x, ws, bs = make(B=3, C=9, T=8, H=4, W=3, out_channels=(8, 8, 12, 8, 8, 12), kernel_sizes=STSSA_KT,
                     bias=(True, True, True, False, True, True), dtype=dtype)
    with use_backend(backend):
        check_forward(x, ws, bs)
        check_backward(x, ws, bs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kernel_sizes", [(1, 3, 7), (3, 3), (5, 1, 5), (7,)])
def test_interleaved_kernel_sizes(backend, kernel_sizes):
    """Projections sharing a tap or a kernel size are not always consecutive columns (the GEMM path
    splits tap runs, conv_kt gathers and scatters groups)."""
    oc = tuple(3 + i for i in range(len(kernel_sizes)))
    x, ws, bs = make(C=4, T=6, out_channels=oc, kernel_sizes=kernel_sizes, bias=(True, False, True)[:len(oc)])
    with use_backend(backend):
        check_forward(x, ws, bs)
        check_backward(x, ws, bs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    x, ws, bs = make(B=2, C=3, T=3, H=2, W=1, out_channels=(2, 3, 2), kernel_sizes=(7, 1, 3),
                     bias=(True, False, True), dtype=torch.float64)
    leaves = [x] + ws + [bs[0], bs[2]]
    leaves = [t.requires_grad_() for t in leaves]

    def fn(x, w0, w1, w2, b0, b2):
        return tuple(temporal_proj(x, [w0, w1, w2], [b0, None, b2]))

    with use_backend(backend):
        assert torch.autograd.gradcheck(fn, leaves)


def test_bias_none_and_partial_grads():
    """biases=None, and grads requested only for some inputs (output_mask of the backward op)."""
    x, ws, _ = make(out_channels=(4, 5), kernel_sizes=(3, 1), bias=(False, False))
    out = temporal_proj(x, ws)
    for o, r in zip(out, temporal_proj_ref(x, ws)):
        torch.testing.assert_close(o, r)
    w = ws[0].clone().requires_grad_()
    out = temporal_proj(x, [w, ws[1]])
    (gw,) = torch.autograd.grad(sum(o.sum() for o in out), [w])
    (gw_ref,) = torch.autograd.grad(sum(o.sum() for o in temporal_proj_ref(x, [w, ws[1]])), [w])
    torch.testing.assert_close(gw, gw_ref)


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------
def _layouts(x):
    big = torch.randn(x.shape[0], x.shape[1] * 2, x.shape[2] + 1, x.shape[3], x.shape[4] + 2, dtype=x.dtype)
    sliced = big[:, ::2, 1:, :, 1:-1]
    sliced.copy_(x)
    cl_big = torch.randn(x.shape[0], x.shape[2], x.shape[3], x.shape[4] * 2, x.shape[1], dtype=x.dtype)
    cl_sliced = cl_big[:, :, :, ::2].permute(0, 4, 1, 2, 3)  # channel stride 1, other strides odd
    cl_sliced.copy_(x)
    return {
        "contiguous": x.contiguous(),
        "channels_last_3d": x.contiguous(memory_format=torch.channels_last_3d),
        "sliced": sliced,
        "channels_last_sliced": cl_sliced,
        "transposed_hw": x.transpose(3, 4).contiguous().transpose(3, 4),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "sliced", "channels_last_sliced", "transposed_hw"])
def test_input_layouts(backend, layout):
    x, ws, bs = make(C=6, T=5, H=3, W=4, out_channels=(4, 5), kernel_sizes=(7, 1), bias=(True, False))
    xv = _layouts(x)[layout]
    assert torch.equal(xv, x)
    with use_backend(backend):
        check_forward(xv, ws, bs)
        check_backward(xv, ws, bs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dims", [dict(B=0), dict(C=0), dict(T=0), dict(H=0), dict(W=0), dict(B=0, T=0)],
                         ids=lambda d: ",".join(f"{k}=0" for k in d))
def test_empty_inputs(backend, dims):
    """A zero-size x gives outputs of the conv3d shape (T frames in, T out; conv3d itself rejects T = 0
    and H/W = 0 with these paddings): biases broadcast where C = 0, zero weight gradients, and the bias
    gradient the sum of the output gradient. The ops pass opcheck there too."""
    x, ws, bs = make(**{"B": 2, "C": 5, "T": 4, "H": 3, "W": 2, **dims}, out_channels=(4, 3), kernel_sizes=(7, 1),
                     bias=(True, False))
    B, C, T, H, W = x.shape
    with use_backend(backend):
        xs, wss, bss = x.requires_grad_(), [w.requires_grad_() for w in ws], [None if b is None else b.requires_grad_() for b in bs]
        out = temporal_proj(xs, wss, bss)
        assert [tuple(o.shape) for o in out] == [(B, 4, T, H, W), (B, 3, T, H, W)]
        torch.testing.assert_close(out[0], bs[0].view(1, 4, 1, 1, 1).expand(B, 4, T, H, W), rtol=0, atol=0)
        torch.testing.assert_close(out[1], torch.zeros(B, 3, T, H, W), rtol=0, atol=0)
        gys = [torch.randn(o.shape) for o in out]
        gx, gw0, gw1, gb0 = torch.autograd.grad(out, [xs, *wss, bss[0]], gys)
    assert gx.shape == x.shape
    torch.testing.assert_close(gw0, torch.zeros_like(ws[0]), rtol=0, atol=0)
    torch.testing.assert_close(gw1, torch.zeros_like(ws[1]), rtol=0, atol=0)
    torch.testing.assert_close(gb0, gys[0].sum((0, 2, 3, 4)))
    if x.numel() == 0:
        torch.library.opcheck(torch.ops.stssa.temporal_proj.default, (x.detach(), [w.detach() for w in ws],
                                                                          [None if b is None else b.detach() for b in bs]))


@pytest.mark.parametrize("T, kt", [(2, 3), (2, 7), (3, 5), (6, 7)])
def test_bf16_cpu_kernel_longer_than_the_clip(T, kt):
    """CPU bf16 with kt > T runs the tap GEMMs: oneDNN's bf16 conv3d weight gradient is NaN or far off
    there. The baseline of the error rule is PyTorch's bf16 conv3d with oneDNN off, which is right."""
    x, ws, bs = make(B=5, C=64, T=T, H=7, W=7, out_channels=(8, 8), kernel_sizes=(kt, 1), dtype=torch.bfloat16)
    assert tp_ops.select(x, [8, 8], [kt, 1]).backend == "gemm"
    leaves = lambda x, ws, bs: [x, *ws, *[b for b in bs if b is not None]]  # noqa: E731
    g = torch.Generator().manual_seed(4)
    gys = [torch.randn((5, 8, T, 7, 7), generator=g, dtype=torch.float64) for _ in ws]

    def grads(fn, dtype, mkldnn=True):
        xs = x.detach().to(dtype).requires_grad_()
        wss = [w.detach().to(dtype).requires_grad_() for w in ws]
        bss = [b.detach().to(dtype).requires_grad_() for b in bs]
        with torch.backends.mkldnn.flags(enabled=mkldnn):
            out = fn(xs, wss, bss)
            return out, torch.autograd.grad(out, leaves(xs, wss, bss), [gy.to(dtype) for gy in gys])

    out, ours = grads(temporal_proj, torch.bfloat16)
    ref_out, ref = grads(temporal_proj_ref, torch.float64)
    lp_out, lp = grads(temporal_proj_ref, torch.bfloat16, mkldnn=False)
    for i, (o, r, l) in enumerate(zip(out, ref_out, lp_out)):
        assert_rule(o, r, l, f"out[{i}]")
    for name, a, r, l in zip(["x", "w0", "w1", "b0", "b1"], ours, ref, lp):
        assert torch.isfinite(a).all(), name
        assert_rule(a, r, l, f"grad {name}")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def _bad_cases():
    x, ws, bs = make(C=5, out_channels=(4, 3), kernel_sizes=(3, 1))
    w_even = torch.randn(4, 5, 2, 1, 1)
    return [
        ("even kt", lambda: temporal_proj(x, [ws[0], w_even]), ValueError, r"weights\[1\].*even temporal kernel size kt=2"),
        ("mismatched C", lambda: temporal_proj(x, [torch.randn(4, 6, 3, 1, 1)]), ValueError,
         r"weights\[0\] has 6 input channels.*C=5"),
        ("x rank", lambda: temporal_proj(x[0], ws), ValueError, r"x must be a 5-D tensor"),
        ("weight rank", lambda: temporal_proj(x, [ws[0][..., 0]]), ValueError, r"weights\[0\] must have shape \[C_out, C, kt, 1, 1\]"),
        ("spatial kernel", lambda: temporal_proj(x, [torch.randn(4, 5, 3, 3, 1)]), ValueError, r"weights\[0\].*temporal-only"),
        ("empty weights", lambda: temporal_proj(x, []), TypeError, r"weights must be a non-empty list"),
        ("weights not list", lambda: temporal_proj(x, ws[0]), TypeError, r"weights must be a non-empty list"),
        ("bias length", lambda: temporal_proj(x, ws, [bs[0], torch.randn(4)]), ValueError, r"biases\[1\] must have shape \[3\]"),
        ("biases count", lambda: temporal_proj(x, ws, [bs[0]]), ValueError, r"biases must be None or a list.*got 1 for 2"),
        ("device", lambda: temporal_proj(x, [ws[0].to("meta")]), ValueError, r"weights\[0\] is on meta but x is on cpu"),
        ("bias device", lambda: temporal_proj(x, ws, [bs[0].to("meta"), None]), ValueError, r"biases\[0\] is on meta"),
        ("dtype", lambda: temporal_proj(x, [ws[0].double()]), TypeError, r"weights\[0\] has dtype torch.float64 but x has torch.float32"),
        ("int x", lambda: temporal_proj(x.long(), ws), TypeError, r"x must be fp16, bf16, fp32 or fp64"),
        ("no out channels", lambda: temporal_proj(x, [torch.randn(0, 5, 3, 1, 1)]), ValueError, r"weights\[0\] has no output channels"),
        ("op weight", lambda: torch.ops.stssa.temporal_proj(x, [torch.randn(4, 6, 3, 1, 1)], [None]), ValueError,
         r"stssa::temporal_proj: weights\[0\] must be \[C_out > 0, C=5, odd kt, 1, 1\]"),
        ("op even kt", lambda: torch.ops.stssa.temporal_proj(x, [torch.randn(4, 5, 2, 1, 1)], [None]), ValueError,
         r"odd kt"),
        ("module even kt", lambda: TemporalProjection(5, [4], [4]), ValueError, r"kernel_sizes must be odd"),
        ("backend name", lambda: use_backend("cudnn").__enter__(), ValueError, r"unknown backend 'cudnn'"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    _, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


# ------------------------------------------------------------------------------------------------
# torch.library integration: one path, opcheck, compile, autocast
# ------------------------------------------------------------------------------------------------
_SAMPLES = list(temporal_proj_sample_inputs("cpu"))


@pytest.mark.parametrize("sample", _SAMPLES, ids=repr)
@pytest.mark.parametrize("backend", [None] + CPU_BACKENDS)
def test_samples_by_rule(sample, backend):
    x, ws, bs = sample.args
    with use_backend(backend):
        check_forward(x, ws, bs)
        check_backward(x, ws, bs)


@pytest.mark.parametrize("sample", _SAMPLES, ids=repr)
def test_opcheck(sample):
    x, ws, bs = sample.args
    torch.library.opcheck(torch.ops.stssa.temporal_proj.default, (x, ws, bs))
    y = torch.ops.stssa.temporal_proj(x, ws, bs)
    for mask in ([True, True, True], [False, True, False], [True, False, False]):
        torch.library.opcheck(torch.ops.stssa._temporal_proj_backward.default, (torch.randn_like(y), x, ws, mask))


@pytest.mark.parametrize("sample", _SAMPLES[:2], ids=repr)
def test_compile_fullgraph(sample):
    """fullgraph capture of validation, the autograd.Function, both ops' fake kernels and the split into
    views (aot_eager: the same graphs inductor gets, without its C++ build time)."""
    x, ws, bs = sample.args
    fn = torch.compile(lambda x, ws, bs: temporal_proj(x, ws, bs), fullgraph=True, backend="aot_eager")
    xs = x.clone().requires_grad_()
    wsc = [w.clone().requires_grad_() for w in ws]
    out = fn(xs, wsc, bs)
    for o, r in zip(out, temporal_proj_ref(x, ws, bs)):
        torch.testing.assert_close(o, r)
    sum((o * (i + 1)).sum() for i, o in enumerate(out)).backward()
    x2 = x.clone().requires_grad_()
    w2 = [w.clone().requires_grad_() for w in ws]
    sum((o * (i + 1)).sum() for i, o in enumerate(temporal_proj_ref(x2, w2, bs))).backward()
    torch.testing.assert_close(xs.grad, x2.grad)
    for a, b in zip(wsc, w2):
        torch.testing.assert_close(a.grad, b.grad)


def test_one_execution_path():
    """Eager forward and backward run the two registered ops (one autograd.Function connects them)."""
    x, ws, bs = make(C=4, T=3, out_channels=(2, 2), kernel_sizes=(3, 1))
    ws = [w.requires_grad_() for w in ws]
    with StssaOpLog() as log:
        sum(o.sum() for o in temporal_proj(x, ws, bs)).backward()
    assert log.ops == ["temporal_proj", "_temporal_proj_backward"]


def test_double_backward_is_a_clear_error():
    x, ws, bs = make(C=4, T=3, out_channels=(2,), kernel_sizes=(3,))
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(temporal_proj(x, ws, bs)[0].square().sum(), x, create_graph=True)


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_autocast_cpu_follows_the_autocast_dtype(amp):
    """Under CPU autocast the op runs in the current autocast dtype (fp16 or bf16) like conv3d does,
    and grads reach the fp32 leaves in fp32."""
    x, ws, bs = make(C=8, T=6, out_channels=(8, 16), kernel_sizes=(7, 1), bias=(True, True))
    ws = [w.requires_grad_() for w in ws]
    with torch.autocast("cpu", dtype=amp):
        out = temporal_proj(x, ws, bs)
        lp = temporal_proj_ref(x, ws, bs)
    ref = temporal_proj_ref(x.double(), f64(ws), f64(bs))
    for o, l, r in zip(out, lp, ref):
        assert o.dtype == l.dtype == amp
        assert_rule(o, r, l, "autocast out")
    sum(o.float().sum() for o in out).backward()
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in ws)


# ------------------------------------------------------------------------------------------------
# nn.Module and dispatch
# ------------------------------------------------------------------------------------------------
def test_module_matches_conv3d_modules():
    torch.manual_seed(0)
    m = TemporalProjection(6, [4, 4, 6, 4, 4, 6], STSSA_KT)
    convs = [torch.nn.Conv3d(6, n, (k, 1, 1), padding=(k // 2, 0, 0)) for n, k in zip(m.out_channels, m.kernel_sizes)]
    with torch.no_grad():
        for c, w, b in zip(convs, m.weights, m.biases):
            c.weight.copy_(w)
            c.bias.copy_(b)
            bound = 1 / (6 * w.shape[2]) ** 0.5  # Conv3d's init bounds
            assert w.abs().max() <= bound and b.abs().max() <= bound
    x = torch.randn(2, 6, 5, 3, 3)
    for o, c in zip(m(x), convs):
        torch.testing.assert_close(o, c(x))
    m.use_fused = False
    for o, c in zip(m(x), convs):
        torch.testing.assert_close(o, c(x))
    assert "weights.0" in m.state_dict() and "biases.5" in m.state_dict()
    assert TemporalProjection(6, [4], [3], bias=False).biases is None


def _pick(device, cc, dtype, aligned=True, interpret=False, threads=1, macs=1 << 30, kt_over_t=False):
    return tp_ops.DISPATCH.select(tp_ops.TemporalProjProblem(device, cc, dtype, interpret, aligned, threads,
                                                             macs, kt_over_t)).backend


def test_dispatch_table():
    assert tp_ops.select(torch.zeros(1, 16, 2, 1, 1), [16], [3]).backend == "conv_kt"  # small problem
    assert tp_ops.select(torch.zeros(8, 256, 8, 7, 7), [256], [7]).backend == "gemm"  # CPU, 1 thread (fixture)
    assert _pick("cpu", 0, torch.float32, threads=1, macs=1000) == "conv_kt"
    assert _pick("cpu", 0, torch.float32, threads=1) == "gemm"
    assert _pick("cpu", 0, torch.float32, threads=2) == "conv_kt"
    assert _pick("cpu", 80, torch.bfloat16, interpret=True) == "gemm"  # interpreter has no bf16
    assert _pick("cuda", 75, torch.float16) == "conv_kt"  # sm_75: tl.dot -> FFMA
    assert _pick("cuda", 90, torch.bfloat16, aligned=False) == "gemm"  # unaligned channels
    assert _pick("cuda", 90, torch.float32) == "gemm"
    assert _pick("cpu", 0, torch.bfloat16, threads=2, kt_over_t=True) == "gemm"  # oneDNN bf16 wgrad bug
    assert _pick("cpu", 0, torch.bfloat16, threads=2, kt_over_t=False) == "conv_kt"
    assert _pick("cpu", 0, torch.float16, threads=2, kt_over_t=True) == "conv_kt"
    for r in tp_ops.DISPATCH.rules:
        assert r.why, "every table row says why"
    text = tp_ops.explain(torch.zeros(1, 16, 2, 1, 1), [16], [3], verbose=True)
    assert "rule 0 [triton] skipped: TRITON_INTERPRET=1 is not set" in text


@pytest.mark.skipif(tp_ops._arch.triton_missing("temporal_proj") is not None, reason="needs triton")
def test_dispatch_table_triton():
    assert _pick("cpu", 80, torch.float32, interpret=True) == "triton"
    assert _pick("cuda", 80, torch.float16) == "triton"
    assert _pick("cuda", 90, torch.bfloat16) == "triton"


def test_channel_alignment_predicate():
    x = torch.zeros(1, 16, 2, 1, 1)
    assert tp_ops._aligned(x, [16, 32])
    assert not tp_ops._aligned(x, [16, 8])
    assert not tp_ops._aligned(torch.zeros(1, 24, 2, 1, 1), [16])
    assert stssa_kernels.temporal_proj is temporal_proj


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
def _gpu_backends():
    if not torch.cuda.is_available():
        return []
    cc = tp_ops._arch.capability(torch.device("cuda"))
    return (["triton"] if cc >= 80 and tp_ops._arch.triton_missing("temporal_proj") is None else []) + CPU_BACKENDS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [
    dict(B=2, C=64, T=8, H=7, W=7, out_channels=(32, 32, 64, 32, 32, 64)),      # aligned (Triton on sm_80+)
    dict(B=3, C=33, T=3, H=5, W=3, out_channels=(17, 16, 40, 5, 16, 33)),       # odd: gemm by the table
    dict(B=1, C=256, T=16, H=4, W=4, out_channels=(128, 128, 256, 128, 128, 256)),
])
def test_gpu_backends_by_rule(dtype, shape):
    x, ws, bs = make(kernel_sizes=STSSA_KT, bias=(True, False, True, True, True, False), dtype=dtype,
                     device="cuda", **shape)
    for backend in [None] + _gpu_backends():
        if backend == "triton" and dtype == torch.float32:
            continue  # never dispatched: fp32 goes to cuBLAS
        with use_backend(backend):
            check_forward(x, ws, bs)
            check_backward(x, ws, bs)


@pytest.mark.gpu
def test_gpu_dispatch_and_channels_last():
    x, ws, bs = make(B=2, C=64, T=4, H=3, W=3, out_channels=(32, 48), kernel_sizes=(7, 1), dtype=torch.float16,
                     device="cuda")
    expect = "triton" if tp_ops._arch.capability(x.device) >= 80 else "conv_kt"
    assert tp_ops.select(x, [32, 48], [7, 1]).backend == expect
    check_forward(x.contiguous(memory_format=torch.channels_last_3d), ws, bs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = temporal_proj(x.float(), [w.float() for w in ws], [b.float() for b in bs])
    assert all(o.dtype == torch.bfloat16 for o in out)


def test_forward_mode_ad_is_a_clear_error():
    """No forward formula: an error, not the zero tangents PyTorch gives an op it sees as a constant."""
    x, ws, bs = make(dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="temporal_proj: forward-mode AD"):
        torch.func.jvp(lambda a: temporal_proj(a, ws, bs)[0], (x,), (torch.randn_like(x),))
