"""Fused temporal (kt x 1 x 1) projections: STSSA's slow/fast Q/K/V Conv3d's in one op.

``temporal_proj(x, weights, biases)`` returns what ``[F.conv3d(x, w, b, padding=(kt // 2, 0, 0))
for w, b in zip(weights, biases)]`` returns, but reads ``x`` once for all projections (one implicit
GEMM over channels and temporal taps; see ``stssa_kernels/triton/temporal_proj.py`` for the math).

Layers of the op:

* ``torch.ops.stssa.temporal_proj(x, weight, bias, out_channels, kernel_sizes) -> Tensor`` works on
  *packed* operands: ``weight[sum_i kt_i * N_i, C]`` (per projection, per tap, the ``[N_i, C]``
  matrix ``W_i[:, :, j]``), ``bias[sum N_i]`` or None, and returns the packed output
  ``Y[B, T, H, W, sum N_i]`` (contiguous). One packed output rather than a ``Tensor[]`` because the
  projections are column slices of one buffer, and custom-op outputs may not alias each other.
* ``torch.ops.stssa._temporal_proj_backward`` is the backward as an op of its own (grad of x, of the
  packed weight and of the packed bias), so torch.compile and opcheck see it.
* :func:`temporal_proj` (the public function) validates the Conv3d-style arguments, packs the
  weights (differentiably: autograd unpacks the weight gradient), calls the op and returns per
  projection a ``[B, C_out_i, T, H, W]`` view of ``Y``. Output layout: channels-last
  (``[B, T, H, W, C_out]`` memory, channel stride 1, position stride ``sum N_i``): each token's
  channel vector is contiguous (the K-major operand of ``Q K^T``, loaded with 16-byte vectors) and the
  (t, h, w) tokens sit at one uniform stride, so ``attention3d`` (which takes any strides) indexes a
  token with one multiply on every axis. It is the layout the GEMM writes without a transpose; that
  it is also the one ``attention3d`` reads fastest is not measured yet (no GPU so far).
* :class:`TemporalProjection` holds the weights like a list of Conv3d.

Backends (chosen per call by the :data:`DISPATCH` table; the benchmark prints which ran):

* ``"triton"``: the implicit-GEMM Triton kernels (no im2col, no padded taps: each output tile
  loops over its own projection's taps only).
* ``"gemm"``: the same tap decomposition with torch matmuls (MKL on CPU, cuBLAS on CUDA): on
  time-major copies of x and Y (``[T, B*H*W, C]``) every tap is one 2-D GEMM over all clips -- one for
  the centre tap of every projection at once, one per other tap offset for the projections that have
  it, accumulated in place -- with no padded-tap FLOPs; the layout copies cost 1/C of the GEMMs.
* ``"conv"``: one cuDNN/oneDNN ``conv3d`` with every weight concatenated and zero-padded to the largest
  kt -- a single library call, at the price of ``max_kt * sum N`` instead of ``sum kt_i N_i`` tap
  GEMMs (1.75x the FLOPs for three 7-tap + three 1-tap projections of equal width).
* ``"conv_kt"``: one library ``conv3d`` per distinct kernel size (weights of that size concatenated),
  outputs copied into ``Y``: no padded taps, one extra pass over the output.

Gradients: first order (x, every weight, every bias); a double backward is not implemented.

Autocast: like ``conv3d`` (a lower-precision op on both CUDA and CPU autocast lists), under autocast
the floating inputs are cast to the autocast dtype (fp16/bf16 on CUDA, bf16 on CPU by default) and the
op runs there with fp32 accumulation.
"""

import contextlib
import dataclasses
import math
import os
from typing import Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ext  # noqa: F401  (the C++ library owns the "stssa" namespace)
from ..reference.temporal_proj import temporal_proj_ref
from ._arch import cuda_capability
from ._eager import plain_eager

try:  # Triton is optional for CPU-only installs (torch CPU wheels do not bring it)
    from ..triton import temporal_proj as _tk
except ImportError:  # pragma: no cover - depends on the install
    _tk = None

__all__ = ["temporal_proj", "TemporalProjection", "DISPATCH", "Route", "route", "select_backend", "use_backend",
           "pack_weights", "pack_biases"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------
# Dispatch table
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Route:
    """One row of the dispatch table: the first row whose conditions all hold picks ``backend``."""
    backend: str                      # one of BACKENDS
    device: str                       # "cpu" | "cuda"
    min_cc: int = 0                   # compute capability major*10+minor, inclusive (CUDA only)
    max_cc: int = 10_000
    dtypes: tuple = _FLOATS
    aligned: bool = False             # C and every C_out multiples of 16, 16-byte aligned x
    interpreter: Optional[bool] = None  # None: either; True/False: TRITON_INTERPRET=1 set or not
    max_threads: int = 1 << 30        # CPU: torch.get_num_threads() at most this
    why: str = ""


_CPU_JSON = "benchmarks/results/temporal_proj{}_cpu-amd-epyc_2026-11-25.json"

DISPATCH: tuple = (
    Route("triton", "cpu", dtypes=(torch.float32, torch.float16), interpreter=True,
          why="TRITON_INTERPRET=1: the Triton kernels run on CPU tensors (tests); the interpreter "
              "simulates neither bf16 nor fp64"),
    Route("gemm", "cpu", max_threads=1,
          why="measured, 1 thread (" + _CPU_JSON.format("_1thread") + "): fastest backend, 1.10-1.25x the "
              "per-kt conv3d baseline and 1.31-1.61x six Conv3d (fwd and fwd+bwd, reduced STSSA shapes)"),
    Route("conv_kt", "cpu",
          why="measured, 2 threads (" + _CPU_JSON.format("") + "): oneDNN's convs scale to 2 threads better "
              "than 7 MKL GEMMs; 0.91-1.11x the per-kt conv3d baseline (gemm 0.86-0.98x), 0.99-1.16x six Conv3d"),
    Route("conv_kt", "cuda", max_cc=79,
          why="UNMEASURED. sm_75: Triton lowers tl.dot to FFMA (no tensor cores; compile_check), so cuDNN: one "
              "call per kernel size (one call with all weights zero-padded to 7 taps = 1.75x the FLOPs)"),
    Route("triton", "cuda", min_cc=80, dtypes=(torch.float16, torch.bfloat16), aligned=True,
          why="UNMEASURED. sm_80+: implicit GEMM on tensor cores (HMMA/HGMMA), no padded-tap FLOPs"),
    Route("gemm", "cuda",
          why="UNMEASURED. fp32/fp64 or odd channel counts: cuBLAS tap GEMMs (no padded taps; fp32 "
              "follows torch.backends.cuda.matmul.allow_tf32)"),
)

BACKENDS = ("triton", "gemm", "conv", "conv_kt")
_forced: Optional[str] = None


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend ("triton", "gemm", "conv", "conv_kt") for every call inside the block (tests, benchmarks);
    ``None`` restores the table. Read when the op runs, so it also applies to compiled graphs."""
    global _forced
    if name not in (None,) + BACKENDS:
        raise ValueError(f"temporal_proj: unknown backend {name!r}; expected one of {BACKENDS}")
    if name == "triton" and _tk is None:
        raise RuntimeError("temporal_proj: backend 'triton' needs the triton package")
    prev, _forced = _forced, name
    try:
        yield
    finally:
        _forced = prev


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _aligned(x: Tensor, out_channels: Sequence[int]) -> bool:
    """The Triton specialisation the dispatcher uses on GPU (compile_specs compiles exactly it):
    16-element C and C_out, and 16-byte aligned x rows in the layout the kernels read."""
    C = x.shape[1]
    if C % 16 or any(n % 16 for n in out_channels):
        return False
    if x.stride(1) != 1:  # the launcher makes a fresh channels-last copy: aligned
        return True
    return x.data_ptr() % 16 == 0 and all(s % 16 == 0 for i, s in enumerate(x.stride()) if i != 1)


def _cc(device: torch.device) -> int:
    return cuda_capability(device) if device.type == "cuda" else 0


def route(device_type: str, cc: int, dtype: torch.dtype, aligned: bool, interpreting: bool,
          threads: int = 1) -> Route:
    """First :data:`DISPATCH` row matching a call's key (pure: no device queries)."""
    for r in DISPATCH:
        if r.device != device_type or not (r.min_cc <= cc <= r.max_cc) or dtype not in r.dtypes:
            continue
        if device_type == "cpu" and threads > r.max_threads:
            continue
        if r.interpreter is not None and r.interpreter != interpreting:
            continue
        if r.backend == "triton" and (_tk is None or (r.aligned and not aligned)):
            continue
        return r
    return Route("gemm", device_type, why="fallback: no table row matched")


def select_backend(x: Tensor, out_channels: Sequence[int]) -> Route:
    """The :data:`DISPATCH` row that runs ``x`` with projections of widths ``out_channels``
    (ignores :func:`use_backend`)."""
    return route(x.device.type, _cc(x.device), x.dtype, _aligned(x, out_channels), _interpreting(),
                 torch.get_num_threads())


def _backend(x: Tensor, out_channels: Sequence[int]) -> str:
    return _forced if _forced is not None else select_backend(x, out_channels).backend


def _triton_config(x: Tensor, out_channels: Sequence[int]):
    cc = None if x.device.type == "cpu" else _cc(x.device)
    return _tk.pick_config(cc, x.shape[1], out_channels)


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


def _canonical(t: Tensor, memory_format=torch.contiguous_format) -> Tensor:
    """``t`` with exactly the strides ``torch.empty(t.shape, memory_format=...)`` gives (what the fake
    kernels promise): ``.contiguous()`` keeps other strides on size-1 dims."""
    ref = torch.empty(t.shape, device="meta", memory_format=memory_format).stride()
    if t.stride() == ref:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format)
    return out.copy_(t)


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


def _group_weight(wp: Tensor, oc, ks, idx) -> Tensor:
    """Packed weight rows of projections ``idx`` -> one Conv3d weight [sum N, C, kg, 1, 1] with
    kg = their largest kt, each projection's taps centred and zeros around them."""
    C, kg = wp.shape[1], max(ks[i] for i in idx)
    lay = list(_layout(oc, ks))
    w = wp.new_zeros((sum(oc[i] for i in idx), C, kg))
    r = 0
    for i in idx:
        row, _, n, kt, p = lay[i]
        w[r:r + n, :, kg // 2 - p:kg // 2 + p + 1] = wp[row:row + kt * n].view(kt, n, C).permute(1, 2, 0)
        r += n
    return w.view(w.shape[0], C, kg, 1, 1).contiguous(memory_format=torch.channels_last_3d)


def _fwd_conv(x: Tensor, wp: Tensor, bias: Optional[Tensor], oc, ks, per_kt: bool) -> Tensor:
    B, C, T, H, W = x.shape
    xc = x.contiguous(memory_format=torch.channels_last_3d)
    groups = _conv_groups(ks, per_kt)
    cols = [c for _, c, *_ in _layout(oc, ks)]
    if len(groups) == 1:  # channels-last in -> channels-last out = the packed [B, T, H, W, sum N] memory
        return F.conv3d(xc, _group_weight(wp, oc, ks, groups[0]), bias, padding=(max(ks) // 2, 0, 0)).permute(0, 2, 3, 4, 1)
    y = torch.empty((B, T, H, W, sum(oc)), dtype=x.dtype, device=x.device)
    for idx in groups:
        bg = None if bias is None else torch.cat([bias[cols[i]:cols[i] + oc[i]] for i in idx])
        out = F.conv3d(xc, _group_weight(wp, oc, ks, idx), bg, padding=(max(ks[i] for i in idx) // 2, 0, 0))
        out, r = out.permute(0, 2, 3, 4, 1), 0
        for i in idx:
            y[..., cols[i]:cols[i] + oc[i]] = out[..., r:r + oc[i]]
            r += oc[i]
    return y


def _bwd_conv(dy: Tensor, x: Tensor, wp: Tensor, oc, ks, need_dx: bool, need_dw: bool, per_kt: bool):
    C = x.shape[1]
    xc = x.contiguous(memory_format=torch.channels_last_3d)
    lay = list(_layout(oc, ks))
    dx, dwp = None, (torch.empty(wp.shape, dtype=wp.dtype, device=wp.device) if need_dw else None)
    for idx in _conv_groups(ks, per_kt):
        kg = max(ks[i] for i in idx)
        gy = torch.cat([dy[..., lay[i][1]:lay[i][1] + oc[i]] for i in idx], -1) if len(idx) < len(oc) else dy
        dxg, dwg, _ = torch.ops.aten.convolution_backward(
            gy.permute(0, 4, 1, 2, 3), xc, _group_weight(wp, oc, ks, idx), None, [1, 1, 1], [kg // 2, 0, 0],
            [1, 1, 1], False, [0, 0, 0], 1, [need_dx, need_dw, False])
        if need_dx:
            dx = dxg if dx is None else dx.add_(dxg)
        if need_dw:
            r = 0
            for i in idx:
                row, _, n, kt, p = lay[i]
                dwp[row:row + kt * n].view(kt, n, C).copy_(dwg[r:r + n, :, kg // 2 - p:kg // 2 + p + 1, 0, 0].permute(2, 0, 1))
                r += n
    return dx, dwp


# ------------------------------------------------------------------------------------------------
# The ops
# ------------------------------------------------------------------------------------------------
def _check_packed(x: Tensor, weight: Tensor, bias: Optional[Tensor], oc: Sequence[int], ks: Sequence[int],
                  name: str = "stssa::temporal_proj") -> None:
    """Op-boundary checks for direct callers of the packed op (the wrapper checks more, with the
    Conv3d-style argument names)."""
    if x.dim() != 5:
        raise ValueError(f"{name}: x must be [B, C, T, H, W], got shape {tuple(x.shape)}")
    if len(oc) != len(ks) or len(oc) == 0:
        raise ValueError(f"{name}: out_channels and kernel_sizes must be non-empty and of equal length, "
                         f"got {list(oc)} and {list(ks)}")
    if any(k < 1 or k % 2 == 0 for k in ks) or any(n < 1 for n in oc):
        raise ValueError(f"{name}: kernel_sizes must be odd and positive and out_channels positive, "
                         f"got {list(ks)} and {list(oc)}")
    rows = sum(k * n for k, n in zip(ks, oc))
    if weight.dim() != 2 or weight.shape[0] != rows or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: weight must be the packed [sum kt_i*C_out_i, C] = [{rows}, {x.shape[1]}] "
                         f"matrix, got shape {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != sum(oc)):
        raise ValueError(f"{name}: bias must be [sum C_out_i] = [{sum(oc)}], got shape {tuple(bias.shape)}")
    for t, what in ((weight, "weight"), (bias, "bias")):
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise ValueError(f"{name}: {what} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")


@torch.library.custom_op("stssa::temporal_proj", mutates_args=())
def _temporal_proj_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_channels: List[int],
                      kernel_sizes: List[int]) -> Tensor:
    """Packed op: x [B, C, T, H, W], weight [sum kt_i N_i, C], bias [sum N_i] or None ->
    Y [B, T, H, W, sum N_i] contiguous (column slice i = projection i, channels last)."""
    _check_packed(x, weight, bias, out_channels, kernel_sizes)
    return _forward_impl(x, weight, bias, out_channels, kernel_sizes)


def _forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_channels: List[int],
                  kernel_sizes: List[int]) -> Tensor:
    weight = weight.contiguous()
    backend = _backend(x, out_channels)
    if backend == "triton":
        y = _tk.temporal_proj_fwd(x, weight, bias, out_channels, kernel_sizes, _triton_config(x, out_channels))
    elif backend in ("conv", "conv_kt"):
        y = _fwd_conv(x, weight, bias, out_channels, kernel_sizes, per_kt=backend == "conv_kt")
    else:
        y = _fwd_gemm(x, weight, bias, out_channels, kernel_sizes)
    return _canonical(y)


@_temporal_proj_op.register_fake
def _(x, weight, bias, out_channels, kernel_sizes):
    _check_packed(x, weight, bias, out_channels, kernel_sizes)
    B, C, T, H, W = x.shape
    return x.new_empty((B, T, H, W, sum(out_channels)))


@torch.library.custom_op("stssa::_temporal_proj_backward", mutates_args=())
def _temporal_proj_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, out_channels: List[int],
                               kernel_sizes: List[int], output_mask: List[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``stssa::temporal_proj``. grad_y [B, T, H, W, sum N] -> (grad_x [B, C, T, H, W]
    channels_last_3d, grad_weight [sum kt_i N_i, C], grad_bias [sum N]); an entry whose
    ``output_mask`` is False comes back as an empty ``[0]`` tensor."""
    _check_packed(x, weight, None, out_channels, kernel_sizes, "stssa::_temporal_proj_backward")
    return _backward_impl(grad_y, x, weight, out_channels, kernel_sizes, output_mask)


def _backward_impl(grad_y: Tensor, x: Tensor, weight: Tensor, out_channels: List[int], kernel_sizes: List[int],
                   output_mask: List[bool]) -> tuple[Tensor, Tensor, Tensor]:
    need_dx, need_dw, need_db = output_mask
    dy = _canonical(grad_y)
    weight = weight.contiguous()
    backend = _backend(x, out_channels)
    if not (need_dx or need_dw):
        dx = dwp = None
    elif backend == "triton":
        dx, dwp = _tk.temporal_proj_bwd(dy, x, weight, out_channels, kernel_sizes, need_dx, need_dw,
                                        _triton_config(x, out_channels))
    elif backend in ("conv", "conv_kt"):
        dx, dwp = _bwd_conv(dy, x, weight, out_channels, kernel_sizes, need_dx, need_dw, per_kt=backend == "conv_kt")
    else:
        dx, dwp = _bwd_gemm(dy, x, weight, out_channels, kernel_sizes, need_dx, need_dw)
    empty = x.new_empty((0,))
    dx = _canonical(dx, torch.channels_last_3d) if need_dx else empty
    dwp = _canonical(dwp) if need_dw else empty.clone()
    # column sums accumulated in fp32 (fp64 for fp64) whatever the dtype
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    db = dy.view(-1, dy.shape[-1]).sum(0, dtype=acc).to(x.dtype) if need_db else empty.clone()
    return dx, dwp, db


@_temporal_proj_backward_op.register_fake
def _(grad_y, x, weight, out_channels, kernel_sizes, output_mask):
    need_dx, need_dw, need_db = output_mask
    empty = lambda: x.new_empty((0,))  # noqa: E731
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d) if need_dx else empty()
    dwp = weight.new_empty(weight.shape) if need_dw else empty()
    db = x.new_empty((sum(out_channels),)) if need_db else empty()
    return dx, dwp, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, out_channels, kernel_sizes = inputs
    ctx.save_for_backward(x, weight)
    ctx.out_channels, ctx.kernel_sizes, ctx.has_bias = out_channels, kernel_sizes, bias is not None


def _backward(ctx, grad_y, impl=None):
    """Gradients through the registered backward op, or through ``impl`` (its implementation, for the
    eager path without create_graph)."""
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if not any(mask):
        return None, None, None, None, None
    dx, dw, db = (impl or torch.ops.stssa._temporal_proj_backward)(grad_y, x, weight, ctx.out_channels,
                                                                   ctx.kernel_sizes, mask)
    return dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None, None


_temporal_proj_op.register_autograd(_backward, setup_context=_setup_context)


class _TemporalProjFunction(torch.autograd.Function):
    """The op's forward and backward without the custom_op dispatcher round trips, for plain eager calls
    (see ``stssa_kernels.ops._eager``); the same implementations and saved tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_channels, kernel_sizes):
        _setup_context(ctx, (x, weight, bias, out_channels, kernel_sizes), None)
        return _forward_impl(x, weight, bias, out_channels, kernel_sizes)

    @staticmethod
    def backward(ctx, grad_y):
        # create_graph=True: through the registered op, whose node names it on a double backward
        return _backward(ctx, grad_y, None if torch.is_grad_enabled() else _backward_impl)


def _autocast_dtype(device_type: str) -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def _register_autocast(device_type: str) -> None:
    """conv3d's autocast rule: floating inputs (not fp64) cast to the *current* autocast dtype.
    (``torch.library.register_autocast`` only takes a fixed dtype.)"""
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64 or t.device.type != device_type:
            return t
        return t.to(_autocast_dtype(device_type))

    def kernel(_keyset, x, weight, bias, out_channels, kernel_sizes):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return torch.ops.stssa.temporal_proj.default(cast(x), cast(weight), cast(bias), out_channels,
                                                         kernel_sizes)

    _AUTOCAST_LIB.impl("temporal_proj", kernel, key.name, with_keyset=True)


_AUTOCAST_LIB = torch.library.Library("stssa", "FRAGMENT")  # noqa: TOR901 (kept alive with the module)
for _dev in ("cuda", "cpu"):
    _register_autocast(_dev)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _check_inputs(x: Tensor, weights: Sequence[Tensor], biases) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"temporal_proj: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"temporal_proj: x must be a 5-D tensor [B, C, T, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"temporal_proj: x must be fp16, bf16, fp32 or fp64, got {x.dtype}")
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise TypeError("temporal_proj: weights must be a non-empty list of Conv3d weights [C_out, C, kt, 1, 1]")
    autocast = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cuda", "cpu") else False
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
        if w.dtype != x.dtype and not autocast:
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
        if b.dtype != x.dtype and not autocast:
            raise TypeError(f"temporal_proj: biases[{i}] has dtype {b.dtype} but x has {x.dtype}")


def pack_weights(weights: Sequence[Tensor]) -> Tensor:
    """Conv3d weights ``[N_i, C, kt_i, 1, 1]`` -> packed ``[sum kt_i N_i, C]`` (per projection, per tap,
    the ``[N_i, C]`` matrix). Differentiable: the packed gradient flows back to every weight."""
    parts = [w.flatten(2).permute(2, 0, 1).reshape(-1, w.shape[1]) for w in weights]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def pack_biases(biases, weights: Sequence[Tensor]) -> Optional[Tensor]:
    """Biases (Tensor or None each) -> packed ``[sum N_i]`` (zeros for missing ones), or None if none."""
    if biases is None or all(b is None for b in biases):
        return None
    parts = [b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
    _check_inputs(x, weights, biases)
    out_channels = [int(w.shape[0]) for w in weights]
    kernel_sizes = [int(w.shape[2]) for w in weights]
    weight, bias = pack_weights(weights), pack_biases(biases, weights)
    if plain_eager([x, weight] + ([bias] if bias is not None else [])):
        y = _TemporalProjFunction.apply(x, weight, bias, out_channels, kernel_sizes)
    else:
        y = torch.ops.stssa.temporal_proj(x, weight, bias, out_channels, kernel_sizes)
    return [part.permute(0, 4, 1, 2, 3) for part in y.split(out_channels, dim=-1)]


class TemporalProjection(nn.Module):
    """Several ``nn.Conv3d(in_channels, out_channels[i], (kernel_sizes[i], 1, 1),
    padding=(kernel_sizes[i] // 2, 0, 0))`` applied to one input, fused.

    ``forward(x [B, C, T, H, W]) -> [out_i [B, out_channels[i], T, H, W], ...]``. ``weights[i]`` and
    ``biases[i]`` have the shapes, initialisation and state-dict meaning of the Conv3d's ``weight`` and
    ``bias``. ``use_fused=False`` runs the plain-PyTorch reference (one ``F.conv3d`` each).
    """

    def __init__(self, in_channels: int, out_channels: Sequence[int], kernel_sizes: Sequence[int],
                 bias: bool = True, device=None, dtype=None):
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
        self.use_fused = True
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
