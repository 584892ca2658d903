"""The compute capability the dispatch tables key on, in one place for every op.

``assume_capability(cc)`` makes CUDA tensors report ``cc`` without asking the driver: fake CUDA tensors
(``torch._subclasses.FakeTensorMode``) then take the dispatch, fake kernels and saved tensors of that
GPU on a machine without one (``benchmarks/head.py --saved-activations``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

_assumed: Optional[int] = None


def cuda_capability(device: torch.device) -> int:
    """major * 10 + minor of a CUDA device (e.g. 75, 80, 90), or the one ``assume_capability`` set."""
    if _assumed is not None:
        return _assumed
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@contextlib.contextmanager
def assume_capability(cc: int) -> Iterator[None]:
    global _assumed
    prev, _assumed = _assumed, int(cc)
    try:
        yield
    finally:
        _assumed = prev
