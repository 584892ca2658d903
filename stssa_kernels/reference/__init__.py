"""Plain-PyTorch references of every op (float64-capable): the single source of truth shared by the
tests, the benchmarks' "PyTorch composition" baselines and the model's ``use_fused=False`` path.

One module per op; import from here (``from stssa_kernels.reference import roi_align3d_ref``).
"""
from .roi_align3d import roi_align3d_ref  # noqa: F401
from .temporal_proj import temporal_proj_ref  # noqa: F401
from .attention3d import attention3d_ref, attention3d_sdpa  # noqa: F401
