"""stssa-kernels: fused kernels for Spatio-Temporal SlowFast Self-Attention (STSSA) video detection.

Public API (all are autograd-aware torch ops, registered under ``torch.ops.stssa``):

- :func:`roi_align3d` / :class:`RoIAlign3d`: temporally-resolved RoIAlign, ``[N,C,T,H,W] -> [K,C,T,h,w]``.
"""
from . import _ext  # noqa: F401  (loads the C++ library and its schemas first)
from ._ext import BUILD_INFO, HAS_CUDA_KERNELS  # noqa: F401
from .ops.roi_align3d import RoIAlign3d, roi_align3d  # noqa: F401

__all__ = ["roi_align3d", "RoIAlign3d", "BUILD_INFO", "HAS_CUDA_KERNELS"]
__version__ = "0.1.0"
