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
from stssa_kernels import TemporalProjection, temporal_proj
from stssa_kernels.ops import temporal_proj as tp_ops
from stssa_kernels.ops.temporal_proj import pack_biases, pack_weights, route, select_backend, use_backend
from stssa_kernels.reference import temporal_proj_ref

CPU_BACKENDS = ["gemm", "conv", "conv_kt"]


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """The tensors here are tiny: one intra-op thread avoids OpenMP hand-off costs that dominate (and,
    on a busy 2-core machine, multiply by 100x) every small CPU conv/GEMM."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
STSSA_KT = [7, 7, 7, 1, 1, 1]  # slow q, k, v (7x1x1) and fast q, k, v (1x1x1)


def make(B=2, C=5, T=4, H=3, W=2, out_channels=(4,), kernel_sizes=(3,), bias=None, dtype=torch.float32,
         device="cpu", seed=0):
    """x [B, C, T, H, W], weights [N_i, C, kt_i, 1, 1] (unit-variance outputs), biases (bias[i] False: None)."""
    bias = (True,) * len(out_channels) if bias is None else bias
    assert len(bias) == len(out_channels) == len(kernel_sizes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, H, W, generator=g, dtype=torch.float64)
    ws = [torch.randn(n, C, k, 1, 1, generator=g, dtype=torch.float64) / (C * k) ** 0.5
          for n, k in zip(out_channels, kernel_sizes)]
    bs = [torch.randn(n, generator=g, dtype=torch.float64) if b else None for n, b in zip(out_channels, bias)]
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), [cast(w) for w in ws], [cast(b) for b in bs]


def f64(ts):
    return [None if t is None else t.detach().double() for t in ts]


def assert_rule(out, ref64, torch_lp, what=""):
    """|out - ref64| <= 2 |torch_lp - ref64| + floor (max norms), floor = 4 ulp of the output scale."""
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    base = (torch_lp.double() - ref64).abs().max().item() if out.numel() else 0.0
    scale = ref64.abs().max().item() if out.numel() else 0.0
    floor = 4 * torch.finfo(out.dtype).eps * max(scale, 1e-30)
    assert err <= 2 * base + floor, f"{what}: error {err:.3g} > 2 x torch's {base:.3g} + floor {floor:.3g}"


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
        ("packed op weight", lambda: torch.ops.stssa.temporal_proj(x, torch.randn(9, 5), None, [4], [3]), ValueError,
         r"weight must be the packed \[sum kt_i\*C_out_i, C\] = \[12, 5\]"),
        ("packed op even kt", lambda: torch.ops.stssa.temporal_proj(x, torch.randn(8, 5), None, [4], [2]), ValueError,
         r"kernel_sizes must be odd"),
        ("module even kt", lambda: TemporalProjection(5, [4], [4]), ValueError, r"kernel_sizes must be odd"),
        ("backend name", lambda: use_backend("cudnn").__enter__(), ValueError, r"unknown backend 'cudnn'"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    _, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


# ------------------------------------------------------------------------------------------------
# torch.library integration
# ------------------------------------------------------------------------------------------------
def test_opcheck():
    x, ws, bs = make(C=3, T=3, H=2, W=2, out_channels=(2, 3), kernel_sizes=(3, 1), bias=(True, False))
    wp, bp = pack_weights(ws), pack_biases(bs, ws)
    args = (x.requires_grad_(), wp.detach().requires_grad_(), bp.detach().requires_grad_(), [2, 3], [3, 1])
    torch.library.opcheck(torch.ops.stssa.temporal_proj.default, args)
    gy = torch.randn(2, 3, 2, 2, 5)
    torch.library.opcheck(torch.ops.stssa._temporal_proj_backward.default,
                          (gy, x.detach(), wp.detach(), [2, 3], [3, 1], [True, False, True]))


def test_compile_fullgraph():
    """fullgraph capture of validation, packing, the op, its fake kernel, the backward op and the
    split into views (aot_eager: the same graphs inductor gets, without its C++ build time)."""
    x, ws, bs = make(C=4, T=5, out_channels=(3, 4, 2), kernel_sizes=(7, 1, 3), bias=(True, False, True))
    fn = torch.compile(lambda x, ws, bs: temporal_proj(x, ws, bs), fullgraph=True, backend="aot_eager")
    xs = x.clone().requires_grad_()
    out = fn(xs, ws, bs)
    for o, r in zip(out, temporal_proj_ref(x, ws, bs)):
        torch.testing.assert_close(o, r)
    sum((o * (i + 1)).sum() for i, o in enumerate(out)).backward()
    x2 = x.clone().requires_grad_()
    sum((o * (i + 1)).sum() for i, o in enumerate(temporal_proj_ref(x2, ws, bs))).backward()
    torch.testing.assert_close(xs.grad, x2.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eager_path_matches_registered_op(backend):
    """Plain eager calls skip the custom_op wrappers (one autograd.Function over the same
    implementations); outputs and every gradient equal the registered op's bit for bit."""
    x, ws, bs = make(C=6, T=5, out_channels=(3, 4, 2), kernel_sizes=(7, 1, 3), bias=(True, False, True))
    oc, ks = [3, 4, 2], [7, 1, 3]
    gy = torch.randn(2, 5, 3, 2, 9, generator=torch.Generator().manual_seed(2))
    runs = []
    with use_backend(backend):
        for eager in (True, False):
            leaves = [t.detach().clone().requires_grad_() for t in (x, pack_weights(ws), pack_biases(bs, ws))]
            if eager:
                y = tp_ops._TemporalProjFunction.apply(*leaves, oc, ks)
                assert tp_ops.plain_eager(leaves)
            else:
                y = torch.ops.stssa.temporal_proj(*leaves, oc, ks)
            y.backward(gy)
            runs.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_eager_path_only_where_nothing_else_looks(monkeypatch):
    calls = []
    real = tp_ops._TemporalProjFunction.apply
    monkeypatch.setattr(tp_ops._TemporalProjFunction, "apply", lambda *a: calls.append(1) or real(*a))
    x, ws, bs = make(C=4, T=3, out_channels=(2, 2), kernel_sizes=(3, 1))
    expect = temporal_proj(x, ws, bs)
    assert len(calls) == 1
    with torch.device("cpu"):  # a TorchFunctionMode
        for o, e in zip(temporal_proj(x, ws, bs), expect):
            torch.testing.assert_close(o, e)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert temporal_proj(x, ws, bs)[0].dtype == torch.bfloat16  # the op's autocast rule ran
    assert len(calls) == 1


def test_eager_double_backward_names_the_op():
    x, ws, bs = make(C=4, T=3, out_channels=(2,), kernel_sizes=(3,))
    x.requires_grad_()
    (dx,) = torch.autograd.grad(temporal_proj(x, ws, bs)[0].square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="_temporal_proj_backward"):
        dx.sum().backward()


def test_autocast_cpu_bf16():
    """Under CPU autocast the op runs in bf16 like conv3d does, and grads reach the fp32 leaves."""
    x, ws, bs = make(C=8, T=6, out_channels=(8, 16), kernel_sizes=(7, 1), bias=(True, True))
    ws = [w.requires_grad_() for w in ws]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = temporal_proj(x, ws, bs)
        lp = temporal_proj_ref(x, ws, bs)
    ref = temporal_proj_ref(x.double(), f64(ws), f64(bs))
    for o, l, r in zip(out, lp, ref):
        assert o.dtype == l.dtype == torch.bfloat16
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


def test_dispatch_table():
    assert select_backend(torch.zeros(1, 16, 2, 1, 1), [16]).backend == "gemm"  # CPU, 1 thread (fixture)
    assert route("cpu", 0, torch.float32, True, False, threads=1).backend == "gemm"
    assert route("cpu", 0, torch.float32, True, False, threads=2).backend == "conv_kt"
    assert route("cpu", 0, torch.float32, True, True).backend == "triton"
    assert route("cpu", 0, torch.bfloat16, True, True).backend == "gemm"  # interpreter has no bf16
    assert route("cuda", 75, torch.float16, True, False).backend == "conv_kt"  # sm_75: tl.dot -> FFMA
    assert route("cuda", 80, torch.float16, True, False).backend == "triton"
    assert route("cuda", 90, torch.bfloat16, True, False).backend == "triton"
    assert route("cuda", 90, torch.bfloat16, False, False).backend == "gemm"  # unaligned channels
    assert route("cuda", 90, torch.float32, True, False).backend == "gemm"
    for r in tp_ops.DISPATCH:
        assert r.why, "every table row says why"


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
    cc = tp_ops._cc(torch.device("cuda"))
    return (["triton"] if cc >= 80 and tp_ops._tk is not None else []) + ["gemm", "conv", "conv_kt"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
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
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_dispatch_and_channels_last():
    x, ws, bs = make(B=2, C=64, T=4, H=3, W=3, out_channels=(32, 48), kernel_sizes=(7, 1), dtype=torch.float16,
                     device="cuda")
    expect = "triton" if tp_ops._cc(x.device) >= 80 and tp_ops._tk is not None else "conv_kt"
    assert select_backend(x, [32, 48]).backend == expect
    check_forward(x.contiguous(memory_format=torch.channels_last_3d), ws, bs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = temporal_proj(x.float(), [w.float() for w in ws], [b.float() for b in bs])
    assert all(o.dtype == torch.bfloat16 for o in out)
