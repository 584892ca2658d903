"""Where a call runs, in one place for every op: the compute capability the dispatch tables key on,
whether the Triton interpreter is on, and the (lazy) import of the Triton kernels.

* :func:`capability` -- ``major * 10 + minor`` of a CUDA tensor's device (75, 80, 86, 90); for CPU
  tensors under ``TRITON_INTERPRET=1`` the architecture whose Triton tiles the interpreter runs
  (:data:`INTERPRET_ARCH`, changed with :func:`interpret_as`); 0 for plain CPU calls.
* :func:`assume_capability` -- CUDA tensors report a given capability without asking the driver: fake
  CUDA tensors (``FakeTensorMode``) then take the dispatch, fake kernels and saved tensors of that GPU
  on a machine without one (``benchmarks/head.py --saved-activations``).
* :func:`triton_kernels` -- ``stssa_kernels.triton.<op>``, imported on first use only: a CPU-only torch
  ships no triton, and ``import stssa_kernels`` must work there. :func:`triton_missing` says why it
  cannot be imported (or None).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Iterator, Optional

import torch

#: Architecture whose Triton tile tables CPU tensors use under TRITON_INTERPRET=1.
INTERPRET_ARCH = 80
_assumed: Optional[int] = None


# read once: triton reads it when it is imported, so it must be set before that (and before this import)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` was set when stssa_kernels was imported (the Triton kernels then
    run on CPU tensors)."""
    return _INTERPRET


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def capability(device: torch.device) -> int:
    """The compute capability the dispatch keys on for tensors on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        if _assumed is not None:
            return _assumed
        return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRET_ARCH if _INTERPRET else 0


def family(cc: int) -> int:
    """Architecture family of a compute capability: 75 (Turing: no bf16 tensor cores, Triton's tl.dot on
    FFMA), 80 (Ampere/Ada, and the consumer Blackwell sm_120/121: mma.sync, about 100 KB of shared memory
    per block), 90 (Hopper and the datacenter Blackwell sm_100/103: 228 KB; HGMMA on Hopper)."""
    return 90 if 90 <= cc < 120 else 80 if cc >= 80 else 75


@contextlib.contextmanager
def assume_capability(cc: int) -> Iterator[None]:
    global _assumed
    prev, _assumed = _assumed, int(cc)
    try:
        yield
    finally:
        _assumed = prev


@contextlib.contextmanager
def interpret_as(cc: int) -> Iterator[None]:
    """Run the interpreter with the tile tables of compute capability ``cc`` (tests: the sm_75 tiles)."""
    global INTERPRET_ARCH
    prev, INTERPRET_ARCH = INTERPRET_ARCH, int(cc)
    try:
        yield
    finally:
        INTERPRET_ARCH = prev


@functools.lru_cache(maxsize=None)
def _import(op: str):
    try:
        return importlib.import_module(f"stssa_kernels.triton.{op}"), None
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


def triton_missing(op: str) -> Optional[str]:
    """Why ``stssa_kernels.triton.<op>`` cannot be imported (e.g. no triton package), or None."""
    return _import(op)[1]


def triton_kernels(op: str):
    """The module ``stssa_kernels.triton.<op>`` (imports triton on first use), or a clear error."""
    mod, why = _import(op)
    if mod is None:
        raise RuntimeError(f"stssa_kernels.{op}: this call runs the Triton kernels, but they cannot be imported "
                           f"({why}). Install triton for this torch (the CUDA wheels of torch bring it: "
                           f"`pip install triton`).")
    return mod
