"""Loading pretrained I3D / Slow backbones from local checkpoint files.

Three key layouts are mapped onto :class:`stssa.models.i3d.I3D`:

* ``stssa`` -- ours (``stem.conv.weight``, ``res3.1.conv_a.weight``, ``res2.0.shortcut.bn.running_mean``);
* ``pytorchvideo`` -- ``i3d_r50`` / ``slow_r50`` state dicts of PyTorchVideo's ``create_resnet``:
  ``blocks.0.conv`` / ``blocks.0.norm`` (stem), then ``blocks.<i>.res_blocks.<j>.branch1_conv``,
  ``branch1_norm``, ``branch2.conv_{a,b,c}``, ``branch2.norm_{a,b,c}``; the stage blocks are the
  ``blocks.<i>`` that hold ``res_blocks`` in increasing ``i`` (``i3d_r50`` has a parameter-free pool at
  ``blocks.2``, ``slow_r50`` has none), the head is ``blocks.<last>.proj``;
* ``pyslowfast`` -- PySlowFast ``ResNet`` (``.pyth`` files whose ``model_state`` holds
  ``s1.pathway0_stem.{conv,bn}``, ``s<k>.pathway0_res<j>.branch1``, ``branch1_bn``,
  ``branch2.{a,b,c}``, ``branch2.{a,b,c}_bn``; non-local and head keys are reported as unexpected).

Both model-zoo formats wrap the weights as ``{"model_state": ...}`` in ``.pyth`` files; bare state dicts
and DDP ``module.`` prefixes are accepted too. Keys that do not map are *reported* (a head, non-local
blocks, optimizer state) rather than silently dropped; a tensor whose shape does not fit ours raises
a :class:`CheckpointShapeError` naming both keys and shapes, with a hint when the temporal kernel is
the difference (an ``slow_r50`` checkpoint into an I3D config, or the reverse).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class CheckpointShapeError(ValueError):
    """A checkpoint tensor does not have the shape of the parameter it maps onto."""


@dataclass
class LoadReport:
    """What :func:`load_backbone` did: the layout it recognised, the keys it loaded, the keys of the
    model it could not fill (``missing``) and the checkpoint keys it did not use (``unexpected``)."""

    layout: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        def short(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        lines = [f"checkpoint layout: {self.layout}; loaded {len(self.loaded)} tensors"]
        lines.append(f"missing ({len(self.missing)}): {short(self.missing)}" if self.missing else "missing: none")
        lines.append(f"unexpected ({len(self.unexpected)}): {short(self.unexpected)}"
                     if self.unexpected else "unexpected: none")
        return "\n".join(lines)


def _numpy_array_globals() -> list:
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_NUMPY_ARRAY_GLOBALS = _numpy_array_globals()


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, Tensor]:
    """Read a ``.pyth`` / ``.pt`` / ``.pth`` file and return the model's tensors.

    Accepts ``{"model_state": sd}`` (PySlowFast / PyTorchVideo model zoo), ``{"state_dict": sd}``,
    ``{"model": sd}`` (our training checkpoints) or a bare state dict.
    """
    try:
        # numpy's array reconstruction: training checkpoints of earlier versions keep numpy's RNG state
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # a damaged file, or pickled objects beyond tensors and containers
        raise ValueError(f"{path}: cannot read the checkpoint with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return unwrap_state_dict(obj, source=os.fspath(path))


def unwrap_state_dict(obj, source: str = "checkpoint") -> Dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model_state", "state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{source}: expected a state dict (str -> Tensor), optionally under 'model_state', "
                         f"'state_dict' or 'model'; got {type(obj).__name__}")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_layout(sd: Mapping[str, Tensor]) -> str:
    keys = list(sd)
    if any(k.startswith("s1.pathway0_stem.") for k in keys):
        return "pyslowfast"
    if any(re.match(r"blocks\.\d+\.res_blocks\.", k) for k in keys):
        return "pytorchvideo"
    if any(k.startswith("stem.conv.") for k in keys):
        return "stssa"
    # A detector's state dict ("backbone.stem.conv.weight") -> our keys under a prefix.
    if any(k.startswith("backbone.stem.conv.") for k in keys):
        return "stssa-detector"
    raise ValueError("unrecognised checkpoint layout: expected PyTorchVideo ('blocks.<i>.res_blocks...'), "
                     "PySlowFast ('s1.pathway0_stem...') or stssa ('stem.conv...') keys; first keys: "
                     f"{keys[:5]}")


def _bottleneck_map(prefix_ours: str, rest: str, names: Dict[str, str]) -> Optional[str]:
    """Map the per-block remainder ``rest`` using ``names`` (source module -> our module)."""
    mod, _, suffix = rest.rpartition(".")
    if mod in names:
        return f"{prefix_ours}.{names[mod]}.{suffix}"
    return None


_PTV_BLOCK = {"branch1_conv": "shortcut.conv", "branch1_norm": "shortcut.bn",
              "branch2.conv_a": "conv_a", "branch2.norm_a": "bn_a",
              "branch2.conv_b": "conv_b", "branch2.norm_b": "bn_b",
              "branch2.conv_c": "conv_c", "branch2.norm_c": "bn_c"}
_PSF_BLOCK = {"branch1": "shortcut.conv", "branch1_bn": "shortcut.bn",
              "branch2.a": "conv_a", "branch2.a_bn": "bn_a",
              "branch2.b": "conv_b", "branch2.b_bn": "bn_b",
              "branch2.c": "conv_c", "branch2.c_bn": "bn_c"}


def convert_state_dict(sd: Mapping[str, Tensor], layout: str = "auto") -> Tuple[Dict[str, Tensor], Dict[str, str], List[str], str]:
    """Rename ``sd``'s keys to ours.

    Returns ``(converted, source_of, unused, layout)``: our key -> tensor, our key -> the source key it
    came from (for error messages), the source keys that map to nothing, and the detected layout.
    """
    if layout == "auto":
        layout = detect_layout(sd)
    out: Dict[str, Tensor] = {}
    source_of: Dict[str, str] = {}
    unused: List[str] = []

    if layout == "pytorchvideo":
        stage_ids = sorted({int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.res_blocks\.", k)] if m})
        stage_of = {b: f"res{i + 2}" for i, b in enumerate(stage_ids)}
    for k, v in sd.items():
        new: Optional[str] = None
        if layout in ("stssa", "stssa-detector"):
            new = k[len("backbone."):] if layout == "stssa-detector" and k.startswith("backbone.") else (
                k if layout == "stssa" else None)
        elif layout == "pytorchvideo":
            m = re.fullmatch(r"blocks\.0\.(conv|norm)\.(\w+)", k)
            if m:
                new = f"stem.{'conv' if m.group(1) == 'conv' else 'bn'}.{m.group(2)}"
            m = re.fullmatch(r"blocks\.(\d+)\.res_blocks\.(\d+)\.(.+)", k)
            if m and int(m.group(1)) in stage_of:
                new = _bottleneck_map(f"{stage_of[int(m.group(1))]}.{m.group(2)}", m.group(3), _PTV_BLOCK)
        elif layout == "pyslowfast":
            m = re.fullmatch(r"s1\.pathway0_stem\.(conv|bn)\.(\w+)", k)
            if m:
                new = f"stem.{m.group(1)}.{m.group(2)}"
            m = re.fullmatch(r"s([2-5])\.pathway0_res(\d+)\.(.+)", k)
            if m:
                new = _bottleneck_map(f"res{m.group(1)}.{m.group(2)}", m.group(3), _PSF_BLOCK)
        else:
            raise ValueError(f"unknown checkpoint layout {layout!r}; use auto, stssa, pytorchvideo or pyslowfast")
        if new is None:
            unused.append(k)
        else:
            out[new] = v
            source_of[new] = k
    return out, source_of, unused, layout


def load_backbone(backbone: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Tensor]],
                  layout: str = "auto", verbose: bool = False) -> LoadReport:
    """Load a pretrained backbone checkpoint (a path or a state dict) into ``backbone`` (an :class:`I3D`).

    Missing and unexpected keys are reported in the returned :class:`LoadReport` (and printed when
    ``verbose``); a shape mismatch raises :class:`CheckpointShapeError` before anything is copied.
    """
    sd = read_state_dict(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else unwrap_state_dict(checkpoint)
    converted, source_of, unused, layout = convert_state_dict(sd, layout)
    ours = backbone.state_dict()
    report = LoadReport(layout=layout)
    errors = []
    for k, v in converted.items():
        if k not in ours:
            report.unexpected.append(source_of[k])
            continue
        if tuple(v.shape) != tuple(ours[k].shape):
            hint = ""
            if v.dim() == 5 and ours[k].dim() == 5 and v.shape[0:2] == ours[k].shape[0:2] and v.shape[3:] == ours[k].shape[3:]:
                hint = (f" (temporal kernel {v.shape[2]} in the checkpoint vs {ours[k].shape[2]} here: an I3D "
                        "checkpoint needs backbone.temporal_kernels 'i3d' / stem_temporal 5, a slow_r50 one "
                        "'slow' / stem_temporal 1)")
            errors.append(f"{source_of[k]} -> {k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}{hint}")
            continue
        report.loaded.append(k)
    if errors:
        raise CheckpointShapeError(f"{len(errors)} shape mismatch(es) loading a {layout} checkpoint:\n  "
                                   + "\n  ".join(errors))
    report.unexpected.extend(unused)
    report.missing = [k for k in ours if k not in converted]
    with torch.no_grad():
        for k in report.loaded:
            ours[k].copy_(converted[k])
    if verbose:
        print(report)
    return report
