"""attention3d: CPU path (PyTorch kernels), registration, dispatch, autocast, errors, GPU checks.

The Triton kernels themselves are tested on CPU tensors in ``test_attention3d_interpret.py``
(TRITON_INTERPRET=1, own process) and on a GPU by the ``gpu``-marked tests below.
Numerics: the 2x rule of ``tests/_numerics.py`` against ``attention3d_ref`` in float64.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stssa_kernels  # noqa: F401  (registers torch.ops.stssa.*)
from _numerics import assert_by_rule, check_against_float64, run_with_grads
from _samples import StssaOpLog, attention3d_inputs, attention3d_sample_inputs
from stssa_kernels import Attention3d, SelfAttention3d, attention3d
from stssa_kernels.ops import attention3d as A
from stssa_kernels.reference import attention3d_ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="CPU-path tests; the interpreter run covers the Triton kernels")

AXES = ("spatial", "temporal", "full")
NAMES = ("q", "k", "v", "residual", "gamma")
_SAMPLES = list(attention3d_sample_inputs("cpu"))
_SMALL64 = list(attention3d_sample_inputs("cpu", torch.float64, small=True))


def check(q, k, v, axis, heads=1, scale=None, residual=None, gamma=None, conditioning=1.0):
    """Forward and backward (q, k, v, residual, gamma) vs float64 by the 2x rule."""
    return check_against_float64(
        lambda q, k, v, r, g: attention3d(q, k, v, axis, heads=heads, scale=scale, residual=r, gamma=g),
        lambda q, k, v, r, g: attention3d_ref(q, k, v, axis, heads, scale, r, g),
        [q, k, v, residual, gamma], NAMES, conditioning=conditioning)


def _cast(sample, dtype):
    return [t.to(dtype) if t is not None and t.dim() else t for t in sample.args]


# ---------------------------------------------------------------------------------------------------
# numerics of the CPU path
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", _SAMPLES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_float64(sample, dtype):
    q, k, v, r, g = _cast(sample, dtype)
    check(q, k, v, residual=r, gamma=g, **sample.kwargs)


@pytest.mark.parametrize("axis", AXES)
def test_equal_head_dims_flash_cpu(axis):
    # Dk == Dv runs PyTorch's fused CPU flash kernel where the table sends long sequences
    q, k, v, r, g = attention3d_inputs((2, 8, 3, 9, 9), 8, epilogue=True)
    with A.DISPATCH.force("torch_flash"):
        assert A.select(q, k, v, axis, 1).backend == "torch_flash"
        check(q, k, v, axis, residual=r, gamma=g)


@pytest.mark.parametrize("axis", AXES)
def test_wide_dv(axis):
    q, k, v, _, _ = attention3d_inputs((1, 16, 2, 2, 3), 512)
    check(q, k, v, axis)


def test_sequence_length_one_is_the_value():
    q, k, v, r, g = attention3d_inputs((2, 4, 3, 1, 1), 6, epilogue=True)
    torch.testing.assert_close(attention3d(q, k, v, "spatial", residual=r, gamma=g), r + g * v)


def test_blocked_math_path_bounded_memory(monkeypatch):
    # force several query blocks of the math path (and the recomputed P in the backward)
    monkeypatch.setattr(A, "_MATH_BLOCK_ELEMS", 64)
    q, k, v, r, g = attention3d_inputs((1, 4, 2, 5, 5), 6, epilogue=True)
    assert A.select(q, k, v, "full", 1).backend == "torch_math"
    check(q, k, v, "full", residual=r, gamma=g)
    check(q, k, v, "full", heads=2, residual=r, gamma=g)


_CLIP_H1 = [s for s in _SAMPLES if s.kwargs["axis"] in ("spatial", "temporal") and s.kwargs["heads"] == 1]


@pytest.mark.parametrize("sample", _CLIP_H1, ids=repr)
def test_clip_views_one_bmm_per_clip(sample, monkeypatch):
    # one head, where the sequences' dims do not merge (spatial: B with T of an NCTHW map; temporal: B
    # with H*W of a channels-last one) the math path reads each clip in place with one bmm per clip;
    # forced here at test sizes (the size rule would copy)
    monkeypatch.setattr(A, "_MM_LOOP_MIN_ELEMS", 0)
    q, k, v, r, g = sample.args
    axis = sample.kwargs["axis"]
    check(q, k, v, residual=r, gamma=g, **sample.kwargs)
    q16, k16, v16, r16, g16 = _cast(sample, torch.float16)  # the math runs in fp32 on converted views
    check(q16, k16, v16, residual=r16, gamma=g16, **sample.kwargs)
    with torch.no_grad():
        _, _, saved = torch.ops.stssa.attention3d(q, k, v, axis, 1, 0.5, r, g)
    # copies of q, k, v only where no view reads them in place, then P
    copies = sum(A._math_view(t, axis, 1, True) is None for t in (q, k, v))
    expected = {("spatial", "contiguous"): 0, ("spatial", "channels_last"): 0, ("spatial", "strided"): 3,
                ("temporal", "contiguous"): 3, ("temporal", "channels_last"): 0, ("temporal", "strided"): 3}
    layout = sample.name.split("-")[1]
    if (axis, layout) in expected:
        assert copies == expected[axis, layout]
    L = A.seq_count_and_length(q.shape, axis)[1]
    assert len(saved) == copies + 1 and saved[-1].shape[-2:] == (L, L)
    for grad_layout in ("contiguous", "channels_last"):  # the grad may arrive in either layout
        go = torch.randn(v.shape)
        go = go.contiguous(memory_format=torch.channels_last_3d) if grad_layout == "channels_last" else go
        _, grads = run_with_grads(lambda *a: attention3d(*a[:3], axis, residual=a[3], gamma=a[4]),
                                  [q, k, v, r, g], go)
        _, rgrads = run_with_grads(lambda *a: attention3d_ref(*a[:3], axis, 1, None, a[3], a[4]),
                                   [q, k, v, r, g], go)
        for a, b in zip(grads, rgrads):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axis,kind", [("spatial", "contiguous"), ("temporal", "channels_last")])
def test_clip_views_gradcheck_opcheck_and_blocks(axis, kind, monkeypatch):
    monkeypatch.setattr(A, "_MM_LOOP_MIN_ELEMS", 0)
    q, k, v, r, g = attention3d_inputs((3, 4, 2, 3, 5), 6, torch.float64, kind, epilogue=True)
    assert A._clip_view(q, axis) is not None and A._seq_view(q, axis, 1, False, True) is None
    args = [t.requires_grad_() for t in (q, k, v, r, g.double())]
    f = lambda q, k, v, r, g: attention3d(q, k, v, axis, residual=r, gamma=g)  # noqa: E731
    assert torch.autograd.gradcheck(f, args, fast_mode=True)
    q, k, v, r, g = (t.detach().float() for t in args)
    torch.library.opcheck(torch.ops.stssa.attention3d.default, (q, k, v, axis, 1, 0.5, r, g))
    out, lse, saved = torch.ops.stssa.attention3d(q, k, v, axis, 1, 0.5, r, g)
    torch.library.opcheck(torch.ops.stssa._attention3d_backward.default,
                          (torch.randn_like(out), q, k, v, q.new_empty(0), lse, saved, axis, 1, 0.5, g))
    monkeypatch.setattr(A, "_MATH_BLOCK_ELEMS", 16)  # query blocks, P recomputed in the backward
    check(q, k, v, axis, residual=r, gamma=g)
    # and compiled with dynamic shapes: the fake kernels see symbolic sizes (no per-clip loop there)
    cf = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    for shape in [(3, 4, 2, 3, 5), (2, 4, 3, 4, 4)]:
        q, k, v, r, g = attention3d_inputs(shape, 6, kind=kind, epilogue=True)
        a = [t.detach().clone().requires_grad_() for t in (q, k, v, r, g)]
        b = [t.detach().clone().requires_grad_() for t in (q, k, v, r, g)]
        cf(*a).sum().backward()
        attention3d_ref(*b[:3], axis, 1, None, b[3], b[4]).sum().backward()
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits_are_stable(dtype):
    q, k, v, _, _ = attention3d_inputs((1, 8, 2, 3, 4), 8, dtype, logit_scale=300.0)
    out = attention3d(q, k, v, "full", scale=1.0)
    assert torch.isfinite(out).all()
    logits = torch.einsum("bcn,bcm->bnm", q.double().flatten(2), k.double().flatten(2))
    assert logits.abs().max() > 1000  # far beyond exp's fp32/fp16 range without max subtraction
    check(q, k, v, "full", scale=1.0, conditioning=logits.abs().max().item())


def test_explicit_scale_and_sagan_unscaled():
    q, k, v, _, _ = attention3d_inputs((1, 4, 2, 3, 3), 5, torch.float64)
    for s in (1.0, 0.1):
        torch.testing.assert_close(attention3d(q, k, v, "spatial", scale=s), attention3d_ref(q, k, v, "spatial", 1, s))


@pytest.mark.parametrize("sample", _SMALL64, ids=repr)
def test_gradcheck_float64(sample):
    args = [t.requires_grad_() if t is not None else None for t in sample.args]
    kw = sample.kwargs
    assert torch.autograd.gradcheck(
        lambda q, k, v, r, g: attention3d(q, k, v, kw["axis"], heads=kw["heads"], scale=kw["scale"], residual=r,
                                          gamma=g), args, fast_mode=True)


def test_gradcheck_float64_flash_cpu():
    q, k, v, _, g = attention3d_inputs((1, 4, 3, 5, 5), 4, torch.float64, epilogue=True)
    args = [t.requires_grad_() for t in (q, k, v, g.double())]
    with A.DISPATCH.force("torch_flash"):
        assert torch.autograd.gradcheck(lambda q, k, v, g: attention3d(q, k, v, "full", gamma=g), args,
                                        fast_mode=True)


@pytest.mark.parametrize("backend,shape,dv", [("torch_flash", (1, 4, 3, 5, 5), 4), ("torch_math", (1, 4, 3, 2, 3), 6)])
def test_float64_is_float64_accurate(backend, shape, dv):
    # every statistic (lse, delta, dgamma) of the fp64 path stays in fp64
    q, k, v, r, g = attention3d_inputs(shape, dv, torch.float64, epilogue=True)
    g = g.double()
    go = torch.randn(v.shape, dtype=torch.float64)
    with A.DISPATCH.force(backend):
        out, grads = run_with_grads(lambda *a: attention3d(*a[:3], "full", residual=a[3], gamma=a[4]),
                                    [q, k, v, r, g], go)
    ref, rgrads = run_with_grads(lambda *a: attention3d_ref(*a[:3], "full", 1, None, a[3], a[4]), [q, k, v, r, g], go)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gamma_zero_still_trains_gamma():
    # SAGAN initialises gamma to 0: the output is the residual, but d out / d gamma = attention
    q, k, v, r, _ = attention3d_inputs((1, 4, 2, 3, 3), 4, epilogue=True)
    g = torch.zeros((), requires_grad=True)
    out = attention3d(q, k, v, "spatial", residual=r, gamma=g)
    torch.testing.assert_close(out, r)
    out.sum().backward()
    expect = attention3d_ref(q.double(), k.double(), v.double(), "spatial").sum()
    torch.testing.assert_close(g.grad.double(), expect, rtol=1e-5, atol=1e-5)


def test_deterministic_backward():
    q, k, v, r, g = attention3d_inputs((2, 6, 3, 4, 5), 10, epilogue=True)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [run_with_grads(lambda *a: attention3d(*a[:3], "full", residual=a[3], gamma=a[4]), [q, k, v, r, g],
                               torch.ones(v.shape))[1] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_empty_batch():
    q, k, v, r, g = attention3d_inputs((0, 4, 2, 3, 3), 6, epilogue=True)
    for axis in AXES:
        out = attention3d(q.requires_grad_(), k, v, axis, residual=r, gamma=g)
        assert out.shape == v.shape
        out.sum().backward()


@pytest.mark.parametrize("axis", AXES)
def test_zero_key_width_is_uniform_attention(axis):
    """Dk = 0: every logit is 0, so each query averages the values of its sequence; values and
    gradients (v, residual, gamma) against the composition in float64."""
    _, _, v, r, g = attention3d_inputs((2, 4, 3, 2, 5), 6, torch.float64, epilogue=True)
    q = torch.empty(2, 0, 3, 2, 5, dtype=torch.float64)
    dims = {"spatial": (3, 4), "temporal": (2,), "full": (2, 3, 4)}[axis]
    torch.testing.assert_close(attention3d(q, q, v, axis), v.mean(dim=dims, keepdim=True).expand_as(v))
    go = torch.randn(v.shape, dtype=torch.float64)
    out, grads = run_with_grads(lambda v, r, g: attention3d(q, q, v, axis, residual=r, gamma=g), [v, r, g.double()], go)
    ref, rgrads = run_with_grads(lambda v, r, g: attention3d_ref(q, q, v, axis, 1, None, r, g), [v, r, g.double()], go)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b)


def test_output_layout_follows_v():
    q, k, v, _, _ = attention3d_inputs((1, 4, 2, 3, 3), 6, kind="channels_last")
    assert attention3d(q, k, v, "temporal").is_contiguous(memory_format=torch.channels_last_3d)
    q, k, v, _, _ = attention3d_inputs((1, 4, 2, 3, 3), 6, kind="strided")
    assert attention3d(q, k, v, "temporal").is_contiguous()


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_autocast_cpu_follows_the_autocast_dtype(amp):
    """Under CPU autocast the op runs in the *current* autocast dtype (fp16 or bf16), like a matmul:
    the output has that dtype, fp32 leaves get fp32 gradients, and the values meet the 2x rule against
    the composition run in that dtype."""
    q, k, v, r, g = attention3d_inputs((1, 8, 2, 3, 3), 8, epilogue=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, r)]
    with torch.autocast("cpu", dtype=amp):
        out = attention3d(*leaves[:3], "spatial", residual=leaves[3], gamma=g)
    assert out.dtype == amp
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)
    ref64 = attention3d_ref(q.double(), k.double(), v.double(), "spatial", 1, None, r.double(), g.double())
    lp = attention3d_ref(q.to(amp), k.to(amp), v.to(amp), "spatial", 1, None, r.to(amp), g)
    assert_by_rule(out.detach(), ref64, lp, "autocast out")
    with torch.autocast("cpu", dtype=amp):  # float64 is left alone, as autocast does for matmul
        assert attention3d(q.double(), k.double(), v.double(), "spatial").dtype == torch.float64


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", ["spatial", "temporal"])
def test_backward_inside_autocast_equals_backward_outside(amp, axis):
    """``loss.backward()`` inside the autocast region (PyTorch advises against it, users do it): the
    backward runs in the dtypes the forward chose, the same gradients as a backward outside; temporal_proj
    feeding attention3d, as in the STSSA head."""
    from stssa_kernels import temporal_proj
    q, _, _, r, g = attention3d_inputs((2, 8, 3, 3, 3), 8, epilogue=True)
    w = torch.randn(8, 8, 3, 1, 1, generator=torch.Generator().manual_seed(3)) / 5
    grads = []
    for inside in (False, True):
        xs, ws, gs = q.clone().requires_grad_(), w.clone().requires_grad_(), g.clone().requires_grad_()
        with torch.autocast("cpu", dtype=amp):
            y, = temporal_proj(xs, [ws])
            loss = attention3d(y, y, y, axis, residual=y, gamma=gs).float().square().sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append([xs.grad, ws.grad, gs.grad])
    for a, b in zip(*grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# registration: one path, opcheck, torch.compile, modules
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("forced, axis", [("torch_flash", "temporal"), ("torch_math", "spatial")])
def test_backward_outside_the_force_block_uses_the_forwards_backend(forced, axis):
    """``with DISPATCH.force(b): out = attention3d(...)`` and ``out.backward()`` after the block: the
    backward reads the saved tensors of the backend that wrote them (it selected again, and crashed on
    another backend's saved shapes: 16x16 spatial maps default to torch_flash, 8-frame temporal ones to
    torch_math)."""
    g = torch.Generator().manual_seed(5)
    q, k, v, r = (torch.randn(2, 4, 8, 16, 16, generator=g) for _ in range(4))
    gamma = torch.tensor(0.5)
    assert A.select(q, k, v, axis).backend != forced  # the default differs from the forced one
    leaves = [t.clone().requires_grad_() for t in (q, k, v, r, gamma)]
    with A.DISPATCH.force(forced):
        out = attention3d(*leaves[:3], axis, residual=leaves[3], gamma=leaves[4])
    gy = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, leaves, gy)

    def ref_grads(dtype):
        ls = [t.to(dtype).requires_grad_() for t in (q, k, v, r, gamma)]
        return torch.autograd.grad(attention3d_ref(*ls[:3], axis, 1, None, ls[3], ls[4]), ls, gy.to(dtype))
    for name, a, r64, lp in zip("qkvrg", grads, ref_grads(torch.float64), ref_grads(torch.float32)):
        assert_by_rule(a, r64, lp, f"grad {name}")


def test_one_execution_path():
    """Eager forward and backward go through the two registered ops (one autograd.Function connects
    them), and compiled graphs hold the same two ops."""
    q, k, v, r, g = attention3d_inputs((1, 4, 2, 3, 3), 6, epilogue=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, r, g)]
    with StssaOpLog() as log:
        attention3d(*leaves[:3], "temporal", residual=leaves[3], gamma=leaves[4]).sum().backward()
    assert log.ops == ["attention3d", "_attention3d_backward"]
    with StssaOpLog() as log, torch.no_grad():
        attention3d(q, k, v, "temporal")
    assert log.ops == ["attention3d"]
    graphs = []

    def backend(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    from torch._dynamo.backends.common import aot_autograd
    f = torch.compile(lambda *a: attention3d(*a[:3], "temporal", residual=a[3], gamma=a[4]).sum(), fullgraph=True,
                      backend=aot_autograd(fw_compiler=backend, bw_compiler=backend))
    f(*leaves).backward()
    assert "stssa.attention3d" in graphs[0] and "stssa._attention3d_backward" in graphs[1]


@pytest.mark.parametrize("sample", _SAMPLES[::3], ids=repr)
def test_opcheck(sample):
    q, k, v, r, g = sample.args
    kw = sample.kwargs
    scale = 0.5
    torch.library.opcheck(torch.ops.stssa.attention3d.default, (q, k, v, kw["axis"], kw["heads"], scale, r, g))
    out, lse, saved = torch.ops.stssa.attention3d(q, k, v, kw["axis"], kw["heads"], scale, r, g)
    o = out if r is None and g is None else q.new_empty(0)
    torch.library.opcheck(torch.ops.stssa._attention3d_backward.default,
                          (torch.randn_like(out), q, k, v, o, lse, saved, kw["axis"], kw["heads"], scale, g))


def test_opcheck_flash_cpu():
    q, k, v, _, _ = attention3d_inputs((1, 8, 1, 9, 8), 8)
    with A.DISPATCH.force("torch_flash"):
        torch.library.opcheck(torch.ops.stssa.attention3d.default, (q, k, v, "spatial", 1, 0.5, None, None))
        out, lse, saved = torch.ops.stssa.attention3d(q, k, v, "spatial", 1, 0.5, None, None)
        torch.library.opcheck(torch.ops.stssa._attention3d_backward.default,
                              (torch.randn_like(out), q, k, v, out, lse, saved, "spatial", 1, 0.5, None))


def test_double_backward_is_a_clear_error():
    q, k, v, _, _ = attention3d_inputs((1, 4, 2, 3, 3), 4, torch.float64)
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(attention3d(q, k, v, "temporal").sum(), q, create_graph=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), heads=st.integers(1, 3), dk=st.integers(1, 5), dv=st.integers(1, 5),
       T=st.integers(1, 5), H=st.integers(1, 6), W=st.integers(1, 6), axis=st.sampled_from(AXES),
       kind=st.sampled_from(["contiguous", "channels_last", "strided"]), epilogue=st.booleans(),
       scale=st.sampled_from([None, 1.0, 0.3]), seed=st.integers(0, 2 ** 16))
def test_property_float64(B, heads, dk, dv, T, H, W, axis, kind, epilogue, scale, seed):
    """Random shapes, axes, head counts, layouts and epilogues: float64 forward and gradients equal the
    composition's."""
    inputs = list(attention3d_inputs((B, dk * heads, T, H, W), dv * heads, torch.float64, kind, epilogue, seed=seed))
    if inputs[4] is not None:
        inputs[4] = inputs[4].double()
    go = torch.randn(inputs[2].shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    out = run_with_grads(lambda *a: attention3d(*a[:3], axis, heads=heads, scale=scale, residual=a[3], gamma=a[4]),
                         inputs, go)
    ref = run_with_grads(lambda *a: attention3d_ref(*a[:3], axis, heads, scale, a[3], a[4]), inputs, go)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-10, atol=1e-12)
    for name, a, c in zip(NAMES, out[1], ref[1]):
        if c is not None:
            torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("sample", _SAMPLES[:6], ids=repr)
def test_torch_compile_fullgraph(sample):
    kw = sample.kwargs

    def f(q, k, v, r, g):
        return (attention3d(q, k, v, kw["axis"], heads=kw["heads"], residual=r, gamma=g) * 2).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() if t is not None else None for t in sample.args]
    b = [t.clone().requires_grad_() if t is not None else None for t in sample.args]
    lc, le = cf(*a), f(*b)
    lc.backward(), le.backward()
    torch.testing.assert_close(lc, le)
    for x, y in zip(a, b):
        if x is not None:
            torch.testing.assert_close(x.grad, y.grad)


def test_torch_compile_dynamic_shapes_and_autocast():
    """Symbolic shapes reach the ops' fake kernels and the sequence-view arithmetic (uncached there);
    autocast inside the compiled function follows its dtype."""
    def f(q, k, v, r, g):
        return attention3d(q, k, v, "temporal", heads=2, residual=r, gamma=g).sum()

    cf = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    for seed, shape in enumerate([(2, 4, 3, 5, 4), (1, 4, 5, 3, 2)]):
        inputs = attention3d_inputs(shape, 4, kind="channels_last", epilogue=True, seed=seed)
        a = [t.detach().clone().requires_grad_() for t in inputs]
        b = [t.detach().clone().requires_grad_() for t in inputs]
        lc, lr = cf(*a), attention3d_ref(*b[:3], "temporal", 2, None, b[3], b[4]).sum()
        lc.backward(), lr.backward()
        torch.testing.assert_close(lc, lr)
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad)

    def h(q, k, v):
        with torch.autocast("cpu", dtype=torch.float16):
            return attention3d(q, k, v, "spatial")

    q, k, v, _, _ = attention3d_inputs((1, 4, 2, 3, 3), 4)
    assert torch.compile(h, fullgraph=True, backend="aot_eager")(q, k, v).dtype == torch.float16


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
# dispatch
# ---------------------------------------------------------------------------------------------------


def _pick(device, cc, dtype, axis, L, dk, dv, interpret=False, scores=None):
    p = A.Attention3dProblem(device, cc, dtype, interpret, axis, L, dk, dv, L * L if scores is None else scores)
    return A.DISPATCH.select(p)


def test_dispatch_table():
    f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    big = 8 * 4096 ** 2  # score elements of B=8 sequences of 4096 tokens
    assert _pick("cpu", 0, f32, "full", 4096, 64, 64, scores=big).backend == "torch_flash"
    assert _pick("cpu", 0, f32, "full", 4096, 16, 64, scores=big).backend == "torch_math"
    assert _pick("cpu", 0, f32, "full", 392, 64, 64, scores=4 * 392 ** 2).backend == "torch_math"
    assert _pick("cpu", 0, f32, "full", 2048, 64, 64, scores=2 * 2048 ** 2).backend == "torch_flash"
    assert _pick("cpu", 0, f32, "temporal", 8, 64, 64, scores=1568 * 64).backend == "torch_math"
    # spatial 16x16 frames with Dk == Dv <= 64: the CPU flash kernel; 8x8 frames, Dk != Dv or wider heads:
    # the matmul path
    assert _pick("cpu", 0, f32, "spatial", 256, 64, 64, scores=16 * 256 ** 2).backend == "torch_flash"
    assert _pick("cpu", 0, f32, "spatial", 255, 64, 64, scores=16 * 255 ** 2).backend == "torch_math"  # the edge
    assert _pick("cpu", 0, f32, "spatial", 64, 64, 64, scores=16 * 64 ** 2).backend == "torch_math"
    assert _pick("cpu", 0, f32, "spatial", 256, 32, 128, scores=8 * 256 ** 2).backend == "torch_math"
    assert _pick("cpu", 0, f32, "spatial", 256, 65, 65, scores=16 * 256 ** 2).backend == "torch_math"  # Dk > 64
    assert _pick("cuda", 90, f64, "full", 4096, 64, 64).backend == "torch_math"
    # sm_75: long fp16 spatial/full sequences at the tested head dim go to the CUTLASS kernel
    assert _pick("cuda", 75, f16, "spatial", 256, 64, 64).backend == "sdpa_efficient"
    # sm_75 bf16: PyTorch math in fp32, never the Triton bf16 code
    assert _pick("cuda", 75, bf16, "spatial", 49, 64, 512).backend == "torch_math"
    # every rule says why; the choice prints with its rule
    assert all(r.why for r in A.DISPATCH.rules)
    assert "rule" in _pick("cpu", 0, f32, "temporal", 16, 64, 512).describe()


@pytest.mark.skipif(A._arch.triton_missing("attention3d") is not None, reason="needs triton")
def test_dispatch_table_triton():
    f16, f32, f64 = torch.float16, torch.float32, torch.float64
    assert _pick("cpu", 80, f32, "full", 4096, 64, 64, interpret=True).backend == "triton"
    assert _pick("cpu", 80, f64, "full", 4096, 64, 64, interpret=True, scores=8 * 4096 ** 2).backend == "torch_flash"
    assert _pick("cpu", 80, f32, "temporal", 8, 0, 64, interpret=True).backend == "triton"  # Dk = 0 too
    assert _pick("cuda", 75, f16, "spatial", 49, 256, 2048).backend == "triton"
    for cc in (75, 80, 90):  # the paper head's SSFA (7x7 frames, one head of Dk = 2048): packed everywhere
        for dt in (f16, f32):
            assert _pick("cuda", cc, dt, "spatial", 49, 2048, 2048).plan.kind == "packed"
    assert _pick("cuda", 75, f16, "full", 4096, 64, 512).backend == "triton"  # Dk != Dv: not SDPA's
    assert _pick("cuda", 75, f16, "full", 4096, 128, 128).backend == "triton"  # untested head dim: not SDPA's
    assert _pick("cuda", 75, f32, "full", 4096, 64, 64).backend == "triton"  # fp32: both FFMA
    for cc in (80, 90):
        assert _pick("cuda", cc, f16, "full", 4096, 128, 128).plan.kind == "flash"
        assert _pick("cuda", cc, f16, "full", 4096, 512, 512).backend == "torch_math"  # head dim past the tiles


def test_explain_names_each_rule_and_reason():
    q, k, v, _, _ = attention3d_inputs((1, 4, 2, 3, 3), 6)
    text = A.explain(q, k, v, "spatial", verbose=True)
    assert "rule 0 [triton] skipped: TRITON_INTERPRET=1 is not set" in text
    assert "declined: needs Dk == Dv" in text  # torch_flash's reason for Dk=4, Dv=6
    assert "-> rule 2" in text


def test_force_a_backend():
    q, k, v, r, g = attention3d_inputs((1, 4, 2, 3, 3), 4, epilogue=True)
    with A.DISPATCH.force("torch_flash"):
        assert A.select(q, k, v, "spatial", 1).backend == "torch_flash"
        check(q, k, v, "spatial", residual=r, gamma=g)
    assert A.select(q, k, v, "spatial", 1).backend == "torch_math"
    q6, k6, v6, _, _ = attention3d_inputs((1, 4, 2, 3, 3), 6)
    with A.DISPATCH.force("torch_flash"), pytest.raises(RuntimeError, match="forced backend 'torch_flash'.*Dk == Dv"):
        attention3d(q6, k6, v6, "spatial")
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        A.DISPATCH.force("cudnn").__enter__()


@pytest.mark.parametrize("axis", ["spatial", "full"])
def test_sdpa_efficient_plumbing_on_meta_tensors(axis):
    # the sm_75 route (CUTLASS SDPA) cannot run without a GPU; its permutes, epilogue and gradient
    # write-back are checked for shapes here on meta tensors (aten's meta kernels)
    m = torch.device("meta")
    q = torch.empty(2, 64, 4, 16, 16, device=m, dtype=torch.float16)
    v, r, g = torch.empty_like(q), torch.empty_like(q), torch.empty((), device=m)
    out, lse, (attn,) = A._sdpa_forward(q, q, v, axis, 2, 0.1, r, g)
    assert out.shape == v.shape and attn.shape[1:] == (2, A.seq_count_and_length(q.shape, axis)[1], 32)
    grads = A._sdpa_backward(torch.empty_like(out), q, q, v, attn, lse, axis, 2, 0.1, g)
    assert [t.shape for t in grads[:3]] == [q.shape] * 3 and grads[3].shape == ()


def test_sequence_view_rule_agrees_with_view():
    # the CPU path decides "view or copy" from strides (no exceptions on the hot path); it must agree
    # with what Tensor.view accepts, or the forward's saved copies and the backward's re-views diverge
    from stssa_kernels.reference.attention3d import to_seq
    for shape in [(2, 4, 3, 5, 7), (1, 4, 1, 5, 7), (2, 4, 3, 1, 1), (3, 6, 2, 4, 1)]:
        big = torch.randn(shape[0], shape[1] + 2, shape[2], shape[3] + 1, shape[4] + 3)
        layouts = [torch.randn(shape), torch.randn(shape).contiguous(memory_format=torch.channels_last_3d),
                   big[:, 1:-1, :, 1:, 2:-1],
                   torch.randn(shape[0], shape[2], shape[1], shape[4], shape[3]).permute(0, 2, 1, 4, 3)]
        for x in layouts:
            for axis in AXES:
                for heads in (1, 2):
                    try:
                        to_seq(x, axis, heads, allow_copy=False)
                        viewable = True
                    except RuntimeError:
                        viewable = False
                    assert (A._seq_view(x, axis, heads, False) is not None) == viewable, (shape, x.stride(), axis)
                    y = A._seq_view(x, axis, heads, False)
                    if y is not None:
                        assert torch.equal(y, to_seq(x, axis, heads))


def test_clip_view_is_the_split_sequence_view():
    # the clip view [B, T | H*W, L, d] holds the same values as the flat sequence layout split by clip
    from stssa_kernels.reference.attention3d import to_seq
    shape = (3, 4, 2, 5, 7)
    for x in (torch.randn(shape), torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)):
        for axis in ("spatial", "temporal"):
            y = A._clip_view(x, axis)
            if y is None:
                continue
            assert torch.equal(y, to_seq(x, axis, 1).reshape(3, -1, *y.shape[2:]))
    assert A._clip_view(torch.randn(shape), "spatial") is not None  # NCTHW frames: [H*W, D] unit stride
    assert A._clip_view(torch.randn(shape), "temporal") is None     # NCTHW [T, D]: no unit stride
    assert A._clip_view(torch.randn(shape), "full") is None


_NO_TRITON = r"""
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as on a CPU-only torch install
import torch, stssa_kernels
assert not any(m.startswith("stssa_kernels.triton") for m in sys.modules), sorted(sys.modules)
q = torch.randn(1, 4, 2, 3, 3, requires_grad=True)
w = [torch.randn(4, 4, 3, 1, 1, requires_grad=True)]
if sys.argv[1] == "cpu":  # every op runs on CPU
    stssa_kernels.attention3d(q, q, q, "spatial").sum().backward()
    sum(o.sum() for o in stssa_kernels.temporal_proj(q, w)).backward()
    print("OK")
else:  # TRITON_INTERPRET=1: the table sends CPU fp32 to the Triton kernels
    for call in (lambda: stssa_kernels.attention3d(q, q, q, "spatial"), lambda: stssa_kernels.temporal_proj(q, w)):
        try:
            call()
        except RuntimeError as e:
            assert "needs triton" in str(e), e
            print("OK", e)
        else:
            raise SystemExit("no error")
"""


@pytest.mark.parametrize("mode", ["cpu", "interpret"])
def test_import_without_triton_and_a_clear_error_where_it_is_needed(mode):
    """A CPU-only torch ships no triton: ``import stssa_kernels`` must not need it and every CPU op runs;
    a call that the table sends to the Triton kernels says what is missing."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("TRITON_INTERPRET", None)
    if mode == "interpret":
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", _NO_TRITON, mode], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


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
    (lambda a: a.update(q="x"), "q must be a Tensor"),
])
def test_bad_inputs_name_the_argument(mutate, match):
    q, k, v, _, _ = attention3d_inputs((1, 4, 2, 3, 3), 6)
    a = dict(q=q, k=k, v=v, axis="spatial", heads=2, scale=None, residual=None, gamma=None)
    mutate(a)
    with pytest.raises((ValueError, TypeError), match=match):
        attention3d(a["q"], a["k"], a["v"], a["axis"], heads=a["heads"], scale=a["scale"], residual=a["residual"],
                    gamma=a["gamma"])


# ---------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA: conftest's needs_cuda)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("sample", list(attention3d_sample_inputs("cpu"))[::2], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_matches_float64(sample, dtype):
    q, k, v, r, g = [t.to("cuda", dtype) if t is not None and t.dim() else (t.cuda() if t is not None else None)
                     for t in sample.args]
    check(q, k, v, residual=r, gamma=g, **sample.kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dv,axis", [((4, 64, 8, 7, 7), 512, "temporal"), ((2, 64, 8, 7, 7), 512, "spatial"),
                                           ((1, 64, 4, 7, 7), 256, "full"), ((2, 32, 2, 16, 16), 32, "spatial"),
                                           ((1, 8, 1, 1, 1), 8, "full"), ((2, 8, 40, 1, 3), 8, "temporal")])
def test_gpu_kernel_families(shape, dv, axis):
    q, k, v, r, g = attention3d_inputs(shape, dv, torch.float16, epilogue=True, device="cuda")
    check(q, k, v, axis, residual=r, gamma=g)


@pytest.mark.gpu
def test_gpu_autocast_bfloat16():
    """CUDA bf16 autocast (the AVA configs' ``amp: bf16``) runs the op in bf16, not fp16."""
    q, k, v, r, g = attention3d_inputs((2, 16, 4, 7, 7), 32, epilogue=True, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, r)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attention3d(*leaves[:3], "spatial", residual=leaves[3], gamma=g)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    ref64 = attention3d_ref(q.double(), k.double(), v.double(), "spatial", 1, None, r.double(), g.double())
    lp = attention3d_ref(*(t.bfloat16() for t in (q, k, v)), "spatial", 1, None, r.bfloat16(), g)
    assert_by_rule(out.detach(), ref64, lp, "bf16 autocast out")


@pytest.mark.gpu
def test_gpu_peak_memory_is_inputs_outputs_and_rows():
    q, k, v, _, _ = attention3d_inputs((1, 64, 16, 16, 16), 64, torch.float16, device="cuda")  # L = 4096
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
def test_gpu_deterministic_backward():
    q, k, v, r, g = attention3d_inputs((2, 64, 4, 16, 16), 128, torch.float16, epilogue=True, device="cuda")
    runs = [run_with_grads(lambda *a: attention3d(*a[:3], "full", residual=a[3], gamma=a[4]), [q, k, v, r, g],
                           torch.ones(v.shape, device="cuda"))[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("axis,shape", [("full", (1, 64, 4, 8, 8)), ("spatial", (2, 64, 2, 16, 16))])
def test_gpu_sdpa_efficient_backend(axis, shape):
    q, k, v, r, g = attention3d_inputs(shape, 64, torch.float16, epilogue=True, device="cuda")
    with A.DISPATCH.force("sdpa_efficient"):
        check(q, k, v, axis, residual=r, gamma=g)


@pytest.mark.gpu
def test_gpu_torch_compile_and_opcheck():
    q, k, v, r, g = attention3d_inputs((1, 32, 4, 7, 7), 64, torch.float16, epilogue=True, device="cuda")
    torch.library.opcheck(torch.ops.stssa.attention3d.default, (q, k, v, "temporal", 2, 0.25, r, g))
    args = [q, k, v, r, g]

    def f(q, k, v, r, g):
        return attention3d(q, k, v, "spatial", heads=2, residual=r, gamma=g).float().square().sum()

    a = [t.detach().clone().requires_grad_() for t in args]
    b = [t.detach().clone().requires_grad_() for t in args]
    lc, le = torch.compile(f, fullgraph=True)(*a), f(*b)
    lc.backward(), le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-3, atol=1e-3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("mode", ["func.jvp", "forward_ad"])
def test_forward_mode_ad_is_a_clear_error(mode):
    """No forward formula: an error, not the zero tangents PyTorch gives an op it sees as a constant."""
    q = torch.randn(2, 4, 2, 3, 3, dtype=torch.float64)
    f = lambda x: attention3d(x, x, x, "temporal")  # noqa: E731
    with pytest.raises(NotImplementedError, match="attention3d: forward-mode AD"):
        if mode == "func.jvp":
            torch.func.jvp(f, (q,), (torch.randn_like(q),))
        else:
            import torch.autograd.forward_ad as fwAD
            with fwAD.dual_level():
                f(fwAD.make_dual(q, torch.randn_like(q)))
