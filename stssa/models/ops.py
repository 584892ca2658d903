"""The two implementations the heads can run: the fused ``stssa_kernels`` ops or their plain-PyTorch
references (``stssa_kernels.reference``: Conv3d, permute + bmm + softmax, torchvision ``roi_align`` with
time folded into the batch).

Both take the same arguments and the same parameters, so ``use_fused=False`` is the reference the fused
model is tested against. The functions are looked up when a head runs, not at import, so a build
that lacks one of the fused ops still constructs models and runs the reference path; asking for the
missing fused op raises an error that names it.
"""
from __future__ import annotations

import importlib
from typing import Callable

_FUSED = {"roi_align3d": "stssa_kernels", "attention3d": "stssa_kernels", "temporal_proj": "stssa_kernels"}
_REFERENCE = {"roi_align3d": "roi_align3d_ref", "attention3d": "attention3d_ref", "temporal_proj": "temporal_proj_ref"}


def get_op(name: str, fused: bool) -> Callable:
    """``get_op("attention3d", fused=True)`` -> ``stssa_kernels.attention3d``;
    ``fused=False`` -> ``stssa_kernels.reference.attention3d_ref``."""
    if fused:
        mod = importlib.import_module(_FUSED[name])
        fn = getattr(mod, name, None)
        if fn is None:
            raise RuntimeError(f"stssa_kernels.{name} is not available in this build of stssa_kernels; "
                               "run the model with use_fused=False (the plain-PyTorch reference path)")
        return fn
    # The per-op module, not the package: the reference of an op is usable as soon as its file exists.
    try:
        fn = getattr(importlib.import_module(f"stssa_kernels.reference.{name}"), _REFERENCE[name], None)
    except ImportError:
        fn = None
    if fn is None:
        raise RuntimeError(f"stssa_kernels.reference.{_REFERENCE[name]} is not available in this build")
    return fn


def available(name: str, fused: bool) -> bool:
    try:
        get_op(name, fused)
        return True
    except RuntimeError:
        return False
