"""I3D ResNet backbone (the Non-local / PySlowFast I3D), AVA variant.

Layout of the ResNet-50 I3D of Wang et al. (Non-local networks) as configured in PySlowFast
(``MODEL.ARCH: i3d``) and PyTorchVideo (``i3d_r50``):

=========  ===========================  =================  ===========================
stage      block                        temporal kernels   output for 32x256x256 input
=========  ===========================  =================  ===========================
stem       conv 5x7x7 /(1,2,2), BN,     5                  64 x 32 x 64 x 64
           ReLU, max-pool 1x3x3 /(1,2,2)
res2       3 bottlenecks                [3, 3, 3]          256 x 32 x 64 x 64
pool       max-pool 2x1x1 /(2,1,1)                         256 x 16 x 64 x 64
res3       4 bottlenecks, /2            [3, 1, 3, 1]       512 x 16 x 32 x 32
res4       6 bottlenecks, /2            [3, 1, 3, 1, 3, 1] 1024 x 16 x 16 x 16
res5       3 bottlenecks, stride 1,     [1, 3, 1]          2048 x 16 x 16 x 16
           dilation 2 (AVA variant)
=========  ===========================  =================  ===========================

A bottleneck is ``conv_a`` (kt x 1 x 1, the temporal kernel) -> ``conv_b`` (1 x 3 x 3, carries the
spatial stride and dilation) -> ``conv_c`` (1 x 1 x 1, 4x expansion), each followed by BN, with a
1x1x1 projection shortcut on the first block of each stage ("stride on the 3x3", as PySlowFast).

Depths, width and temporal kernels are configurable so tests and the CPU demo can run a tiny
network; ``temporal_kernels`` is given per stage as a pattern that repeats over the blocks of the
stage (``[3, 1]`` over 4 blocks is ``[3, 1, 3, 1]``), which is how both reference codebases state it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List, Optional

import torch
from torch import Tensor, nn

from .conv import Conv3d

#: Temporal kernel patterns of the I3D (PySlowFast ``_TEMPORAL_KERNEL_BASIS["i3d"]``) ...
I3D_TEMPORAL = [[3], [3, 1], [3, 1], [1, 3]]
#: ... and of the Slow pathway / ``slow_r50`` (temporal convolutions only in res4 and res5).
SLOW_TEMPORAL = [[1], [1], [3], [3]]


@dataclass
class I3DConfig:
    """Backbone hyper-parameters. The defaults are the AVA I3D ResNet-50 of the paper."""

    depths: List[int] = field(default_factory=lambda: [3, 4, 6, 3])
    width: int = 64                      # stem channels; bottleneck inner width of res2 (x2 per stage)
    expansion: int = 4                   # bottleneck output = expansion * inner width
    stem_temporal: int = 5               # 5 for I3D, 1 for slow_r50
    temporal_kernels: List[List[int]] = field(default_factory=lambda: [list(p) for p in I3D_TEMPORAL])
    spatial_strides: List[int] = field(default_factory=lambda: [1, 2, 2, 1])
    spatial_dilations: List[int] = field(default_factory=lambda: [1, 1, 1, 2])
    temporal_pool: int = 2               # max-pool kernel/stride over time after res2 (1: none)
    in_channels: int = 3
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    freeze_bn: bool = False              # BN in eval mode with frozen affine (small-batch detection)
    zero_init_last_bn: bool = True       # each bottleneck's last BN scale starts at 0 (block = identity)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "I3DConfig":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"backbone config: unknown keys {unknown}; known: {sorted(names)}")
        if d.get("temporal_kernels") == "slow":
            d["temporal_kernels"] = [list(p) for p in SLOW_TEMPORAL]
        elif d.get("temporal_kernels") == "i3d":
            d["temporal_kernels"] = [list(p) for p in I3D_TEMPORAL]
        cfg = cls(**d)
        for name in ("depths", "temporal_kernels", "spatial_strides", "spatial_dilations"):
            if len(getattr(cfg, name)) != 4:
                raise ValueError(f"backbone config: {name} must have 4 entries (res2..res5), got {getattr(cfg, name)!r}")
        return cfg

    @property
    def out_channels(self) -> int:
        return self.width * 8 * self.expansion

    @property
    def stride(self) -> int:
        """Spatial stride of the res5 map with respect to the input."""
        s = 4
        for st in self.spatial_strides:
            s *= st
        return s


class Bottleneck(nn.Module):
    """``conv_a`` kt x 1 x 1 -> ``conv_b`` 1 x 3 x 3 (stride, dilation) -> ``conv_c`` 1 x 1 x 1, residual."""

    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, kt: int, stride: int, dilation: int,
                 eps: float, momentum: float, zero_init_last_bn: bool = True):
        super().__init__()
        if dim_in != dim_out or stride != 1:
            self.shortcut = nn.Sequential()
            self.shortcut.add_module("conv", Conv3d(dim_in, dim_out, 1, stride=(1, stride, stride), bias=False))
            self.shortcut.add_module("bn", nn.BatchNorm3d(dim_out, eps=eps, momentum=momentum))
        else:
            self.shortcut = None
        self.conv_a = Conv3d(dim_in, dim_inner, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=False)
        self.bn_a = nn.BatchNorm3d(dim_inner, eps=eps, momentum=momentum)
        self.conv_b = Conv3d(dim_inner, dim_inner, (1, 3, 3), stride=(1, stride, stride),
                                padding=(0, dilation, dilation), dilation=(1, dilation, dilation), bias=False)
        self.bn_b = nn.BatchNorm3d(dim_inner, eps=eps, momentum=momentum)
        self.conv_c = Conv3d(dim_inner, dim_out, 1, bias=False)
        self.bn_c = nn.BatchNorm3d(dim_out, eps=eps, momentum=momentum)
        # Zero-init of the last BN scale (Goyal et al.; PySlowFast ZERO_INIT_FINAL_BN) makes each block
        # start as identity; in a short from-scratch run the scales can stay near 0, so it is optional.
        if zero_init_last_bn:
            nn.init.zeros_(self.bn_c.weight)
        self.relu = nn.ReLU(inplace=True)

    def branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(residual branch, shortcut)`` of the block for input ``x``, before their sum and ReLU."""
        identity = x if self.shortcut is None else self.shortcut(x)
        y = self.relu(self.bn_a(self.conv_a(x)))
        y = self.relu(self.bn_b(self.conv_b(y)))
        return self.bn_c(self.conv_c(y)), identity

    def forward(self, x: Tensor) -> Tensor:
        y, identity = self.branches(x)
        return self.relu(y + identity)


class I3D(nn.Module):
    """I3D ResNet: ``clips [B, 3, T, H, W]`` -> res5 features ``[B, C5, T / 2, H / 16, W / 16]``
    (AVA strides; ``C5 = 8 * width * expansion`` = 2048 for ResNet-50)."""

    def __init__(self, cfg: Optional[I3DConfig] = None, **overrides):
        super().__init__()
        if cfg is None:
            cfg = I3DConfig.from_dict(overrides)
        elif overrides:
            raise TypeError("I3D: pass either a config or keyword overrides, not both")
        self.cfg = cfg
        kt0 = cfg.stem_temporal
        self.stem = nn.Sequential()
        self.stem.add_module("conv", Conv3d(cfg.in_channels, cfg.width, (kt0, 7, 7), stride=(1, 2, 2),
                                               padding=(kt0 // 2, 3, 3), bias=False))
        self.stem.add_module("bn", nn.BatchNorm3d(cfg.width, eps=cfg.bn_eps, momentum=cfg.bn_momentum))
        self.stem.add_module("relu", nn.ReLU(inplace=True))
        self.stem.add_module("pool", nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))

        dim_in = cfg.width
        for i in range(4):
            inner = cfg.width * 2 ** i
            out = inner * cfg.expansion
            pattern = cfg.temporal_kernels[i]
            blocks = []
            for j in range(cfg.depths[i]):
                blocks.append(Bottleneck(dim_in if j == 0 else out, inner, out, pattern[j % len(pattern)],
                                         cfg.spatial_strides[i] if j == 0 else 1, cfg.spatial_dilations[i],
                                         cfg.bn_eps, cfg.bn_momentum, cfg.zero_init_last_bn))
            self.add_module(f"res{i + 2}", nn.Sequential(*blocks))
            dim_in = out
        tp = cfg.temporal_pool
        self.pool = nn.MaxPool3d((tp, 1, 1), stride=(tp, 1, 1)) if tp > 1 else nn.Identity()
        self.out_channels = dim_in
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if cfg.freeze_bn:
            self.freeze_bn_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or x.size(1) != self.cfg.in_channels:
            raise ValueError(f"I3D: clips must be [B, {self.cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
        x = self.stem(x)
        x = self.res2(x)
        x = self.pool(x)
        x = self.res3(x)
        x = self.res4(x)
        return self.res5(x)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.cfg.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm3d):
                    m.eval()
        return self

    def freeze_bn_parameters(self) -> None:
        """With ``freeze_bn`` the BN affine parameters are not trained either (PySlowFast ``BN.FREEZE``)."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm3d):
                for p in m.parameters():
                    p.requires_grad_(False)


def i3d_r50(**overrides) -> I3D:
    """The AVA I3D ResNet-50 of the paper (res5 stride 1, dilation 2: 32x256x256 -> 2048x16x16x16)."""
    return I3D(I3DConfig.from_dict(overrides))

