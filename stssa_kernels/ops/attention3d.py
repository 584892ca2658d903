"""``attention3d``: SAGAN-style self-attention over the spatial, temporal or joint axis of a video map.

Registration (``torch.ops.stssa``):

* ``attention3d(q, k, v, axis, heads, scale, residual?, gamma?) -> (out, lse, saved)``: ``out`` is the
  result; ``lse`` (per-row logsumexp, fp32 [sequences, heads, L], or the backend's own layout, or
  empty) and ``saved`` (a backend-specific list: the pre-epilogue attention output for the flash
  kernels' backward, the sequence-layout copies of q/k/v the CPU path already made) are for the
  backward and not differentiable.
* ``_attention3d_backward(grad_out, q, k, v, out, lse, saved, axis, heads, scale, gamma?)
  -> (dq, dk, dv, dgamma)`` (``dgamma`` is empty without gamma; the residual's gradient is
  ``grad_out`` itself).

Both are ``torch.library.custom_op`` s with fake kernels, so ``torch.compile(fullgraph=True)`` traces
through them as opaque calls, and ``register_autograd`` connects them.

Plain eager calls (no torch.compile, fake tensors, dispatch or torch-function modes, functorch
transforms, tensor subclasses or autocast) skip the custom_op's dispatcher round trips, which cost as
much as the arithmetic of a small problem on the CPU: the same implementation runs through one
``torch.autograd.Function``. Without a backward to follow,
the eager path may also pick a different rule (``Rule.grad``).

Dispatch is data (``DISPATCH``): the first rule matching (device, arch, dtype, axis, sequence length)
whose implementation supports the shapes runs. Implementations:

* ``triton``: the fused kernels of ``stssa_kernels.triton.attention3d`` (packed for short sequences,
  flash-style for long ones), reading q/k/v in place; also taken for CPU tensors when
  ``TRITON_INTERPRET=1`` so the same tests exercise the GPU kernels without a GPU.
* ``torch_flash``: PyTorch's fused CPU flash-attention kernel on permuted views
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, what
  ``F.scaled_dot_product_attention`` runs on CPU); it needs Dk == Dv.
* ``torch_math``: batched ``bmm``/softmax/``bmm`` on permuted views in blocks of queries (what SDPA's
  math backend computes, without its O(L^2) autograd graph): CPU short sequences (faster than the
  flash kernel there, measured), Dk != Dv, float64 on GPUs. No Python loop over sequences.
* ``sdpa_efficient``: CUDA, PyTorch's memory-efficient (CUTLASS) attention on contiguous permuted
  copies. Chosen on sm_75 for long fp16 sequences: Triton 3.8 lowers ``tl.dot`` to FFMA there
  (measured with ``compile_check``: no HMMA on sm_75), so compute-bound shapes (full axis, large
  frames) are faster on the tensor cores of the CUTLASS kernel even after paying the permute copies,
  while the short, memory-bound sequences (temporal axis, 7x7 RoI frames) stay on Triton, whose
  in-place reads avoid those copies. The crossover (L >= 256) is an estimate from arithmetic
  intensity vs the RTX Titan's FFMA ridge (16.3 TFLOP/s / 672 GB/s ~ 24 flop/byte), UNMEASURED until
  ``benchmarks/attn3d.py`` runs on an sm_75 GPU; change the table then.

GPU rules are unmeasured (no GPU was available when they were written); the CPU rule was measured
with ``benchmarks/attn3d.py`` (results under ``benchmarks/results/``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional

import torch
from torch import Tensor, nn

from ..reference.attention3d import _SEQ_PERM, AXES, attention3d_ref, to_seq
from ..triton import attention3d as _tk
from ._arch import cuda_capability
from ._eager import plain_eager

__all__ = ["attention3d", "Attention3d", "SelfAttention3d", "DISPATCH", "Rule", "select", "select_for", "explain",
           "clear_dispatch_cache"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Architecture whose Triton tile tables are used for CPU tensors under TRITON_INTERPRET=1
#: (tests set it to 75 to exercise the sm_75 tiles).
INTERPRET_ARCH = 80


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the dispatch table; empty tuples match anything."""
    impl: str                       # "triton" | "torch_flash" | "torch_math" | "sdpa_efficient"
    device: str = ""                # "cpu" | "cuda" | "" (any)
    archs: tuple = ()               # arch families (75, 80, 90) for cuda
    dtypes: tuple = ()
    axes: tuple = ()
    min_len: int = 0                # sequence-length regime [min_len, max_len]
    max_len: int = 1 << 62
    max_scores: int = 1 << 62       # score elements of one call (sequences * heads * L^2)
    interpret: Optional[bool] = None  # match only with / without TRITON_INTERPRET=1
    grad: Optional[bool] = None     # match only when a backward will / will not follow (the eager path
                                    # knows; the registered op and torch.compile assume one will)
    note: str = ""


_F16, _BF16, _F32 = torch.float16, torch.bfloat16, torch.float32
#: CPU regime of batched bmm/softmax/bmm keeping P for the backward (as the PyTorch composition does):
#: sequences up to CPU_MATH_MAX_LEN tokens whose scores (sequences * heads * L^2) fit 64 MiB in fp32.
#: Measured with benchmarks/attn3d.py on this project's 2-core CPU (results/attn3d_cpu-*.json): the bmm
#: composition beats PyTorch's CPU flash kernel up to L = 512 and loses to it at L = 2048 (1.2-1.4x).
CPU_MATH_MAX_LEN = 512
CPU_MATH_MAX_SCORES = 1 << 24
#: Without a backward (eager inference) the flash kernel wins earlier on frames: measured on the same
#: CPU (forward only, B*T = 16 frames, d = 64): 14x14 3.4-4.2 ms vs 4.0-4.8 ms for bmm/softmax/bmm,
#: 16x16 6.8-8.0 vs 7.2-9.9; a tie at 10x10 and 12x12, a loss on short temporal sequences (L = 8..32)
#: and a tie on the full axis at L = 512 with 2 sequences.
CPU_FLASH_NOGRAD_MIN_LEN = 196

DISPATCH: tuple[Rule, ...] = (
    Rule("triton", device="cpu", interpret=True, dtypes=(_F16, _F32),
         note="TRITON_INTERPRET=1: the GPU kernels on CPU tensors"),
    Rule("torch_flash", device="cpu", grad=False, axes=("spatial",), min_len=CPU_FLASH_NOGRAD_MIN_LEN,
         note="CPU, no backward, frames >= 14x14, Dk == Dv: PyTorch's CPU flash kernel (measured)"),
    Rule("torch_math", device="cpu", max_len=CPU_MATH_MAX_LEN, max_scores=CPU_MATH_MAX_SCORES,
         note="CPU, L <= 512: batched bmm/softmax/bmm keeping P (measured)"),
    Rule("torch_flash", device="cpu", note="CPU, long, Dk == Dv: PyTorch's CPU flash kernel (measured)"),
    Rule("torch_math", device="cpu", note="CPU, long, Dk != Dv: bmm/softmax/bmm in query blocks"),
    Rule("sdpa_efficient", device="cuda", archs=(75,), dtypes=(_F16,), axes=("full", "spatial"), min_len=256,
         note="sm_75 FFMA tl.dot: long fp16 sequences on CUTLASS tensor cores (UNMEASURED)"),
    Rule("triton", device="cuda", dtypes=(_F16, _BF16, _F32),
         note="fused Triton kernels, in-place strided reads (UNMEASURED tiles)"),
    Rule("torch_math", note="fallback: float64 on GPU, head dims the fused kernels do not take"),
)


@dataclasses.dataclass(frozen=True)
class Choice:
    rule: int
    impl: str
    plan: Optional[_tk.Plan] = None

    @property
    def kernel(self) -> str:
        return f"triton-{self.plan.kind}" if self.plan is not None else self.impl

    def describe(self) -> str:
        r = DISPATCH[self.rule]
        what = self.plan.describe() if self.plan is not None else self.impl
        return f"rule {self.rule} ({r.note}): {what}"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cc(device: torch.device) -> int:
    return cuda_capability(device) if device.type == "cuda" else INTERPRET_ARCH


def select_for(device: str, cc: int, dtype: torch.dtype, axis: str, L: int, dk: int, dv: int,
               interpret: bool = False, scores: int = 0, grad: bool = True) -> Choice:
    """First rule of ``DISPATCH`` matching (device type, arch, dtype, axis, sequence length) whose
    implementation takes the head dims (dk, dv). ``cc``: compute capability (e.g. 75), for the Triton
    tile tables also on CPU under the interpreter."""
    fam = _tk.arch_family(cc)
    for i, r in enumerate(DISPATCH):
        if (r.device and r.device != device) or (r.dtypes and dtype not in r.dtypes) \
                or (r.axes and axis not in r.axes) or not (r.min_len <= L <= r.max_len) or scores > r.max_scores \
                or (r.interpret is not None and r.interpret != interpret) \
                or (r.grad is not None and r.grad != grad) \
                or (r.archs and (device != "cuda" or fam not in r.archs)):
            continue
        if r.impl == "triton":
            p = _tk.plan(cc, L, dk, dv, dtype)
            if p is not None:
                return Choice(i, "triton", p)
        elif r.impl == "sdpa_efficient":
            if dk == dv and dk % 8 == 0 and dk <= 128:
                return Choice(i, r.impl)
        elif r.impl == "torch_flash":
            if dk == dv:
                return Choice(i, r.impl)
        else:
            return Choice(i, r.impl)
    raise AssertionError("DISPATCH must end with a catch-all rule")


_select_cached = functools.lru_cache(maxsize=1024)(select_for)


def clear_dispatch_cache() -> None:
    """Forget cached dispatch decisions: call after replacing ``DISPATCH`` (or its thresholds) at runtime."""
    _select_cached.cache_clear()
    _eager_plan.cache_clear()


def select(q: Tensor, k: Tensor, v: Tensor, axis: str, heads: int, grad: bool = True) -> Choice:
    """The dispatch decision for these inputs (a pure function of device, arch, dtype and shapes, and of
    whether a backward will follow)."""
    nseq, L = _tk.seq_count_and_length(q.shape, axis)
    args = (q.device.type, _cc(q.device), q.dtype, axis, L, q.shape[1] // heads, v.shape[1] // heads, _interpret(),
            nseq * heads * L * L, grad)
    # eager calls hit the cache; symbolic shapes (torch.compile with dynamic shapes) are not hashable
    if all(type(a) is not torch.SymInt for a in args[4:7] + args[8:9]):
        return _select_cached(*args)
    return select_for(*args)


def explain(q: Tensor, k: Tensor, v: Tensor, axis: str, heads: int = 1, grad: bool = True) -> str:
    """Human-readable dispatch entry for these inputs (printed by the benchmark); ``grad``: whether a
    backward follows (eager calls without one may take another rule)."""
    return select(q, k, v, axis, heads, grad).describe()


def _needs_out(c: Choice, epilogue: bool) -> bool:
    """Whether the backward reads the op's output (the flash kernels take delta = rowsum(dY * O) from
    it when there is no epilogue; with one they save the pre-epilogue attention instead)."""
    return c.impl == "triton" and c.plan.kind == "flash" and not epilogue


# ---------------------------------------------------------------------------------------------------
# PyTorch implementations (CPU, fp64, sm_75 long sequences)
# ---------------------------------------------------------------------------------------------------

# Score elements one block of the math path may hold (fp32: 256 MiB), and the most it keeps for the
# backward (fp32: 64 MiB; larger problems recompute P in the backward).
_MATH_BLOCK_ELEMS = 1 << 26
_MATH_KEEP_P_ELEMS = 1 << 24


def _heads6(x: Tensor, heads: int) -> Tensor:
    """[B, D, T, H, W] -> [B, heads, D/heads, T, H, W] view (Tensor.view: no Python-level unflatten)."""
    B, D, T, H, W = x.shape
    return x.view(B, heads, D // heads, T, H, W)


def _write_back(dst: Tensor, y_seq: Tensor, axis: str, heads: int) -> Tensor:
    """Copy a [N, heads, L, d] tensor into the [B, heads*d, T, H, W] tensor ``dst`` (one strided copy)."""
    _heads6(dst, heads).copy_(_seq6(y_seq, axis, dst.shape))
    return dst


def _epilogue_into(out: Tensor, attn_seq: Tensor, axis: str, heads: int, residual, gamma) -> Tensor:
    a6 = _seq6(attn_seq, axis, out.shape)
    o6 = _heads6(out, heads)
    if residual is None and gamma is None:
        o6.copy_(a6)
    elif residual is None:
        torch.mul(a6, gamma.to(out.dtype), out=o6)
    elif gamma is None:
        torch.add(_heads6(residual, heads), a6, out=o6)
    else:
        torch.addcmul(_heads6(residual, heads), gamma.to(out.dtype), a6, out=o6)
    return out


def _unit_last(t: Tensor) -> Tensor:
    # the aten CPU flash kernels index the head dim as if its stride were 1 (the public SDPA copies
    # such inputs first); the "full"-axis view of an NCTHW map has stride T*H*W there
    return t if t.stride(-1) == 1 else t.contiguous()


def _math_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _math_logits(qs, ks, sl, scale):
    # bmm then an in-place scale: measured faster on the CPU than baddbmm(alpha=scale, beta=0).
    # 4-D matmul folds [N, heads] into the GEMM batch in C++ (one Python call instead of flatten + bmm:
    # per-call overhead is a measurable share of small problems on the CPU)
    a = qs if sl is None else qs[:, :, sl]
    s = torch.matmul(a, ks.transpose(-2, -1))
    return s if scale == 1.0 else s.mul_(scale)


def _math_keeps_p(N: int, h: int, L: int) -> bool:
    """Whether the math path keeps P for its backward (as autograd would for the bmm/softmax/bmm
    composition) instead of recomputing it: when all scores fit the single-block budget."""
    return N * h * L * L <= min(_MATH_KEEP_P_ELEMS, _MATH_BLOCK_ELEMS)


def _math_step(N: int, h: int, L: int):
    """Query rows per block, or None for one block (the forward and backward must agree, so that a
    recomputed P equals the forward's bit for bit)."""
    step = max(1, _MATH_BLOCK_ELEMS // max(1, N * h * L))
    return None if step >= L else step


def _math_forward(qs, ks, vs, scale):
    """softmax(scale q k^T) v ([N, heads, L, d] each) with batched GEMMs and PyTorch's fused softmax,
    in blocks of queries (one block unless the scores would pass _MATH_BLOCK_ELEMS). Returns (out, P or
    None): P is kept when small (``_math_keeps_p``), else the backward recomputes it with the same
    kernels, bit for bit."""
    N, h, L, _ = qs.shape
    ct = _math_dtype(qs.dtype)
    dtype = qs.dtype
    if ct != dtype:
        qs, ks, vs = qs.to(ct), ks.to(ct), vs.to(ct)
    step = _math_step(N, h, L)
    p = None
    if step is None:
        p = torch.softmax(_math_logits(qs, ks, None, scale), dim=-1)
        out = torch.matmul(p, vs)
    else:
        out = qs.new_empty((N, h, L, vs.shape[-1]))
        for i in range(0, L, step):
            out[:, :, i:i + step] = torch.matmul(torch.softmax(_math_logits(qs, ks, slice(i, i + step), scale), -1), vs)
    return (out if ct == dtype else out.to(dtype)), (p if _math_keeps_p(N, h, L) else None)


def _math_backward(dys, qs, ks, vs, scale, gamma, p_saved=None):
    """Backward of :func:`_math_forward` given dY (the grad of ``gamma * attention``): returns
    (dq, dk, dv, dgamma or None). dS = P * (dP - rowsum(P * dP)) by autograd's own softmax backward on
    the forward's P (kept or recomputed bit for bit), so saturated rows (one-hot P at large logits)
    cancel exactly. gamma stays out of the L^2-sized work: dP and dS are formed for dY and gamma scales
    dq, dk, dv; and dgamma = sum(dY * A) = sum(V * P^T dY) reuses dV's GEMM, so no output is saved."""
    N, h, L, _ = qs.shape
    ct = _math_dtype(qs.dtype)
    dtype = qs.dtype
    if ct != dtype:
        qs, ks, vs, dys = qs.to(ct), ks.to(ct), vs.to(ct), dys.to(ct)
    step = _math_step(N, h, L)
    blocks = [None] if step is None else [slice(i, i + step) for i in range(0, L, step)]
    dq = torch.empty_like(qs) if step is not None else None
    dk = dv = None
    for sl in blocks:
        p = p_saved if p_saved is not None else torch.softmax(_math_logits(qs, ks, sl, scale), dim=-1)
        dy, qb = (dys, qs) if sl is None else (dys[:, :, sl], qs[:, :, sl])
        dv_b = torch.matmul(p.transpose(-2, -1), dy)
        dv = dv_b if dv is None else dv.add_(dv_b)
        ds = torch._softmax_backward_data(torch.matmul(dy, vs.transpose(-2, -1)), p, -1, p.dtype)
        if sl is None:
            dq = torch.matmul(ds, ks)
        else:
            dq[:, :, sl] = torch.matmul(ds, ks)
        dk_b = torch.matmul(ds.transpose(-2, -1), qb)
        dk = dk_b if dk is None else dk.add_(dk_b)
    dgamma = None
    if gamma is not None:
        g = gamma.to(ct)
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


# dims of the permuted [.., heads, .., d] 6-D view (reference.to_seq) that merge into one sequence dim
_SEQ_GROUPS = {"spatial": ((0, 1), (2,), (3, 4), (5,)), "temporal": ((0, 1, 2), (3,), (4,), (5,)),
               "full": ((0,), (1,), (2, 3, 4), (5,))}


def _static(x: Tensor) -> bool:
    """Plain-int geometry (eager tensors, static-shape fakes), so the cached stride arithmetic applies."""
    return not any(isinstance(s, torch.SymInt) for s in (*x.shape, *x.stride(), x.storage_offset()))


def _seq_geometry_of(shape: tuple, stride: tuple, axis: str, heads: int, unit_last: bool):
    """(size, stride) of the [sequences, heads, L, d] view of a [B, D, T, H, W] tensor with these
    strides, or None where that view needs a copy (or, ``unit_last``, where d's stride is not 1): the
    permuted dims of each sequence dim must chain (size-1 dims aside). Ints or SymInts."""
    B, D, T, H, W = shape
    sB, sD, sT, sH, sW = stride
    d = D // heads
    size6, stride6 = (B, heads, d, T, H, W), (sB, sD * d, sD, sT, sH, sW)
    perm = _SEQ_PERM[axis]
    size, st = [size6[i] for i in perm], [stride6[i] for i in perm]
    out_size, out_stride = [], []
    for group in _SEQ_GROUPS[axis]:
        dims = [i for i in group if size[i] != 1]
        if any(st[a] != st[b] * size[b] for a, b in zip(dims, dims[1:])):
            return None
        out_size.append(math.prod(size[i] for i in group))
        out_stride.append(st[dims[-1]] if dims else 1)
    if unit_last and st[5] != 1:
        return None
    return tuple(out_size), tuple(out_stride)


# eager shapes repeat: cached, the arithmetic costs less than the ~35 us per tensor of permute + reshape
_seq_geometry = functools.lru_cache(maxsize=4096)(_seq_geometry_of)


def _seq_view(x: Tensor, axis: str, heads: int, unit_last: bool):
    """The sequence-layout view of ``x`` if it needs no copy (None otherwise); a pure function of the
    strides, so the forward (which saves the copies it makes) and the backward (which re-views what
    was not saved) agree, eagerly and under fake tensors."""
    if x.numel() == 0:
        return to_seq(x, axis, heads)  # reshape views any empty tensor
    geometry = _seq_geometry if _static(x) else _seq_geometry_of
    g = geometry(tuple(x.shape), tuple(x.stride()), axis, heads, unit_last)
    return None if g is None else x.as_strided(g[0], g[1], x.storage_offset())


def _seq6_geometry_of(seq_shape: tuple, seq_stride: tuple, axis: str, shape: tuple):
    """(size, stride) of ``seq_as_6d``: [sequences, heads, L, d] -> [B, heads, d, T, H, W] (always a view)."""
    B, _, T, H, W = shape
    _, h, _, d = seq_shape
    s0, s1, s2, s3 = seq_stride
    if axis == "spatial":
        stride = (T * s0, s1, s3, s0, W * s2, s2)
    elif axis == "temporal":
        stride = (H * W * s0, s1, s3, s2, W * s0, s0)
    else:
        stride = (s0, s1, s3, H * W * s2, W * s2, s2)
    return (B, h, d, T, H, W), stride


_seq6_geometry = functools.lru_cache(maxsize=4096)(_seq6_geometry_of)


def _seq6(y: Tensor, axis: str, shape) -> Tensor:
    """``seq_as_6d`` (reference.attention3d) through stride arithmetic, cached for eager shapes."""
    static = _static(y) and all(type(s) is int for s in shape)
    size, stride = (_seq6_geometry if static else _seq6_geometry_of)(tuple(y.shape), tuple(y.stride()), axis,
                                                                    tuple(shape))
    return y.as_strided(size, stride, y.storage_offset())


def _seq_inputs(xs, axis, heads, unit_last, saved=None):
    """Sequence-layout q, k, v: views where possible, else copies (made now, or taken from ``saved``
    in the backward). Returns (tensors, the copies made)."""
    out, copies = [], []
    it = iter(saved or ())
    for x in xs:
        y = _seq_view(x, axis, heads, unit_last)
        if y is None:
            y = next(it, None) if saved is not None else None
            if y is None:
                y = to_seq(x, axis, heads).contiguous() if unit_last else to_seq(x, axis, heads)
                copies.append(y)
        out.append(y)
    return out, copies


def _torch_forward(q, k, v, axis, heads, scale, residual, gamma, flash):
    """Returns (out, lse, saved): saved = the sequence-layout copies of q, k, v that had to be made
    (the backward re-views the others), plus the attention output for the flash kernel's backward."""
    (qs, ks, vs), copies = _seq_inputs((q, k, v), axis, heads, flash)
    if flash:
        attn, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qs, ks, vs, 0.0, False, scale=scale)
    else:
        (attn, p), lse = _math_forward(qs, ks, vs, scale), q.new_empty(0, dtype=torch.float32)
    out = _epilogue_into(torch.empty_like(v), attn, axis, heads, residual, gamma)
    return out, lse, copies + ([attn] if flash else [p] if p is not None else [])


def _torch_backward(grad_out, q, k, v, lse, saved, axis, heads, scale, gamma, flash):
    nseq, L = _tk.seq_count_and_length(q.shape, axis)
    last = flash or _math_keeps_p(nseq, heads, L)  # saved = copies + [attention output | P]
    (qs, ks, vs), _ = _seq_inputs((q, k, v), axis, heads, flash, saved[:-1] if last else saved)
    dos = to_seq(grad_out, axis, heads)
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
    grads = [_write_back(torch.empty_like(x), g, axis, heads) for x, g in ((q, dqs), (k, dks), (v, dvs))]
    return (*grads, dgamma)


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
# the ops
# ---------------------------------------------------------------------------------------------------


def _forward_impl(c, q, k, v, axis, heads, scale, residual, gamma):
    if c.impl == "triton":
        g32 = gamma.reshape(()).to(torch.float32) if gamma is not None else None
        out, lse, attn = _tk.forward(q, k, v, axis, heads, scale, residual, g32, c.plan)
        return out, lse, ([attn] if attn is not None else [])
    if c.impl == "sdpa_efficient":
        return _sdpa_forward(q, k, v, axis, heads, scale, residual, gamma)
    return _torch_forward(q, k, v, axis, heads, scale, residual, gamma, c.impl == "torch_flash")


@torch.library.custom_op("stssa::attention3d", mutates_args=())
def _attention3d_op(q: Tensor, k: Tensor, v: Tensor, axis: str, heads: int, scale: float,
                    residual: Optional[Tensor], gamma: Optional[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    return _forward_impl(select(q, k, v, axis, heads), q, k, v, axis, heads, scale, residual, gamma)


@_attention3d_op.register_fake
def _attention3d_fake(q, k, v, axis, heads, scale, residual, gamma):
    c = select(q, k, v, axis, heads)
    if c.impl != "triton":  # PyTorch implementations: their aten ops carry their own fake kernels
        return _forward_impl(c, q, k, v, axis, heads, scale, residual, gamma)
    nseq, L = _tk.seq_count_and_length(q.shape, axis)
    out = torch.empty_like(v)
    lse = q.new_empty((nseq, heads, L), dtype=torch.float32)
    saved = []
    if c.plan.kind == "flash" and (residual is not None or gamma is not None):
        saved = [v.new_empty((nseq, heads, L, v.shape[1] // heads))]
    return out, lse, saved


def _backward_impl(c, grad_out, q, k, v, out, lse, saved, axis, heads, scale, gamma):
    """Gradients (dq, dk, dv, dgamma in gamma's shape and dtype or None) for the forward that ran ``c``."""
    if c.impl == "triton":
        g32 = gamma.reshape(()).to(torch.float32) if gamma is not None else None
        o = saved[0] if saved else out
        dq, dk, dv, dg = _tk.backward(grad_out, q, k, v, o, lse, axis, heads, scale, g32, c.plan)
    elif c.impl == "sdpa_efficient":
        dq, dk, dv, dg = _sdpa_backward(grad_out, q, k, v, saved[0], lse, axis, heads, scale, gamma)
    else:
        dq, dk, dv, dg = _torch_backward(grad_out, q, k, v, lse, saved, axis, heads, scale, gamma,
                                         c.impl == "torch_flash")
    return dq, dk, dv, (dg.reshape(gamma.shape).to(gamma.dtype) if gamma is not None else None)


@torch.library.custom_op("stssa::_attention3d_backward", mutates_args=())
def _attention3d_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             saved: list[Tensor], axis: str, heads: int, scale: float,
                             gamma: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``out``: the forward's output where the backward reads it (else empty); ``lse``/``saved``: what
    the forward returned for the backward. Returns (dq, dk, dv, dgamma), dgamma empty without gamma."""
    dq, dk, dv, dgamma = _backward_impl(select(q, k, v, axis, heads), grad_out, q, k, v, out, lse, saved, axis,
                                        heads, scale, gamma)
    return dq, dk, dv, (dgamma if dgamma is not None else q.new_empty(0))


@_attention3d_backward_op.register_fake
def _attention3d_backward_fake(grad_out, q, k, v, out, lse, saved, axis, heads, scale, gamma):
    dgamma = torch.empty_like(gamma) if gamma is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dgamma


def _save(ctx, c: Choice, q, k, v, axis, heads, scale, residual, gamma, out, lse, saved) -> None:
    """What the backward of the forward that ran ``c`` needs (shared by the registered op's autograd and
    the eager autograd.Function)."""
    ctx.save_for_backward(q, k, v, out if _needs_out(c, residual is not None or gamma is not None) else None, lse,
                          gamma, *saved)
    ctx.axis, ctx.heads, ctx.scale, ctx.choice = axis, heads, scale, c
    ctx.has_residual = residual is not None


def _grads(ctx, grad_out, eager: bool):
    """(dq, dk, dv, dresidual, dgamma) from what ``_save`` kept. Through the registered backward op,
    except eager calls without create_graph, which run its implementation directly (with
    create_graph=True the op's node names it when a double backward reaches it)."""
    q, k, v, out, lse, gamma, *saved = ctx.saved_tensors
    out = out if out is not None else q.new_empty(0)
    if eager and not torch.is_grad_enabled():
        dq, dk, dv, dgamma = _backward_impl(ctx.choice, grad_out, q, k, v, out, lse, saved, ctx.axis, ctx.heads,
                                            ctx.scale, gamma)
    else:
        dq, dk, dv, dgamma = torch.ops.stssa._attention3d_backward(grad_out, q, k, v, out, lse, saved, ctx.axis,
                                                                   ctx.heads, ctx.scale, gamma)
        dgamma = dgamma if gamma is not None else None
    return dq, dk, dv, (grad_out if ctx.has_residual else None), dgamma


def _setup_context(ctx, inputs, output):
    q, k, v, axis, heads, scale, residual, gamma = inputs
    out, lse, saved = output
    _save(ctx, select(q, k, v, axis, heads), q, k, v, axis, heads, scale, residual, gamma, out, lse, saved)
    ctx.mark_non_differentiable(lse, *saved)


def _backward(ctx, grad_out, _grad_lse, _grad_saved):
    if grad_out is None:
        return None, None, None, None, None, None, None, None
    dq, dk, dv, dres, dgamma = _grads(ctx, grad_out, eager=False)
    return dq, dk, dv, None, None, None, dres, dgamma


_attention3d_op.register_autograd(_backward, setup_context=_setup_context)

# Under autocast the op runs in the autocast dtype (inputs are cast before dispatch, like a matmul).
if hasattr(torch.library, "register_autocast"):
    torch.library.register_autocast("stssa::attention3d", "cuda", torch.float16)
    torch.library.register_autocast("stssa::attention3d", "cpu", torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# eager fast path
# ---------------------------------------------------------------------------------------------------
# See stssa_kernels/ops/_eager.py: plain eager calls run the implementations through one
# autograd.Function instead of the custom_op's wrappers.


class _Attention3dFunction(torch.autograd.Function):
    """The op's forward and backward without the dispatcher round trips (see above)."""

    @staticmethod
    def forward(ctx, q, k, v, residual, gamma, axis, heads, scale, c):
        out, lse, saved = _forward_impl(c, q, k, v, axis, heads, scale, residual, gamma)
        _save(ctx, c, q, k, v, axis, heads, scale, residual, gamma, out, lse, saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return (*_grads(ctx, grad_out, eager=True), None, None, None, None)


@functools.lru_cache(maxsize=1024)
def _eager_plan(device: str, cc: int, dtype: torch.dtype, shape: tuple, dv: int, axis: str, heads: int,
                grad: bool, interpret: bool) -> Choice:
    """The dispatch choice for an eager call: one cached lookup per call instead of recomputing the
    sequence geometry (measured ~15 us per call in Python)."""
    nseq, L = _tk.seq_count_and_length(shape, axis)
    return select_for(device, cc, dtype, axis, L, shape[1] // heads, dv // heads, interpret, nseq * heads * L * L, grad)


def _attention3d_eager(q, k, v, axis, heads, scale, residual, gamma) -> Tensor:
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, residual, gamma))
    c = _eager_plan(q.device.type, _cc(q.device), q.dtype, q.shape, v.shape[1], axis, heads, grad, _interpret())
    if not grad:
        return _forward_impl(c, q, k, v, axis, heads, scale, residual, gamma)[0]
    return _Attention3dFunction.apply(q, k, v, residual, gamma, axis, heads, scale, c)


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
    Differentiable w.r.t. q, k, v, residual and gamma; the backward is deterministic.
    """
    _check(q, k, v, axis, heads, scale, residual, gamma)
    if scale is None:  # (a zero key width makes every logit 0, whatever the scale)
        scale = (q.shape[1] // heads) ** -0.5 if q.shape[1] else 1.0
    scale = float(scale)
    if plain_eager([t for t in (q, k, v, residual, gamma) if t is not None]):
        return _attention3d_eager(q, k, v, axis, heads, scale, residual, gamma)
    return torch.ops.stssa.attention3d(q, k, v, axis, heads, scale, residual, gamma)[0]


class Attention3d(nn.Module):
    """Module form of :func:`attention3d` (no parameters): ``forward(q, k, v, residual=None, gamma=None)``."""

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
