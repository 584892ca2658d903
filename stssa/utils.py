"""Config files, seeding, RNG state and atomic checkpoint files for :mod:`stssa.train`."""
from __future__ import annotations

import copy
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import numpy as np
import torch
import yaml

from stssa._os import current_umask

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config path, or the bare name of one in ``stssa/configs`` (``stssa_full`` or ``stssa_full.yaml``)."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"config {path!s} not found (nor as a name in {CONFIG_DIR})")


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Load a YAML config; ``_base_: other.yaml`` (relative to the file) is merged underneath, recursively.

    ``overrides`` are ``dotted.key=value`` strings (value parsed as YAML), applied last.
    """
    p = resolve_config_path(path)
    with open(p) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: a config must be a YAML mapping, got {type(cfg).__name__}")
    base = cfg.pop("_base_", None)
    name = cfg.pop("name", p.stem)  # a config's own name, never its base's
    if base is not None:
        cfg = _merge(load_config(p.parent / base), cfg)
    cfg["name"] = name
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a mapping in the config")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML: {e}") from None
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """Every RNG the training step draws from (dropout, anything in the model), for exact resume."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key as a tensor: the checkpoint then loads with torch.load(weights_only=True) (model.pretrained)
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.int64).astype(np.uint32), *rest))  # tensor or ndarray
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a kill at any
    moment leaves either the previous checkpoint or the new one, never a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would outlive the rename
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: Optional[str] = "cpu") -> Dict[str, Any]:
    """A training checkpoint; a file that is not one (truncated, not a torch file) is a ValueError naming it."""
    # weights_only=False: checkpoints of earlier versions hold numpy RNG arrays besides tensors.
    try:
        ckpt = torch.load(os.fspath(path), map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch.load raises many types for a damaged file
        raise ValueError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a stssa.train checkpoint (expected a dict with 'model', got "
                         f"{type(ckpt).__name__}{' with keys ' + str(sorted(ckpt)[:8]) if isinstance(ckpt, dict) else ''})")
    return ckpt
