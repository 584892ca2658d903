"""``attention3d``: SAGAN-style self-attention over the spatial, temporal or joint axis of a video map.

One execution path (flash-attention's pattern): :func:`attention3d` validates, applies autocast, and
runs two registered ops, connected to autograd by one ``torch.autograd.Function``:

* ``torch.ops.stssa.attention3d(q, k, v, axis, heads, scale, residual?, gamma?) -> (out, lse, saved)``:
  ``out`` is the result; ``lse`` (per-row logsumexp, fp32 ``[sequences, heads, L]``, or the backend's
  own layout, or empty) and ``saved`` (a backend-specific list: the pre-epilogue attention output for
  the flash kernels' backward, P or the sequence-layout copies of q/k/v the CPU path made) are what
  the backward needs.
* ``torch.ops.stssa._attention3d_backward(grad_out, q, k, v, out, lse, saved, axis, heads, scale,
  gamma?, forced?) -> (dq, dk, dv, dgamma)`` (``out``: the output when the call had no epilogue, else
  empty; ``dgamma`` empty without gamma; the residual's gradient is ``grad_out`` itself; ``forced``: the
  backend the forward was forced to, so that a backward outside the ``DISPATCH.force`` block reads the
  ``saved`` tensors of the backend that wrote them).

Both are plain ``torch.library`` definitions with a CPU and a CUDA kernel and a fake kernel, so a
call costs one dispatcher hop into Python (no custom_op wrapper layers), ``torch.compile(fullgraph=True)``
traces the autograd.Function and sees the ops as opaque calls, and ``opcheck`` checks them. The ops
take the dispatch decision themselves (see ``DISPATCH``), from devices, dtypes and shapes only, so eager
calls, compiled graphs and opcheck run the same backend for the same inputs.

Backends (``DISPATCH``: rules as data, first match; ``explain()`` prints why each rule did or did not
take a call; ``DISPATCH.force(name)`` pins one):

* ``triton``: the fused kernels of ``stssa_kernels.triton.attention3d`` (packed for short sequences,
  flash-style for long ones), reading q/k/v in place; CUDA, and CPU tensors under
  ``TRITON_INTERPRET=1`` (the same kernels without a GPU). Imported on first use only.
* ``torch_flash``: PyTorch's fused CPU flash-attention kernel on sequence views
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward); Dk == Dv.
* ``torch_math``: batched matmul/softmax/matmul on sequence views, in blocks of queries (what SDPA's
  math backend computes, without its autograd graph), fp32 statistics for fp16/bf16. The one CPU
  implementation of the attention math for short sequences, and the fallback everywhere.
* ``sdpa_efficient``: CUDA, PyTorch's memory-efficient (CUTLASS) attention on contiguous permuted
  copies, for long fp16 sequences on sm_75 (Triton lowers ``tl.dot`` to FFMA there).

GPU rules are unmeasured (no GPU was available when they were written); the CPU rules were measured
with ``benchmarks/attn3d.py`` (results under ``benchmarks/results/``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _ext  # noqa: F401  (the C++ library owns the "stssa" namespace)
from ..reference.attention3d import _SEQ_PERM, AXES, attention3d_ref, seq_count_and_length, to_seq
from . import _arch
from ._dispatch import Backend, Dispatcher, Problem, Rule, TritonBackend, between, register_op_pair
from ._dispatch import no_autocast as _no_autocast, refuse_forward_ad

__all__ = ["attention3d", "Attention3d", "SelfAttention3d", "DISPATCH", "select", "explain"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_F16, _BF16, _F32 = torch.float16, torch.bfloat16, torch.float32


# ---------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Attention3dProblem(Problem):
    axis: str = "spatial"
    L: int = 0          # tokens per sequence
    dk: int = 0         # q/k channels per head
    dv: int = 0         # v channels per head
    scores: int = 0     # score elements of the call: sequences * heads * L^2


class _Triton(TritonBackend):
    def __init__(self):
        super().__init__("attention3d")

    def reasons(self, p):
        out = super().reasons(p)
        if not out and self.missing() is None and self.plan(p) is None:
            out.append(f"no tile for head dim Dk={p.dk} at L={p.L} (the flash kernels stop at 256)")
        return out

    def plan(self, p):
        return _arch.triton_kernels("attention3d").plan(p.cc, p.L, p.dk, p.dv, p.dtype)


class _TorchFlash(Backend):
    name = "torch_flash"

    def reasons(self, p):
        out = []
        if p.device != "cpu":
            out.append("PyTorch's CPU flash kernel: CPU tensors only")
        if p.dk != p.dv:
            out.append(f"needs Dk == Dv per head, got {p.dk} != {p.dv}")
        if p.dk == 0:
            out.append("needs Dk > 0")
        return out


class _TorchMath(Backend):
    name = "torch_math"


class _SdpaEfficient(Backend):
    name = "sdpa_efficient"

    def reasons(self, p):
        out = []
        if p.device != "cuda":
            out.append("CUTLASS kernel: CUDA tensors only")
        if p.dtype not in (_F16, _BF16, _F32):
            out.append(f"takes fp16/bf16/fp32, not {p.dtype}")
        if p.dk != p.dv or p.dk % 8 or not 0 < p.dk <= 128:
            out.append(f"needs Dk == Dv, a multiple of 8 in [8, 128], got Dk={p.dk}, Dv={p.dv}")
        return out


#: CPU regime of batched matmul/softmax/matmul keeping P for the backward (as the PyTorch composition
#: does): sequences up to CPU_MATH_MAX_LEN tokens whose scores (sequences * heads * L^2) fit 64 MiB in
#: fp32. Measured with benchmarks/attn3d.py on this project's 2-core CPU (results/attn3d_cpu-*.json):
#: the matmul composition beats PyTorch's CPU flash kernel up to L = 512 on the full axis (whose sequence
#: view of an NCTHW map needs no copy, while the flash kernel needs a unit-stride head dim) and loses to
#: it at L = 2048. On the spatial axis the math path reads an NCTHW map's frames in place (one bmm per
#: clip) while the flash kernel needs unit-stride copies; from CPU_SPATIAL_FLASH_LEN tokens (16x16 frames)
#: with head dims up to CPU_SPATIAL_FLASH_DK the two are even (2 threads, forced backends, B=2 T=8 and B=2
#: T=4 16x16, Dk = Dv = 32/64, forward and forward+backward: flash 0.85-1.1x the math path's time, two
#: runs); at Dk = 96/128 the math path is faster (0.80-0.99x flash's time), and at 8x8 too.
CPU_MATH_MAX_LEN = 512
CPU_MATH_MAX_SCORES = 1 << 24
CPU_SPATIAL_FLASH_LEN = 256
CPU_SPATIAL_FLASH_DK = 64
#: head dims of the sm_75 SDPA rule: the ones the GPU tests run through it (test_gpu_sdpa_efficient_rule)
SM75_SDPA_HEAD_DIMS = (64,)

DISPATCH = Dispatcher("attention3d", [_Triton(), _TorchFlash(), _TorchMath(), _SdpaEfficient()], [
    Rule("triton", "TRITON_INTERPRET=1: the GPU kernels on CPU tensors", device="cpu", interpret=True,
         dtypes=(_F16, _F32)),
    Rule("torch_flash", "CPU, spatial axis, L >= 256, Dk == Dv <= 64: PyTorch's CPU flash kernel (measured at "
         "16x16 against the matmul path reading NCTHW frames in place: even to 0.85x its time at Dk = 32/64; "
         "at Dk = 96/128 the matmul path is faster, 0.87-0.99x flash's time)", device="cpu",
         when=(("axis", ("spatial",)), ("L", between(CPU_SPATIAL_FLASH_LEN)), ("dk", between(hi=CPU_SPATIAL_FLASH_DK)))),
    Rule("torch_math", "CPU, L <= 512: batched matmul/softmax/matmul keeping P (measured)", device="cpu",
         when=(("L", between(hi=CPU_MATH_MAX_LEN)), ("scores", between(hi=CPU_MATH_MAX_SCORES)))),
    Rule("torch_flash", "CPU, long, Dk == Dv: PyTorch's CPU flash kernel (measured)", device="cpu"),
    Rule("torch_math", "CPU, long, Dk != Dv: matmul/softmax/matmul in query blocks", device="cpu"),
    Rule("sdpa_efficient", "sm_75 FFMA tl.dot: long fp16 sequences on CUTLASS tensor cores, tested head dims "
         "only (UNMEASURED)", device="cuda", families=(75,), dtypes=(_F16,),
         when=(("axis", ("full", "spatial")), ("L", between(256)), ("dk", SM75_SDPA_HEAD_DIMS))),
    Rule("torch_math", "sm_75 bf16: no bf16 tensor cores, and Triton's bf16 code has never run there; "
         "PyTorch math in fp32 (bf16's range kept; fp16 would lose it)", device="cuda", families=(75,),
         dtypes=(_BF16,)),
    Rule("triton", "CUDA: fused Triton kernels, in-place strided reads (UNMEASURED tiles)", device="cuda",
         dtypes=(_F16, _BF16, _F32)),
    Rule("torch_math", "fallback: float64 on GPU, head dims the fused kernels do not take"),
])


def _problem(q: Tensor, v: Tensor, axis: str, heads: int) -> Attention3dProblem:
    nseq, L = seq_count_and_length(q.shape, axis)
    return Attention3dProblem(q.device.type, _arch.capability(q.device), q.dtype, _arch.interpreting(), axis, L,
                              q.shape[1] // heads, v.shape[1] // heads, nseq * heads * L * L)


def select(q: Tensor, k: Tensor, v: Tensor, axis: str, heads: int = 1, forced: Optional[str] = None):
    """The dispatch decision (a :class:`~stssa_kernels.ops._dispatch.Choice`) for these inputs: a pure
    function of device, arch, dtype and shapes (and of ``DISPATCH.force``, or ``forced``)."""
    dev = q.device
    key = (dev, _arch.capability(dev), q.dtype, q.shape, v.shape[1], axis, heads)
    return DISPATCH.select_cached(key, lambda: _problem(q, v, axis, heads), forced)


def explain(q: Tensor, k: Tensor, v: Tensor, axis: str, heads: int = 1, verbose: bool = False) -> str:
    """The dispatch entry for these inputs (printed by the benchmarks); ``verbose``: every rule with why
    it did or did not take the call."""
    if verbose:
        return DISPATCH.explain(_problem(q, v, axis, heads))
    return select(q, k, v, axis, heads).describe()


# ---------------------------------------------------------------------------------------------------
# PyTorch implementations (CPU, fp64, sm_75 long sequences)
# ---------------------------------------------------------------------------------------------------

# Score elements one block of the math path may hold (fp32: 256 MiB), and the most it keeps for the
# backward (fp32: 64 MiB; larger problems recompute P in the backward).
_MATH_BLOCK_ELEMS = 1 << 26
_MATH_KEEP_P_ELEMS = 1 << 24
#: _mm's per-index bmm loop: at most this many calls, and only where the operands of one call hold at
#: least this many elements (measured: a transposing copy costs ~2.6 ns per fp32 element on the 2-core
#: AMD EPYC machine, a bmm call ~4 us; B=2, T=8, 8x8, D=64 spatial q k^T: 177 us by the loop vs 427 us
#: copy + bmm, 1 thread)
_MM_LOOP_MAX = 64
_MM_LOOP_MIN_ELEMS = 2048


def _heads_view(x: Tensor, heads: int) -> Tensor:
    """[B, D, T, H, W] -> [B, heads, D/heads, T, H, W] view; ``x`` itself for one head."""
    if heads == 1:
        return x
    B, D, T, H, W = x.shape
    return x.view(B, heads, D // heads, T, H, W)


def _write_back(dst: Tensor, y_seq: Tensor, axis: str, heads: int) -> Tensor:
    """Copy a sequence-layout tensor into the [B, heads*d, T, H, W] tensor ``dst`` (one strided copy)."""
    _heads_view(dst, heads).copy_(_seq_as_map(y_seq, axis, dst.shape, heads))
    return dst


def _epilogue_into(out: Tensor, attn_seq: Tensor, axis: str, heads: int, residual, gamma) -> Tensor:
    """out = residual + gamma * attention (the terms present), one pass over the map."""
    a = _seq_as_map(attn_seq, axis, out.shape, heads)
    o = _heads_view(out, heads)
    if gamma is not None and gamma.dtype != out.dtype:
        gamma = gamma.to(out.dtype)
    if residual is None and gamma is None:
        o.copy_(a)
    elif residual is None:
        torch.mul(a, gamma, out=o)
    elif gamma is None:
        torch.add(_heads_view(residual, heads), a, out=o)
    else:
        torch.addcmul(_heads_view(residual, heads), gamma, a, out=o)
    return out


def _unit_last(t: Tensor) -> Tensor:
    # the aten CPU flash kernels index the head dim as if its stride were 1 (the public SDPA copies
    # such inputs first); the "full"-axis view of an NCTHW map has stride T*H*W there
    return t if t.stride(-1) == 1 else t.contiguous()


def _math_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _merges(t: Tensor) -> bool:
    """Whether the two leading dims of a 4-D operand merge into one batch dim without a copy."""
    return t.shape[0] == 1 or t.shape[1] == 1 or t.stride(0) == t.stride(1) * t.shape[1]


def _match_batch(*ts):
    """With one head, clip views ``[B, T, L, d]`` (:func:`_clip_view`) may meet flat ``[B*T, L, d]``
    tensors (other layouts, or P): split the flat ones to match (always a view). None entries pass."""
    lead = next((t.shape[:2] for t in ts if t is not None and t.dim() == 4), None)
    if lead is None:
        return ts
    return tuple(t.view(*lead, *t.shape[1:]) if t is not None and t.dim() == 3 else t for t in ts)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` over the batch dims: 3-D ``[N, m, k] @ [N, k, n]`` by one bmm (a fraction of torch.matmul's
    per-call cost on small problems); 4-D ``[N0, N1, m, k]`` (sequences x heads, or clips x frames from
    :func:`_clip_view`; the math functions give all their operands the same batch dims once, with
    :func:`_match_batch`) by torch.matmul, or, where the two batch dims do not merge (torch.matmul would
    copy the operand first), one bmm per leading index on the operands in place -> a contiguous
    ``[N0, N1, m, n]``."""
    if a.dim() == 3:
        return torch.bmm(a, b)
    n0 = a.shape[0]
    # per-index bmm calls only where they replace a copy of enough data to pay for the extra calls
    if isinstance(n0, int) and not (_merges(a) and _merges(b)) and n0 <= _MM_LOOP_MAX \
            and a[0].numel() + b[0].numel() >= _MM_LOOP_MIN_ELEMS:
        out = a.new_empty((*a.shape[:-1], b.shape[-1]))
        for i in range(n0):
            torch.bmm(a[i], b[i], out=out[i])
        return out
    return torch.matmul(a, b)


def _math_logits(qs, ks, sl, scale):
    # bmm then an in-place scale: measured faster on the CPU than baddbmm(alpha=scale, beta=0)
    a = qs if sl is None else qs[..., sl, :]
    s = _mm(a, ks.transpose(-2, -1))
    return s if scale == 1.0 else s.mul_(scale)


def _math_keeps_p(rows: int, L: int) -> bool:
    """Whether the math path keeps P (``rows`` query rows of ``L`` scores) for its backward (as
    autograd would for the bmm/softmax/bmm composition) instead of recomputing it: when all scores fit
    the single-block budget."""
    return rows * L <= min(_MATH_KEEP_P_ELEMS, _MATH_BLOCK_ELEMS)


def _math_step(rows: int, L: int):
    """Query rows per block, or None for one block (the forward and backward must agree, so that a
    recomputed P equals the forward's bit for bit). ``rows``: all query rows (sequences * heads * L)."""
    step = max(1, _MATH_BLOCK_ELEMS * L // max(1, rows * L))
    return None if step >= L else step


def _math_forward(qs, ks, vs, scale):
    """softmax(scale q k^T) v ([N, L, d], or [N, heads, L, d]) with batched GEMMs and PyTorch's fused
    softmax, in blocks of queries (one block unless the scores would pass _MATH_BLOCK_ELEMS). Returns
    (out, P or None): P is kept when small (``_math_keeps_p``), else the backward recomputes it with the
    same kernels, bit for bit."""
    qs, ks, vs = _match_batch(qs, ks, vs)
    L = qs.shape[-2]
    rows = math.prod(qs.shape[:-1])
    ct = _math_dtype(qs.dtype)
    dtype = qs.dtype
    if ct != dtype:
        qs, ks, vs = qs.to(ct), ks.to(ct), vs.to(ct)
    step = _math_step(rows, L)
    p = None
    if step is None:
        p = torch.softmax(_math_logits(qs, ks, None, scale), dim=-1)
        out = _mm(p, vs)
    else:
        out = qs.new_empty((*qs.shape[:-1], vs.shape[-1]))
        for i in range(0, L, step):
            out[..., i:i + step, :] = _mm(torch.softmax(_math_logits(qs, ks, slice(i, i + step), scale), -1), vs)
    return (out if ct == dtype else out.to(dtype)), (p if _math_keeps_p(rows, L) else None)


def _math_backward(dys, qs, ks, vs, scale, gamma, p_saved=None):
    """Backward of :func:`_math_forward` given dY (the grad of ``gamma * attention``): returns
    (dq, dk, dv, dgamma or None). dS = P * (dP - rowsum(P * dP)) by autograd's own softmax backward on
    the forward's P (kept or recomputed bit for bit), so saturated rows (one-hot P at large logits)
    cancel exactly. gamma stays out of the L^2-sized work: dP and dS are formed for dY and gamma scales
    dq, dk, dv; and dgamma = sum(dY * A) = sum(V * P^T dY) = sum(P * dY V^T) reuses dV's or dP's GEMM,
    whichever is smaller (dP where L <= Dv: an AVA RoI's 7x7 frame has L = 49 against Dv = 256), so no
    output is saved."""
    dys, qs, ks, vs, p_saved = _match_batch(dys, qs, ks, vs, p_saved)
    L = qs.shape[-2]
    rows = math.prod(qs.shape[:-1])
    ct = _math_dtype(qs.dtype)
    dtype = qs.dtype
    if ct != dtype:
        qs, ks, vs, dys = qs.to(ct), ks.to(ct), vs.to(ct), dys.to(ct)
    step = _math_step(rows, L)
    blocks = [None] if step is None else [slice(i, i + step) for i in range(0, L, step)]
    dq = torch.empty_like(qs) if step is not None else None
    dk = dv = dgamma = None
    gamma_by_p = gamma is not None and L <= vs.shape[-1]
    for sl in blocks:
        p = p_saved if p_saved is not None else torch.softmax(_math_logits(qs, ks, sl, scale), dim=-1)
        dy, qb = (dys, qs) if sl is None else (dys[..., sl, :], qs[..., sl, :])
        dv_b = _mm(p.transpose(-2, -1), dy)
        dv = dv_b if dv is None else dv.add_(dv_b)
        dp = _mm(dy, vs.transpose(-2, -1))
        if gamma_by_p:
            part = (p * dp).sum(dtype=torch.float64)
            dgamma = part if dgamma is None else dgamma.add_(part)
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
        if sl is None:
            dq = _mm(ds, ks)
        else:
            dq[..., sl, :] = _mm(ds, ks)
        dk_b = _mm(ds.transpose(-2, -1), qb)
        dk = dk_b if dk is None else dk.add_(dk_b)
    if gamma is not None:
        g = gamma if gamma.dtype == ct else gamma.to(ct)
        if not gamma_by_p:
            dgamma = (vs * dv).sum(dtype=torch.float64)
        dv.mul_(g)
        alpha = g * scale
    else:
        alpha = scale
    dq.mul_(alpha)
    dk.mul_(alpha)
    if ct != dtype:
        dq, dk, dv = dq.to(dtype), dk.to(dtype), dv.to(dtype)
    return dq, dk, dv, dgamma


# dims of the permuted [.., heads, .., d] 6-D view (reference.to_seq) that merge into one sequence dim;
# with one head the heads dim merges into the sequences (a 3-D [sequences, L, d] view)
_SEQ_GROUPS = {"spatial": ((0, 1), (2,), (3, 4), (5,)), "temporal": ((0, 1, 2), (3,), (4,), (5,)),
               "full": ((0,), (1,), (2, 3, 4), (5,))}
_SEQ_GROUPS_FLAT = {"spatial": ((0, 1, 2), (3, 4), (5,)), "temporal": ((0, 1, 2, 3), (4,), (5,)),
                    "full": ((0, 1), (2, 3, 4), (5,))}
# clip views (one head): the sequences split into clips x (frames | positions), for maps whose sequences'
# dims do not merge into one (the spatial axis of an NCTHW map, the temporal axis of a channels-last one)
_SEQ_GROUPS_CLIP = {"spatial": ((0,), (1, 2), (3, 4), (5,)), "temporal": ((0,), (1, 2, 3), (4,), (5,))}


def _seq_geometry_of(shape: tuple, stride: tuple, axis: str, heads: int, unit_last: bool, flat: bool,
                     clip: bool = False):
    """(size, stride) of the [sequences, heads, L, d] view (``flat``, one head: [sequences, L, d]; ``clip``,
    one head: [B, T, L, d] spatial or [B, H*W, L, d] temporal, whose [L, d] matrices must have a unit
    stride, i.e. be GEMM operands in place) of a [B, D, T, H, W] tensor with these strides, or None where
    that view needs a copy (or, ``unit_last``, where d's stride is not 1): the permuted dims of each
    sequence dim must chain (size-1 dims aside). Ints or SymInts. This is the one sequence-view function
    of the op (forward, backward, fake kernels)."""
    if clip and axis not in _SEQ_GROUPS_CLIP:
        return None
    B, D, T, H, W = shape
    sB, sD, sT, sH, sW = stride
    d = D // heads
    size6, stride6 = (B, heads, d, T, H, W), (sB, sD * d, sD, sT, sH, sW)
    perm = _SEQ_PERM[axis]
    size, st = [size6[i] for i in perm], [stride6[i] for i in perm]
    out_size, out_stride = [], []
    for group in (_SEQ_GROUPS_CLIP if clip else _SEQ_GROUPS_FLAT if flat else _SEQ_GROUPS)[axis]:
        dims = [i for i in group if size[i] != 1]
        if any(st[a] != st[b] * size[b] for a, b in zip(dims, dims[1:])):
            return None
        out_size.append(math.prod(size[i] for i in group))
        out_stride.append(st[dims[-1]] if dims else 1)
    if unit_last and st[5] != 1:
        return None
    if clip and out_size[2] > 1 and out_size[3] > 1 and out_stride[2] != 1 and out_stride[3] != 1:
        return None
    return tuple(out_size), tuple(out_stride)


# eager shapes repeat: cached (symbolic shapes are unhashable and take the uncached function)
_seq_geometry = functools.lru_cache(maxsize=4096)(_seq_geometry_of)


def _geometry(fn_cached, fn, *args):
    try:
        return fn_cached(*args)
    except TypeError:  # SymInt sizes (torch.compile with dynamic shapes)
        return fn(*args)


def _seq_view(x: Tensor, axis: str, heads: int, unit_last: bool, flat: bool = False):
    """The sequence-layout view of ``x`` if it needs no copy (None otherwise); a pure function of the
    strides, so the forward (which saves the copies it makes) and the backward (which re-views what
    was not saved) agree, eagerly and under fake tensors."""
    if x.numel() == 0:
        y = to_seq(x, axis, heads)  # reshape views any empty tensor
        return y.flatten(0, 1) if flat else y
    g = _geometry(_seq_geometry, _seq_geometry_of, tuple(x.shape), tuple(x.stride()), axis, heads, unit_last, flat)
    return None if g is None else x.as_strided(g[0], g[1], x.storage_offset())


def _seq_copy(x: Tensor, axis: str, heads: int, unit_last: bool, flat: bool) -> Tensor:
    """The sequence layout of ``x`` as one copy (for inputs whose view needs one)."""
    y = to_seq(x, axis, heads).contiguous() if unit_last else to_seq(x, axis, heads)
    return y.flatten(0, 1) if flat else y


def _seq6_geometry_of(seq_shape: tuple, seq_stride: tuple, axis: str, shape: tuple):
    """(size, stride) of ``seq_as_6d``: [sequences, heads, L, d] (or flat [sequences, L, d], one head)
    -> [B, heads, d, T, H, W] (always a view)."""
    B, _, T, H, W = shape
    if len(seq_shape) == 3:
        (s0, s2, s3), h, d, s1 = seq_stride, 1, seq_shape[2], 0
    else:
        (_, h, _, d), (s0, s1, s2, s3) = seq_shape, seq_stride
    if axis == "spatial":
        stride = (T * s0, s1, s3, s0, W * s2, s2)
    elif axis == "temporal":
        stride = (H * W * s0, s1, s3, s2, W * s0, s0)
    else:
        stride = (s0, s1, s3, H * W * s2, W * s2, s2)
    return (B, h, d, T, H, W), stride


_seq6_geometry = functools.lru_cache(maxsize=4096)(_seq6_geometry_of)


def _seq_as_map(y: Tensor, axis: str, shape, heads: int) -> Tensor:
    """The inverse of the sequence view, always a view: [.., L, d] -> [B, heads, d, T, H, W]
    (``seq_as_6d`` of reference.attention3d), or [B, d, T, H, W] for one head (what _heads_view gives)."""
    size, stride = _geometry(_seq6_geometry, _seq6_geometry_of, tuple(y.shape), tuple(y.stride()), axis,
                             tuple(shape))
    if heads == 1:
        size, stride = size[:1] + size[2:], stride[:1] + stride[2:]
    return y.as_strided(size, stride, y.storage_offset())


def _clip_view(x: Tensor, axis: str):
    """The math path's fallback view with one head, where the sequences' dims do not merge into one:
    ``[B, T, H*W, D]`` (spatial) or ``[B, H*W, T, D]`` (temporal) of ``x [B, D, T, H, W]`` when every
    sequence's ``[L, D]`` matrix is a GEMM operand in place (:func:`_seq_geometry_of` with ``clip``);
    :func:`_mm` then runs one bmm per clip on it instead of copying the map. None otherwise."""
    if x.numel() == 0:
        return None
    g = _geometry(_seq_geometry, _seq_geometry_of, tuple(x.shape), tuple(x.stride()), axis, 1, False, False, True)
    return None if g is None else x.as_strided(g[0], g[1], x.storage_offset())


def _math_view(x: Tensor, axis: str, heads: int, flat: bool):
    """The math path's in-place view of ``x``: the sequence view, else (one head) :func:`_clip_view`."""
    y = _seq_view(x, axis, heads, False, flat)
    return y if y is not None or not flat else _clip_view(x, axis)


def _flat(t: Tensor) -> Tensor:
    """A math result ``[B, T, L, d]`` (clip views in) -> the flat ``[B*T, L, d]`` layout; 3-D unchanged."""
    return t.flatten(0, 1) if t.dim() == 4 else t


def _seq_inputs(xs, axis, heads, unit_last, flat, saved=None):
    """Sequence-layout q, k, v: views where possible (for the math path, one head, also clip views),
    else copies (made now, or taken from ``saved`` in the backward). Returns (tensors, the copies made)."""
    out, copies = [], []
    it = iter(saved or ())
    for x in xs:
        y = _seq_view(x, axis, heads, unit_last, flat) if unit_last else _math_view(x, axis, heads, flat)
        if y is None:
            y = next(it, None) if saved is not None else None
            if y is None:
                y = _seq_copy(x, axis, heads, unit_last, flat)
                copies.append(y)
        out.append(y)
    return out, copies


def _torch_forward(q, k, v, axis, heads, scale, residual, gamma, flash):
    """Returns (out, lse, saved): saved = the sequence-layout copies of q, k, v that had to be made
    (the backward re-views the others), plus the attention output for the flash kernel's backward."""
    (qs, ks, vs), copies = _seq_inputs((q, k, v), axis, heads, flash, heads == 1 and not flash)
    if flash:
        attn, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qs, ks, vs, 0.0, False, scale=scale)
    else:
        (attn, p), lse = _math_forward(qs, ks, vs, scale), q.new_empty(0, dtype=torch.float32)
        attn = _flat(attn) if heads == 1 else attn
    out = _epilogue_into(torch.empty_like(v), attn, axis, heads, residual, gamma)
    return out, lse, copies + ([attn] if flash else [p] if p is not None else [])


def _torch_backward(grad_out, q, k, v, lse, saved, axis, heads, scale, gamma, flash):
    nseq, L = seq_count_and_length(q.shape, axis)
    flat = heads == 1 and not flash
    last = flash or _math_keeps_p(nseq * heads * L, L)  # saved = copies + [attention output | P]
    (qs, ks, vs), _ = _seq_inputs((q, k, v), axis, heads, flash, flat, saved[:-1] if last else saved)
    (dos,), _ = _seq_inputs((grad_out,), axis, heads, flash, flat)
    if flash:
        os_ = saved[-1]
        dgamma = None
        if gamma is not None:
            acc = torch.promote_types(dos.dtype, torch.float32)  # fp32 for half inputs, fp64 stays fp64
            dgamma = torch.sum(dos.to(acc) * os_.to(acc))
            dos = dos * gamma.to(dos.dtype)
        dqs, dks, dvs = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _unit_last(dos), qs, ks, vs, _unit_last(os_), lse, 0.0, False, scale=scale)
    else:
        dqs, dks, dvs, dgamma = _math_backward(dos, qs, ks, vs, scale, gamma, saved[-1] if last else None)
        if heads == 1:
            dqs, dks, dvs = _flat(dqs), _flat(dks), _flat(dvs)
    return (*(_grad_map(g, x, axis, heads) for x, g in ((q, dqs), (k, dks), (v, dvs))), dgamma)


def _grad_map(g_seq: Tensor, x: Tensor, axis: str, heads: int) -> Tensor:
    """The gradient of ``x`` from its sequence-layout gradient: for one head, a view of it (as autograd
    would hand back for the permute/bmm composition: no copy); heads merge channels, so one copy."""
    if heads == 1:
        return _seq_as_map(g_seq, axis, x.shape, 1)
    return _write_back(torch.empty_like(x), g_seq, axis, heads)


def _sdpa_forward(q, k, v, axis, heads, scale, residual, gamma):
    qs, ks, vs = (to_seq(t, axis, heads).contiguous() for t in (q, k, v))
    attn, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        qs, ks, vs, None, True, 0.0, False, scale=scale)
    out = _epilogue_into(torch.empty_like(v), attn, axis, heads, residual, gamma)
    return out, lse, [attn]


def _sdpa_backward(grad_out, q, k, v, o, lse, axis, heads, scale, gamma):
    qs, ks, vs = (to_seq(t, axis, heads).contiguous() for t in (q, k, v))
    dos = to_seq(grad_out, axis, heads)
    dgamma = None
    if gamma is not None:
        dgamma = torch.sum(dos.to(torch.float32) * o.to(torch.float32))  # fp16 inputs only (rule above)
        dos = dos * gamma.to(dos.dtype)
    # dropout_p = 0: the philox seed/offset are never read
    seed = torch.zeros((), dtype=torch.int64)
    dqs, dks, dvs, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dos.contiguous(), qs, ks, vs, None, o, lse, seed, seed, 0.0, [True, True, True, False], False, scale=scale)
    grads = [_write_back(torch.empty_like(x), g, axis, heads) for x, g in ((q, dqs), (k, dks), (v, dvs))]
    return (*grads, dgamma)



# ---------------------------------------------------------------------------------------------------
# the registered ops
# ---------------------------------------------------------------------------------------------------


def _forward_impl(c, q, k, v, axis, heads, scale, residual, gamma):
    if c.backend == "triton":
        g32 = gamma.reshape(()).to(torch.float32) if gamma is not None else None
        out, lse, attn = _arch.triton_kernels("attention3d").forward(q, k, v, axis, heads, scale, residual, g32,
                                                                     c.plan)
        return out, lse, ([attn] if attn is not None else [])
    if c.backend == "sdpa_efficient":
        return _sdpa_forward(q, k, v, axis, heads, scale, residual, gamma)
    return _torch_forward(q, k, v, axis, heads, scale, residual, gamma, c.backend == "torch_flash")


def _backward_impl(c, grad_out, q, k, v, out, lse, saved, axis, heads, scale, gamma):
    """Gradients (dq, dk, dv, dgamma in gamma's shape and dtype or None) for the forward that ran ``c``."""
    if c.backend == "triton":
        g32 = gamma.reshape(()).to(torch.float32) if gamma is not None else None
        o = saved[0] if saved else out
        dq, dk, dv, dg = _arch.triton_kernels("attention3d").backward(grad_out, q, k, v, o, lse, axis, heads, scale,
                                                                      g32, c.plan)
    elif c.backend == "sdpa_efficient":
        dq, dk, dv, dg = _sdpa_backward(grad_out, q, k, v, saved[0], lse, axis, heads, scale, gamma)
    else:
        dq, dk, dv, dg = _torch_backward(grad_out, q, k, v, lse, saved, axis, heads, scale, gamma,
                                         c.backend == "torch_flash")
    if gamma is not None and (dg.shape != gamma.shape or dg.dtype != gamma.dtype):
        dg = dg.reshape(gamma.shape).to(gamma.dtype)
    return dq, dk, dv, (dg if gamma is not None else None)


def _attention3d_kernel(q, k, v, axis, heads, scale, residual, gamma):
    return _forward_impl(select(q, k, v, axis, heads), q, k, v, axis, heads, scale, residual, gamma)


def _attention3d_fake(q, k, v, axis, heads, scale, residual, gamma):
    c = select(q, k, v, axis, heads)
    if c.backend != "triton":  # PyTorch implementations: their aten ops carry their own fake kernels
        return _forward_impl(c, q, k, v, axis, heads, scale, residual, gamma)
    nseq, L = seq_count_and_length(q.shape, axis)
    out = torch.empty_like(v)
    lse = q.new_empty((nseq, heads, L), dtype=torch.float32)
    saved = []
    if c.plan.kind == "flash" and (residual is not None or gamma is not None):
        saved = [v.new_empty((nseq, heads, L, v.shape[1] // heads))]
    return out, lse, saved


def _attention3d_backward_kernel(grad_out, q, k, v, out, lse, saved, axis, heads, scale, gamma, forced=None):
    dq, dk, dv, dgamma = _backward_impl(select(q, k, v, axis, heads, forced), grad_out, q, k, v, out, lse, saved,
                                        axis, heads, scale, gamma)
    return dq, dk, dv, (dgamma if dgamma is not None else q.new_empty(0))


def _attention3d_backward_fake(grad_out, q, k, v, out, lse, saved, axis, heads, scale, gamma, forced=None):
    c = select(q, k, v, axis, heads, forced)
    if c.backend in ("torch_math", "torch_flash"):  # their gradients' strides follow the sequence layout
        return _attention3d_backward_kernel(grad_out, q, k, v, out, lse, saved, axis, heads, scale, gamma, forced)
    dgamma = torch.empty_like(gamma) if gamma is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dgamma


_LIB, _forward_op, _backward_op = register_op_pair(  # _LIB kept alive with the module
    "attention3d(Tensor q, Tensor k, Tensor v, str axis, int heads, float scale, Tensor? residual, "
    "Tensor? gamma) -> (Tensor, Tensor, Tensor[])",
    "_attention3d_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor[] saved, str axis, int heads, float scale, Tensor? gamma, str? forced=None) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _attention3d_kernel, _attention3d_backward_kernel, _attention3d_fake, _attention3d_backward_fake)


class _Attention3dFunction(torch.autograd.Function):
    """The one autograd connection of the op: forward and backward are the registered ops."""

    @staticmethod
    def forward(ctx, q, k, v, residual, gamma, axis, heads, scale):
        out, lse, saved = _forward_op(q, k, v, axis, heads, scale, residual, gamma)
        # without an epilogue the flash kernels' backward takes delta = rowsum(dY * O) from the output
        ctx.save_for_backward(q, k, v, out if residual is None and gamma is None else None, lse, gamma, *saved)
        ctx.axis, ctx.heads, ctx.scale, ctx.has_residual = axis, heads, scale, residual is not None
        ctx.forced = DISPATCH.forced  # the backward reads this backend's saved tensors, wherever it runs
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("attention3d: double backward is not implemented (stssa::_attention3d_backward "
                               "has no derivative)")
        q, k, v, out, lse, gamma, *saved = ctx.saved_tensors
        with _no_autocast(q.device.type):
            dq, dk, dv, dgamma = _backward_op(grad_out, q, k, v, out if out is not None else q.new_empty(0), lse,
                                              saved, ctx.axis, ctx.heads, ctx.scale, gamma, ctx.forced)
        return (dq, dk, dv, grad_out if ctx.has_residual else None, dgamma if gamma is not None else None,
                None, None, None)


# ---------------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------------


def _check(q, k, v, axis, heads, scale, residual, gamma) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention3d: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"attention3d: {name} must be 5-D [B, D, T, H, W], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"attention3d: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention3d: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention3d: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != q.shape:
        raise ValueError(f"attention3d: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[0] != q.shape[0] or v.shape[2:] != q.shape[2:]:
        raise ValueError(f"attention3d: v must be [B, Dv, T, H, W] with q's B, T, H, W {tuple(q.shape[:1] + q.shape[2:])}, "
                         f"got {tuple(v.shape)}")
    if axis not in AXES:
        raise ValueError(f"attention3d: axis must be one of {AXES}, got {axis!r}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"attention3d: heads must be a positive int, got {heads!r}")
    if q.shape[1] % heads or v.shape[1] % heads:
        raise ValueError(f"attention3d: heads={heads} must divide Dk={q.shape[1]} and Dv={v.shape[1]}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not math.isfinite(scale)):
        raise ValueError(f"attention3d: scale must be a finite float or None, got {scale!r}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"attention3d: residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != v.shape or residual.dtype != v.dtype or residual.device != v.device:
            raise ValueError(f"attention3d: residual must match v ({tuple(v.shape)}, {v.dtype}, {v.device}), got "
                             f"({tuple(residual.shape)}, {residual.dtype}, {residual.device})")
    if gamma is not None:
        if not isinstance(gamma, Tensor):
            raise TypeError(f"attention3d: gamma must be a one-element Tensor or None, got {type(gamma).__name__}")
        if gamma.numel() != 1 or not gamma.is_floating_point() or gamma.device != q.device:
            raise ValueError(f"attention3d: gamma must be a one-element float tensor on {q.device}, got shape "
                             f"{tuple(gamma.shape)}, {gamma.dtype}, {gamma.device}")


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The current autocast dtype for this device type, or None when autocast is off there."""
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # autocast's rule for matmul-like ops: floating tensors other than float64 run in the autocast dtype
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _run(q, k, v, axis, heads, scale, residual, gamma) -> Tensor:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (residual is not None and residual.requires_grad)
                                    or (gamma is not None and gamma.requires_grad)):
        return _Attention3dFunction.apply(q, k, v, residual, gamma, axis, heads, scale)
    refuse_forward_ad("attention3d", q, k, v, residual, gamma)
    return _forward_op(q, k, v, axis, heads, scale, residual, gamma)[0]


def attention3d(q: Tensor, k: Tensor, v: Tensor, axis: str, *, heads: int = 1, scale: float | None = None,
                residual: Tensor | None = None, gamma: Tensor | None = None) -> Tensor:
    """Fused self-attention over one axis of a video feature map.

    Args:
        q, k: ``[B, Dk, T, H, W]``; v: ``[B, Dv, T, H, W]`` - any strides (contiguous,
            ``channels_last_3d``, slices), read where they lie. fp16, bf16, fp32 (fp32 accumulation and
            softmax statistics) or fp64.
        axis: ``"spatial"`` (each frame's H*W positions attend to each other: B*T sequences),
            ``"temporal"`` (each position's T frames: B*H*W sequences) or ``"full"`` (all T*H*W: B sequences).
        heads: splits Dk and Dv into ``heads`` groups of channels (head i: channels [i*D/heads, (i+1)*D/heads)).
        scale: logit scale, default ``(Dk / heads) ** -0.5``; SAGAN's unscaled form is ``scale=1.0``.
        residual: optional ``[B, Dv, T, H, W]`` (v's dtype), added in the same kernel.
        gamma: optional one-element tensor (SAGAN's learnable scalar) multiplying the attention.
    Returns:
        ``[B, Dv, T, H, W]`` (laid out like v) = ``residual + gamma * softmax(scale q^T k) v`` per head.
    Differentiable w.r.t. q, k, v, residual and gamma (first order); the backward is deterministic.
    Under autocast, q, k, v and residual run in the current autocast dtype (as a matmul would; float64
    stays float64), with fp32 accumulation.
    """
    dev = q.device.type if isinstance(q, Tensor) else None
    amp = _autocast_dtype(dev) if dev is not None else None
    if amp is not None:
        q, k, v, residual = _cast(q, amp), _cast(k, amp), _cast(v, amp), _cast(residual, amp)
    _check(q, k, v, axis, heads, scale, residual, gamma)
    if scale is None:  # (a zero key width makes every logit 0, whatever the scale)
        scale = (q.shape[1] // heads) ** -0.5 if q.shape[1] else 1.0
    scale = float(scale)
    if amp is None:
        return _run(q, k, v, axis, heads, scale, residual, gamma)
    with torch.autocast(dev, enabled=False):  # the kernels choose their own accumulation precision
        return _run(q, k, v, axis, heads, scale, residual, gamma)


class Attention3d(nn.Module):
    """Module form of :func:`attention3d` (no parameters): ``forward(q, k, v, residual=None, gamma=None)``.
    ``use_fused=False`` runs the plain-PyTorch reference (``attention3d_ref``) instead."""

    def __init__(self, axis: str, heads: int = 1, scale: float | None = None, use_fused: bool = True):
        super().__init__()
        if axis not in AXES:
            raise ValueError(f"Attention3d: axis must be one of {AXES}, got {axis!r}")
        self.axis, self.heads, self.scale, self.use_fused = axis, heads, scale, use_fused

    def forward(self, q: Tensor, k: Tensor, v: Tensor, residual: Tensor | None = None,
                gamma: Tensor | None = None) -> Tensor:
        if self.use_fused:
            return attention3d(q, k, v, self.axis, heads=self.heads, scale=self.scale, residual=residual, gamma=gamma)
        return attention3d_ref(q, k, v, self.axis, self.heads, self.scale, residual, gamma)

    def extra_repr(self) -> str:
        return f"axis={self.axis!r}, heads={self.heads}, scale={self.scale}, use_fused={self.use_fused}"


class SelfAttention3d(nn.Module):
    """SAGAN self-attention block on a video map (the SSFA / TSFA unit of STSSA).

    ``x [B, C, T, H, W] -> x + gamma * attention3d(Wq x, Wk x, Wv x)`` with 1x1x1 convolutions
    ``Wq, Wk: C -> key_channels`` (default C // 8), ``Wv: C -> C`` and ``gamma`` initialised to 0, so the
    block starts as the identity. The residual and gamma are applied inside the fused kernel.
    ``use_fused`` is the attribute of its ``attn`` (an :class:`Attention3d`).
    """

    def __init__(self, channels: int, axis: str, key_channels: int | None = None, heads: int = 1,
                 scale: float | None = 1.0, use_fused: bool = True):
        super().__init__()
        key_channels = key_channels or max(1, channels // 8)
        self.query = nn.Conv3d(channels, key_channels, 1)
        self.key = nn.Conv3d(channels, key_channels, 1)
        self.value = nn.Conv3d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(()))
        self.attn = Attention3d(axis, heads, scale, use_fused)

    def forward(self, x: Tensor) -> Tensor:
        v = self.value(x)
        # under autocast the projections run in half precision; the residual follows them
        return self.attn(self.query(x), self.key(x), v, residual=x.to(v.dtype), gamma=self.gamma)
