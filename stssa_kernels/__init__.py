"""stssa-kernels: fused kernels for Spatio-Temporal SlowFast Self-Attention (STSSA) video detection.

Public API (all are autograd-aware torch ops, registered under ``torch.ops.stssa``):

- :func:`roi_align3d` / :class:`RoIAlign3d`: temporally-resolved RoIAlign, ``[N,C,T,H,W] -> [K,C,T,h,w]``.
- :func:`temporal_proj` / :class:`TemporalProjection`: fused temporal (kt x 1 x 1) Q/K/V projections,
  ``x [B,C,T,H,W], [W_i [N_i,C,kt_i,1,1]] -> [out_i [B,N_i,T,H,W]]``.
- :func:`attention3d` / :class:`Attention3d` / :class:`SelfAttention3d`: fused self-attention over the
  spatial, temporal or full axis of ``[B,D,T,H,W]`` maps (residual + gamma epilogue), forward and backward.
"""
from . import _ext  # noqa: F401  (loads the C++ library and its schemas first)
from ._ext import BUILD_INFO, HAS_CUDA_KERNELS  # noqa: F401
from .ops.roi_align3d import RoIAlign3d, roi_align3d  # noqa: F401
from .ops.temporal_proj import TemporalProjection, temporal_proj  # noqa: F401
from .ops.attention3d import Attention3d, SelfAttention3d, attention3d  # noqa: F401

__all__ = ["roi_align3d", "RoIAlign3d", "BUILD_INFO", "HAS_CUDA_KERNELS"]
__all__ += ["temporal_proj", "TemporalProjection"]
__all__ += ["attention3d", "Attention3d", "SelfAttention3d"]
__version__ = "0.1.0"
