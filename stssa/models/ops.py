"""The two implementations the model layer runs, by plain imports: the fused ``stssa_kernels`` ops or their
plain-PyTorch references (``stssa_kernels.reference``: Conv3d, permute + bmm + softmax, torchvision
``roi_align`` with time folded into the batch). Both take the same arguments and the same parameters, so
``use_fused=False`` is the reference the fused model is tested against.

One mechanism across the modules: every module that can run either way carries a boolean ``use_fused``
attribute (constructor argument ``use_fused=True``) and looks its ops up with ``get_op(name,
self.use_fused)`` (or ``ops(self.use_fused)``) when it runs; :func:`set_fused` switches a whole model, as
``module.train()`` does for training mode.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

from torch import nn

from stssa_kernels import attention3d, roi_align3d, temporal_proj
from stssa_kernels.reference import attention3d_ref, roi_align3d_ref, temporal_proj_ref

FUSED = SimpleNamespace(roi_align3d=roi_align3d, attention3d=attention3d, temporal_proj=temporal_proj)
REFERENCE = SimpleNamespace(roi_align3d=roi_align3d_ref, attention3d=attention3d_ref, temporal_proj=temporal_proj_ref)


def ops(fused: bool) -> SimpleNamespace:
    """The op set: ``ops(True).attention3d is stssa_kernels.attention3d``;
    ``ops(False).attention3d is stssa_kernels.reference.attention3d_ref``."""
    return FUSED if fused else REFERENCE


def get_op(name: str, fused: bool) -> Callable:
    """``get_op("attention3d", fused=True)`` -> ``stssa_kernels.attention3d`` (``fused=False``: its reference)."""
    try:
        return getattr(ops(fused), name)
    except AttributeError:
        raise ValueError(f"unknown op {name!r}; the model layer runs {sorted(vars(FUSED))}") from None


def available(name: str, fused: bool) -> bool:
    """Whether the op set has an op of this name."""
    return hasattr(ops(fused), name)


def set_fused(module: nn.Module, use_fused: bool) -> nn.Module:
    """Set ``use_fused`` on ``module`` and every submodule that has the attribute; returns ``module``."""
    for m in module.modules():
        if hasattr(m, "use_fused") and not isinstance(getattr(type(m), "use_fused", None), property):
            m.use_fused = bool(use_fused)
    return module
