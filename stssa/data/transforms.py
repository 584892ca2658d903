"""Clip-and-box transforms for AVA: short-side scale jitter, random crop, horizontal flip, test resize.

A clip here is a float ``Tensor[T, 3, H, W]`` with values in ``[0, 255]`` (frames as a batch, so that
``F.interpolate`` resizes every frame at once); boxes are ``Tensor[L, 4]`` ``(x1, y1, x2, y2)`` in
continuous pixel coordinates of that clip: the pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``, so the
whole frame is ``(0, 0, W, H)`` and a normalised box maps to pixels by multiplying with ``(W, H, W, H)``.
This is the convention in which ``F.interpolate(align_corners=False)`` scales pixel centres, and it is the
one ``roi_align3d(..., aligned=True)`` expects. Every geometric step transforms the boxes with the pixels;
``tests/test_ava_data.py`` checks that painted box regions stay inside their transformed boxes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["short_side_size", "resize", "random_short_side_scale", "random_crop", "horizontal_flip",
           "clip_boxes", "normalize", "TrainTransform", "TestTransform"]


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """``(h, w)`` after scaling so that the short side is ``short`` (aspect ratio kept, rounded)."""
    if height <= width:
        return short, max(1, int(round(width * short / height)))
    return max(1, int(round(height * short / width))), short


def resize(clip: Tensor, boxes: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Bilinear (antialiased when shrinking) resize of ``clip [T, 3, H, W]`` to ``size = (h, w)``."""
    h0, w0 = clip.shape[-2:]
    h, w = size
    if (h, w) != (h0, w0):
        clip = F.interpolate(clip, size=(h, w), mode="bilinear", align_corners=False,
                             antialias=(h < h0 or w < w0))
        boxes = boxes * boxes.new_tensor([w / w0, h / h0, w / w0, h / h0])
    return clip, boxes


def random_short_side_scale(clip: Tensor, boxes: Tensor, min_size: int, max_size: int,
                            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Scale jitter: resize so that the short side is uniform in ``[min_size, max_size]``."""
    short = int(torch.randint(min_size, max_size + 1, (1,), generator=generator))
    return resize(clip, boxes, short_side_size(clip.shape[-2], clip.shape[-1], short))


def clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """Clip boxes to the frame ``[0, W] x [0, H]``."""
    lim = boxes.new_tensor([width, height, width, height])
    return torch.minimum(boxes.clamp(min=0), lim)


def random_crop(clip: Tensor, boxes: Tensor, size: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Crop a random ``size x size`` window (the same for every frame); boxes shifted and clipped."""
    h, w = clip.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"random_crop: clip of {h}x{w} is smaller than the crop size {size}")
    y0 = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    x0 = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    clip = clip[..., y0:y0 + size, x0:x0 + size]
    boxes = clip_boxes(boxes - boxes.new_tensor([x0, y0, x0, y0]), size, size)
    return clip, boxes


def horizontal_flip(clip: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror left-right: ``x -> W - x`` (so ``x1' = W - x2``, ``x2' = W - x1``)."""
    w = clip.shape[-1]
    flipped = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    return clip.flip(-1), flipped


def normalize(clip: Tensor, mean, std) -> Tensor:
    """``(clip / 255 - mean) / std`` per channel; ``clip`` is ``[T, 3, H, W]`` in ``[0, 255]``."""
    # (x / 255 - m) / s == (x - 255 m) * (1 / (255 s)): two passes over the clip instead of three.
    m = clip.new_tensor(mean).view(1, 3, 1, 1) * 255.0
    inv = 1.0 / (clip.new_tensor(std).view(1, 3, 1, 1) * 255.0)
    return (clip - m) * inv


class TrainTransform:
    """Training augmentation (PySlowFast AVA recipe): short side uniform in ``jitter_scales``, random
    ``crop_size`` square crop, horizontal flip with probability ``flip_prob``, normalisation.

    ``__call__(clip [T, 3, H, W] float 0..255, boxes [L, 4] pixels) -> (clip [3, T, S, S] normalised,
    boxes [L, 4] pixels of the crop, keep bool[L])``; ``keep`` is False for boxes left with less than one
    pixel of width or height inside the crop (their person is outside it; the caller drops them).
    """

    def __init__(self, crop_size: int, jitter_scales: tuple[int, int], flip_prob: float = 0.5,
                 mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225)):
        lo, hi = (int(v) for v in jitter_scales)
        if not (crop_size > 0 and crop_size <= lo <= hi):
            raise ValueError(f"TrainTransform: need 0 < crop_size <= jitter_scales[0] <= jitter_scales[1], "
                             f"got crop_size={crop_size}, jitter_scales={jitter_scales}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"TrainTransform: flip_prob must lie in [0, 1], got {flip_prob}")
        self.crop_size, self.jitter_scales, self.flip_prob = int(crop_size), (lo, hi), float(flip_prob)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, clip: Tensor, boxes: Tensor, generator: torch.Generator | None = None):
        clip, boxes = random_short_side_scale(clip, boxes, *self.jitter_scales, generator=generator)
        clip, boxes = random_crop(clip, boxes, self.crop_size, generator=generator)
        if float(torch.rand((), generator=generator)) < self.flip_prob:
            clip, boxes = horizontal_flip(clip, boxes)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        clip = normalize(clip, self.mean, self.std)
        return clip.permute(1, 0, 2, 3).contiguous(), boxes, keep


class TestTransform:
    """Test-time transform: resize so that the short side is ``short_side`` (no crop), normalise.

    ``__call__(clip [T, 3, H, W], boxes [L, 4]) -> (clip [3, T, h, w], boxes [L, 4], keep all-True)``.
    """

    def __init__(self, short_side: int, mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225)):
        if short_side <= 0:
            raise ValueError(f"TestTransform: short_side must be positive, got {short_side}")
        self.short_side, self.mean, self.std = int(short_side), tuple(mean), tuple(std)

    def __call__(self, clip: Tensor, boxes: Tensor, generator: torch.Generator | None = None):
        size = short_side_size(clip.shape[-2], clip.shape[-1], self.short_side)
        clip, boxes = resize(clip, boxes, size)
        boxes = clip_boxes(boxes, *size)
        clip = normalize(clip, self.mean, self.std)
        return clip.permute(1, 0, 2, 3).contiguous(), boxes, torch.ones(len(boxes), dtype=torch.bool)
