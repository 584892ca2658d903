"""attention3d's Triton kernels on CPU tensors under the Triton interpreter.

Run in their own process (TRITON_INTERPRET must be set before triton is imported):

    TRITON_INTERPRET=1 python -m pytest -m interpret tests/test_attention3d_interpret.py

With TRITON_INTERPRET=1 the op's dispatch sends CPU fp16/fp32 tensors to the Triton kernels, so these
tests run the exact kernels a GPU runs: both families (packed: L <= BLOCK_M, flash: longer), the sm_75
and sm_80/90 tiles, every layout path (merged / unmerged strides), wide Dv (dk/dv split launches) and
the residual/gamma epilogue. Sizes are tiny: the interpreter executes every program in numpy.
Numerics: the 2x rule of ``tests/_numerics.py``.
"""
from __future__ import annotations

import pytest
import torch

from _numerics import check_against_float64, run_with_grads
from _samples import attention3d_inputs
from conftest import INTERPRETING

pytestmark = pytest.mark.interpret

if INTERPRETING:
    from stssa_kernels import attention3d
    from stssa_kernels.ops import _arch
    from stssa_kernels.ops import attention3d as A
    from stssa_kernels.reference import attention3d_ref

NAMES = ("q", "k", "v", "residual", "gamma")


def check(q, k, v, axis, heads=1, scale=None, residual=None, gamma=None, conditioning=1.0):
    return check_against_float64(
        lambda q, k, v, r, g: attention3d(q, k, v, axis, heads=heads, scale=scale, residual=r, gamma=g),
        lambda q, k, v, r, g: attention3d_ref(q, k, v, axis, heads, scale, r, g),
        [q, k, v, residual, gamma], NAMES, conditioning=conditioning)


def _kind(q, v, axis, heads=1):
    c = A.select(q, q, v, axis, heads)
    assert c.backend == "triton", c.describe()
    return c.plan.kind


@pytest.fixture(params=[80, 75], ids=["sm80-tiles", "sm75-tiles"])
def arch(request):
    with _arch.interpret_as(request.param):
        yield request.param


# (shape [B, Dk, T, H, W], Dv, axis, heads): packed and flash for every axis, odd sizes and tails
CASES = [
    ((2, 6, 3, 5, 7), 10, "spatial", 2),    # L=35: packed (G=1)
    ((2, 6, 5, 3, 3), 10, "temporal", 2),   # L=5: packed, many sequences per program
    ((1, 4, 3, 5, 5), 6, "full", 1),        # L=75: flash, key-block tail
    ((1, 4, 70, 1, 2), 4, "temporal", 1),   # L=70: flash on the temporal axis
]


@pytest.mark.parametrize("case", CASES, ids=["spatial-L35", "temporal-L5", "full-L75", "temporal-L70"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64(case, dtype, arch):
    shape, dv, axis, heads = case
    q, k, v, r, g = attention3d_inputs(shape, dv, dtype, "contiguous", epilogue=dtype == torch.float16)
    check(q, k, v, axis, heads=heads, residual=r, gamma=g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sm75_7x7_frames(dtype):
    """The AVA head's 7x7 frames (L = 49) on sm_75 tiles run packed with 16-wide Dk/Dv chunks (a tail
    chunk in both here): the tile that reaches any Dk, where the flash kernels stop at 256."""
    with _arch.interpret_as(75):
        q, k, v, r, g = attention3d_inputs((1, 40, 2, 7, 7), 24, dtype, "channels_last", epilogue=True)
        assert _kind(q, v, "spatial") == "packed"
        check(q, k, v, "spatial", residual=r, gamma=g)


@pytest.mark.parametrize("kind", ["channels_last", "strided"])
@pytest.mark.parametrize("axis,shape", [("spatial", (2, 4, 2, 3, 5)), ("temporal", (1, 4, 6, 2, 3)),
                                        ("full", (1, 4, 2, 5, 7))])
def test_layouts(kind, axis, shape):
    q, k, v, r, g = attention3d_inputs(shape, 6, torch.float32, kind, epilogue=True)
    check(q, k, v, axis, heads=2, residual=r, gamma=g)


@pytest.mark.parametrize("axis,shape", [("spatial", (1, 8, 2, 3, 3)), ("full", (1, 8, 2, 6, 7))])
def test_wide_dv(axis, shape):
    # Dv/heads = 160 > BLOCK_DV = 64: packed loops over Dv chunks; flash splits Dv over the grid
    # (forward), sums dP over chunks for dk and splits dv over programs (backward)
    q, k, v, r, g = attention3d_inputs(shape, 320, torch.float32, epilogue=True)
    assert _kind(q, v, axis, heads=2) == {"spatial": "packed", "full": "flash"}[axis]
    check(q, k, v, axis, heads=2, residual=r, gamma=g)


@pytest.mark.parametrize("epilogue", ["residual", "gamma"])
@pytest.mark.parametrize("axis,shape", [("temporal", (2, 4, 4, 2, 2)), ("full", (1, 4, 3, 4, 6))])
def test_partial_epilogue(epilogue, axis, shape):
    q, k, v, r, g = attention3d_inputs(shape, 6, torch.float32, epilogue=True)
    r, g = (r, None) if epilogue == "residual" else (None, g)
    check(q, k, v, axis, residual=r, gamma=g)


@pytest.mark.parametrize("axis,shape", [("spatial", (2, 4, 3, 1, 1)), ("temporal", (2, 4, 1, 3, 2)),
                                        ("full", (3, 4, 1, 1, 1))])
def test_sequence_length_one(axis, shape):
    q, k, v, r, g = attention3d_inputs(shape, 6, torch.float32, epilogue=True)
    torch.testing.assert_close(attention3d(q, k, v, axis, residual=r, gamma=g), r + g * v)
    check(q, k, v, axis, residual=r, gamma=g)


@pytest.mark.parametrize("axis,shape", [("spatial", (2, 0, 3, 2, 5)), ("temporal", (2, 0, 3, 2, 5)),
                                        ("full", (1, 0, 3, 5, 5))])
def test_zero_key_width(axis, shape):
    """Dk = 0 (every logit 0: uniform attention) is right under the interpreter, values and gradients,
    through the Triton kernels (their score scale is 0 then; see tests/test_triton_launch_interpret.py)."""
    B, _, T, H, W = shape
    _, _, v, r, g = attention3d_inputs((B, 4, T, H, W), 6, torch.float32, epilogue=True)
    q = torch.empty(shape)
    c = A.select(q, q, v, axis, 1)
    assert c.backend == "triton"
    go = torch.randn(v.shape, generator=torch.Generator().manual_seed(5))
    out, grads = run_with_grads(lambda v, r, g: attention3d(q, q, v, axis, residual=r, gamma=g), [v, r, g], go)
    ref, rgrads = run_with_grads(lambda v, r, g: attention3d_ref(q.double(), q.double(), v, axis, 1, None, r, g),
                                 [v.double(), r.double(), g.double()], go.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits_are_stable(dtype):
    q, k, v, _, _ = attention3d_inputs((1, 8, 2, 5, 7), 8, dtype, logit_scale=300.0)
    logits = torch.einsum("bcn,bcm->bnm", q.double().flatten(2), k.double().flatten(2))
    assert logits.abs().max() > 1000
    for axis in ("temporal", "full"):  # packed and flash
        out = attention3d(q, k, v, axis, scale=1.0)
        assert torch.isfinite(out).all()
        check(q, k, v, axis, scale=1.0, conditioning=logits.abs().max().item())


def test_deterministic_backward():
    q, k, v, r, g = attention3d_inputs((1, 4, 3, 4, 6), 6, torch.float32, epilogue=True)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [run_with_grads(lambda *a: attention3d(*a[:3], "full", residual=a[3], gamma=a[4]), [q, k, v, r, g],
                               torch.ones(v.shape))[1] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("axis,shape", [("full", (1, 4, 3, 5, 5)), ("temporal", (2, 4, 4, 2, 2))])
def test_opcheck_triton_path(axis, shape):
    # the Triton implementation's fake kernel (incl. the flash path's saved attention)
    q, k, v, r, g = attention3d_inputs(shape, 6, torch.float32, epilogue=True)
    assert _kind(q, v, axis, 2) == ("flash" if axis == "full" else "packed")
    torch.library.opcheck(torch.ops.stssa.attention3d.default, (q, k, v, axis, 2, 0.5, r, g))
    out, lse, saved = torch.ops.stssa.attention3d(q, k, v, axis, 2, 0.5, r, g)
    torch.library.opcheck(torch.ops.stssa._attention3d_backward.default,
                          (torch.randn_like(out), q, k, v, q.new_empty(0), lse, saved, axis, 2, 0.5, g))


def test_compiled_and_eager_run_the_same_kernels():
    """torch.compile (aot_eager) and eager run the same Triton launches: equal bit for bit."""
    q, k, v, r, g = attention3d_inputs((1, 4, 3, 5, 5), 6, torch.float16, "channels_last", epilogue=True)
    go = torch.randn(v.shape, generator=torch.Generator().manual_seed(3)).to(torch.float16)

    def f(q, k, v, r, g):
        return attention3d(q, k, v, "full", heads=2, residual=r, gamma=g)

    eager = run_with_grads(f, [q, k, v, r, g], go)
    compiled = run_with_grads(torch.compile(f, fullgraph=True, backend="aot_eager"), [q, k, v, r, g], go)
    assert torch.equal(eager[0], compiled[0])
    for a, b in zip(eager[1], compiled[1]):
        assert torch.equal(a, b)


def test_float64_is_not_sent_to_triton():
    q, k, v, _, _ = attention3d_inputs((1, 4, 2, 3, 3), 6, torch.float64)
    assert A.select(q, k, v, "spatial", 1).backend.startswith("torch_")
