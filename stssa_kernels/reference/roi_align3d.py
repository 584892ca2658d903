"""Reference RoIAlign3D built from ``torchvision.ops.roi_align`` (the specification frame by frame).

Two compositions, both used as benchmark baselines and by the model's ``use_fused=False`` path:

* :func:`roi_align3d_ref` folds time into the batch (one permute copy of the features, one call);
* :func:`roi_align3d_ref_loop` calls torchvision once per frame.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align


def _as_rois(boxes, input: Tensor) -> Tensor:
    if isinstance(boxes, (list, tuple)):
        rows = [torch.cat([torch.full((b.size(0), 1), i, dtype=b.dtype, device=b.device), b], 1)
                for i, b in enumerate(boxes)]
        return torch.cat(rows) if rows else input.new_zeros((0, 5))
    return boxes


def roi_align3d_ref(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                    aligned: bool = False) -> Tensor:
    """``input`` [N, C, T, H, W], boxes [K, 5] / [K, T, 5] / list of [L_i, 4] -> [K, C, T, h, w].

    Time is folded into the batch: frame t of clip n becomes image n * T + t.
    """
    n, c, t, h, w = input.shape
    rois = _as_rois(boxes, input).to(input.dtype)
    k = rois.size(0)
    frames = input.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    tt = torch.arange(t, device=input.device, dtype=rois.dtype)
    if rois.dim() == 2:
        rois_t = rois[:, None, :].expand(k, t, 5).clone()
    else:
        rois_t = rois.clone()
    rois_t[..., 0] = rois_t[..., 0] * t + tt  # image index of (clip, frame)
    out = roi_align(frames, rois_t.reshape(k * t, 5), output_size, spatial_scale, sampling_ratio, aligned)
    oh, ow = out.shape[-2:]
    return out.reshape(k, t, c, oh, ow).permute(0, 2, 1, 3, 4).contiguous()


def roi_align3d_ref_loop(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                         aligned: bool = False) -> Tensor:
    """Same result as :func:`roi_align3d_ref`, one torchvision call per frame (no feature copy)."""
    rois = _as_rois(boxes, input).to(input.dtype)
    outs = []
    for f in range(input.size(2)):
        r = rois if rois.dim() == 2 else rois[:, f]
        outs.append(roi_align(input[:, :, f], r, output_size, spatial_scale, sampling_ratio, aligned))
    return torch.stack(outs, dim=2)
