"""Fused temporal (kt x 1 x 1) projections: STSSA's slow/fast Q/K/V Conv3d's in one op.

``temporal_proj(x, weights, biases)`` returns what ``[F.conv3d(x, w, b, padding=(kt // 2, 0, 0))
for w, b in zip(weights, biases)]`` returns, but reads ``x`` once for all projections (one implicit
GEMM over channels and temporal taps; see ``stssa_kernels/triton/temporal_proj.py`` for the math).

One execution path: :func:`temporal_proj` validates the Conv3d-style arguments, applies autocast and
runs two registered ops through one ``torch.autograd.Function`` (the op's only autograd connection):

* ``torch.ops.stssa.temporal_proj(x, weights, biases) -> Y``: ``weights`` the Conv3d weights
  ``[N_i, C, kt_i, 1, 1]``, ``biases`` one ``[N_i]`` tensor or None each; ``Y[B, T, H, W, sum N_i]``
  (contiguous) is the packed output, whose column slice i is projection i. One packed output rather
  than a ``Tensor[]`` because the projections are column slices of one buffer, and op outputs may not
  alias each other.
* ``torch.ops.stssa._temporal_proj_backward(grad_y, x, weights, output_mask) -> (grad_x,
  grad_weights, grad_bias)``: ``grad_weights`` one per weight, ``grad_bias`` packed ``[sum N_i]``;
  entries whose ``output_mask`` ([x, weights, biases]) is False come back empty.

Both are plain ``torch.library`` definitions with CPU/CUDA kernels and fake kernels (one dispatcher
hop per call; torch.compile traces the autograd.Function and sees the ops as opaque calls). The ops
take the dispatch decision themselves, so eager, compiled and opcheck calls run the same backend.
:func:`temporal_proj` returns per projection a ``[B, C_out_i, T, H, W]`` view of ``Y``: channels-last
(channel stride 1, position stride ``sum N_i``), each token's channel vector contiguous and the
(t, h, w) tokens at one uniform stride, which ``attention3d`` (any strides) reads in place.

Backends (``DISPATCH``: rules as data, first match; ``explain()``; ``DISPATCH.force(name)``):

* ``"triton"``: the implicit-GEMM Triton kernels (no im2col, no padded taps: each output tile
  loops over its own projection's taps only). Imported on first use only.
* ``"gemm"``: the same tap decomposition with torch matmuls (MKL on CPU, cuBLAS on CUDA): on
  time-major copies of x and Y (``[T, B*H*W, C]``) every tap is one 2-D GEMM over all clips -- one for
  the centre tap of every projection at once, one per other tap offset for the projections that have
  it, accumulated in place -- with no padded-tap FLOPs; the layout copies cost 1/C of the GEMMs.
* ``"conv"``: one cuDNN/oneDNN ``conv3d`` with every weight concatenated and zero-padded to the largest
  kt -- a single library call, at the price of ``max_kt * sum N`` instead of ``sum kt_i N_i`` tap
  GEMMs (1.75x the FLOPs for three 7-tap + three 1-tap projections of equal width).
* ``"conv_kt"``: one library ``conv3d`` per distinct kernel size (the weights of that size
  concatenated), outputs copied into ``Y``: no padded taps, one extra pass over the output.

Gradients: first order (x, every weight, every bias); a double backward is a clear error.

Autocast: like ``conv3d``, under autocast the floating inputs (not fp64) are cast to the *current*
autocast dtype of their device (fp16 or bf16, CPU and CUDA alike) and the op runs there with fp32
accumulation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ext  # noqa: F401  (the C++ library owns the "stssa" namespace)
from ..reference.temporal_proj import temporal_proj_ref
from . import _arch
from ._dispatch import (Backend, Dispatcher, Problem, Rule, TritonBackend, between, no_autocast as _no_autocast,
                        refuse_forward_ad, register_op_pair)

__all__ = ["temporal_proj", "TemporalProjection", "DISPATCH", "select", "explain", "pack_weights", "pack_biases"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_F16, _BF16, _F32 = torch.float16, torch.bfloat16, torch.float32


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TemporalProjProblem(Problem):
    aligned: bool = False   # C and every C_out multiples of 16, 16-byte aligned x (the Triton specialisation)
    threads: int = 1        # torch.get_num_threads() (CPU)
    macs: int = 0           # multiply-adds of the forward: B*T*H*W * C * sum_i kt_i * C_out_i
    kt_over_t: bool = False  # some kt_i > T (taps that meet only padding for some frames)


class _Triton(TritonBackend):
    def __init__(self):
        super().__init__("temporal_proj")


class _Plain(Backend):
    def __init__(self, name: str):
        self.name = name


_CPU_JSON = "benchmarks/results/temporal_proj{}_cpu-amd-epyc_2026-11-25.json"
CPU_SMALL_MACS = 1 << 23

DISPATCH = Dispatcher("temporal_proj", [_Triton(), _Plain("gemm"), _Plain("conv"), _Plain("conv_kt")], [
    Rule("triton", "TRITON_INTERPRET=1: the Triton kernels run on CPU tensors (tests); the interpreter "
         "simulates neither bf16 nor fp64", device="cpu", interpret=True, dtypes=(_F32, _F16)),
    Rule("gemm", "CPU bf16 with kt > T: oneDNN's bf16 conv3d weight gradient is NaN, inf or ~86% wrong there "
         "(measured, torch 2.14.1: T=2 kt=3/5/7, T=3..6 kt=5/7; fp32 and fp16 are right); the tap GEMMs skip "
         "all-padding taps", device="cpu", dtypes=(_BF16,), when=(("kt_over_t", (True,)),)),
    Rule("conv_kt", "CPU, small problems (< 2^23 MACs): per-call costs dominate and conv_kt makes the fewest "
         "calls (one conv per kernel size); measured fwd+bwd at 1 thread, STSSA mix: 2.0x faster than gemm at "
         "5.5e4 MACs, 1.26x at 1.6e6, 0.82x at 9.6e6 (shared machine)", device="cpu",
         when=(("macs", between(hi=CPU_SMALL_MACS)),)),
    Rule("gemm", "measured, 1 thread (" + _CPU_JSON.format("_1thread") + "): fastest backend, 1.10-1.25x the "
         "per-kt conv3d baseline and 1.31-1.61x six Conv3d (fwd and fwd+bwd, reduced STSSA shapes)",
         device="cpu", when=(("threads", between(hi=1)),)),
    Rule("conv_kt", "measured, 2 threads (" + _CPU_JSON.format("") + "): oneDNN's convs scale to 2 threads "
         "better than 7 MKL GEMMs; 0.91-1.11x the per-kt conv3d baseline (gemm 0.86-0.98x)", device="cpu"),
    Rule("conv_kt", "UNMEASURED. sm_75: Triton lowers tl.dot to FFMA (no tensor cores; compile_check), so "
         "cuDNN: one call per kernel size", device="cuda", families=(75,)),
    Rule("triton", "UNMEASURED. sm_80+: implicit GEMM on tensor cores (HMMA/HGMMA), no padded-tap FLOPs",
         device="cuda", families=(80, 90), dtypes=(_F16, _BF16), when=(("aligned", (True,)),)),
    Rule("gemm", "UNMEASURED. fp32/fp64 or odd channel counts: cuBLAS tap GEMMs (no padded taps; fp32 "
         "follows torch.backends.cuda.matmul.allow_tf32)", device="cuda"),
    Rule("gemm", "fallback: torch GEMMs"),
])


def _aligned(x: Tensor, out_channels: Sequence[int]) -> bool:
    """The Triton specialisation the dispatcher uses on GPU (compile_specs compiles exactly it):
    16-element C and C_out, and 16-byte aligned x rows in the layout the kernels read."""
    C = x.shape[1]
    if C % 16 or any(n % 16 for n in out_channels):
        return False
    if x.stride(1) != 1:  # the launcher makes a fresh channels-last copy: aligned
        return True
    return x.data_ptr() % 16 == 0 and all(s % 16 == 0 for i, s in enumerate(x.stride()) if i != 1)


def _key(x: Tensor, out_channels: Sequence[int], kernel_sizes: Sequence[int]) -> tuple:
    dev = x.device
    B, C, T, H, W = x.shape
    macs = B * T * H * W * C * sum(n * k for n, k in zip(out_channels, kernel_sizes))
    return (dev, _arch.capability(dev), x.dtype, _arch.interpreting(), _aligned(x, out_channels),
            torch.get_num_threads() if dev.type == "cpu" else 0, macs, any(k > T for k in kernel_sizes))


def select(x: Tensor, out_channels: Sequence[int], kernel_sizes: Sequence[int]):
    """The dispatch decision (a :class:`~stssa_kernels.ops._dispatch.Choice`) for ``x`` with projections
    of widths ``out_channels`` and temporal kernel sizes ``kernel_sizes`` (and ``DISPATCH.force``)."""
    key = _key(x, out_channels, kernel_sizes)
    return DISPATCH.select_cached(key, lambda: TemporalProjProblem(key[0].type, *key[1:]))


def explain(x: Tensor, out_channels: Sequence[int], kernel_sizes: Sequence[int], verbose: bool = False) -> str:
    """The dispatch entry for this call (printed by the benchmarks); ``verbose``: every rule's verdict."""
    if verbose:
        key = _key(x, out_channels, kernel_sizes)
        return DISPATCH.explain(TemporalProjProblem(key[0].type, *key[1:]))
    return select(x, out_channels, kernel_sizes).describe()


def _triton_config(tk, x: Tensor, out_channels: Sequence[int]):
    cc = None if x.device.type == "cpu" else _arch.capability(x.device)
    return tk.pick_config(cc, x.shape[1], out_channels)


# ------------------------------------------------------------------------------------------------
# Layout helpers
# ------------------------------------------------------------------------------------------------
def _layout(out_channels: Sequence[int], kernel_sizes: Sequence[int]):
    """Per projection: (row offset in the packed weight, column offset in Y, N_i, kt_i, p_i)."""
    row = col = 0
    for n, kt in zip(out_channels, kernel_sizes):
        yield row, col, n, kt, kt // 2
        row += kt * n
        col += n


def _tap_rows(out_channels, kernel_sizes, d: int) -> list:
    """For tap offset d (input time t + d feeds output time t): maximal runs of consecutive
    projections that have this tap, as (col0, col1, [(weight row0, row1), ...])."""
    runs, cur = [], None
    for row, col, n, kt, p in _layout(out_channels, kernel_sizes):
        if abs(d) <= p:
            r0 = row + (p + d) * n
            if cur is not None and cur[1] == col:
                cur[1] = col + n
                cur[2].append((r0, r0 + n))
            else:
                cur = [col, col + n, [(r0, r0 + n)]]
                runs.append(cur)
        else:
            cur = None
    return runs


def _rows(wp: Tensor, spans) -> Tensor:
    return wp[spans[0][0]:spans[0][1]] if len(spans) == 1 else torch.cat([wp[a:b] for a, b in spans])


# ------------------------------------------------------------------------------------------------
# Backends: torch GEMMs ("gemm") and one fused conv3d ("conv")
# ------------------------------------------------------------------------------------------------
def _time_major(x: Tensor) -> Tensor:
    """x [B, C, T, H, W] -> [T, B*H*W, C] (one copy). Time-major rows make every tap one 2-D GEMM:
    the input rows of output frames t0..t1 under tap d are the contiguous block of frames
    t0+d..t1+d, for all clips at once (with [B, T, ...] rows each tap would be B separate GEMMs)."""
    B, C, T, H, W = x.shape
    return x.permute(2, 0, 3, 4, 1).reshape(T, B * H * W, C)


def _tap_range(T: int, d: int):
    """Output frames [t0, t1) whose input frame t + d exists (empty when T <= |d|: all padding)."""
    return max(0, -d), T - max(0, d)


def _taps(ks) -> list:
    pmax = max(ks) // 2
    return [0] + [d for a in range(1, pmax + 1) for d in (-a, a)]


def _fwd_gemm(x: Tensor, wp: Tensor, bias: Optional[Tensor], oc, ks) -> Tensor:
    B, C, T, H, W = x.shape
    R, ntot = B * H * W, sum(oc)
    xt = _time_major(x)
    yt = torch.empty((T, R, ntot), dtype=x.dtype, device=x.device)
    # Centre tap of every projection: one GEMM over all output columns, the bias as its beta term.
    (_, _, spans), = _tap_rows(oc, ks, 0)
    w0 = _rows(wp, spans)
    if bias is not None:
        torch.addmm(bias, xt.view(T * R, C), w0.t(), out=yt.view(T * R, ntot))
    else:
        torch.mm(xt.view(T * R, C), w0.t(), out=yt.view(T * R, ntot))
    for d in _taps(ks)[1:]:
        t0, t1 = _tap_range(T, d)
        if t1 <= t0:
            continue
        xs = xt[t0 + d:t1 + d].reshape(-1, C)
        for c0, c1, spans in _tap_rows(oc, ks, d):
            yt[t0:t1, :, c0:c1].flatten(0, 1).addmm_(xs, _rows(wp, spans).t())
    # back to [B, T, H, W, sum N] (one copy of the output: 1/C of the GEMM's work)
    return yt.view(T, B, H, W, ntot).permute(1, 0, 2, 3, 4).contiguous()


def _bwd_gemm(dy: Tensor, x: Tensor, wp: Tensor, oc, ks, need_dx: bool, need_dw: bool):
    B, C, T, H, W = x.shape
    R, ntot = B * H * W, sum(oc)
    dyt = dy.permute(1, 0, 2, 3, 4).reshape(T, R, ntot)  # time-major copy of dY
    dx = dwp = None
    if need_dx:
        dxt = torch.empty((T, R, C), dtype=x.dtype, device=x.device)
        (_, _, spans), = _tap_rows(oc, ks, 0)
        torch.mm(dyt.view(T * R, ntot), _rows(wp, spans), out=dxt.view(T * R, C))
        for d in _taps(ks)[1:]:
            t0, t1 = _tap_range(T, d)
            if t1 <= t0:
                continue
            dxs = dxt[t0 + d:t1 + d].view(-1, C)  # dx[t + d] += dy[t] @ W_d
            for c0, c1, spans in _tap_rows(oc, ks, d):
                dxs.addmm_(dyt[t0:t1, :, c0:c1].flatten(0, 1), _rows(wp, spans))
        # [T, B, H, W, C] -> [B, C, T, H, W] with channels_last_3d strides (one copy)
        dx = dxt.view(T, B, H, W, C).permute(1, 0, 2, 3, 4).contiguous().permute(0, 4, 1, 2, 3)
    if need_dw:
        xt = _time_major(x)
        dwp = torch.empty(wp.shape, dtype=wp.dtype, device=wp.device)
        for d in _taps(ks):
            t0, t1 = _tap_range(T, d)
            runs = _tap_rows(oc, ks, d)
            if t1 <= t0:  # all-padding tap: no input ever meets these weights
                for _, _, spans in runs:
                    for a, b in spans:
                        dwp[a:b].zero_()
                continue
            # dW_d = sum over (t, clip, position) of dy[t]^T x[t + d]: one GEMM per projection with the
            # whole reduction inside the BLAS (fp32 accumulation)
            dys, xs = dyt[t0:t1].view(-1, ntot), xt[t0 + d:t1 + d].reshape(-1, C)
            for c0, c1, spans in runs:
                col = c0
                for a, b in spans:
                    torch.mm(dys[:, col:col + b - a].t(), xs, out=dwp[a:b])
                    col += b - a
    return dx, dwp


def _conv_groups(ks, per_kt: bool) -> list:
    """Projection indices per library conv call: all in one ("conv") or one call per kernel size
    ("conv_kt")."""
    if not per_kt:
        return [list(range(len(ks)))]
    groups: dict = {}
    for i, k in enumerate(ks):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


def _group_weight(weights: Sequence[Tensor], idx) -> Tensor:
    """Conv3d weights of projections ``idx`` -> one weight [sum N, C, kg, 1, 1] with kg = their largest kt,
    each projection's taps centred and zeros around them (no padding when all share one kt)."""
    ws = [weights[i] for i in idx]
    kg = max(w.shape[2] for w in ws)
    if all(w.shape[2] == kg for w in ws):
        return ws[0] if len(ws) == 1 else torch.cat(ws)
    C = ws[0].shape[1]
    out = ws[0].new_zeros((sum(w.shape[0] for w in ws), C, kg, 1, 1))
    r = 0
    for w in ws:
        n, p = w.shape[0], w.shape[2] // 2
        out[r:r + n, :, kg // 2 - p:kg // 2 + p + 1] = w
        r += n
    return out


@dataclasses.dataclass(frozen=True)
class _ConvGroup:
    """One library conv call of the conv backends: projections ``idx`` (their weights concatenated),
    kernel size ``kg`` (the largest of theirs), output columns ``[c0, c1)`` of Y when consecutive."""
    idx: tuple
    kg: int
    same_kt: bool          # every projection in the group has kt == kg (no zero taps)
    c0: int
    c1: int
    consecutive: bool


def _plan_groups(oc, ks, per_kt: bool) -> tuple:
    cols = [sum(oc[:i]) for i in range(len(oc))]
    out = []
    for idx in _conv_groups(ks, per_kt):
        kg = max(ks[i] for i in idx)
        out.append(_ConvGroup(tuple(idx), kg, all(ks[i] == kg for i in idx), cols[idx[0]],
                              cols[idx[-1]] + oc[idx[-1]], len(idx) == idx[-1] - idx[0] + 1))
    return tuple(out)


def _group_bias(x: Tensor, biases, oc, idx) -> Optional[Tensor]:
    if len(idx) == 1:
        return biases[idx[0]]
    if all(biases[i] is None for i in idx):
        return None
    return torch.cat([biases[i] if biases[i] is not None else x.new_zeros(oc[i]) for i in idx])


def _fwd_conv(x: Tensor, weights, biases, oc, groups, small: bool = False) -> Tensor:
    """``groups``: :func:`_plan_groups`. ``small``: convolve ``x`` in its own layout (a tiny call is
    dominated by per-call costs: a layout copy of x costs more than the channels-last conv saves)."""
    B, C, T, H, W = x.shape
    xc = x if small else x.contiguous(memory_format=torch.channels_last_3d)
    if len(groups) == 1:  # channels-last out = the packed [B, T, H, W, sum N] memory; else one copy into it
        g = groups[0]
        w = weights[0] if len(weights) == 1 else _group_weight(weights, g.idx)
        out = F.conv3d(xc, w, _group_bias(x, biases, oc, g.idx), padding=(g.kg // 2, 0, 0))
        return out.permute(0, 2, 3, 4, 1).contiguous()
    y = torch.empty((B, T, H, W, sum(oc)), dtype=x.dtype, device=x.device)
    cols = [sum(oc[:i]) for i in range(len(oc))]
    for g in groups:
        idx = g.idx
        w = weights[idx[0]] if len(idx) == 1 else _group_weight(weights, idx)
        out = F.conv3d(xc, w, _group_bias(x, biases, oc, idx), padding=(g.kg // 2, 0, 0)).permute(0, 2, 3, 4, 1)
        if g.consecutive:  # one column block
            y[..., g.c0:g.c1] = out
            continue
        r = 0
        for i in idx:
            y[..., cols[i]:cols[i] + oc[i]] = out[..., r:r + oc[i]]
            r += oc[i]
    return y


def _bwd_conv(dy: Tensor, x: Tensor, weights, oc, ks, need_dx: bool, need_dw: bool, groups, small: bool = False):
    """``dy``: the packed output's gradient [B, T, H, W, sum N] in any dense strides. ``small``: as in
    :func:`_fwd_conv`, x in its own layout (no channels-last copy of a tiny input)."""
    xc = x if small else x.contiguous(memory_format=torch.channels_last_3d)
    cols = [sum(oc[:i]) for i in range(len(oc))]
    dx, dws = None, [None] * len(weights)
    for g in groups:
        idx, kg = g.idx, g.kg
        if len(idx) == len(oc):
            gy = dy
        elif g.consecutive:
            gy = dy[..., g.c0:g.c1]
        else:
            gy = torch.cat([dy[..., cols[i]:cols[i] + oc[i]] for i in idx], -1)
        wg = weights[idx[0]] if len(idx) == 1 else _group_weight(weights, idx)
        dxg, dwg, _ = torch.ops.aten.convolution_backward(
            gy.permute(0, 4, 1, 2, 3), xc, wg, None, [1, 1, 1], [kg // 2, 0, 0],
            [1, 1, 1], False, [0, 0, 0], 1, [need_dx, need_dw, False])
        if need_dx:
            dx = dxg if dx is None else dx.add_(dxg)
        if need_dw:
            if len(idx) == 1:
                dws[idx[0]] = dwg
                continue
            r = 0
            for i in idx:
                n, p = oc[i], ks[i] // 2
                dws[i] = dwg[r:r + n, :, kg // 2 - p:kg // 2 + p + 1].clone(memory_format=torch.contiguous_format)
                r += n
    return dx, dws


# ------------------------------------------------------------------------------------------------
# The registered ops
# ------------------------------------------------------------------------------------------------
def _contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _exact(t: Tensor, strides: tuple) -> Tensor:
    """``t`` with exactly ``strides`` (what the fake kernels promise; ``.contiguous()`` keeps other
    strides on size-1 dims)."""
    if t.stride() == strides:
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def _cl3d_strides(shape) -> tuple:
    B, C, T, H, W = shape
    C1, W1, H1, T1 = max(C, 1), max(W, 1), max(H, 1), max(T, 1)
    return (T1 * H1 * W1 * C1, 1, H1 * W1 * C1, W1 * C1, C1)


def _check_op(x: Tensor, weights: Sequence[Tensor], name: str = "stssa::temporal_proj") -> None:
    """Op-boundary checks for direct callers of the op (the wrapper checks everything, naming the
    Conv3d-style arguments)."""
    if x.dim() != 5:
        raise ValueError(f"{name}: x must be [B, C, T, H, W], got shape {tuple(x.shape)}")
    if len(weights) == 0:
        raise ValueError(f"{name}: weights must be a non-empty list of Conv3d weights [C_out, C, kt, 1, 1]")
    C = x.shape[1]
    for i, w in enumerate(weights):
        if w.dim() != 5 or w.shape[1] != C or w.shape[2] % 2 == 0 or w.shape[3] != 1 or w.shape[4] != 1 \
                or w.shape[0] == 0:
            raise ValueError(f"{name}: weights[{i}] must be [C_out > 0, C={C}, odd kt, 1, 1], got {tuple(w.shape)}")
        if w.device != x.device or w.dtype != x.dtype:
            raise ValueError(f"{name}: weights[{i}] is {w.dtype} on {w.device} but x is {x.dtype} on {x.device}")


def pack_weights(weights: Sequence[Tensor]) -> Tensor:
    """Conv3d weights ``[N_i, C, kt_i, 1, 1]`` -> packed ``[sum kt_i N_i, C]`` (per projection, per tap,
    the ``[N_i, C]`` matrix): the operand of the GEMM and Triton backends."""
    parts = [w.flatten(2).permute(2, 0, 1).reshape(-1, w.shape[1]) for w in weights]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).contiguous()


def pack_biases(biases, weights: Sequence[Tensor]) -> Optional[Tensor]:
    """Biases (Tensor or None each) -> packed ``[sum N_i]`` (zeros for missing ones), or None if none."""
    if biases is None or all(b is None for b in biases):
        return None
    parts = [b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)]
    # contiguous: the Triton kernels read the packed bias at unit stride (a strided single bias was read
    # as its storage's first elements)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).contiguous()


def _unpack_weight_grads(dwp: Tensor, weights: Sequence[Tensor]) -> list:
    """Packed ``[sum kt_i N_i, C]`` gradient -> one ``[N_i, C, kt_i, 1, 1]`` tensor per weight."""
    out, row = [], 0
    for w in weights:
        n, C, kt = w.shape[0], w.shape[1], w.shape[2]
        # a fresh tensor each (op outputs may not alias each other)
        out.append(dwp[row:row + kt * n].view(kt, n, C).permute(1, 2, 0).clone(memory_format=torch.contiguous_format)
                   .view(n, C, kt, 1, 1))
        row += kt * n
    return out


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the op kernels derive once per call signature: validated arguments, the backend, widths."""
    backend: str
    oc: list
    ks: list
    small: bool            # CPU problem under CPU_SMALL_MACS
    empty: bool            # x has no elements (B, C, T, H or W is 0): no backend runs
    y_strides: tuple       # contiguous strides of Y [B, T, H, W, sum N]
    dx_strides: tuple      # channels_last_3d strides of x's shape
    groups: tuple          # the conv backends' library calls (_plan_groups); () for the others


def _plan(x: Tensor, weights: Sequence[Tensor], name: str) -> _Plan:
    """The cached per-signature plan (checks run once per signature: they read only shapes, dtypes and
    devices, all in the key; so do the dispatch inputs, plus the thread count, the interpreter flag,
    the forced backend and, on CUDA, x's alignment)."""
    dev = x.device
    ws = tuple([(w.shape, w.dtype, w.device) for w in weights])
    extra = torch.get_num_threads() if dev.type == "cpu" else _aligned(x, [w.shape[0] for w in weights]) if ws else None
    sig = (x.shape, x.dtype, dev, extra, _arch.interpreting(), DISPATCH.forced, ws)
    try:
        plan = DISPATCH.plans.get(sig)
    except TypeError:  # symbolic sizes: no cache
        plan, sig = None, None
    if plan is None:
        _check_op(x, weights, name)
        oc, ks = [w.shape[0] for w in weights], [w.shape[2] for w in weights]
        B, C, T, H, W = x.shape
        macs = B * T * H * W * C * sum(n * k for n, k in zip(oc, ks))
        backend = select(x, oc, ks).backend
        groups = _plan_groups(oc, ks, backend == "conv_kt") if backend in ("conv", "conv_kt") else ()
        plan = _Plan(backend, oc, ks, dev.type == "cpu" and macs < CPU_SMALL_MACS, x.numel() == 0,
                     _contiguous_strides((B, T, H, W, sum(oc))), _cl3d_strides(x.shape), groups)
        if sig is not None:
            DISPATCH.plans[sig] = plan
    return plan


def _forward_kernel(x: Tensor, weights: List[Tensor], biases: List[Optional[Tensor]]) -> Tensor:
    plan = _plan(x, weights, "stssa::temporal_proj")
    backend, oc, ks = plan.backend, plan.oc, plan.ks
    if plan.empty:  # conv3d rejects T = 0 (padded T < kt) and H/W = 0, and drops the outputs for C = 0
        B, C, T, H, W = x.shape
        y = torch.zeros((B, T, H, W, sum(oc)), dtype=x.dtype, device=x.device)  # Y = bias when C = 0
        bp = pack_biases(biases, weights)
        return y if bp is None else y.add_(bp)
    if backend in ("conv", "conv_kt"):
        y = _fwd_conv(x, weights, biases, oc, plan.groups, plan.small)
    else:
        wp, bp = pack_weights(weights), pack_biases(biases, weights)
        if backend == "triton":
            tk = _arch.triton_kernels("temporal_proj")
            y = tk.temporal_proj_fwd(x, wp, bp, oc, ks, _triton_config(tk, x, oc))
        else:
            y = _fwd_gemm(x, wp, bp, oc, ks)
    return _exact(y, plan.y_strides)


def _forward_fake(x, weights, biases):
    _check_op(x, weights)
    B, C, T, H, W = x.shape
    return x.new_empty((B, T, H, W, sum(w.shape[0] for w in weights)))


def _backward_kernel(grad_y: Tensor, x: Tensor, weights: List[Tensor], output_mask: List[bool]):
    plan = _plan(x, weights, "stssa::_temporal_proj_backward")
    need_dx, need_dw, need_db = output_mask
    backend, oc, ks = plan.backend, plan.oc, plan.ks
    conv = backend in ("conv", "conv_kt")
    # the conv backends take dy in any dense strides (convolution_backward reads its [B, N, T, H, W]
    # view: no copy of a gradient arriving in NCTHW); the GEMM and Triton ones need the packed layout, and
    # a broadcast gradient (zero strides, e.g. from .sum().backward()) is made dense for all
    dense = all(st != 0 or sz == 1 for st, sz in zip(grad_y.stride(), grad_y.shape))
    dy = grad_y if conv and dense else _exact(grad_y, plan.y_strides)
    dx, dws = None, None
    if plan.empty:  # nothing flowed through: x's gradient is empty, the weights' are zero
        dx = torch.empty_strided(x.shape, plan.dx_strides, dtype=x.dtype, device=x.device)
        dws = [torch.zeros(w.shape, dtype=w.dtype, device=w.device) for w in weights]
    elif need_dx or need_dw:
        if conv:
            dx, dws = _bwd_conv(dy, x, weights, oc, ks, need_dx, need_dw, plan.groups, plan.small)
        else:
            wp = pack_weights(weights)
            if backend == "triton":
                tk = _arch.triton_kernels("temporal_proj")
                dx, dwp = tk.temporal_proj_bwd(dy, x, wp, oc, ks, need_dx, need_dw, _triton_config(tk, x, oc))
            else:
                dx, dwp = _bwd_gemm(dy, x, wp, oc, ks, need_dx, need_dw)
            dws = _unpack_weight_grads(dwp, weights) if need_dw else None
    dx = _exact(dx, plan.dx_strides) if need_dx else x.new_empty((0,))
    dws = dws if need_dw else [x.new_empty((0,)) for _ in weights]
    # column sums accumulated in fp32 (fp64 for fp64) whatever the dtype
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    db = dy.sum((0, 1, 2, 3), dtype=acc).to(x.dtype) if need_db else x.new_empty((0,))
    return dx, dws, db


def _backward_fake(grad_y, x, weights, output_mask):
    need_dx, need_dw, need_db = output_mask
    empty = lambda: x.new_empty((0,))  # noqa: E731
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d) if need_dx else empty()
    dws = [w.new_empty(w.shape) if need_dw else empty() for w in weights]
    db = x.new_empty((sum(w.shape[0] for w in weights),)) if need_db else empty()
    return dx, dws, db


_LIB, _forward_op, _backward_op = register_op_pair(  # _LIB kept alive with the module
    "temporal_proj(Tensor x, Tensor[] weights, Tensor?[] biases) -> Tensor",
    "_temporal_proj_backward(Tensor grad_y, Tensor x, Tensor[] weights, bool[] output_mask) "
    "-> (Tensor, Tensor[], Tensor)",
    _forward_kernel, _backward_kernel, _forward_fake, _backward_fake)


class _TemporalProjFunction(torch.autograd.Function):
    """The one autograd connection of the op. ``apply(x, n, *weights, *biases)`` (n weights; biases
    Tensor or None each) -> the packed output Y."""

    @staticmethod
    def forward(ctx, x, n, *params):
        weights, biases = list(params[:n]), list(params[n:])
        ctx.save_for_backward(x, *weights)
        ctx.n, ctx.has_bias = n, [b is not None for b in biases]
        return _forward_op(x, weights, biases)

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():
            raise RuntimeError("temporal_proj: double backward is not implemented (stssa::_temporal_proj_backward "
                               "has no derivative)")
        x, *weights = ctx.saved_tensors
        n = ctx.n
        need = ctx.needs_input_grad
        mask = [need[0], any(need[2:2 + n]), any(h and g for h, g in zip(ctx.has_bias, need[2 + n:]))]
        if not any(mask):
            return (None,) * (2 + 2 * n)
        with _no_autocast(x.device.type):
            dx, dws, db = _backward_op(grad_y, x, weights, mask)
        dbs = db.split([w.shape[0] for w in weights]) if mask[2] else [None] * n
        return (dx if need[0] else None, None,
                *[dw if need[2 + i] else None for i, dw in enumerate(dws)],
                *[dbs[i] if (h and need[2 + n + i]) else None for i, h in enumerate(ctx.has_bias)])


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _cast(t, dtype):
    # conv3d's autocast rule: floating tensors other than float64 run in the autocast dtype
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def temporal_proj(x: Tensor, weights: Sequence[Tensor],
                  biases: Optional[Sequence[Optional[Tensor]]] = None) -> List[Tensor]:
    """Several temporal-only Conv3d's of one input, in one pass over ``x``.

    Args:
        x: ``[B, C, T, H, W]`` (any strides; contiguous or ``channels_last_3d``), fp16/bf16/fp32/fp64.
        weights: list of Conv3d weights ``[C_out_i, C, kt_i, 1, 1]`` with odd ``kt_i`` (1, 3, 7, ...).
        biases: ``None`` or a list of the same length of ``[C_out_i]`` tensors or ``None``.

    Returns:
        ``[out_0, out_1, ...]``, ``out_i[B, C_out_i, T, H, W] = F.conv3d(x, weights[i], biases[i],
        padding=(kt_i // 2, 0, 0))`` (zero padding in time). All outputs are column slices of one
        ``[B, T, H, W, sum C_out_i]`` buffer: channel stride 1, position stride ``sum C_out_i``.
    """
    dev = x.device.type if isinstance(x, Tensor) else None
    amp = None
    if dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
        amp = torch.get_autocast_dtype(dev)
        x = _cast(x, amp)
        if isinstance(weights, (list, tuple)):
            weights = [_cast(w, amp) for w in weights]
        if isinstance(biases, (list, tuple)):
            biases = [_cast(b, amp) for b in biases]
    _check_inputs(x, weights, biases)
    weights = list(weights)
    biases = list(biases) if biases is not None else [None] * len(weights)
    if amp is None:
        y = _run(x, weights, biases)
    else:
        with torch.autocast(dev, enabled=False):  # the backends choose their own accumulation precision
            y = _run(x, weights, biases)
    if len(weights) == 1:  # no split node in the graph
        return [y.permute(0, 4, 1, 2, 3)]
    return [part.permute(0, 4, 1, 2, 3) for part in y.split([w.shape[0] for w in weights], dim=-1)]


def _run(x, weights, biases) -> Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)
                                    or any(b is not None and b.requires_grad for b in biases)):
        return _TemporalProjFunction.apply(x, len(weights), *weights, *biases)
    refuse_forward_ad("temporal_proj", x, *weights, *biases)
    return _forward_op(x, weights, biases)


def _check_inputs(x: Tensor, weights: Sequence[Tensor], biases) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"temporal_proj: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"temporal_proj: x must be a 5-D tensor [B, C, T, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"temporal_proj: x must be fp16, bf16, fp32 or fp64, got {x.dtype}")
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise TypeError("temporal_proj: weights must be a non-empty list of Conv3d weights [C_out, C, kt, 1, 1]")
    C = x.shape[1]
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError(f"temporal_proj: weights[{i}] must be a Tensor, got {type(w).__name__}")
        if w.dim() != 5 or w.shape[3] != 1 or w.shape[4] != 1:
            raise ValueError(f"temporal_proj: weights[{i}] must have shape [C_out, C, kt, 1, 1] (a temporal-only "
                             f"Conv3d weight), got {tuple(w.shape)}")
        if w.shape[1] != C:
            raise ValueError(f"temporal_proj: weights[{i}] has {w.shape[1]} input channels (dim 1) but x has "
                             f"C={C} channels")
        if w.shape[2] % 2 == 0:
            raise ValueError(f"temporal_proj: weights[{i}] has an even temporal kernel size kt={w.shape[2]}; "
                             "only odd kt (1, 3, 5, 7, ...) keep T frames with padding kt // 2")
        if w.shape[0] == 0:
            raise ValueError(f"temporal_proj: weights[{i}] has no output channels (shape {tuple(w.shape)})")
        if w.device != x.device:
            raise ValueError(f"temporal_proj: weights[{i}] is on {w.device} but x is on {x.device}")
        if w.dtype != x.dtype:
            raise TypeError(f"temporal_proj: weights[{i}] has dtype {w.dtype} but x has {x.dtype}")
    if biases is None:
        return
    if not isinstance(biases, (list, tuple)) or len(biases) != len(weights):
        n = len(biases) if isinstance(biases, (list, tuple)) else type(biases).__name__
        raise ValueError(f"temporal_proj: biases must be None or a list with one entry (Tensor or None) per "
                         f"weight; got {n} for {len(weights)} weights")
    for i, (b, w) in enumerate(zip(biases, weights)):
        if b is None:
            continue
        if not isinstance(b, Tensor):
            raise TypeError(f"temporal_proj: biases[{i}] must be a Tensor or None, got {type(b).__name__}")
        if b.dim() != 1 or b.shape[0] != w.shape[0]:
            raise ValueError(f"temporal_proj: biases[{i}] must have shape [{w.shape[0]}] (C_out of weights[{i}]), "
                             f"got {tuple(b.shape)}")
        if b.device != x.device:
            raise ValueError(f"temporal_proj: biases[{i}] is on {b.device} but x is on {x.device}")
        if b.dtype != x.dtype:
            raise TypeError(f"temporal_proj: biases[{i}] has dtype {b.dtype} but x has {x.dtype}")


class TemporalProjection(nn.Module):
    """Several ``nn.Conv3d(in_channels, out_channels[i], (kernel_sizes[i], 1, 1),
    padding=(kernel_sizes[i] // 2, 0, 0))`` applied to one input, fused.

    ``forward(x [B, C, T, H, W]) -> [out_i [B, out_channels[i], T, H, W], ...]``. ``weights[i]`` and
    ``biases[i]`` have the shapes, initialisation and state-dict meaning of the Conv3d's ``weight`` and
    ``bias``. ``use_fused=False`` runs the plain-PyTorch reference (one ``F.conv3d`` each).
    """

    def __init__(self, in_channels: int, out_channels: Sequence[int], kernel_sizes: Sequence[int],
                 bias: bool = True, device=None, dtype=None, use_fused: bool = True):
        super().__init__()
        if len(out_channels) != len(kernel_sizes) or len(out_channels) == 0:
            raise ValueError(f"TemporalProjection: out_channels {list(out_channels)} and kernel_sizes "
                             f"{list(kernel_sizes)} must be non-empty lists of equal length")
        for k in kernel_sizes:
            if k < 1 or k % 2 == 0:
                raise ValueError(f"TemporalProjection: kernel_sizes must be odd and positive, got {list(kernel_sizes)}")
        kw = dict(device=device, dtype=dtype)
        self.in_channels = in_channels
        self.out_channels = list(out_channels)
        self.kernel_sizes = list(kernel_sizes)
        self.use_fused = bool(use_fused)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(n, in_channels, k, 1, 1, **kw)) for n, k in zip(out_channels, kernel_sizes)])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(n, **kw)) for n in out_channels]) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv3d's initialisation (kaiming_uniform with a=sqrt(5), bias U(-1/sqrt(fan_in), ..)).
        for i, w in enumerate(self.weights):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if self.biases is not None:
                bound = 1 / math.sqrt(w.shape[1] * w.shape[2]) if w.numel() else 0
                nn.init.uniform_(self.biases[i], -bound, bound)

    def forward(self, x: Tensor) -> List[Tensor]:
        biases = list(self.biases) if self.biases is not None else None
        fn = temporal_proj if self.use_fused else temporal_proj_ref
        return fn(x, list(self.weights), biases)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, out_channels={self.out_channels}, kernel_sizes={self.kernel_sizes}, "
                f"bias={self.biases is not None}")
