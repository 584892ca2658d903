"""Plain-PyTorch reference of ``temporal_proj``: one ``F.conv3d`` per projection.

This is the single source of truth for the fused op (tests compare against it in float64), the
"six separate Conv3d" baseline of ``benchmarks/temporal_proj.py`` and the model's ``use_fused=False``
path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def temporal_proj_ref(x: Tensor, weights: Sequence[Tensor],
                      biases: Optional[Sequence[Optional[Tensor]]] = None) -> list[Tensor]:
    """Temporal-only 3-D convolutions of one input, computed separately.

    Args:
        x: ``[B, C, T, H, W]``.
        weights: list of ``[C_out_i, C, kt_i, 1, 1]`` Conv3d weights, ``kt_i`` odd.
        biases: ``None`` or a list of the same length holding ``[C_out_i]`` tensors or ``None``.

    Returns:
        ``[out_0, out_1, ...]`` with ``out_i = F.conv3d(x, weights[i], biases[i],
        padding=(kt_i // 2, 0, 0))`` of shape ``[B, C_out_i, T, H, W]`` (zero padding in time).
    """
    if biases is None:
        biases = [None] * len(weights)
    return [F.conv3d(x, w, b, padding=(w.shape[2] // 2, 0, 0)) for w, b in zip(weights, biases)]
