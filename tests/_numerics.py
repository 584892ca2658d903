"""The project's numerics rule, once, for every op's tests.

Rule: a kernel's error against a float64 reference may be at most **twice** the error of the same
computation done by PyTorch in the kernel's precision, plus a rounding floor::

    max|kernel - ref64| <= 2 * max|torch_lp - ref64| + conditioning * ulps * eps(dtype) * max|ref64|

* ``ref64``: the reference composition (``stssa_kernels.reference``) run in float64;
* ``torch_lp``: the same composition run in the kernel's dtype (``eps(dtype)`` is that dtype's
  machine epsilon, ``torch.finfo(dtype).eps``);
* the floor covers results PyTorch happens to compute exactly (a softmax over one key, a copied
  residual) where the kernel rounds once; ``conditioning`` scales it for ill-conditioned inputs (with
  logits of magnitude ``s``, a rounding of the logits by ``eps * s`` moves the probabilities by as much).

API (used by test_attention3d*.py and test_temporal_proj*.py; written to fit any op):

* :func:`assert_by_rule` -- one tensor against its float64 reference and PyTorch's low-precision result.
* :func:`run_with_grads` -- forward + backward of a function on fresh leaf copies of its inputs.
* :func:`check_against_float64` -- an op and its reference composition, forward and every input
  gradient, by the rule.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

ULPS = 8


def max_error(a: Tensor, ref: Tensor) -> float:
    """max |a - ref| in float64 (0 for empty tensors)."""
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def rounding_floor(ref64: Tensor, dtype: torch.dtype, ulps: int = ULPS) -> float:
    """``ulps`` units of ``dtype``'s epsilon at the scale of the reference (its largest magnitude)."""
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    return ulps * torch.finfo(dtype).eps * max(scale, torch.finfo(torch.float32).tiny)


def assert_by_rule(out: Tensor, ref64: Tensor, torch_lp: Tensor, name: str = "", *, ulps: int = ULPS,
                   conditioning: float = 1.0) -> None:
    """``out`` (the kernel, any dtype) vs ``ref64`` (float64 reference) vs ``torch_lp`` (PyTorch's
    composition in ``out``'s dtype): asserts finite values, equal shapes and the 2x rule."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err, base = max_error(out, ref64), max_error(torch_lp, ref64)
    floor = conditioning * rounding_floor(ref64, out.dtype, ulps)
    assert err <= 2 * base + floor, (f"{name}: error {err:.3g} > 2 x PyTorch's {base:.3g} + floor {floor:.3g} "
                                     f"({out.dtype})")


def run_with_grads(fn: Callable[..., Tensor], inputs: Sequence[Optional[Tensor]], grad_out: Tensor):
    """``fn(*leaves)`` on detached copies of ``inputs`` (None entries stay None; floating ones require
    grad), then backward with ``grad_out`` (cast to the output's dtype).
    Returns ``(output, [grad of each input or None])``."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None
              for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(device=out.device, dtype=out.dtype))
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def check_against_float64(op: Callable[..., Tensor], composition: Callable[..., Tensor],
                          inputs: Sequence[Optional[Tensor]], names: Sequence[str], *, grad_out: Tensor = None,
                          conditioning: float = 1.0, ulps: int = ULPS, seed: int = 1) -> Tensor:
    """Forward and the gradient of every (non-None) input of ``op(*inputs)`` against
    ``composition(*inputs)`` in float64, by the 2x rule with ``composition`` in the inputs' own dtypes
    as PyTorch's low-precision baseline. ``names`` label the inputs in failure messages; ``grad_out``
    defaults to a seeded standard normal (rounded to the output's dtype, so that the float64 reference
    sees the values the kernel sees). Returns the op's output."""
    with torch.no_grad():
        shape_probe = composition(*inputs)
    if grad_out is None:
        g = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(shape_probe.shape, generator=g, dtype=torch.float64).to(shape_probe.device)
    # the same incoming gradient for all three: the one the kernel sees, rounded to its output dtype
    grad_out = grad_out.to(shape_probe.dtype).double()
    out64, g64 = run_with_grads(composition, [t.double() if t is not None and t.is_floating_point() else t
                                              for t in inputs], grad_out)
    outc, gc = run_with_grads(composition, inputs, grad_out)
    outk, gk = run_with_grads(op, inputs, grad_out)
    assert outk.dtype == outc.dtype, f"output dtype {outk.dtype}, PyTorch gives {outc.dtype}"
    assert_by_rule(outk, out64, outc, "out", ulps=ulps, conditioning=conditioning)
    for name, a, b, c in zip(names, gk, gc, g64):
        if c is not None:
            assert a is not None, f"grad {name}: missing"
            assert a.dtype == b.dtype, f"grad {name}: dtype {a.dtype}, PyTorch gives {b.dtype}"
            assert_by_rule(a, c, b, f"grad {name}", ulps=ulps, conditioning=conditioning)
    return outk
