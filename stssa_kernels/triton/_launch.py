"""Launch plumbing shared by the Triton op modules.

* ``on_tensor_device``: launchers run under the CUDA device of their tensors. Triton launches on the
  *current* device, so without it a model on ``cuda:1`` (no ``torch.cuda.set_device``) fails with
  "Pointer argument cannot be accessed from Triton" or runs on the wrong GPU (triton-lang/triton#2441).
* ``capture_launches``: run launchers on CPU tensors with every kernel launch recorded instead of
  executed, so host code (grids, strides, specialisations) can be inspected without a GPU.
* ``jit_compile_args``: what Triton's JIT would compile for a recorded launch on an arch: the same
  binder and ``_pack_args`` the JIT runs (divisibility-by-16 and ==1 specialisation of integers,
  16-byte alignment of pointers, ``do_not_specialize``), aimed at a ``GPUTarget`` instead of the
  current device.
* ``LAUNCH_OPTIONS``: compile options every launch passes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator

import torch
import triton

#: FP contraction (mul + add -> FMA) pinned on, the default of triton 3.6-3.9: triton 3.9 warns that 3.10
#: turns the default off, so without the pin one kernel would compile to different code (and rounding)
#: by triton version. compile_check builds with the same options (they reach it in the recorded kwargs).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def device_context(device: torch.device):
    """The context a launch for tensors on ``device`` runs in: that CUDA device, or nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_call_recorders: list[list] = []  # active record_launcher_calls() blocks


def on_tensor_device(fn: Callable) -> Callable:
    """Decorator for launchers: run ``fn`` under the device of its first tensor argument."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for rec in _call_recorders:
            rec.append((fn.__module__, fn.__name__, args, dict(kwargs)))
        dev = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if dev is None:
            return fn(*args, **kwargs)
        with device_context(dev):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def record_launcher_calls() -> Iterator[list]:
    """Record every call of a launcher (a function decorated with ``on_tensor_device``) inside the
    block as (module, name, args, kwargs); the calls still run."""
    calls: list = []
    _call_recorders.append(calls)
    try:
        yield calls
    finally:
        _call_recorders.remove(calls)


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the kernel object, its grid and its arguments as passed."""
    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", None)
        return getattr(fn, "__name__", repr(self.kernel))


def _kernel_classes() -> list:
    from triton.runtime.jit import JITFunction
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every supported Triton has the interpreter
        pass
    return classes


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Record every Triton kernel launch (JIT or interpreter) inside the block instead of running it.
    Outputs of the recorded launches are left unwritten."""
    launches: list[Launch] = []

    def run(self, *args, grid=None, warmup=False, **kwargs):
        launches.append(Launch(self, grid, args, dict(kwargs)))
        return None

    saved = [(cls, cls.__dict__.get("run")) for cls in _kernel_classes()]
    try:
        for cls, _ in saved:
            cls.run = run
        yield launches
    finally:
        for cls, orig in saved:
            if orig is None:
                del cls.run
            else:
                cls.run = orig


def jit_compile_args(kernel, args: tuple, kwargs: dict, cc: int):
    """``(signature, constexprs, attrs, options, key)`` that Triton's JIT derives from a launch of
    ``kernel`` (a JITFunction) with these arguments on a CUDA device of compute capability ``cc``;
    ``key`` identifies the compiled variant (two launches with equal keys share one binary)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from triton import knobs

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    # the two options JITFunction.run adds before binding (they are part of the cache key)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (kernel.fn.__name__, cc, tuple(specialization), str(options))
    return signature, constexprs, attrs, options, key


def triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)
