"""attention3d: CPU path (PyTorch kernels), registration, dispatch table, errors, GPU checks.

The Triton kernels themselves are tested on CPU tensors in ``test_attention3d_interpret.py``
(TRITON_INTERPRET=1, own process) and on a GPU by the ``gpu``-marked tests below.

Tolerance rule: error(op vs float64) <= 2 * error(PyTorch composition in the same dtype vs float64)
+ a rounding floor of a few ulps of the output's magnitude.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stssa_kernels  # noqa: F401  (registers torch.ops.stssa.*)
from stssa_kernels import Attention3d, SelfAttention3d, attention3d
from stssa_kernels.ops import attention3d as A
from stssa_kernels.reference import attention3d_ref
from stssa_kernels.triton import attention3d as TK

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="CPU-path tests; the interpreter run covers the Triton kernels")

AXES = ("spatial", "temporal", "full")
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}


def _make(shape_q, dv, dtype, layout="contiguous", epilogue=False, device="cpu", seed=0, logit_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    B, Dk, T, H, W = shape_q

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    q, k, v = rnd(B, Dk, T, H, W) * logit_scale, rnd(B, Dk, T, H, W), rnd(B, dv, T, H, W)
    r = rnd(B, dv, T, H, W) if epilogue else None
    gm = torch.tensor(0.75, dtype=torch.float64) if epilogue else None

    def lay(x):
        x = x.to(device=device, dtype=dtype)
        if layout == "channels_last":
            return x.contiguous(memory_format=torch.channels_last_3d)
        if layout == "strided":  # a slice of a wider map: no stride chain, nothing mergeable
            big = torch.zeros(x.shape[0], x.shape[1] + 2, x.shape[2], x.shape[3] + 1, x.shape[4] + 3,
                              dtype=dtype, device=device)
            big[:, 1:-1, :, 1:, 2:-1] = x
            return big[:, 1:-1, :, 1:, 2:-1]
        return x

    return [lay(t) for t in (q, k, v)], (lay(r) if r is not None else None), (gm.to(device) if gm is not None else None)


@pytest.fixture
def cpu_flash():
    """Route CPU calls that fit the math budget to PyTorch's CPU flash kernel instead (its code path
    is otherwise only taken by large problems)."""
    saved = A.DISPATCH
    A.DISPATCH = tuple(dataclasses.replace(r, max_len=0) if r.impl == "torch_math" and r.device == "cpu"
                       and r.max_len < 1 << 62 else r for r in saved)
    A.clear_dispatch_cache()
    yield
    A.DISPATCH = saved
    A.clear_dispatch_cache()


def _floor(ref, dtype):
    return 8 * EPS[dtype] * max(1.0, ref.abs().max().item())


def _grads(fn, inputs, go):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(go.to(out.dtype))
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def check_against_float64(q, k, v, axis, heads=1, scale=None, residual=None, gamma=None, op=attention3d,
                          conditioning=1.0):
    """Forward and backward (q, k, v, residual, gamma) vs float64, with the 2x-composition rule.

    ``conditioning`` scales the rounding floor for ill-conditioned inputs: with logits of magnitude
    |s| a rounding of the logits by eps*|s| perturbs the probabilities by the same relative amount."""
    dtype = q.dtype

    def fused(q, k, v, r, g):
        return op(q, k, v, axis, heads=heads, scale=scale, residual=r, gamma=g)

    def comp(q, k, v, r, g):
        return attention3d_ref(q, k, v, axis, heads, scale, r, g)

    inputs = [q, k, v, residual, gamma]
    go = torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(v.device)
    out64, g64 = _grads(comp, [t.double() if t is not None else None for t in inputs], go)
    outc, gc = _grads(comp, inputs, go)
    outk, gk = _grads(fused, inputs, go)
    assert outk.dtype == dtype and outk.shape == v.shape
    pairs = [("out", outk, outc, out64)] + [(n, a, b, c) for n, a, b, c in zip("q k v residual gamma".split(), gk, gc, g64)
                                            if c is not None]
    for name, kern, compo, ref in pairs:
        assert torch.isfinite(kern).all(), name
        err = (kern.double() - ref).abs().max().item()
        base = (compo.double() - ref).abs().max().item()
        tol = 2 * base + conditioning * _floor(ref, dtype)
        assert err <= tol, f"{name}: error {err:.3g} > 2 x composition {base:.3g} + floor"


# ---------------------------------------------------------------------------------------------------
# numerics of the CPU path
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_float64(axis, dtype, layout):
    # odd sizes, Dk != Dv, 2 heads, residual + gamma on one layout
    (q, k, v), r, g = _make((2, 6, 3, 5, 7), 10, dtype, layout, epilogue=layout == "channels_last")
    check_against_float64(q, k, v, axis, heads=2, residual=r, gamma=g)


@pytest.mark.parametrize("axis", AXES)
def test_equal_head_dims_flash_cpu(axis, cpu_flash):
    # Dk == Dv and scores over the CPU math budget run PyTorch's fused CPU flash kernel
    (q, k, v), r, g = _make((2, 8, 3, 9, 9), 8, torch.float32, epilogue=True)
    assert A.select(q, k, v, axis, 1).impl == "torch_flash"
    check_against_float64(q, k, v, axis, residual=r, gamma=g)


@pytest.mark.parametrize("axis", AXES)
def test_wide_dv(axis):
    (q, k, v), _, _ = _make((1, 16, 2, 2, 3), 512, torch.float32)
    check_against_float64(q, k, v, axis, heads=1)


@pytest.mark.parametrize("axis,shape", [("spatial", (2, 4, 3, 1, 1)), ("temporal", (2, 4, 1, 3, 2)),
                                        ("full", (3, 4, 1, 1, 1))])
def test_sequence_length_one(axis, shape):
    (q, k, v), r, g = _make(shape, 6, torch.float32, epilogue=True)
    out = attention3d(q, k, v, axis, residual=r, gamma=g)
    torch.testing.assert_close(out, r + g * v)  # softmax over one key is 1
    check_against_float64(q, k, v, axis, residual=r, gamma=g)


def test_blocked_math_path_bounded_memory(monkeypatch):
    # Dk != Dv falls back to blocked bmm/softmax/bmm; force several query blocks
    monkeypatch.setattr(A, "_MATH_BLOCK_ELEMS", 64)
    A.clear_dispatch_cache()
    try:
        (q, k, v), r, g = _make((1, 4, 2, 5, 5), 6, torch.float32, epilogue=True)
        c = A._eager_plan("cpu", A._cc(q.device), q.dtype, q.shape, v.shape[1], "full", 1, True, False)
        assert c.impl == "torch_math"  # the blocked path
        check_against_float64(q, k, v, "full", residual=r, gamma=g)
    finally:
        A.clear_dispatch_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits_are_stable(dtype):
    (q, k, v), _, _ = _make((1, 8, 2, 3, 4), 8, dtype, logit_scale=300.0)
    out = attention3d(q, k, v, "full", scale=1.0)
    assert torch.isfinite(out).all()
    logits = torch.einsum("bcn,bcm->bnm", q.double().flatten(2), k.double().flatten(2))
    assert logits.abs().max() > 1000  # far beyond exp's fp32/fp16 range without max subtraction
    check_against_float64(q, k, v, "full", scale=1.0, conditioning=logits.abs().max().item())


def test_explicit_scale_and_sagan_unscaled():
    (q, k, v), _, _ = _make((1, 4, 2, 3, 3), 5, torch.float64)
    for s in (1.0, 0.1):
        torch.testing.assert_close(attention3d(q, k, v, "spatial", scale=s), attention3d_ref(q, k, v, "spatial", 1, s))


@pytest.mark.parametrize("axis", AXES)
def test_gradcheck_float64(axis):
    (q, k, v), r, g = _make((1, 4, 2, 2, 3), 6, torch.float64, epilogue=True)
    args = [t.requires_grad_() for t in (q, k, v, r, g)]
    assert torch.autograd.gradcheck(lambda q, k, v, r, g: attention3d(q, k, v, axis, heads=2, residual=r, gamma=g),
                                    args, fast_mode=True)


def test_gradcheck_float64_flash_cpu(cpu_flash):
    (q, k, v), _, g = _make((1, 4, 3, 5, 5), 4, torch.float64, epilogue=True)
    assert A.select(q, k, v, "full", 1).impl == "torch_flash"
    args = [t.requires_grad_() for t in (q, k, v, g)]
    assert torch.autograd.gradcheck(lambda q, k, v, g: attention3d(q, k, v, "full", gamma=g), args, fast_mode=True)


@pytest.mark.parametrize("shape,dv,impl", [((1, 4, 3, 5, 5), 4, "torch_flash"), ((1, 4, 3, 2, 3), 6, "torch_math")])
def test_float64_is_float64_accurate(shape, dv, impl, request):
    # every statistic (lse, delta, dgamma) of the fp64 path stays in fp64
    if impl == "torch_flash":
        request.getfixturevalue("cpu_flash")
    (q, k, v), r, g = _make(shape, dv, torch.float64, epilogue=True)
    assert A.select(q, k, v, "full", 1).impl == impl
    go = torch.randn(v.shape, dtype=torch.float64)
    out, grads = _grads(lambda *a: attention3d(*a[:3], "full", residual=a[3], gamma=a[4]), [q, k, v, r, g], go)
    ref, rgrads = _grads(lambda *a: attention3d_ref(*a[:3], "full", 1, None, a[3], a[4]), [q, k, v, r, g], go)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gamma_zero_still_trains_gamma():
    # SAGAN initialises gamma to 0: the output is the residual, but d out / d gamma = attention
    (q, k, v), r, _ = _make((1, 4, 2, 3, 3), 4, torch.float32, epilogue=True)
    g = torch.zeros((), requires_grad=True)
    out = attention3d(q, k, v, "spatial", residual=r, gamma=g)
    torch.testing.assert_close(out, r)
    out.sum().backward()
    expect = attention3d_ref(q.double(), k.double(), v.double(), "spatial").sum()
    torch.testing.assert_close(g.grad.double(), expect, rtol=1e-5, atol=1e-5)


def test_deterministic_backward():
    (q, k, v), r, g = _make((2, 6, 3, 4, 5), 10, torch.float32, epilogue=True)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_grads(lambda *a: attention3d(*a[:3], "full", residual=a[3], gamma=a[4]), [q, k, v, r, g],
                       torch.ones(v.shape, dtype=torch.float64))[1] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_empty_batch():
    (q, k, v), r, g = _make((0, 4, 2, 3, 3), 6, torch.float32, epilogue=True)
    for axis in AXES:
        out = attention3d(q.requires_grad_(), k, v, axis, residual=r, gamma=g)
        assert out.shape == v.shape
        out.sum().backward()


def test_zero_key_width_is_uniform_attention():
    """Dk = 0: every logit is 0, so each query averages the values of its sequence (eager path and
    registered op alike)."""
    (_, _, v), _, _ = _make((2, 4, 3, 2, 5), 6, torch.float32)
    q = torch.empty(2, 0, 3, 2, 5)
    expect = v.mean(dim=2, keepdim=True).expand_as(v)  # temporal axis: mean over T
    torch.testing.assert_close(attention3d(q, q, v, "temporal"), expect)
    torch.testing.assert_close(torch.ops.stssa.attention3d(q, q, v, "temporal", 1, 1.0, None, None)[0], expect)


def test_output_layout_follows_v():
    (q, k, v), _, _ = _make((1, 4, 2, 3, 3), 6, torch.float32, "channels_last")
    out = attention3d(q, k, v, "temporal")
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    (q, k, v), _, _ = _make((1, 4, 2, 3, 3), 6, torch.float32, "strided")
    assert attention3d(q, k, v, "temporal").is_contiguous()


def test_autocast_cpu_bfloat16():
    (q, k, v), _, _ = _make((1, 8, 2, 3, 3), 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention3d(q, k, v, "spatial")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attention3d_ref(q, k, v, "spatial"), atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile, modules
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["flash_cpu", "math_epilogue_channels_last"])
def test_opcheck(case, request):
    if case == "flash_cpu":  # Dk == Dv, no epilogue; the head-dim copies are saved for the backward
        request.getfixturevalue("cpu_flash")
        (q, k, v), r, g = _make((1, 8, 1, 9, 8), 8, torch.float32)
        axis, heads = "spatial", 1
        assert A.select(q, k, v, axis, heads).impl == "torch_flash"
    else:  # Dk != Dv (bmm path), 2 heads, residual + gamma, sequence copies saved for the backward
        (q, k, v), r, g = _make((2, 4, 3, 2, 3), 6, torch.float32, "channels_last", epilogue=True)
        axis, heads = "temporal", 2
        g = g.float()
    args = [t.requires_grad_() for t in (q, k, v)]
    r = r.requires_grad_() if r is not None else None
    g = g.requires_grad_() if g is not None else None
    torch.library.opcheck(torch.ops.stssa.attention3d.default, (*args, axis, heads, 0.5, r, g))
    out, lse, saved = torch.ops.stssa.attention3d(*args, axis, heads, 0.5, r, g)
    keep_out = A._needs_out(A.select(q, k, v, axis, heads), r is not None or g is not None)
    o = out.detach() if keep_out else q.new_empty(0)
    go = torch.randn_like(out)
    torch.library.opcheck(torch.ops.stssa._attention3d_backward.default,
                          (go, q.detach(), k.detach(), v.detach(), o, lse, [t.detach() for t in saved], axis, heads,
                           0.5, g.detach() if g is not None else None))


def assert_eager_matches_op(inputs, axis, heads, scale, go):
    """``attention3d`` (the eager path: one autograd.Function) and ``torch.ops.stssa.attention3d``
    (the registered custom op) give the same output and gradients, bit for bit."""
    eager = _grads(lambda *a: attention3d(*a[:3], axis, heads=heads, scale=scale, residual=a[3], gamma=a[4]),
                   inputs, go)
    op = _grads(lambda *a: torch.ops.stssa.attention3d(*a[:3], axis, heads, scale, a[3], a[4])[0], inputs, go)
    assert torch.equal(eager[0], op[0])
    for name, a, b in zip("q k v residual gamma".split(), eager[1], op[1]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_eager_path_matches_registered_op(axis, layout):
    """Plain eager calls skip the custom_op's dispatcher round trips (one autograd.Function over the same
    implementations); results and gradients must equal the registered op's bit for bit."""
    (q, k, v), r, g = _make((2, 4, 3, 5, 4), 6, torch.float32, layout, epilogue=True, seed=3)
    g = g.float()
    go = torch.randn(v.shape, generator=torch.Generator().manual_seed(4))
    assert_eager_matches_op([q, k, v, r, g], axis, 2, 2 ** -0.5, go)


def test_eager_path_only_where_nothing_else_looks(monkeypatch):
    """Torch-function modes, autocast and torch.compile must see the registered op (its autocast rule,
    fake kernel and schema); only plain eager calls take the fast path."""
    calls = []
    real = A._attention3d_eager
    monkeypatch.setattr(A, "_attention3d_eager", lambda *a: calls.append(a[3]) or real(*a))
    (q, k, v), _, _ = _make((1, 4, 2, 3, 3), 4, torch.float32)
    expect = attention3d(q, k, v, "spatial")
    assert len(calls) == 1
    with torch.device("cpu"):  # a TorchFunctionMode
        torch.testing.assert_close(attention3d(q, k, v, "spatial"), expect)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention3d(q, k, v, "spatial").dtype == torch.bfloat16  # the op's autocast rule ran
    compiled = torch.compile(lambda q, k, v: attention3d(q, k, v, "spatial"), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), expect)
    assert len(calls) == 1


def test_eager_double_backward_is_a_clear_error(request):
    (q, k, v), _, _ = _make((1, 4, 2, 3, 3), 4, torch.float64)
    q.requires_grad_()
    # the autograd.Function goes through the registered backward op, whose node names it when the
    # double backward reaches it
    (dq,) = torch.autograd.grad(attention3d(q, k, v, "temporal").sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="_attention3d_backward"):
        dq.sum().backward()


def test_cpu_inference_rule():
    """Without a backward the CPU flash kernel takes large frames (measured faster there); with one, the
    bmm path that keeps P. Both agree with float64 by the 2x rule."""
    (q, k, v), _, _ = _make((2, 8, 2, 14, 14), 8, torch.float32, seed=5)
    assert A.select(q, k, v, "spatial", 1, grad=False).impl == "torch_flash"
    assert A.select(q, k, v, "spatial", 1, grad=True).impl == "torch_math"
    assert A.select(q, k, v, "temporal", 1, grad=False).impl == "torch_math"
    ref = attention3d_ref(q.double(), k.double(), v.double(), "spatial")
    with torch.no_grad():
        out = attention3d(q, k, v, "spatial")
    base = (attention3d_ref(q, k, v, "spatial").double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * base + _floor(ref, torch.float32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), heads=st.integers(1, 3), dk=st.integers(1, 5), dv=st.integers(1, 5),
       T=st.integers(1, 5), H=st.integers(1, 6), W=st.integers(1, 6), axis=st.sampled_from(AXES),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]), epilogue=st.booleans(),
       scale=st.sampled_from([None, 1.0, 0.3]), seed=st.integers(0, 2 ** 16))
def test_property_float64_and_both_paths(B, heads, dk, dv, T, H, W, axis, layout, epilogue, scale, seed):
    """Random shapes, axes, head counts, layouts and epilogues: float64 forward and gradients equal the
    composition's, and the eager path (the autograd.Function) equals the registered op bit for bit."""
    (q, k, v), r, g = _make((B, dk * heads, T, H, W), dv * heads, torch.float64, layout, epilogue, seed=seed)
    inputs = [q, k, v, r, g]
    go = torch.randn(v.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    s = scale if scale is not None else dk ** -0.5
    eager = _grads(lambda *a: attention3d(*a[:3], axis, heads=heads, scale=scale, residual=a[3], gamma=a[4]),
                   inputs, go)
    op = _grads(lambda *a: torch.ops.stssa.attention3d(*a[:3], axis, heads, s, a[3], a[4])[0], inputs, go)
    ref = _grads(lambda *a: attention3d_ref(*a[:3], axis, heads, scale, a[3], a[4]), inputs, go)
    assert torch.equal(eager[0], op[0])
    torch.testing.assert_close(eager[0], ref[0], rtol=1e-10, atol=1e-12)
    for name, a, b, c in zip("q k v residual gamma".split(), eager[1], op[1], ref[1]):
        if c is None:
            continue
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11, msg=name)


def test_torch_compile_fullgraph():
    (q, k, v), r, g = _make((1, 4, 2, 3, 3), 6, torch.float32, epilogue=True)
    g = g.float()

    def f(q, k, v, r, g):
        return (attention3d(q, k, v, "spatial", heads=2, residual=r, gamma=g) * 2).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (q, k, v, r, g)]
    b = [t.clone().requires_grad_() for t in (q, k, v, r, g)]
    lc, le = cf(*a), f(*b)
    lc.backward(), le.backward()
    torch.testing.assert_close(lc, le)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_torch_compile_dynamic_shapes():
    """Symbolic shapes reach the op's fake kernel and the sequence-view arithmetic (uncached there)."""
    def f(q, k, v, r, g):
        return attention3d(q, k, v, "temporal", heads=2, residual=r, gamma=g).sum()

    cf = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    for seed, shape in enumerate([(2, 4, 3, 5, 4), (1, 4, 5, 3, 2)]):
        (q, k, v), r, g = _make(shape, 4, torch.float32, "channels_last", epilogue=True, seed=seed)
        g = g.float()
        a = [t.detach().clone().requires_grad_() for t in (q, k, v, r, g)]
        b = [t.detach().clone().requires_grad_() for t in (q, k, v, r, g)]
        lc, lr = cf(*a), attention3d_ref(*b[:3], "temporal", 2, None, b[3], b[4]).sum()
        lc.backward(), lr.backward()
        torch.testing.assert_close(lc, lr)
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad)


def test_self_attention_module_fused_matches_reference():
    torch.manual_seed(0)
    m = SelfAttention3d(16, "spatial", heads=2)
    with torch.no_grad():
        m.gamma.fill_(0.5)
    ref = SelfAttention3d(16, "spatial", heads=2, use_fused=False)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 16, 3, 4, 5)
    y, yr = m(x), ref(x)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    yr.square().sum().backward()
    for (n, p), (_, pr) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert "axis='spatial'" in repr(Attention3d("spatial"))


# ---------------------------------------------------------------------------------------------------
# dispatch table
# ---------------------------------------------------------------------------------------------------


def test_dispatch_table():
    f16, f32, f64 = torch.float16, torch.float32, torch.float64
    big = 8 * 4096 ** 2  # score elements of B=8 sequences of 4096 tokens
    assert A.select_for("cpu", 80, f32, "full", 4096, 64, 64, scores=big).impl == "torch_flash"
    assert A.select_for("cpu", 80, f32, "full", 4096, 16, 64, scores=big).impl == "torch_math"
    assert A.select_for("cpu", 80, f32, "full", 392, 64, 64, scores=4 * 392 ** 2).impl == "torch_math"
    assert A.select_for("cpu", 80, f32, "full", 2048, 64, 64, scores=2 * 2048 ** 2).impl == "torch_flash"
    assert A.select_for("cpu", 80, f32, "spatial", 256, 64, 64, scores=1 << 25).impl == "torch_flash"
    assert A.select_for("cpu", 80, f32, "temporal", 8, 64, 64, scores=1568 * 64).impl == "torch_math"
    assert A.select_for("cpu", 80, f32, "full", 4096, 64, 64, interpret=True).impl == "triton"
    assert A.select_for("cpu", 80, f64, "full", 4096, 64, 64, interpret=True, scores=big).impl == "torch_flash"
    assert A.select_for("cuda", 90, f64, "full", 4096, 64, 64).impl == "torch_math"
    # sm_75: long fp16 spatial/full sequences go to the CUTLASS kernel, short ones stay on Triton
    assert A.select_for("cuda", 75, f16, "full", 4096, 128, 128).impl == "sdpa_efficient"
    assert A.select_for("cuda", 75, f16, "spatial", 256, 64, 64).impl == "sdpa_efficient"
    assert A.select_for("cuda", 75, f16, "spatial", 49, 256, 2048).impl == "triton"
    # the paper head's SSFA (7x7 frames, one head of Dk = 512/2048): packed on every arch and dtype
    for cc in (75, 80, 90):
        for dt in (f16, f32):
            assert A.select_for("cuda", cc, dt, "spatial", 49, 2048, 2048).kernel == "triton-packed"
    assert A.select_for("cuda", 75, f16, "temporal", 8, 64, 512).kernel == "triton-packed"
    assert A.select_for("cuda", 75, f16, "full", 4096, 64, 512).impl == "triton"  # Dk != Dv: not SDPA's
    assert A.select_for("cuda", 75, f32, "full", 4096, 64, 64).impl == "triton"   # fp32: both FFMA
    # sm_80 / sm_90: Triton everywhere it can; head dims over 256 with long sequences fall back
    for cc in (80, 90):
        assert A.select_for("cuda", cc, f16, "full", 4096, 128, 128).kernel == "triton-flash"
        assert A.select_for("cuda", cc, f16, "spatial", 49, 64, 2048).kernel == "triton-packed"
        assert A.select_for("cuda", cc, f16, "full", 4096, 512, 512).impl == "torch_math"
    # every rule's note names what it is; the choice prints with its rule
    assert all(r.note for r in A.DISPATCH)
    assert "rule" in A.select_for("cuda", 90, f16, "temporal", 16, 64, 512).describe()


def test_plan_covers_compile_specs():
    # every (kernel, tile, dtype) plan() can return is among the compiled specs of that arch
    for cc in (75, 80, 90):
        specs = {(s.name, s.config) for s in TK.compile_specs(cc)}
        names = {n for n, _ in specs}
        for dt, tag in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            for L in (1, 7, 8, 32, 49, 64, 65, 784, 4096):
                for dk in (8, 64, 100, 128, 256):
                    p = TK.plan(cc, L, dk, 512, dt)
                    f, b = p.fwd, p.bwd
                    if p.kind == "packed":
                        want = [(n, f"{tag} BM={f.block_m} BDK={p.block_dk} BDV={f.block_dv} w{f.num_warps}")
                                for n in ("attn3d_fwd_packed", "attn3d_bwd_packed")]
                    else:
                        fc = f"{tag} BM={f.block_m} BN={f.block_n} BDK={p.block_dk} BDV={f.block_dv} w{f.num_warps}"
                        bc = f"{tag} BM={b.block_m} BN={b.block_n} BDK={p.block_dk} BDV={b.block_dv} w{b.num_warps}"
                        want = [("attn3d_fwd_flash", fc), ("attn3d_bwd_dq", bc), ("attn3d_bwd_dkdv", bc + " Dv<=BDV"),
                                ("attn3d_bwd_dkdv", bc + " wide-Dv")]
                    for w in want:
                        assert w in specs, (cc, L, dk, w)
        assert "attn3d_bwd_delta" in names


@pytest.mark.parametrize("axis", ["spatial", "full"])
def test_sdpa_efficient_plumbing_on_meta_tensors(axis):
    # the sm_75 route (CUTLASS SDPA) cannot run without a GPU; its permutes, epilogue and gradient
    # write-back are checked for shapes here on meta tensors (aten's meta kernels)
    m = torch.device("meta")
    q = torch.empty(2, 64, 4, 16, 16, device=m, dtype=torch.float16)
    v, r, g = torch.empty_like(q), torch.empty_like(q), torch.empty((), device=m)
    out, lse, (attn,) = A._sdpa_forward(q, q, v, axis, 2, 0.1, r, g)
    assert out.shape == v.shape and attn.shape[1:] == (2, *TK.seq_count_and_length(q.shape, axis)[1:], 32)
    grads = A._sdpa_backward(torch.empty_like(out), q, q, v, attn, lse, axis, 2, 0.1, g)
    assert [t.shape for t in grads[:3]] == [q.shape] * 3 and grads[3].shape == ()


def test_sequence_view_rule_agrees_with_view():
    # the CPU path decides "view or copy" from strides (no exceptions on the hot path); it must agree
    # with what Tensor.view accepts, or the forward's saved copies and the backward's re-views diverge
    from stssa_kernels.reference.attention3d import to_seq
    for shape in [(2, 4, 3, 5, 7), (1, 4, 1, 5, 7), (2, 4, 3, 1, 1), (3, 6, 2, 4, 1)]:
        big = torch.empty(shape[0], shape[1] + 2, shape[2], shape[3] + 1, shape[4] + 3)
        layouts = [torch.empty(shape), torch.empty(shape).contiguous(memory_format=torch.channels_last_3d),
                   big[:, 1:-1, :, 1:, 2:-1],
                   torch.empty(shape[0], shape[2], shape[1], shape[4], shape[3]).permute(0, 2, 1, 4, 3)]
        for x in layouts:
            for axis in AXES:
                for heads in (1, 2):
                    try:
                        to_seq(x, axis, heads, allow_copy=False)
                        viewable = True
                    except RuntimeError:
                        viewable = False
                    assert (A._seq_view(x, axis, heads, False) is not None) == viewable, (shape, x.stride(), axis)


def test_layout_merging():
    # contiguous spatial tokens (h, w) and channels-last full tokens (t, h, w) collapse to one stride
    x = torch.empty(2, 8, 3, 4, 5)
    geo = TK._geometry(x.shape, "spatial", [TK._desc_5d(x, 8)])
    assert (geo.seq_dims, geo.tok_dims) == (2, 1) and geo.strides[0][5] == 1
    y = x.contiguous(memory_format=torch.channels_last_3d)
    geo = TK._geometry(y.shape, "full", [TK._desc_5d(y, 8)])
    assert geo.tok_dims == 1 and geo.strides[0][5] == 8
    geo = TK._geometry(y.shape, "temporal", [TK._desc_5d(y, 8)])
    assert geo.seq_dims == 2 and geo.tok_dims == 1  # (b) and merged (h, w)
    # a slice breaks the chain: tokens keep two dims
    z = torch.empty(2, 8, 3, 4, 7)[..., 1:6]
    assert TK._geometry(z.shape, "spatial", [TK._desc_5d(z, 8)]).tok_dims == 2


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(q=a["q"][0]), "q must be 5-D"),
    (lambda a: a.update(k=a["k"][:, :2]), "k must have q's shape"),
    (lambda a: a.update(v=a["v"][:, :, :1]), "v must be"),
    (lambda a: a.update(v=a["v"].double()), "share a dtype"),
    (lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), "q must be float"),
    (lambda a: a.update(axis="time"), "axis must be one of"),
    (lambda a: a.update(heads=3), "heads=3 must divide"),
    (lambda a: a.update(heads=0), "heads must be a positive int"),
    (lambda a: a.update(scale=float("nan")), "scale must be a finite float"),
    (lambda a: a.update(residual=a["v"][:, :2]), "residual must match v"),
    (lambda a: a.update(gamma=torch.ones(2)), "gamma must be a one-element"),
    (lambda a: a.update(gamma=0.5), "gamma must be a one-element Tensor"),
])
def test_bad_inputs_name_the_argument(mutate, match):
    (q, k, v), _, _ = _make((1, 4, 2, 3, 3), 6, torch.float32)
    a = dict(q=q, k=k, v=v, axis="spatial", heads=2, scale=None, residual=None, gamma=None)
    mutate(a)
    with pytest.raises((ValueError, TypeError), match=match):
        attention3d(a["q"], a["k"], a["v"], a["axis"], heads=a["heads"], scale=a["scale"], residual=a["residual"],
                    gamma=a["gamma"])


# ---------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_gpu_matches_float64(axis, dtype, layout):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16")
    (q, k, v), r, g = _make((2, 16, 5, 7, 7), 96, dtype, layout, epilogue=True, device="cuda")
    check_against_float64(q, k, v, axis, heads=2, residual=r, gamma=g)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape,dv,axis", [((4, 64, 8, 7, 7), 512, "temporal"), ((2, 64, 8, 7, 7), 512, "spatial"),
                                           ((1, 64, 4, 7, 7), 256, "full"), ((2, 32, 2, 16, 16), 32, "spatial"),
                                           ((1, 8, 1, 1, 1), 8, "full"), ((2, 8, 40, 1, 3), 8, "temporal")])
def test_gpu_kernel_families(shape, dv, axis):
    (q, k, v), r, g = _make(shape, dv, torch.float16, epilogue=True, device="cuda")
    check_against_float64(q, k, v, axis, residual=r, gamma=g)


@pytest.mark.gpu
@gpu
def test_gpu_peak_memory_is_inputs_outputs_and_rows():
    (q, k, v), _, _ = _make((1, 64, 16, 16, 16), 64, torch.float16, device="cuda")  # L = 4096
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attention3d(q, k, v, "full")
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    io = sum(t.numel() * t.element_size() for t in (q, k, v)) * 2 + 2 * out.numel() * out.element_size()
    rows = 4096 * 4 * 4
    assert extra <= io + rows + (1 << 20), (extra, io)  # an L^2 matrix alone would be 32 MiB


@pytest.mark.gpu
@gpu
def test_gpu_deterministic_backward():
    (q, k, v), r, g = _make((2, 64, 4, 16, 16), 128, torch.float16, epilogue=True, device="cuda")
    runs = [_grads(lambda *a: attention3d(*a[:3], "full", residual=a[3], gamma=a[4]), [q, k, v, r, g],
                   torch.ones(v.shape, dtype=torch.float64, device="cuda"))[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("axis", AXES)
def test_gpu_eager_path_matches_registered_op(axis):
    (q, k, v), r, g = _make((2, 16, 5, 7, 7), 32, torch.float16, "channels_last", epilogue=True, device="cuda")
    g = g.float()
    go = torch.randn(v.shape, generator=torch.Generator().manual_seed(4)).to("cuda", torch.float16)
    assert_eager_matches_op([q, k, v, r, g], axis, 2, 0.25, go)


@pytest.fixture
def sdpa_here():
    """The sm_75 rule (PyTorch's memory-efficient SDPA for long fp16 sequences) applied to this GPU's arch,
    so that its code path runs on whatever GPU the tests have."""
    saved = A.DISPATCH
    fam = TK.arch_family(A._cc(torch.device("cuda")))
    A.DISPATCH = tuple(dataclasses.replace(r, archs=(fam,)) if r.impl == "sdpa_efficient" else r for r in saved)
    A.clear_dispatch_cache()
    yield
    A.DISPATCH = saved
    A.clear_dispatch_cache()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("axis,shape", [("full", (1, 64, 4, 8, 8)), ("spatial", (2, 64, 2, 16, 16))])
def test_gpu_sdpa_efficient_rule(sdpa_here, axis, shape):
    (q, k, v), r, g = _make(shape, 64, torch.float16, epilogue=True, device="cuda")
    assert A.select(q, k, v, axis, 1).impl == "sdpa_efficient"
    check_against_float64(q, k, v, axis, residual=r, gamma=g)


@pytest.mark.gpu
@gpu
def test_gpu_torch_compile_and_opcheck():
    (q, k, v), r, g = _make((1, 32, 4, 7, 7), 64, torch.float16, epilogue=True, device="cuda")
    g = g.float()
    args = [t.requires_grad_() for t in (q, k, v, r, g)]
    torch.library.opcheck(torch.ops.stssa.attention3d.default, (*args[:3], "temporal", 2, 0.25, *args[3:]))

    def f(q, k, v, r, g):
        return attention3d(q, k, v, "spatial", heads=2, residual=r, gamma=g).float().square().sum()

    a = [t.detach().clone().requires_grad_() for t in args]
    b = [t.detach().clone().requires_grad_() for t in args]
    lc, le = torch.compile(f, fullgraph=True)(*a), f(*b)
    lc.backward(), le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-3, atol=1e-3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=2e-3, atol=2e-3)
