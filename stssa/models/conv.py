"""``Conv3d``: ``nn.Conv3d`` with a workaround for a CPU bf16 defect of PyTorch's oneDNN convolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _cpu_bf16(x: Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state dict), except on CPU in bf16 when the temporal kernel is
    longer than the input clip (``kt > T``): there the convolution runs in fp32 and its output is cast to
    bf16, because oneDNN's bf16 conv3d weight gradient is NaN, inf or ~86% wrong (measured, torch 2.14.1,
    e.g. ``T=2, kt=3``; fp32 and fp16 are right). Such layers see short clips, so the fp32 detour is cheap.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_size[0] > x.shape[2] and _cpu_bf16(x):
            b = None if self.bias is None else self.bias.float()
            with torch.autocast("cpu", enabled=False):
                y = F.conv3d(x.float(), self.weight.float(), b, self.stride, self.padding, self.dilation, self.groups)
            return y.to(torch.bfloat16)
        return super().forward(x)
