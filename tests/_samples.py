"""Sample inputs per op, one generator each, shared by the CPU, interpreter and GPU tests (numerics,
gradcheck, opcheck, torch.compile).

* :func:`attention3d_sample_inputs` -> :class:`Sample` s for ``attention3d``;
* :func:`temporal_proj_sample_inputs` -> :class:`Sample` s for ``temporal_proj``.

Inputs are fresh seeded normals made in float64 and cast, at odd sizes (1, 3, 5, 7, 49), in the layouts
a model hands the ops: contiguous, ``channels_last_3d`` and a strided slice of a wider map.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

LAYOUTS = ("contiguous", "channels_last", "strided")


@dataclasses.dataclass
class Sample:
    name: str
    args: tuple           # positional tensors (None allowed)
    kwargs: dict

    def __repr__(self) -> str:
        return self.name


def layout(x: Tensor, kind: str) -> Tensor:
    """``x`` in memory layout ``kind`` (same values)."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if kind == "strided":  # a slice of a wider map: no stride chain, nothing mergeable
        big = torch.zeros(x.shape[0], x.shape[1] + 2, x.shape[2], x.shape[3] + 1, x.shape[4] + 3,
                          dtype=x.dtype, device=x.device)
        big[:, 1:-1, :, 1:, 2:-1] = x
        return big[:, 1:-1, :, 1:, 2:-1]
    if kind == "contiguous":
        return x.contiguous()
    raise ValueError(kind)


def randn(*shape, seed: int, dtype=torch.float32, device="cpu", scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# attention3d
# ---------------------------------------------------------------------------------------------------

def attention3d_inputs(shape_q, dv: int, dtype=torch.float32, kind: str = "contiguous", epilogue: bool = False,
                       device="cpu", seed: int = 0, logit_scale: float = 1.0):
    """(q, k, v, residual or None, gamma or None): q, k ``shape_q = [B, Dk, T, H, W]``, v/residual
    ``[B, dv, T, H, W]`` in layout ``kind``, gamma a scalar 0.75 (float32; float64 for float64 inputs)."""
    B, Dk, T, H, W = shape_q
    q = layout(randn(B, Dk, T, H, W, seed=seed, dtype=dtype, device=device, scale=logit_scale), kind)
    k = layout(randn(B, Dk, T, H, W, seed=seed + 1, dtype=dtype, device=device), kind)
    v = layout(randn(B, dv, T, H, W, seed=seed + 2, dtype=dtype, device=device), kind)
    r = layout(randn(B, dv, T, H, W, seed=seed + 3, dtype=dtype, device=device), kind) if epilogue else None
    g = torch.tensor(0.75, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32) \
        if epilogue else None
    return q, k, v, r, g


def attention3d_sample_inputs(device="cpu", dtype=torch.float32, small: bool = False) -> Iterator[Sample]:
    """Every axis x layout, with 1 and 2 heads, Dk != Dv, with and without the residual/gamma epilogue,
    plus sequences of one token and 7x7 frames. ``small``: tiny sizes (float64 gradcheck, interpreter).
    Sample args: (q, k, v, residual, gamma); kwargs: axis, heads, scale."""
    shape, dv = ((1, 4, 2, 2, 3), 6) if small else ((2, 6, 3, 5, 7), 10)
    seed = 0
    for axis in ("spatial", "temporal", "full"):
        for kind in LAYOUTS:
            for heads, epilogue in ((2, True), (1, False)):
                seed += 10
                q, k, v, r, g = attention3d_inputs(shape, dv, dtype, kind, epilogue, device, seed)
                yield Sample(f"{axis}-{kind}-h{heads}-{'epi' if epilogue else 'plain'}", (q, k, v, r, g),
                             dict(axis=axis, heads=heads, scale=None))
        # sequences of one token (softmax over one key) and a 7x7 frame (the AVA RoI)
        one = {"spatial": (2, 4, 3, 1, 1), "temporal": (2, 4, 1, 3, 2), "full": (3, 4, 1, 1, 1)}[axis]
        yield Sample(f"{axis}-L1", attention3d_inputs(one, 6, dtype, "contiguous", True, device, seed + 5),
                     dict(axis=axis, heads=1, scale=None))
    if not small:
        yield Sample("spatial-7x7-cl", attention3d_inputs((1, 8, 2, 7, 7), 16, dtype, "channels_last", True, device, 99),
                     dict(axis="spatial", heads=1, scale=1.0))


# ---------------------------------------------------------------------------------------------------
# temporal_proj
# ---------------------------------------------------------------------------------------------------

STSSA_KT = (7, 7, 7, 1, 1, 1)  # slow q, k, v (7x1x1) and fast q, k, v (1x1x1)


def temporal_proj_inputs(B=2, C=5, T=4, H=3, W=2, out_channels=(4,), kernel_sizes=(3,), bias=None,
                         dtype=torch.float32, device="cpu", seed=0):
    """x [B, C, T, H, W], weights [N_i, C, kt_i, 1, 1] (unit-variance outputs), biases (bias[i] False: None)."""
    bias = (True,) * len(out_channels) if bias is None else bias
    assert len(bias) == len(out_channels) == len(kernel_sizes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, H, W, generator=g, dtype=torch.float64)
    ws = [torch.randn(n, C, k, 1, 1, generator=g, dtype=torch.float64) / (C * k) ** 0.5
          for n, k in zip(out_channels, kernel_sizes)]
    bs = [torch.randn(n, generator=g, dtype=torch.float64) if b else None for n, b in zip(out_channels, bias)]
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), [cast(w) for w in ws], [cast(b) for b in bs]


def temporal_proj_sample_inputs(device="cpu", dtype=torch.float32, small: bool = False) -> Iterator[Sample]:
    """The STSSA mix (three 7-tap + three 1-tap projections, some without bias), interleaved kernel
    sizes, a single projection, T shorter than kt (all-padding taps) and the input layouts.
    Sample args: (x, weights, biases)."""
    C = 3 if small else 7
    T = 3 if small else 5
    yield Sample("stssa-mix", temporal_proj_inputs(C=C, T=T, out_channels=(5, 3, 9, 4, 1, 6), kernel_sizes=STSSA_KT,
                                                   bias=(True, False, True, True, False, True), dtype=dtype,
                                                   device=device), {})
    yield Sample("interleaved-1-3-7", temporal_proj_inputs(C=4, T=6, out_channels=(3, 4, 5), kernel_sizes=(1, 3, 7),
                                                           bias=(True, False, True), dtype=dtype, device=device,
                                                           seed=1), {})
    yield Sample("single-kt3-T1", temporal_proj_inputs(T=1, out_channels=(6,), kernel_sizes=(3,), dtype=dtype,
                                                       device=device, seed=2), {})
    for kind in ("channels_last", "strided"):
        x, ws, bs = temporal_proj_inputs(C=6, T=5, H=3, W=4, out_channels=(4, 5), kernel_sizes=(7, 1),
                                         bias=(True, False), dtype=dtype, device=device, seed=3)
        yield Sample(f"layout-{kind}", (layout(x, kind), ws, bs), {})


class StssaOpLog(TorchDispatchMode):
    """Records the names of the stssa ops a computation dispatches (``.ops``)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "stssa":
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` as a module (the scripts import their ``common`` helpers from their folder)."""
    import importlib.util
    import pathlib
    import sys

    bench = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", bench / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench))
    return mod
