"""Plain-PyTorch references for ``attention3d`` (SAGAN-style self-attention on video feature maps).

Two compositions, both autograd-aware and valid in any floating dtype (float64 included):

* :func:`attention3d_ref` - the paper-style composition: permute/reshape to sequences, ``bmm``,
  ``softmax``, ``bmm``, permute back. It materialises the ``[sequences, L, L]`` attention matrix.
  It is the float64 ground truth of the tests, baseline (a) of ``benchmarks/attn3d.py`` and the
  ``use_fused=False`` path of the model.
* :func:`attention3d_sdpa` - the same maths through ``torch.nn.functional.scaled_dot_product_attention``
  with the permutes (and copies) it needs; baseline (b) of the benchmark.

Shapes: ``q, k: [B, Dk, T, H, W]``, ``v: [B, Dv, T, H, W]`` -> ``[B, Dv, T, H, W]``. ``axis`` picks the
token set of one sequence: ``"spatial"`` the H*W positions of one frame (B*T sequences),
``"temporal"`` the T frames of one position (B*H*W sequences), ``"full"`` all T*H*W positions
(B sequences). ``heads`` splits the channels; ``scale`` defaults to ``(Dk / heads) ** -0.5``.
With ``residual``/``gamma``: ``residual + gamma * attention``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AXES = ("spatial", "temporal", "full")


def seq_count_and_length(shape, axis: str) -> tuple[int, int]:
    """(number of sequences, tokens per sequence) of a ``[B, D, T, H, W]`` map for ``axis``."""
    B, _, T, H, W = shape
    if axis == "spatial":
        return B * T, H * W
    if axis == "temporal":
        return B * H * W, T
    if axis == "full":
        return B, T * H * W
    raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


_SEQ_PERM = {"spatial": (0, 3, 1, 4, 5, 2), "temporal": (0, 4, 5, 1, 3, 2), "full": (0, 1, 3, 4, 5, 2)}


def to_seq(x: torch.Tensor, axis: str, heads: int, allow_copy: bool = True) -> torch.Tensor:
    """[B, D, T, H, W] -> [sequences, heads, L, D/heads]: one permute and one reshape, so a view where
    the strides allow and otherwise exactly one copy. ``allow_copy=False`` raises instead of copying."""
    if axis not in _SEQ_PERM:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    B, D, T, H, W = x.shape
    y = x.view(B, heads, D // heads, T, H, W).permute(_SEQ_PERM[axis])
    if axis == "spatial":
        shape = (B * T, heads, H * W, D // heads)
    elif axis == "temporal":
        shape = (B * H * W, heads, T, D // heads)
    else:
        shape = (B, heads, T * H * W, D // heads)
    return y.reshape(shape) if allow_copy else y.view(shape)


def seq_as_6d(y: torch.Tensor, axis: str, shape) -> torch.Tensor:
    """[sequences, heads, L, d] -> [B, heads, d, T, H, W], always a view (split + permute only)."""
    B, _, T, H, W = shape
    N, heads, L, d = y.shape
    if axis == "spatial":
        return y.reshape(B, T, heads, H, W, d).permute(0, 2, 5, 1, 3, 4)
    if axis == "temporal":
        return y.reshape(B, H, W, heads, T, d).permute(0, 3, 5, 4, 1, 2)
    if axis == "full":
        return y.reshape(B, heads, T, H, W, d).permute(0, 1, 5, 2, 3, 4)
    raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


def from_seq(y: torch.Tensor, axis: str, shape) -> torch.Tensor:
    """Inverse of :func:`to_seq`: [sequences, heads, L, d] -> [B, heads*d, T, H, W] (a view for one
    head; merging heads and channels copies otherwise)."""
    return seq_as_6d(y, axis, shape).flatten(1, 2)


def _epilogue(attn: torch.Tensor, residual, gamma) -> torch.Tensor:
    if gamma is not None:
        attn = gamma * attn
    if residual is not None:
        attn = residual + attn
    return attn


def attention3d_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: str, heads: int = 1,
                    scale: float | None = None, residual: torch.Tensor | None = None,
                    gamma: torch.Tensor | None = None) -> torch.Tensor:
    """Paper-style composition (SAGAN): explicit ``bmm -> softmax -> bmm`` per sequence.

    Args:
        q, k: ``[B, Dk, T, H, W]``; v: ``[B, Dv, T, H, W]``.
        axis: ``"spatial" | "temporal" | "full"``.
        heads: number of heads (divides Dk and Dv).
        scale: logit scale, default ``(Dk / heads) ** -0.5``.
        residual: optional ``[B, Dv, T, H, W]``; gamma: optional scalar tensor.
    Returns:
        ``[B, Dv, T, H, W]`` = ``residual + gamma * softmax(scale * q k^T) v`` (terms present when given).
    Computes in the inputs' dtype (use float64 for ground truth); O(L^2) memory per sequence.
    """
    if scale is None:  # (a zero key width makes every logit 0, whatever the scale)
        scale = (q.shape[1] // heads) ** -0.5 if q.shape[1] else 1.0
    qs, ks, vs = (to_seq(t, axis, heads) for t in (q, k, v))
    N, h, L, dk = qs.shape
    qs, ks, vs = (t.reshape(N * h, L, t.shape[-1]) for t in (qs, ks, vs))
    logits = torch.bmm(qs, ks.transpose(1, 2)) * scale           # [N*h, L, L]
    attn = torch.bmm(torch.softmax(logits, dim=-1), vs)          # [N*h, L, dv]
    out = from_seq(attn.reshape(N, h, L, -1), axis, v.shape)
    return _epilogue(out, residual, gamma)


def attention3d_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: str, heads: int = 1,
                     scale: float | None = None, residual: torch.Tensor | None = None,
                     gamma: torch.Tensor | None = None) -> torch.Tensor:
    """The same result through ``F.scaled_dot_product_attention`` with the permutes it needs.

    SDPA takes ``[N, heads, L, d]``; its fused GPU backends need the last dim contiguous, so the
    permuted q/k/v are copied with ``.contiguous()`` (a no-op where the layout already fits, e.g. the
    spatial/full axes of a ``channels_last_3d`` map with one head). The output is returned as the
    permuted view, as a user writing this composition would get it. Which backend runs is left to
    the caller's ``torch.nn.attention.sdpa_kernel`` context.
    """
    if scale is None:
        scale = (q.shape[1] // heads) ** -0.5 if q.shape[1] else 1.0
    qs, ks, vs = (to_seq(t, axis, heads).contiguous() for t in (q, k, v))
    attn = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
    return _epilogue(from_seq(attn, axis, v.shape), residual, gamma)
