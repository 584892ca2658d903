"""When an op may skip its ``torch.library.custom_op`` wrappers.

A Python custom_op pays for its generality on every call: the dispatcher re-enters Python for the
autograd, ADInplaceOrView and backend keys, and the generated autograd node wraps the backward in a
second custom_op. Measured on this project's 2-core CPU (``benchmarks/attn3d.py``, small maps): ~0.1 ms
per forward and ~0.6 ms per forward+backward -- as much as the arithmetic of an 8x8 frame, and a GPU
kernel's worth at the AVA head's shapes. The ops therefore run plain eager calls through one
``torch.autograd.Function`` over the same implementations (same dispatch decision, same saved tensors),
and keep the registered op for everything that needs its registrations: torch.compile and other
tracers, fake tensors, dispatch and torch-function modes, functorch transforms, tensor subclasses, and
autocast (the op's autocast rule casts the inputs).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def plain_eager(tensors: Sequence[Tensor]) -> bool:
    """Whether nothing but eager autograd will see a call on these tensors (``tensors[0]`` names the
    device whose autocast state matters)."""
    return not (torch.compiler.is_compiling() or torch.overrides.has_torch_function(tensors)
                or torch._C._len_torch_dispatch_stack() or torch._C._functorch.peek_interpreter_stack() is not None
                or torch.is_autocast_enabled(tensors[0].device.type))
