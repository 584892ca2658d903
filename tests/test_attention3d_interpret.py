"""attention3d's Triton kernels on CPU tensors under the Triton interpreter.

Run in their own process (TRITON_INTERPRET must be set before triton is imported):

    TRITON_INTERPRET=1 python -m pytest -m interpret tests/test_attention3d_interpret.py

With TRITON_INTERPRET=1 the op's dispatch sends CPU fp16/fp32 tensors to the Triton kernels, so these
tests run the exact kernels a GPU runs: both families (packed: L <= BLOCK_M, flash: longer), the sm_75
and sm_80/90 tiles, every layout path (merged / unmerged strides), wide Dv (dk/dv split launches) and
the residual/gamma epilogue. Sizes are tiny: the interpreter executes every program in numpy.
Tolerance rule as in test_attention3d.py: error <= 2 x the PyTorch composition's error in the same
dtype (both vs float64) + a rounding floor.
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.interpret,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="needs TRITON_INTERPRET=1 set before triton is imported")]

if os.environ.get("TRITON_INTERPRET") == "1":
    from stssa_kernels import attention3d
    from stssa_kernels.ops import attention3d as A
    from test_attention3d import _grads, _make, assert_eager_matches_op, check_against_float64


def _kernel(q, v, axis, heads=1):
    c = A.select(q, q, v, axis, heads)
    assert c.impl == "triton", c.describe()
    return c.kernel


@pytest.fixture(params=[80, 75], ids=["sm80-tiles", "sm75-tiles"])
def arch(request, monkeypatch):
    monkeypatch.setattr(A, "INTERPRET_ARCH", request.param)
    return request.param


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
    (q, k, v), r, g = _make(shape, dv, dtype, "contiguous", epilogue=dtype == torch.float16)
    check_against_float64(q, k, v, axis, heads=heads, residual=r, gamma=g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sm75_7x7_frames(dtype, monkeypatch):
    """The AVA head's 7x7 frames (L = 49) on sm_75 tiles run packed with 16-wide Dk/Dv chunks (a tail
    chunk in both here): the tile that reaches any Dk, where the flash kernels stop at 256."""
    monkeypatch.setattr(A, "INTERPRET_ARCH", 75)
    (q, k, v), r, g = _make((1, 40, 2, 7, 7), 24, dtype, "channels_last", epilogue=True)
    assert _kernel(q, v, "spatial") == "triton-packed"
    check_against_float64(q, k, v, "spatial", residual=r, gamma=g)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("axis,shape", [("spatial", (2, 4, 2, 3, 5)), ("temporal", (1, 4, 6, 2, 3)),
                                        ("full", (1, 4, 2, 5, 7))])
def test_layouts(layout, axis, shape):
    (q, k, v), r, g = _make(shape, 6, torch.float32, layout, epilogue=True)
    check_against_float64(q, k, v, axis, heads=2, residual=r, gamma=g)


@pytest.mark.parametrize("axis,shape", [("spatial", (1, 8, 2, 3, 3)), ("full", (1, 8, 2, 6, 7))])
def test_wide_dv(axis, shape):
    # Dv/heads = 160 > BLOCK_DV = 64: packed loops over Dv chunks; flash splits Dv over the grid
    # (forward), sums dP over chunks for dk and splits dv over programs (backward)
    (q, k, v), r, g = _make(shape, 320, torch.float32, epilogue=True)
    kinds = {"spatial": "triton-packed", "full": "triton-flash"}
    assert _kernel(q, v, axis, heads=2) == kinds[axis]
    check_against_float64(q, k, v, axis, heads=2, residual=r, gamma=g)


@pytest.mark.parametrize("epilogue", ["residual", "gamma"])
@pytest.mark.parametrize("axis,shape", [("temporal", (2, 4, 4, 2, 2)), ("full", (1, 4, 3, 4, 6))])
def test_partial_epilogue(epilogue, axis, shape):
    (q, k, v), r, g = _make(shape, 6, torch.float32, epilogue=True)
    r, g = (r, None) if epilogue == "residual" else (None, g)
    check_against_float64(q, k, v, axis, residual=r, gamma=g)


@pytest.mark.parametrize("axis,shape", [("spatial", (2, 4, 3, 1, 1)), ("temporal", (2, 4, 1, 3, 2)),
                                        ("full", (3, 4, 1, 1, 1))])
def test_sequence_length_one(axis, shape):
    (q, k, v), r, g = _make(shape, 6, torch.float32, epilogue=True)
    out = attention3d(q, k, v, axis, residual=r, gamma=g)
    torch.testing.assert_close(out, r + g.float() * v)
    check_against_float64(q, k, v, axis, residual=r, gamma=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits_are_stable(dtype):
    (q, k, v), _, _ = _make((1, 8, 2, 5, 7), 8, dtype, logit_scale=300.0)
    logits = torch.einsum("bcn,bcm->bnm", q.double().flatten(2), k.double().flatten(2))
    assert logits.abs().max() > 1000
    for axis in ("temporal", "full"):  # packed and flash
        out = attention3d(q, k, v, axis, scale=1.0)
        assert torch.isfinite(out).all()
        check_against_float64(q, k, v, axis, scale=1.0, conditioning=logits.abs().max().item())


def test_deterministic_backward():
    (q, k, v), r, g = _make((1, 4, 3, 4, 6), 6, torch.float32, epilogue=True)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_grads(lambda *a: attention3d(*a[:3], "full", residual=a[3], gamma=a[4]), [q, k, v, r, g],
                       torch.ones(v.shape, dtype=torch.float64))[1] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("axis,shape", [("full", (1, 4, 3, 5, 5)), ("temporal", (2, 4, 4, 2, 2))])
def test_opcheck_triton_path(axis, shape):
    # the Triton implementation's fake kernel (incl. the flash path's saved attention) and autograd
    # registration; the op is a custom_op, so opcheck runs under the interpreter too
    (q, k, v), r, g = _make(shape, 6, torch.float32, epilogue=True)
    args = [t.requires_grad_() for t in (q, k, v, r, g.float())]
    assert A.select(q, k, v, axis, 2).kernel == ("triton-flash" if axis == "full" else "triton-packed")
    torch.library.opcheck(torch.ops.stssa.attention3d.default, (*args[:3], axis, 2, 0.5, *args[3:]))
    out, lse, saved = torch.ops.stssa.attention3d(*args[:3], axis, 2, 0.5, *args[3:])
    torch.library.opcheck(torch.ops.stssa._attention3d_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), q.new_empty(0), lse,
                           [t.detach() for t in saved], axis, 2, 0.5, args[4].detach()))


@pytest.mark.parametrize("axis,shape", [("full", (1, 4, 3, 5, 5)), ("temporal", (2, 4, 4, 2, 2))])
def test_eager_path_matches_registered_op(axis, shape):
    """The eager autograd.Function and the registered op run the same Triton launches: equal bit for bit
    (flash with its saved attention output, and packed)."""
    (q, k, v), r, g = _make(shape, 6, torch.float16, "channels_last", epilogue=True)
    g = g.float()
    go = torch.randn(v.shape, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    assert_eager_matches_op([q, k, v, r, g], axis, 2, 0.5, go)


def test_float64_is_not_sent_to_triton():
    (q, k, v), _, _ = _make((1, 4, 2, 3, 3), 6, torch.float64)
    assert A.select(q, k, v, "spatial", 1).impl.startswith("torch_")
