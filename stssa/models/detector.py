"""The action detector: backbone + RoI head, and ``build_model`` from a config dict."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .heads import BaselineHead, STSSAHead
from .i3d import I3D, I3DConfig
from .ops import set_fused


class ActionDetector(nn.Module):
    """``clips [B, 3, T, H, W], rois [K, 5] (batch_idx, x1, y1, x2, y2 in clip pixels) -> logits [K, classes]``.

    The logits are per-class (multi-label): train with sigmoid BCE, score with ``sigmoid``.
    """

    def __init__(self, backbone: I3D, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def use_fused(self) -> bool:
        return self.head.use_fused

    def set_fused(self, use_fused: bool) -> "ActionDetector":
        """Switch between the fused ``stssa_kernels`` ops and the plain-PyTorch reference (same parameters)."""
        set_fused(self, use_fused)
        return self

    def forward(self, clips: Tensor, rois: Tensor) -> Tensor:
        if rois.dim() != 2 or rois.size(1) != 5:
            raise ValueError(f"ActionDetector: rois must be [K, 5] (batch_idx, x1, y1, x2, y2), got {tuple(rois.shape)}")
        return self.head(self.backbone(clips), rois)


_HEAD_KEYS = {
    "stssa": {"axes", "num_layers", "embed_dim", "branches", "slow_kernel", "heads", "layernorm", "pool",
              "dropout", "roi_size", "sampling_ratio", "aligned", "recompute", "scale", "gamma_init",
              "norm_position"},
    "baseline": {"pool", "dropout", "roi_size", "sampling_ratio", "aligned"},
}


def build_head(cfg: dict, in_channels: int, spatial_scale: float, num_classes: int, use_fused: bool) -> nn.Module:
    cfg = dict(cfg or {})
    kind = cfg.pop("type", "stssa")
    if kind not in _HEAD_KEYS:
        raise ValueError(f"model.head.type must be one of {sorted(_HEAD_KEYS)}, got {kind!r}")
    unknown = sorted(set(cfg) - _HEAD_KEYS[kind])
    if unknown:
        raise ValueError(f"model.head ({kind}): unknown keys {unknown}; known: {sorted(_HEAD_KEYS[kind])}")
    cls = STSSAHead if kind == "stssa" else BaselineHead
    return cls(in_channels, num_classes=num_classes, spatial_scale=spatial_scale, use_fused=use_fused, **cfg)


def build_model(cfg: dict, use_fused: Optional[bool] = None, load_pretrained: bool = True) -> ActionDetector:
    """Build an :class:`ActionDetector` from the ``model`` section of a config::

        backbone: {depths, width, temporal_kernels, ...}   # I3DConfig fields
        head: {type: stssa|baseline, axes, num_layers, embed_dim, layernorm, pool, dropout, ...}
        num_classes: 80
        use_fused: true
        pretrained: path/to/checkpoint.pyth               # optional (PyTorchVideo / PySlowFast / ours)
    """
    cfg = dict(cfg or {})
    known = {"backbone", "head", "num_classes", "use_fused", "pretrained", "pretrained_layout"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"model: unknown keys {unknown}; known: {sorted(known)}")
    bcfg = I3DConfig.from_dict(cfg.get("backbone"))
    backbone = I3D(bcfg)
    if load_pretrained and cfg.get("pretrained"):
        from .checkpoint import load_backbone
        report = load_backbone(backbone, cfg["pretrained"], layout=cfg.get("pretrained_layout", "auto"))
        print(f"pretrained backbone {cfg['pretrained']}:\n{report}")
        if bcfg.freeze_bn:
            backbone.freeze_bn_parameters()
    fused = cfg.get("use_fused", True) if use_fused is None else use_fused
    head = build_head(cfg.get("head"), backbone.out_channels, 1.0 / bcfg.stride, cfg.get("num_classes", 80), fused)
    return ActionDetector(backbone, head)
