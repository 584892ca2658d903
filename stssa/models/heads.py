"""RoI heads: the STSSA head of the paper and the PySlowFast-style baseline.

STSSA head (``STSSAHead``)::

    features [N, C, T, H, W] --roi_align3d (7x7, 1/16, aligned, time kept)--> x [K, C, T, 7, 7]
    for each layer:  for axis in (spatial = SSFA, temporal = TSFA):
        q_s, k_s, v_s, q_f, k_f, v_f = temporal_proj(x, [Wq_s, Wk_s, Wv_s (7x1x1), Wq_f, Wk_f, Wv_f (1x1x1)])
        x = x + gamma_s * attention3d(q_s, k_s, v_s, axis) + gamma_f * attention3d(q_f, k_f, v_f, axis)
        x = LayerNorm_C(x)                                   (optional)
    GAP or GMP over (T, 7, 7) -> dropout -> Linear(C, 80)

The "slow" branch projects Q/K/V with a 7x1x1 temporal convolution (each position sees a 7-frame
temporal context before attending), the "fast" branch with 1x1x1. SSFA attends over the 7x7 positions
of each frame, TSFA over the T frames of each position. The residual is SAGAN's: one learnable scalar
``gamma`` per branch, initialised at 0 so every block starts as the identity.

``embed_dim`` is the Q/K embedding width (512 or 2048 in the paper's ablation); V keeps the channel
count C of the RoI features so the residual needs no output projection -- the reading of "SAGAN-style
residual" that the ``attention3d`` op computes in one pass (``residual + gamma * softmax(q k) v``).

``use_fused`` picks the fused ``stssa_kernels`` ops or their plain-PyTorch references
(:mod:`stssa.models.ops`) for the same parameters.

Baseline head (``BaselineHead``, PySlowFast ``ResNetRoIHead``): average the features over time,
2-D RoIAlign 7x7, spatial max pool, dropout, Linear(C, 80).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .conv import Conv3d
from .ops import get_op

AXES = ("spatial", "temporal")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of ``[K, C, T, H, W]`` (plain PyTorch on both paths)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class SlowFastAttention(nn.Module):
    """One SSFA (``axis="spatial"``) or TSFA (``axis="temporal"``) block with slow and fast branches.

    ``x [K, C, T, H, W] -> [K, C, T, H, W]``.
    """

    def __init__(self, channels: int, embed_dim: int, axis: str, branches: Sequence[str] = ("slow", "fast"),
                 slow_kernel: int = 7, heads: int = 1, layernorm: bool = False, recompute: bool = False,
                 scale: float | None = None, gamma_init: float = 0.0, norm_position: str = "post"):
        super().__init__()
        if axis not in AXES:
            raise ValueError(f"SlowFastAttention: axis must be one of {AXES}, got {axis!r}")
        if not branches or any(b not in ("slow", "fast") for b in branches):
            raise ValueError(f"SlowFastAttention: branches must be a non-empty subset of ('slow', 'fast'), got {branches!r}")
        if slow_kernel % 2 != 1:
            raise ValueError(f"SlowFastAttention: slow_kernel must be odd, got {slow_kernel}")
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"SlowFastAttention: heads must be a positive int, got {heads!r}")
        if embed_dim % heads or channels % heads:
            raise ValueError(f"SlowFastAttention: heads={heads} must divide embed_dim={embed_dim} and channels={channels}")
        if norm_position not in ("post", "pre"):
            raise ValueError(f"SlowFastAttention: norm_position must be 'post' or 'pre', got {norm_position!r}")
        if scale is not None and not float(scale) > 0:
            raise ValueError(f"SlowFastAttention: scale must be None or > 0, got {scale!r}")
        self.scale = None if scale is None else float(scale)
        self.norm_position = norm_position
        self.axis = axis
        self.branches = tuple(branches)
        self.heads = heads
        self.recompute = bool(recompute)
        self.use_fused = True
        self.proj = nn.ModuleDict()
        for b in self.branches:
            kt = slow_kernel if b == "slow" else 1
            pad = (kt // 2, 0, 0)
            self.proj[b] = nn.ModuleDict({
                "q": Conv3d(channels, embed_dim, (kt, 1, 1), padding=pad),
                "k": Conv3d(channels, embed_dim, (kt, 1, 1), padding=pad),
                "v": Conv3d(channels, channels, (kt, 1, 1), padding=pad),
            })
        self.gamma = nn.ParameterDict({b: nn.Parameter(torch.full((), float(gamma_init))) for b in self.branches})
        self.norm = ChannelLayerNorm(channels) if layernorm else None

    def _convs(self):
        return [self.proj[b][n] for b in self.branches for n in ("q", "k", "v")]

    def _attend(self, x: Tensor) -> Tensor:
        temporal_proj = get_op("temporal_proj", self.use_fused)
        attention3d = get_op("attention3d", self.use_fused)
        convs = self._convs()
        # pre-norm: Q/K/V see the normalised input, the residual stream stays un-normalised.
        src = self.norm(x) if self.norm is not None and self.norm_position == "pre" else x
        qkv = temporal_proj(src, [c.weight for c in convs], [c.bias for c in convs])
        y = x
        for i, b in enumerate(self.branches):
            q, k, v = qkv[3 * i: 3 * i + 3]
            y = attention3d(q, k, v, self.axis, heads=self.heads, scale=self.scale, residual=y, gamma=self.gamma[b])
        return y

    def forward(self, x: Tensor) -> Tensor:
        # recompute: keep only the block's input for the backward and redo the projections and the
        # attention there. The Q/K/V projections (2 x embed + C channels per branch) are most of what
        # the block saves, and the fused kernels cannot drop them: they are the attention's inputs.
        if self.recompute and torch.is_grad_enabled():
            y = torch.utils.checkpoint.checkpoint(self._attend, x, use_reentrant=False)
        else:
            y = self._attend(x)
        return self.norm(y) if self.norm is not None and self.norm_position == "post" else y

    def extra_repr(self) -> str:
        return (f"axis={self.axis!r}, branches={self.branches}, heads={self.heads}, scale={self.scale}, "
                f"norm_position={self.norm_position!r}")


class STSSAHead(nn.Module):
    """``features [N, C, T, H, W], rois [K, 5] (batch_idx, x1, y1, x2, y2 in input pixels) -> logits [K, classes]``."""

    def __init__(self, in_channels: int, num_classes: int = 80, axes: Sequence[str] = ("spatial", "temporal"),
                 num_layers: int = 1, embed_dim: int = 512, branches: Sequence[str] = ("slow", "fast"),
                 slow_kernel: int = 7, heads: int = 1, layernorm: bool = False, pool: str = "avg",
                 dropout: float = 0.5, roi_size: int = 7, spatial_scale: float = 1 / 16,
                 sampling_ratio: int = 0, aligned: bool = True, use_fused: bool = True, recompute: bool = False,
                 scale: float | None = None, gamma_init: float = 0.0, norm_position: str = "post"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"STSSAHead: pool must be 'avg' or 'max', got {pool!r}")
        axes = tuple(axes)
        if not axes or any(a not in AXES for a in axes):
            raise ValueError(f"STSSAHead: axes must be a non-empty subset of {AXES}, got {axes!r}")
        if num_layers < 0:
            raise ValueError(f"STSSAHead: num_layers must be >= 0, got {num_layers}")
        self.roi_size = (roi_size, roi_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.pool = pool
        self.blocks = nn.ModuleList(
            SlowFastAttention(in_channels, embed_dim, axis, branches, slow_kernel, heads, layernorm, recompute,
                              scale, gamma_init, norm_position)
            for _ in range(num_layers) for axis in axes)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.set_fused(use_fused)

    def set_fused(self, use_fused: bool) -> None:
        self.use_fused = bool(use_fused)
        for b in self.blocks:
            b.use_fused = self.use_fused

    def roi_features(self, features: Tensor, rois: Tensor) -> Tensor:
        """``[N, C, T, H, W], [K, 5] -> [K, C, T, 7, 7]``."""
        roi_align3d = get_op("roi_align3d", self.use_fused)
        return roi_align3d(features, rois, self.roi_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        return self.forward_rois(self.roi_features(features, rois))

    def forward_rois(self, x: Tensor) -> Tensor:
        """The head after the RoIAlign: ``x [K, C, T, r, r]`` (``roi_features``) -> logits ``[K, classes]``."""
        for block in self.blocks:
            x = block(x)
        x = x.flatten(2)
        x = x.mean(2) if self.pool == "avg" else x.amax(2)
        return self.classifier(self.dropout(x))


class BaselineHead(nn.Module):
    """PySlowFast ``ResNetRoIHead``: temporal average, 2-D RoIAlign 7x7, spatial max pool, dropout, linear.

    ``features [N, C, T, H, W], rois [K, 5] -> logits [K, classes]``. The fused path runs the RoIAlign
    as ``roi_align3d`` on the ``T = 1`` averaged map, the reference path as torchvision ``roi_align``.
    """

    def __init__(self, in_channels: int, num_classes: int = 80, pool: str = "max", dropout: float = 0.5,
                 roi_size: int = 7, spatial_scale: float = 1 / 16, sampling_ratio: int = 0, aligned: bool = True,
                 use_fused: bool = True):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"BaselineHead: pool must be 'avg' or 'max', got {pool!r}")
        self.roi_size = (roi_size, roi_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.use_fused = bool(use_fused)

    def set_fused(self, use_fused: bool) -> None:
        self.use_fused = bool(use_fused)

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        avg = features.mean(2, keepdim=True)
        if self.use_fused:
            x = get_op("roi_align3d", True)(avg, rois, self.roi_size, self.spatial_scale, self.sampling_ratio,
                                            self.aligned)[:, :, 0]
        else:
            from torchvision.ops import roi_align
            x = roi_align(avg[:, :, 0], rois.to(avg.dtype), self.roi_size, self.spatial_scale, self.sampling_ratio,
                          self.aligned)
        return self._pool_classify(x)

    def roi_features(self, features: Tensor, rois: Tensor) -> Tensor:
        """``[N, C, T, H, W], [K, 5] -> [K, C, T, 7, 7]``: the time-resolved RoIAlign (``roi_align3d``), which
        :meth:`forward_rois` averages over time -- equal to the 2-D RoIAlign of the time average, since
        bilinear sampling is linear and the same at every ``t``."""
        roi_align3d = get_op("roi_align3d", self.use_fused)
        return roi_align3d(features, rois, self.roi_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def forward_rois(self, x: Tensor) -> Tensor:
        """``x [K, C, T, r, r]`` (``roi_features``) -> logits ``[K, classes]``."""
        return self._pool_classify(x.mean(2))

    def _pool_classify(self, x: Tensor) -> Tensor:
        x = x.flatten(2)
        x = x.mean(2) if self.pool == "avg" else x.amax(2)
        return self.classifier(self.dropout(x))

