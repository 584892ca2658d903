"""Temporally-resolved 3-D RoIAlign: ``torchvision.ops.roi_align`` applied to every frame of a clip.

The C++ library (LibTorch stable ABI) declares the schemas (csrc/stssa.cpp) and the CPU/CUDA kernels
(csrc/cpu, csrc/cuda); this module adds what the dispatcher needs from Python -- fake (meta) kernels for tracing, the autograd
formula, input validation with clear messages -- and the user-facing function and ``nn.Module``.

Autocast: the op is not on an autocast list, so it runs in the dtype of ``input`` (fp32/fp64/fp16/bf16,
always accumulating in fp32 or better). Under autocast a Conv3d produces fp16/bf16 features and the
RoI features come out in that dtype; boxes are always read in fp32 (fp64 for fp64 input), never
rounded to fp16, whose 0.5-pixel resolution at 1000 px would move boxes.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from .. import _ext  # noqa: F401  (schemas and kernels)
from ._dispatch import refuse_forward_ad

BoxesType = Union[Tensor, Sequence[Tensor]]

#: Largest sampling grid (samples per bin side, adaptive or sampling_ratio) the kernels take; see
#: roi_align3d_common.h.
MAX_ADAPTIVE_GRID = 1024
_INT_MAX = 2**31 - 1


def _pair(output_size) -> Tuple[int, int]:
    if isinstance(output_size, int):
        ph = pw = output_size
    else:
        try:
            ph, pw = (int(s) for s in output_size)
        except (TypeError, ValueError):
            raise ValueError(f"roi_align3d: output_size must be an int or a pair (h, w), got {output_size!r}") from None
    if ph <= 0 or pw <= 0:
        raise ValueError(f"roi_align3d: output_size must be positive, got ({ph}, {pw})")
    if ph > _INT_MAX or pw > _INT_MAX:  # the kernels index bins with int
        raise ValueError(f"roi_align3d: output_size must be at most {_INT_MAX} per side, got ({ph}, {pw})")
    return ph, pw


def convert_boxes_to_rois(boxes: BoxesType, input: Tensor) -> Tensor:
    """``Tensor[K, 5]``, ``Tensor[K, T, 5]`` or a list of ``Tensor[L_i, 4]`` -> rois in the kernel dtype.

    rois are fp32 (fp64 for fp64 input) on ``input``'s device.
    """
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"roi_align3d: boxes[{i}] must be a Tensor[L, 4], got {shape}")
            if b.device != input.device:
                raise ValueError(f"roi_align3d: boxes[{i}] is on {b.device} but input is on {input.device}")
        if len(boxes) == 0:
            return torch.empty((0, 5), dtype=dtype, device=input.device)
        idx = torch.cat([torch.full((b.size(0), 1), i, dtype=dtype, device=input.device)
                         for i, b in enumerate(boxes)])
        return torch.cat([idx, torch.cat([b.to(dtype) for b in boxes])], dim=1)
    if not isinstance(boxes, Tensor):
        raise TypeError(f"roi_align3d: boxes must be a Tensor or a list of Tensors, got {type(boxes).__name__}")
    if boxes.device != input.device:
        raise ValueError(f"roi_align3d: boxes is on {boxes.device} but input is on {input.device}")
    if not boxes.is_floating_point():
        raise TypeError(f"roi_align3d: boxes must be a floating-point tensor, got {boxes.dtype}")
    if boxes.dim() == 2 and boxes.size(1) == 5:
        pass
    elif boxes.dim() == 3 and boxes.size(2) == 5:
        if boxes.size(1) != input.size(2):
            raise ValueError(f"roi_align3d: per-frame boxes must be [K, T, 5] with T = input.size(2) = "
                             f"{input.size(2)}, got {tuple(boxes.shape)}")
    else:
        raise ValueError(f"roi_align3d: boxes must be [K, 5], [K, T, 5] or a list of [L, 4], got {tuple(boxes.shape)}")
    return boxes.detach().to(dtype)


def _has_data(t: Tensor) -> bool:
    """False for meta and fake tensors (shape inference, FakeTensorMode), whose values cannot be read."""
    return t.device.type != "meta" and not is_fake(t)


def _check_values(rois: Tensor, input: Tensor, ph: int, pw: int, spatial_scale: float, sampling_ratio: int,
                  aligned: bool) -> None:
    """Data-dependent checks, one device sync for all of them. Skipped while torch.compile traces
    and for meta/fake boxes (the kernels then return NaN for rows with an invalid batch index and
    ignore NaN samples)."""
    if rois.numel() == 0:
        return
    n = input.size(0)
    b = rois[..., 0]
    x1, y1, x2, y2 = rois[..., 1], rois[..., 2], rois[..., 3], rois[..., 4]
    flags = [
        (~torch.isfinite(rois)).any(),
        ((b < 0) | (b >= n) | (b != torch.floor(b))).any(),
        ((x2 < x1) | (y2 < y1)).any(),
        (b != b[:, :1]).any() if rois.dim() == 3 else torch.zeros((), dtype=torch.bool, device=rois.device),
    ]
    if sampling_ratio <= 0:
        gh = torch.ceil((y2 - y1) * spatial_scale / ph).amax()
        gw = torch.ceil((x2 - x1) * spatial_scale / pw).amax()
        flags.append(torch.maximum(gh, gw) > MAX_ADAPTIVE_GRID)
    bad = torch.stack(flags).tolist()  # the one sync
    if bad[0]:
        raise ValueError("roi_align3d: boxes contain NaN or infinite values")
    if bad[1]:
        raise ValueError(f"roi_align3d: boxes batch index (column 0) must be an integer in [0, {n}) "
                         f"(input.size(0) = {n}); got values {b.unique()[:8].tolist()}")
    if bad[2]:
        raise ValueError("roi_align3d: boxes must satisfy x2 >= x1 and y2 >= y1 (zero-size boxes are allowed)")
    if bad[3]:
        raise ValueError("roi_align3d: per-frame boxes must keep the same batch index on every frame")
    if len(bad) > 4 and bad[4]:
        raise ValueError(f"roi_align3d: a box spans more than {MAX_ADAPTIVE_GRID} feature-map pixels per output "
                         "bin, which would need that many adaptive samples per bin side; clip the boxes to the "
                         "image or pass sampling_ratio > 0")


def roi_align3d(input: Tensor, boxes: BoxesType, output_size, spatial_scale: float = 1.0,
                sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign on every frame of a clip, keeping time.

    Args:
        input: ``Tensor[N, C, T, H, W]`` features (contiguous, ``channels_last_3d`` or any strided view;
            read in place). fp32, fp64, fp16 or bf16.
        boxes: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` applied to every frame; or a list
            of ``N`` tensors ``Tensor[L_i, 4]`` (as torchvision); or per-frame boxes ``Tensor[K, T, 5]``
            (the batch index must be constant along T). Coordinates are in input-image pixels.
        output_size: ``int`` or ``(h, w)``.
        spatial_scale: feature-map size / image size (1/16 for a stride-16 map).
        sampling_ratio: bilinear samples per bin side (at most ``MAX_ADAPTIVE_GRID``); ``<= 0`` picks
            ``ceil(box_size / output_size)``.
        aligned: shift boxes by -0.5 pixel (the "aligned" RoIAlign of Detectron2).

    Returns:
        ``Tensor[K, C, T, h, w]`` where ``out[:, :, t] == torchvision.ops.roi_align(input[:, :, t],
        boxes_t, ...)``, in ``input``'s dtype; ``channels_last_3d`` when ``input`` is (every bin's channel
        vector contiguous, as a following Conv3d/Linear in channels-last wants it), otherwise contiguous.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"roi_align3d: input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 5:
        raise ValueError(f"roi_align3d: input must be [N, C, T, H, W], got shape {tuple(input.shape)}")
    if input.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"roi_align3d: input must be float32/float64/float16/bfloat16, got {input.dtype}")
    ph, pw = _pair(output_size)
    if not isinstance(sampling_ratio, int):
        raise TypeError(f"roi_align3d: sampling_ratio must be an int, got {type(sampling_ratio).__name__}")
    if sampling_ratio > MAX_ADAPTIVE_GRID:
        raise ValueError(f"roi_align3d: sampling_ratio must be at most {MAX_ADAPTIVE_GRID} samples per bin side "
                         f"(<= 0 for adaptive), got {sampling_ratio}")
    spatial_scale = float(spatial_scale)
    if not (spatial_scale > 0 and spatial_scale < float("inf")):
        raise ValueError(f"roi_align3d: spatial_scale must be a positive finite number, got {spatial_scale}")
    rois = convert_boxes_to_rois(boxes, input)
    if rois.size(0) > 0 and (input.size(3) == 0 or input.size(4) == 0):
        raise ValueError(f"roi_align3d: input height and width must be positive, got {tuple(input.shape)}")
    if not torch.compiler.is_compiling() and _has_data(rois):
        _check_values(rois, input, ph, pw, spatial_scale, sampling_ratio, bool(aligned))
    refuse_forward_ad("roi_align3d", input)
    return torch.ops.stssa.roi_align3d(input, rois, spatial_scale, ph, pw, sampling_ratio, bool(aligned))


class RoIAlign3d(nn.Module):
    """``nn.Module`` form of :func:`roi_align3d` (mirrors ``torchvision.ops.RoIAlign``)."""

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, boxes: BoxesType) -> Tensor:
        return roi_align3d(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


# --- registrations for the dispatcher ------------------------------------------------------------------

def _is_channels_last(x: Tensor) -> bool:
    """The kernels' layout rule (csrc/roi_align3d_common.h, is_channels_last_3d)."""
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


@torch.library.register_fake("stssa::roi_align3d")
def _roi_align3d_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    torch._check(input.dim() == 5, lambda: "roi_align3d: input must be 5-D")
    torch._check(rois.dim() in (2, 3) and rois.size(-1) == 5, lambda: "roi_align3d: rois must be [K, 5] or [K, T, 5]")
    out = input.new_empty((rois.size(0), input.size(1), input.size(2), pooled_height, pooled_width))
    # a channels_last_3d input gives a channels_last_3d output, as the CPU and CUDA kernels do
    return out.contiguous(memory_format=torch.channels_last_3d) if _is_channels_last(input) else out


@torch.library.register_fake("stssa::_roi_align3d_backward")
def _roi_align3d_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                               time, height, width, sampling_ratio, aligned, deterministic=False,
                               channels_last=False):
    out = grad.new_empty((batch_size, channels, time, height, width))
    return out.contiguous(memory_format=torch.channels_last_3d) if channels_last else out


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, ph, pw, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, ph, pw, sampling_ratio, aligned)
    ctx.input_shape = tuple(input.shape)
    ctx.channels_last = _is_channels_last(input)  # grad_input gets input's layout


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, ph, pw, sampling_ratio, aligned = ctx.args
    n, c, t, h, w = ctx.input_shape
    grad_input = None
    if ctx.needs_input_grad[0]:
        # The stable ABI cannot read the global flag: it is decided here and passed to the kernel.
        grad_input = torch.ops.stssa._roi_align3d_backward(grad, rois, spatial_scale, ph, pw, n, c, t, h, w,
                                                           sampling_ratio, aligned,
                                                           torch.are_deterministic_algorithms_enabled(),
                                                           ctx.channels_last)
    return grad_input, None, None, None, None, None, None


torch.library.register_autograd("stssa::roi_align3d", _backward, setup_context=_setup_context)


# The backward is linear in grad; its own derivative is the forward op applied to the incoming
# gradient, which gives double backward (e.g. gradient penalties) for free.
def _bwd_setup_context(ctx, inputs, output):
    grad, rois, spatial_scale, ph, pw, n, c, t, h, w, sampling_ratio, aligned = inputs[:12]
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, ph, pw, sampling_ratio, aligned)


def _bwd_backward(ctx, gg):
    (rois,) = ctx.saved_tensors
    spatial_scale, ph, pw, sampling_ratio, aligned = ctx.args
    g = None
    if ctx.needs_input_grad[0]:
        g = torch.ops.stssa.roi_align3d(gg, rois, spatial_scale, ph, pw, sampling_ratio, aligned)
    return (g,) + (None,) * 13


torch.library.register_autograd("stssa::_roi_align3d_backward", _bwd_backward, setup_context=_bwd_setup_context)
