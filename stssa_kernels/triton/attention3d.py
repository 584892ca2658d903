"""Triton kernels for ``attention3d``: fused self-attention over one axis of a video feature map.

Maths, per sequence ``s`` and head ``h`` (``i, j`` tokens of the sequence, ``c`` a channel of the head)::

    S_ij   = scale * sum_c q[c, i] k[c, j]                    (Dk/heads channels; Dk = 0 gives S = 0)
    lse_i  = log sum_j exp(S_ij);   P_ij = exp(S_ij - lse_i)
    A_ic   = sum_j P_ij v[c, j]                              (Dv/heads channels)
    out    = residual + gamma * A                            (epilogue terms when given)

backward (``dY`` = grad of out, ``dO = gamma dY``)::

    dV_jc  = sum_i P_ij dO_ic
    dP_ij  = sum_c dO_ic v_jc;   delta_i = sum_j P_ij dP_ij = sum_c dO_ic A_ic
    dS_ij  = P_ij (dP_ij - delta_i);   dQ = scale dS K;   dK = scale dS^T Q
    dgamma = sum_ic dY_ic A_ic;        dresidual = dY

The softmax runs in the exp2 domain (scores pre-multiplied by log2(e), as in the Triton tutorial's
fused attention); ``lse`` is stored in natural log.

Layout: tensors are read and written where they lie, ``[B, D, T, H, W]`` with arbitrary strides
(contiguous, ``channels_last_3d``, the channel slices of temporal_proj's output). A sequence is a set
of (b, t, h, w) positions; the host splits the four position dims into *sequence* dims and *token*
dims (spatial: (b, t) | (h, w); temporal: (b, h, w) | (t); full: (b) | (t, h, w)), drops size-1 dims
and merges neighbours whose strides chain in every tensor, so the common layouts index a token with
one multiply. Each tensor's layout reaches the kernels as one tuple ``(channel, head, seq0, seq1,
seq2, tok0, tok1, tok2)`` of strides, the merged sizes as ``GEO = (SN1, SN2, TN1, TN2)``; a unit
stride is specialised by Triton's JIT, giving coalesced vector loads along it. Tiles are loaded
channel-major (``[D, tokens]``): in the NCTHW layout a Conv3d produces the token is the unit-stride
index.

Memory-traffic floor: read q, k, v (+ residual), write out; the backward reads q, k, v, dY and
writes dq, dk, dv. Statistics are O(rows): one fp32 logsumexp per token (and one fp32 delta per token
in the backward). Nothing O(L^2) ever reaches global memory.

Two kernel families, chosen by sequence length L (see ``plan``):

* **packed** (L <= BLOCK_M): the whole key set of a sequence fits one tile, so one program handles
  G = BLOCK_M // L complete sequences at once (the temporal axis has tens of thousands of sequences of
  4..32 tokens). Scores of the packed tile are computed as one [BLOCK_M, BLOCK_M] block with a
  block-diagonal mask: G-fold wasted multiply-adds buy full tiles for the matrix units and one
  exact softmax pass (no online rescaling). Dv is looped over inside the program, so the softmax is
  computed once however wide Dv is. The backward is one kernel as well (dq, dk, dv and delta from
  the complete rows; delta = rowsum(P * dP) needs no saved output, and P is recomputed by the same
  helper, so it is the forward's bit for bit).
* **flash** (longer L): FlashAttention-2. The forward streams key blocks through an online softmax
  (``_online_softmax_step``); wide Dv is split over a grid dimension, which recomputes S = QK^T once
  per Dv block (n_dv_blocks * 2 L^2 Dk extra flops) in exchange for an O(BLOCK_M x BLOCK_DV)
  accumulator that fits in registers and more parallelism; the alternative, one program looping
  over Dv, would need the probabilities of every key block kept on chip or written out (O(L^2)).
  The backward is a delta pre-pass plus separate dq and dk/dv kernels, so no atomics are used and
  the backward is deterministic by construction. For Dv wider than one block, dk (which needs the
  full dP = dO V^T) and dv (split over Dv blocks) run as different programs of one launch.

All statistics and accumulations are fp32. fp32 inputs use exact fp32 products
(``input_precision="ieee"``, torch.matmul's default contract); fp16/bf16 use the matrix units (sm_80
mma.sync, sm_90 wgmma where the tile allows; sm_75 FFMA, see ``stssa_kernels.ops.attention3d`` for
what that means for dispatch). Offsets are 64-bit.

Absent optional tensors (residual, gamma, the saved attention output, delta without gamma) are
passed as ``None``: Triton specialises on it, so the kernels take no placeholder arguments.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from ._launch import LAUNCH_OPTIONS, on_tensor_device

LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))

# Size arguments the JIT need not specialise on: their "% 16" never changes the code (they enter index
# math, not the contiguity of a load), and for GEO, NSEQH and DV_PER_PROG neither does "== 1" (unused
# sizes are 1 in every launch alike), so each would be an extra compile of the same code. HEADS == 1
# and G == 1 keep their variant: the head offset and the packed kernels' per-row divisions vanish,
# which the widest tiles need to stay within 255 registers. L, DK and DV stay fully specialised:
# their divisibility makes the token/channel masks of vector loads uniform.
_FLASH_NO_SPEC = dict(do_not_specialize=["GEO"], do_not_specialize_on_alignment=["HEADS"])
_PACKED_NO_SPEC = dict(do_not_specialize=["GEO", "NSEQH", "DV_PER_PROG"],
                       do_not_specialize_on_alignment=["HEADS", "G"])

# --------------------------------------------------------------------------------------------------
# index helpers: one tensor's tile addresses from its layout tuple
# --------------------------------------------------------------------------------------------------


@triton.jit
def _split_off(idx, n1, n2, s0, s1, s2, NDIMS: tl.constexpr):
    """Offset of linear index ``idx`` over up to three dims (sizes [*, n1, n2], strides s0..s2)."""
    if NDIMS == 1:
        off = idx.to(tl.int64) * s0
    elif NDIMS == 2:
        off = (idx // n1).to(tl.int64) * s0 + (idx % n1).to(tl.int64) * s1
    else:
        i2 = idx % n2
        rest = idx // n2
        off = (rest // n1).to(tl.int64) * s0 + (rest % n1).to(tl.int64) * s1 + i2.to(tl.int64) * s2
    return off


@triton.jit
def _seq_base(seq, head, ST, GEO, SEQ_DIMS: tl.constexpr):
    """Offset of (sequence, head) in a tensor of layout ``ST``."""
    return _split_off(seq, GEO[0], GEO[1], ST[2], ST[3], ST[4], SEQ_DIMS) + head.to(tl.int64) * ST[1]


@triton.jit
def _tok_off(tok, ST, GEO, TOK_DIMS: tl.constexpr):
    """Offsets of tokens ``tok`` inside their sequence, in a tensor of layout ``ST``."""
    return _split_off(tok, GEO[2], GEO[3], ST[5], ST[6], ST[7], TOK_DIMS)


@triton.jit
def _rows(seq, head, tok, ST, GEO, SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr):
    """Offsets of tokens ``tok`` of (sequence, head) in a tensor of layout ``ST``."""
    return _seq_base(seq, head, ST, GEO, SEQ_DIMS) + _tok_off(tok, ST, GEO, TOK_DIMS)


@triton.jit
def _load_tile(P, rows, ST, c0, N, ok, BLOCK: tl.constexpr):
    """Channels ``c0 .. c0 + BLOCK - 1`` (of ``N``) of the tokens at offsets ``rows`` as a channel-major
    tile ``[BLOCK, len(rows)]``; masked channels and tokens (``ok`` false) read 0."""
    c = c0 + tl.arange(0, BLOCK)
    ptr = P + rows[None, :] + c[:, None].to(tl.int64) * ST[0]
    return tl.load(ptr, mask=(c < N)[:, None] & ok[None, :], other=0.0)


@triton.jit
def _store_tile(P, rows, ST, c0, N, ok, tile, BLOCK: tl.constexpr):
    """Store a channel-major tile (see ``_load_tile``) in P's dtype."""
    c = c0 + tl.arange(0, BLOCK)
    ptr = P + rows[None, :] + c[:, None].to(tl.int64) * ST[0]
    tl.store(ptr, tile.to(P.dtype.element_ty), mask=(c < N)[:, None] & ok[None, :])


@triton.jit
def _row_stat(P, gs, L, tok):
    """Pointer to the per-token fp32 statistic (lse or delta) of sequence-head ``gs``, layout [NSEQH, L]."""
    return P + gs.to(tl.int64) * L + tok


# --------------------------------------------------------------------------------------------------
# softmax helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v, PREC: tl.constexpr):
    """One key block of the streaming softmax. ``s [BM, BN]``: scores in the exp2 domain, masked keys
    at -inf; ``v [BN, BDV]``. Rescales the running accumulator/row sum by exp2(m_old - m_new) and adds
    this block's contribution. The first block always holds key 0, so m stays finite from then on."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _packed_softmax(Q, K, q_rows, k_rows, q_st, k_st, g, ok, DK, qk_scale,
                    BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, PREC: tl.constexpr):
    """P = softmax(S) of one packed tile, S = scale * Q K^T with the keys of other sequences (``g``
    differs) and padding rows masked. Returns (P [BLOCK_M, BLOCK_M] fp32, lse [BLOCK_M] natural log);
    padding rows get P = 0. Shared by the forward and backward kernels, so both see the same P."""
    s = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for d0 in range(0, DK, BLOCK_DK):  # Dk in chunks: the operand tiles stay small for any Dk
        qT = _load_tile(Q, q_rows, q_st, d0, DK, ok, BLOCK_DK)
        kT = _load_tile(K, k_rows, k_st, d0, DK, ok, BLOCK_DK)
        s += tl.dot(tl.trans(qT), kT, input_precision=PREC)
    same = (g[:, None] == g[None, :]) & ok[None, :]
    s = tl.where(same, s * qk_scale, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # rows with no valid key (padding rows)
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    l = tl.where(l == 0.0, 1.0, l)
    return p * (1.0 / l)[:, None], (m + tl.log2(l)) * LN2


# --------------------------------------------------------------------------------------------------
# packed kernels: several complete short sequences per program
# --------------------------------------------------------------------------------------------------


@triton.jit
def _packed_rows(pid, G, L, NSEQH, BLOCK_M: tl.constexpr, TOKEN_MAJOR: tl.constexpr):
    """Row r of the tile -> (local sequence g, sequence-head gs, token n, validity). Token-major order
    puts neighbouring sequences in neighbouring rows (the unit-stride direction of the temporal axis
    in NCTHW)."""
    r = tl.arange(0, BLOCK_M)
    if TOKEN_MAJOR:
        n = r // G
        g = r % G
    else:
        g = r // L
        n = r % L
    gs = pid * G + g
    ok = (n < L) & (g < G) & (gs < NSEQH)
    return g, tl.where(ok, gs, 0), tl.where(ok, n, 0), ok


@triton.jit(**_PACKED_NO_SPEC)
def _attn3d_fwd_packed(
    Q, K, V, O, R, GAMMA, LSE, q_st, k_st, v_st, o_st, r_st, GEO,
    NSEQH, HEADS, L, DK, DV, G, DV_PER_PROG, qk_scale,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr, TOKEN_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (cdiv(NSEQH, G), Dv splits): G sequence-heads per program, channels
    [pid1 * DV_PER_PROG, (pid1 + 1) * DV_PER_PROG) of Dv. Writes O (and LSE from split 0)."""
    g, gs, n, ok = _packed_rows(tl.program_id(0), G, L, NSEQH, BLOCK_M, TOKEN_MAJOR)
    seq, head = gs // HEADS, gs % HEADS
    q_rows = _rows(seq, head, n, q_st, GEO, SEQ_DIMS, TOK_DIMS)
    k_rows = _rows(seq, head, n, k_st, GEO, SEQ_DIMS, TOK_DIMS)
    v_rows = _rows(seq, head, n, v_st, GEO, SEQ_DIMS, TOK_DIMS)
    o_rows = _rows(seq, head, n, o_st, GEO, SEQ_DIMS, TOK_DIMS)

    p, lse = _packed_softmax(Q, K, q_rows, k_rows, q_st, k_st, g, ok, DK, qk_scale, BLOCK_M, BLOCK_DK, PREC)
    # the LSE from Dv split 0 only; a scalar branch, not `mask=ok & (pid1 == 0)`: triton 3.9's
    # interpreter types that block & scalar as int32 and rejects it as a mask
    if tl.program_id(1) == 0:
        tl.store(_row_stat(LSE, gs, L, n), lse, mask=ok)

    pv = p.to(V.dtype.element_ty)
    if GAMMA is not None:
        gamma = tl.load(GAMMA).to(tl.float32)
    if R is not None:
        r_rows = _rows(seq, head, n, r_st, GEO, SEQ_DIMS, TOK_DIMS)
    dv_lo = tl.program_id(1) * DV_PER_PROG
    for c0 in range(dv_lo, tl.minimum(dv_lo + DV_PER_PROG, DV), BLOCK_DV):
        vT = _load_tile(V, v_rows, v_st, c0, DV, ok, BLOCK_DV)
        oT = tl.trans(tl.dot(pv, tl.trans(vT), input_precision=PREC))  # A^T chunk [BLOCK_DV, BLOCK_M]
        if GAMMA is not None:
            oT = oT * gamma
        if R is not None:
            oT += _load_tile(R, r_rows, r_st, c0, DV, ok, BLOCK_DV).to(tl.float32)
        _store_tile(O, o_rows, o_st, c0, DV, ok, oT, BLOCK_DV)


@triton.jit(**_PACKED_NO_SPEC)
def _attn3d_bwd_packed(
    Q, K, V, DO, DQ, DK_, DV_, DELTA, GAMMA, q_st, k_st, v_st, do_st, dq_st, dk_st, dv_st, GEO,
    NSEQH, HEADS, L, DK, DV, G, qk_scale, sm_scale,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr, TOKEN_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (cdiv(NSEQH, G),): dq, dk, dv of G sequence-heads per program, and (with GAMMA) the
    per-token delta' = sum_c dY A that the host sums into dgamma."""
    g, gs, n, ok = _packed_rows(tl.program_id(0), G, L, NSEQH, BLOCK_M, TOKEN_MAJOR)
    seq, head = gs // HEADS, gs % HEADS
    q_rows = _rows(seq, head, n, q_st, GEO, SEQ_DIMS, TOK_DIMS)
    k_rows = _rows(seq, head, n, k_st, GEO, SEQ_DIMS, TOK_DIMS)
    v_rows = _rows(seq, head, n, v_st, GEO, SEQ_DIMS, TOK_DIMS)
    do_rows = _rows(seq, head, n, do_st, GEO, SEQ_DIMS, TOK_DIMS)
    dv_rows = _rows(seq, head, n, dv_st, GEO, SEQ_DIMS, TOK_DIMS)

    # Whole rows are in the tile: redo the softmax exactly as the forward did instead of reading the
    # fp32 lse back (whose rounding, eps * |S|, would unnormalise P at very large logits).
    p, _ = _packed_softmax(Q, K, q_rows, k_rows, q_st, k_st, g, ok, DK, qk_scale, BLOCK_M, BLOCK_DK, PREC)

    if GAMMA is not None:
        gamma = tl.load(GAMMA).to(tl.float32)
    # One sweep over Dv: dP = dY V^T accumulates while each dV chunk (needs only P) is finished and stored.
    pT = tl.trans(p).to(DO.dtype.element_ty)
    dp = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for c0 in range(0, DV, BLOCK_DV):
        doT = _load_tile(DO, do_rows, do_st, c0, DV, ok, BLOCK_DV)
        vT = _load_tile(V, v_rows, v_st, c0, DV, ok, BLOCK_DV)
        dp += tl.dot(tl.trans(doT), vT, input_precision=PREC)
        dvT = tl.trans(tl.dot(pT, tl.trans(doT), input_precision=PREC))
        if GAMMA is not None:
            dvT = dvT * gamma
        _store_tile(DV_, dv_rows, dv_st, c0, DV, ok, dvT, BLOCK_DV)
    # delta' = rowsum(P * dY V^T) = rowsum(dY * A): exact here because the whole row is in the tile.
    delta = tl.sum(p * dp, 1)
    if GAMMA is not None:
        tl.store(_row_stat(DELTA, gs, L, n), delta, mask=ok)
        ds = p * (dp - delta[:, None]) * gamma
    else:
        ds = p * (dp - delta[:, None])
    ds = ds.to(Q.dtype.element_ty)
    dsT = tl.trans(ds)

    dq_rows = _rows(seq, head, n, dq_st, GEO, SEQ_DIMS, TOK_DIMS)
    dk_rows = _rows(seq, head, n, dk_st, GEO, SEQ_DIMS, TOK_DIMS)
    for d0 in range(0, DK, BLOCK_DK):
        qT = _load_tile(Q, q_rows, q_st, d0, DK, ok, BLOCK_DK)
        kT = _load_tile(K, k_rows, k_st, d0, DK, ok, BLOCK_DK)
        dqT = tl.trans(tl.dot(ds, tl.trans(kT), input_precision=PREC)) * sm_scale
        dkT = tl.trans(tl.dot(dsT, tl.trans(qT), input_precision=PREC)) * sm_scale
        _store_tile(DQ, dq_rows, dq_st, d0, DK, ok, dqT, BLOCK_DK)
        _store_tile(DK_, dk_rows, dk_st, d0, DK, ok, dkT, BLOCK_DK)


# --------------------------------------------------------------------------------------------------
# flash kernels: long sequences, online softmax over key blocks
# --------------------------------------------------------------------------------------------------


@triton.jit
def _block_of_sequence(L, HEADS, BLOCK: tl.constexpr):
    """Program axis 0 -> (sequence-head gs, sequence, head, token indices of this block, their mask).
    The blocks of one sequence are adjacent program ids, so its K/V stay hot in L2."""
    nb = tl.cdiv(L, BLOCK)
    gs = tl.program_id(0) // nb
    i = (tl.program_id(0) % nb) * BLOCK + tl.arange(0, BLOCK)
    return gs, gs // HEADS, gs % HEADS, i, i < L


@triton.jit(**_FLASH_NO_SPEC)
def _attn3d_fwd_flash(
    Q, K, V, O, R, A, GAMMA, LSE, q_st, k_st, v_st, o_st, r_st, a_st, GEO,
    HEADS, L, DK, DV, qk_scale,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_M) * NSEQH, cdiv(Dv, BLOCK_DV)): one query block, one Dv block. Writes O,
    LSE (from Dv block 0) and, when given, A = the attention output before the epilogue."""
    gs, seq, head, mi, m_ok = _block_of_sequence(L, HEADS, BLOCK_M)
    c0 = tl.program_id(1) * BLOCK_DV
    k_base = _seq_base(seq, head, k_st, GEO, SEQ_DIMS)
    v_base = _seq_base(seq, head, v_st, GEO, SEQ_DIMS)
    q_rows = _rows(seq, head, mi, q_st, GEO, SEQ_DIMS, TOK_DIMS)
    q = tl.trans(_load_tile(Q, q_rows, q_st, 0, DK, m_ok, BLOCK_DK))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        ni = n0 + tl.arange(0, BLOCK_N)
        n_ok = ni < L
        kT = _load_tile(K, k_base + _tok_off(ni, k_st, GEO, TOK_DIMS), k_st, 0, DK, n_ok, BLOCK_DK)
        s = tl.where(n_ok[None, :], tl.dot(q, kT, input_precision=PREC) * qk_scale, float("-inf"))
        vT = _load_tile(V, v_base + _tok_off(ni, v_st, GEO, TOK_DIMS), v_st, c0, DV, n_ok, BLOCK_DV)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, tl.trans(vT), PREC)

    acc = acc * (1.0 / l_i)[:, None]
    if tl.program_id(1) == 0:  # the LSE from Dv split 0 (a scalar branch, see _attn3d_fwd_packed)
        tl.store(_row_stat(LSE, gs, L, mi), (m_i + tl.log2(l_i)) * LN2, mask=m_ok)
    accT = tl.trans(acc)
    if A is not None:
        a_rows = _rows(seq, head, mi, a_st, GEO, SEQ_DIMS, TOK_DIMS)
        _store_tile(A, a_rows, a_st, c0, DV, m_ok, accT, BLOCK_DV)
    if GAMMA is not None:
        accT = accT * tl.load(GAMMA).to(tl.float32)
    if R is not None:
        r_rows = _rows(seq, head, mi, r_st, GEO, SEQ_DIMS, TOK_DIMS)
        accT += _load_tile(R, r_rows, r_st, c0, DV, m_ok, BLOCK_DV).to(tl.float32)
    o_rows = _rows(seq, head, mi, o_st, GEO, SEQ_DIMS, TOK_DIMS)
    _store_tile(O, o_rows, o_st, c0, DV, m_ok, accT, BLOCK_DV)


@triton.jit(**_FLASH_NO_SPEC)
def _attn3d_bwd_delta(
    DO, A, DELTA, do_st, a_st, GEO, HEADS, L, DV,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_M) * NSEQH,): delta'_i = sum_c dY_ic A_ic (A = attention output before the
    epilogue, or the output itself without one), fp32."""
    gs, seq, head, mi, m_ok = _block_of_sequence(L, HEADS, BLOCK_M)
    do_rows = _rows(seq, head, mi, do_st, GEO, SEQ_DIMS, TOK_DIMS)
    a_rows = _rows(seq, head, mi, a_st, GEO, SEQ_DIMS, TOK_DIMS)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, DV, BLOCK_DV):
        doT = _load_tile(DO, do_rows, do_st, c0, DV, m_ok, BLOCK_DV).to(tl.float32)
        aT = _load_tile(A, a_rows, a_st, c0, DV, m_ok, BLOCK_DV).to(tl.float32)
        acc += tl.sum(doT * aT, 0)
    tl.store(_row_stat(DELTA, gs, L, mi), acc, mask=m_ok)


@triton.jit(**_FLASH_NO_SPEC)
def _attn3d_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, GAMMA, q_st, k_st, v_st, do_st, dq_st, GEO,
    HEADS, L, DK, DV, qk_scale, sm_scale,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_M) * NSEQH,): dq of one query block, streaming key blocks."""
    gs, seq, head, mi, m_ok = _block_of_sequence(L, HEADS, BLOCK_M)
    k_base = _seq_base(seq, head, k_st, GEO, SEQ_DIMS)
    v_base = _seq_base(seq, head, v_st, GEO, SEQ_DIMS)
    q_rows = _rows(seq, head, mi, q_st, GEO, SEQ_DIMS, TOK_DIMS)
    do_rows = _rows(seq, head, mi, do_st, GEO, SEQ_DIMS, TOK_DIMS)
    q = tl.trans(_load_tile(Q, q_rows, q_st, 0, DK, m_ok, BLOCK_DK))
    lse2 = tl.load(_row_stat(LSE, gs, L, mi), mask=m_ok, other=0.0) * LOG2E
    delta = tl.load(_row_stat(DELTA, gs, L, mi), mask=m_ok, other=0.0)
    if GAMMA is not None:
        gamma = tl.load(GAMMA).to(tl.float32)
        delta = delta * gamma

    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        ni = n0 + tl.arange(0, BLOCK_N)
        n_ok = ni < L
        kT = _load_tile(K, k_base + _tok_off(ni, k_st, GEO, TOK_DIMS), k_st, 0, DK, n_ok, BLOCK_DK)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        p = tl.where(n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        v_rows = v_base + _tok_off(ni, v_st, GEO, TOK_DIMS)
        # dP = dY V^T over Dv chunks (one for narrow Dv; the dY chunk re-reads hit L1/L2)
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, DV, BLOCK_DV):
            doT = _load_tile(DO, do_rows, do_st, c0, DV, m_ok, BLOCK_DV)
            vT = _load_tile(V, v_rows, v_st, c0, DV, n_ok, BLOCK_DV)
            dp += tl.dot(tl.trans(doT), vT, input_precision=PREC)
        if GAMMA is not None:
            dp = dp * gamma
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(K.dtype.element_ty), tl.trans(kT), input_precision=PREC)
    dq_rows = _rows(seq, head, mi, dq_st, GEO, SEQ_DIMS, TOK_DIMS)
    _store_tile(DQ, dq_rows, dq_st, 0, DK, m_ok, tl.trans(dq * sm_scale), BLOCK_DK)


@triton.jit
def _dkdv_tile(
    Q, K, V, DO, DK_, DV_, LSE, DELTA, GAMMA, q_st, k_st, v_st, do_st, dk_st, dv_st, GEO,
    gs, seq, head, ni, n_ok, dv_block, L, DK, DV, qk_scale, sm_scale,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, ONE_DV_CHUNK: tl.constexpr, COMPUTE_DK: tl.constexpr,
    COMPUTE_DV: tl.constexpr, PREC: tl.constexpr,
):
    """dk (over all of Dv) and/or dv (of Dv block ``dv_block``) of the key block ``ni`` (valid where
    ``n_ok``), streaming query blocks."""
    c0 = dv_block * BLOCK_DV
    q_base = _seq_base(seq, head, q_st, GEO, SEQ_DIMS)
    do_base = _seq_base(seq, head, do_st, GEO, SEQ_DIMS)
    k_rows = _rows(seq, head, ni, k_st, GEO, SEQ_DIMS, TOK_DIMS)
    v_rows = _rows(seq, head, ni, v_st, GEO, SEQ_DIMS, TOK_DIMS)
    k = tl.trans(_load_tile(K, k_rows, k_st, 0, DK, n_ok, BLOCK_DK))  # [BN, BDK]
    if GAMMA is not None:
        gamma = tl.load(GAMMA).to(tl.float32)
    if COMPUTE_DK and ONE_DV_CHUNK:
        v = tl.trans(_load_tile(V, v_rows, v_st, c0, DV, n_ok, BLOCK_DV))  # [BN, BDV]

    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for m0 in range(0, L, BLOCK_M):
        mi = m0 + tl.arange(0, BLOCK_M)
        m_ok = mi < L
        q_rows = q_base + _tok_off(mi, q_st, GEO, TOK_DIMS)
        do_rows = do_base + _tok_off(mi, do_st, GEO, TOK_DIMS)
        qT = _load_tile(Q, q_rows, q_st, 0, DK, m_ok, BLOCK_DK)
        lse2 = tl.load(_row_stat(LSE, gs, L, mi), mask=m_ok, other=0.0) * LOG2E
        sT = tl.dot(k, qT, input_precision=PREC) * qk_scale                          # [BN, BM]
        pT = tl.where(m_ok[None, :], tl.exp2(sT - lse2[None, :]), 0.0)
        if COMPUTE_DV or ONE_DV_CHUNK:
            doT = _load_tile(DO, do_rows, do_st, c0, DV, m_ok, BLOCK_DV)            # [BDV, BM]
        if COMPUTE_DV:
            dv += tl.dot(pT.to(DO.dtype.element_ty), tl.trans(doT), input_precision=PREC)
        if COMPUTE_DK:
            if ONE_DV_CHUNK:
                dpT = tl.dot(v, doT, input_precision=PREC)
            else:
                dpT = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for cc in range(0, DV, BLOCK_DV):
                    vT_c = _load_tile(V, v_rows, v_st, cc, DV, n_ok, BLOCK_DV)
                    doT_c = _load_tile(DO, do_rows, do_st, cc, DV, m_ok, BLOCK_DV)
                    dpT += tl.dot(tl.trans(vT_c), doT_c, input_precision=PREC)
            delta = tl.load(_row_stat(DELTA, gs, L, mi), mask=m_ok, other=0.0)
            if GAMMA is not None:
                dsT = pT * (dpT - delta[None, :]) * gamma
            else:
                dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(Q.dtype.element_ty), tl.trans(qT), input_precision=PREC)
    if COMPUTE_DK:
        dk_rows = _rows(seq, head, ni, dk_st, GEO, SEQ_DIMS, TOK_DIMS)
        _store_tile(DK_, dk_rows, dk_st, 0, DK, n_ok, tl.trans(dk * sm_scale), BLOCK_DK)
    if COMPUTE_DV:
        if GAMMA is not None:
            dv = dv * gamma
        dv_rows = _rows(seq, head, ni, dv_st, GEO, SEQ_DIMS, TOK_DIMS)
        _store_tile(DV_, dv_rows, dv_st, c0, DV, n_ok, tl.trans(dv), BLOCK_DV)


@triton.jit(**_FLASH_NO_SPEC)
def _attn3d_bwd_dkdv(
    Q, K, V, DO, DK_, DV_, LSE, DELTA, GAMMA, q_st, k_st, v_st, do_st, dk_st, dv_st, GEO,
    HEADS, L, DK, DV, qk_scale, sm_scale,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    ONE_DV_CHUNK: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_N) * NSEQH, 1 or 1 + cdiv(Dv, BLOCK_DV)): one key block per program along
    axis 0. dk needs the full dP = dO V^T (all of Dv), dv only its own Dv block. Dv <= BLOCK_DV: each
    program computes both. Wider: program 0 of axis 1 computes dk (summing dP over Dv chunks),
    program j >= 1 the dv of Dv block j - 1."""
    gs, seq, head, ni, n_ok = _block_of_sequence(L, HEADS, BLOCK_N)
    pid_dv = tl.program_id(1)
    if ONE_DV_CHUNK:
        _dkdv_tile(Q, K, V, DO, DK_, DV_, LSE, DELTA, GAMMA, q_st, k_st, v_st, do_st, dk_st, dv_st, GEO,
                   gs, seq, head, ni, n_ok, 0, L, DK, DV, qk_scale, sm_scale, SEQ_DIMS, TOK_DIMS,
                   BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DV, True, True, True, PREC)
    elif pid_dv == 0:
        _dkdv_tile(Q, K, V, DO, DK_, DV_, LSE, DELTA, GAMMA, q_st, k_st, v_st, do_st, dk_st, dv_st, GEO,
                   gs, seq, head, ni, n_ok, 0, L, DK, DV, qk_scale, sm_scale, SEQ_DIMS, TOK_DIMS,
                   BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DV, False, True, False, PREC)
    else:
        _dkdv_tile(Q, K, V, DO, DK_, DV_, LSE, DELTA, GAMMA, q_st, k_st, v_st, do_st, dk_st, dv_st, GEO,
                   gs, seq, head, ni, n_ok, pid_dv - 1, L, DK, DV, qk_scale, sm_scale, SEQ_DIMS, TOK_DIMS,
                   BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DV, False, False, True, PREC)


# --------------------------------------------------------------------------------------------------
# host side: layout analysis, block-configuration tables, launchers
# --------------------------------------------------------------------------------------------------

# Position dims (indices into [B, D, T, H, W]) that form a sequence / the tokens of a sequence.
_AXIS_DIMS = {"spatial": ((0, 2), (3, 4)), "temporal": ((0, 3, 4), (2,)), "full": ((0,), (2, 3, 4))}
_MAX_DIMS = 3  # sequence / token dims a layout tuple holds after merging (B, T, H, W give at most 3)


def seq_count_and_length(shape, axis: str) -> tuple[int, int]:
    """(number of sequences, tokens per sequence) of a [B, D, T, H, W] map for ``axis``."""
    seq_pos, tok_pos = _AXIS_DIMS[axis]
    return math.prod(shape[p] for p in seq_pos), math.prod(shape[p] for p in tok_pos)


@dataclasses.dataclass(frozen=True)
class _Desc:
    """Strides of one tensor before merging: channel, head, and one per position dim of [B, D, T, H, W]."""
    channel: int
    head: int
    pos: dict


def _desc_5d(x: torch.Tensor, head_dim: int) -> _Desc:
    st = x.stride()
    return _Desc(st[1], head_dim * st[1], {0: st[0], 2: st[2], 3: st[3], 4: st[4]})


def _desc_seq(shape, axis: str, heads: int, d: int) -> _Desc:
    """A contiguous "sequence layout" tensor [sequences, heads, L, d] (the saved attention output),
    expressed in the position dims of the 5-D map it came from."""
    seq_pos, tok_pos = _AXIS_DIMS[axis]
    _, L = seq_count_and_length(shape, axis)
    strides, acc = {}, d
    for p in reversed(tok_pos):
        strides[p] = acc
        acc *= shape[p]
    acc = heads * L * d
    for p in reversed(seq_pos):
        strides[p] = acc
        acc *= shape[p]
    return _Desc(1, L * d, strides)


def _merge(shape, pos, descs: list[_Desc]):
    """Drop size-1 dims and merge neighbours whose strides chain in every tensor -> [(size, strides)]."""
    merged = []
    for p in pos:
        size = shape[p]
        if size == 1:
            continue
        st = [ds.pos[p] for ds in descs]
        if merged and all(prev == size * s for prev, s in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * size, st)
        else:
            merged.append((size, st))
    return merged or [(1, [0] * len(descs))]


@dataclasses.dataclass
class _Geometry:
    """Sequence/token indexing shared by every tensor of one launch."""
    seq_dims: int
    tok_dims: int
    sizes: tuple    # GEO = (SN1, SN2, TN1, TN2): sizes of the inner merged sequence / token dims
    layouts: dict   # tensor name -> (channel, head, seq0, seq1, seq2, tok0, tok1, tok2) strides

    def token_major(self, G: int) -> bool:
        """Packed tiles: order rows token-major when neighbouring sequences are closer in memory than
        neighbouring tokens (judged on q; every tensor was merged alike)."""
        st = self.layouts["q"]
        inner_seq, inner_tok = st[2 + self.seq_dims - 1], st[2 + _MAX_DIMS + self.tok_dims - 1]
        return G > 1 and abs(inner_seq) < abs(inner_tok)


def _geometry(shape, axis: str, descs: dict) -> _Geometry:
    """Merge the position dims of all tensors of a launch (``descs``: name -> _Desc) consistently."""
    seq_pos, tok_pos = _AXIS_DIMS[axis]
    names, ds = list(descs), list(descs.values())
    sq, tk = _merge(shape, seq_pos, ds), _merge(shape, tok_pos, ds)
    layouts = {}
    for i, (name, d) in enumerate(zip(names, ds)):
        s = [st[i] for _, st in sq] + [0] * (_MAX_DIMS - len(sq))
        t = [st[i] for _, st in tk] + [0] * (_MAX_DIMS - len(tk))
        layouts[name] = (d.channel, d.head, *s, *t)
    size = lambda m, j: m[j][0] if len(m) > j else 1  # noqa: E731
    return _Geometry(len(sq), len(tk), (size(sq, 1), size(sq, 2), size(tk, 1), size(tk, 2)), layouts)


# ---- block configurations: data, one row per (arch family, element size) --------------------------
# UNMEASURED on GPUs: chosen from tile arithmetic and the compile check (no register spills, shared
# memory within the arch's limit, for every layout compile_check builds; its report is in
# benchmarks/results/compile_check_*.json). The kernels index by strides, so a tile's elements carry
# their own 64-bit addresses unless the JIT specialises a unit stride: hence smaller tiles and more
# warps than contiguous-layout attention kernels use. `benchmarks/attn3d.py` prints the entry that ran
# so the tables can be tuned from measurements.
# sm_75 runs tl.dot on FFMA for every dtype, so it gets the fp32 (FFMA) tiles and packs fewer
# sequences per tile: the block-diagonal waste of packing costs real FFMA time there, while on
# tensor-core archs it fills otherwise idle MMA cycles. sm_86/89 (about 100 KB of shared memory per
# block, 1536 threads per SM) have a family key of their own; today their tiles are sm_80's.

# (family, bits) -> (BLOCK_M, BLOCK_DK, forward BLOCK_DV, backward BLOCK_DV, num_warps, num_stages);
# L <= BLOCK_M runs packed (the packed kernels loop over Dk and Dv in chunks, so any head width fits:
# the flash kernels hold a whole Dk tile and stop at MAX_HEAD_DIM). 64 rows everywhere, so the AVA
# head's 7x7 = 49-token frames run packed whatever Dk. The FFMA tiles (sm_75, and fp32 on every arch)
# take 16-wide Dk/Dv chunks, the widest without register spills; the 16-bit backward takes 32-wide Dv
# chunks (64-wide ones spill 8-200 bytes under triton 3.6 on sm_80/86/90).
_PACKED_MMA16 = (64, 32, 64, 32, 8, 2)
_PACKED_FFMA = (64, 16, 16, 16, 8, 1)
PACKED_CONFIGS = {
    (75, 16): _PACKED_FFMA, (75, 32): _PACKED_FFMA,
    (80, 16): _PACKED_MMA16, (80, 32): _PACKED_FFMA,
    (86, 16): _PACKED_MMA16, (86, 32): _PACKED_FFMA,
    (90, 16): _PACKED_MMA16, (90, 32): _PACKED_FFMA,
}
# (family, bits) -> padded head dim BLOCK_DK -> (forward tile, backward tile), each
# (BLOCK_M, BLOCK_N, BLOCK_DV, num_warps, num_stages[, maxnreg]). maxnreg = 255 lifts the register cap
# ptxas otherwise picks for occupancy (64-128 for some of these 8-warp kernels), under which they spill.
# Every tile compiles without spills under triton 3.6, 3.8 and 3.9 (compile_check).
_MMA16 = {64: ((64, 64, 64, 8, 2), (32, 32, 64, 8, 2, 255)),  # sm_80
          128: ((64, 64, 64, 8, 2), (32, 32, 64, 8, 2)),
          256: ((64, 32, 64, 8, 2), (16, 16, 64, 8, 2))}
# sm_90 (wgmma): the 64-wide dk/dv tile fits its register file with 32-wide Dv chunks; the 128- and
# 256-wide forwards halve their key block
_MMA16_SM90 = {64: ((64, 64, 64, 8, 2), (64, 32, 32, 8, 2)),
               128: ((64, 32, 64, 8, 2), (32, 32, 64, 8, 2)),
               256: ((64, 16, 64, 8, 2), (16, 16, 64, 8, 2))}
_FFMA16 = {64: ((64, 32, 32, 8, 1), (32, 16, 32, 8, 1)),   # sm_75: fp16 converted to fp32 for FFMA
           128: ((64, 32, 32, 8, 1), (16, 32, 32, 8, 1)),
           256: ((32, 32, 32, 8, 1), (16, 16, 32, 8, 1))}
# fp32: ptxas caps the 8-warp FFMA backward kernels for occupancy and they spill under the cap
_FFMA32 = {64: ((64, 32, 32, 8, 1), (32, 16, 32, 8, 1, 255)),
           128: ((32, 16, 32, 8, 1), (16, 32, 32, 8, 1, 255)),
           256: ((32, 32, 32, 8, 1), (16, 16, 32, 8, 1, 255))}
FLASH_CONFIGS = {
    (75, 16): _FFMA16, (75, 32): _FFMA32,
    (80, 16): _MMA16, (80, 32): _FFMA32,
    (86, 16): _MMA16, (86, 32): _FFMA32,
    (90, 16): _MMA16_SM90, (90, 32): _FFMA32,
}
MAX_HEAD_DIM = 256  # q/k channels per head the flash kernels take in one tile
# delta pre-pass: (BLOCK_M, BLOCK_DV, num_warps), every arch and dtype (64-wide Dv chunks spill on sm_86
# under triton 3.6)
DELTA_TILE = (64, 32, 4)
# A packed forward with fewer programs than this splits Dv over a second grid dimension (each split
# recomputes the tiny packed softmax) to fill the GPU.
MIN_PROGRAMS = 256


def arch_family(cc: int) -> int:
    """The tile family of compute capability ``cc``: 75, 80 (A100 class), 86 (sm_86/89/120/121) or 90
    (sm_90/100/103)."""
    if 90 <= cc < 120:
        return 90
    if cc in (86, 89) or cc >= 120:  # RTX 30xx/40xx/50xx class (~100 KB shared memory per block, mma.sync);
        return 86                    # sm_87 (Orin) has the A100's shared memory
    return 80 if cc >= 80 else 75


def _pow2(x: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(x))


@dataclasses.dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    block_dv: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # register cap handed to ptxas; None: ptxas chooses


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which Triton kernel family and tiles run one call."""
    kind: str  # "packed" | "flash"
    family: int
    bits: int
    block_dk: int
    fwd: Tile
    bwd: Tile

    def describe(self) -> str:
        f, b = self.fwd, self.bwd
        if self.kind == "packed":
            return (f"triton-packed sm_{self.family} fp{self.bits}-class BM={f.block_m} BDK={self.block_dk} "
                    f"BDV={f.block_dv} w{f.num_warps}")
        return (f"triton-flash sm_{self.family} fp{self.bits}-class BDK={self.block_dk} fwd BM={f.block_m} "
                f"BN={f.block_n} BDV={f.block_dv} w{f.num_warps} | bwd BM={b.block_m} BN={b.block_n} "
                f"BDV={b.block_dv} w{b.num_warps}")


def plan(cc: int, L: int, dk: int, dv: int, dtype: torch.dtype = torch.float16) -> Plan | None:
    """Kernel family and tiles for head dims (dk, dv), sequence length L and dtype; None if unsupported."""
    fam = arch_family(cc)
    bits = 32 if dtype == torch.float32 else 16
    bm, bdk, bdv_fwd, bdv_bwd, w, st = PACKED_CONFIGS[(fam, bits)]
    if L <= bm:
        return Plan("packed", fam, bits, bdk, Tile(bm, bm, bdv_fwd, w, st), Tile(bm, bm, bdv_bwd, w, st))
    if dk > MAX_HEAD_DIM:
        return None
    bdk = _pow2(dk, 64)  # head dims below 64 are padded: QK^T is rarely the cost next to PV
    fwd, bwd = FLASH_CONFIGS[(fam, bits)][bdk]
    return Plan("flash", fam, bits, bdk, Tile(*fwd), Tile(*bwd))


# fp32 inputs get exact fp32 products (torch.matmul's default contract, allow_tf32=False); the
# tensor-core paths are fp16/bf16, for which the option has no effect. A TF32 variant would double
# the fp32 configurations to compile.
PRECISION = "ieee"


def _qk_scale(scale: float, dk: int) -> float:
    # exp2-domain score scale; with no key channels S is identically 0 whatever the scale (which
    # may then be inf: 1/sqrt(0))
    return scale * LOG2E.value if dk else 0.0


# ---- launchers --------------------------------------------------------------------------------------


@on_tensor_device
def forward(q, k, v, axis: str, heads: int, scale: float, residual, gamma, p: Plan):
    """Attention forward, on q's device.

    q, k ``[B, Dk, T, H, W]``, v and residual ``[B, Dv, T, H, W]`` (any strides, one dtype), gamma an
    fp32 scalar tensor or None; ``p`` from ``plan``. Returns (out ``[B, Dv, T, H, W]`` laid out like v,
    lse ``[N, heads, L]`` fp32, attn ``[N, heads, L, Dv/heads]`` or None). ``attn`` (the output before
    the epilogue) is written only by the flash family when residual/gamma are present: its backward
    takes delta from it. Dk = 0 is uniform attention (out = residual + gamma * mean_j v)."""
    B, Dk, T, H, W = q.shape
    Dv = v.shape[1]
    dk, dv = Dk // heads, Dv // heads
    nseq, L = seq_count_and_length(q.shape, axis)
    out = torch.empty_like(v)
    lse = torch.empty((nseq, heads, L), device=q.device, dtype=torch.float32)
    store_attn = p.kind == "flash" and (residual is not None or gamma is not None)
    attn = torch.empty((nseq, heads, L, dv), device=q.device, dtype=v.dtype) if store_attn else None
    if nseq * L == 0:
        return out, lse, attn
    descs = {"q": _desc_5d(q, dk), "k": _desc_5d(k, dk), "v": _desc_5d(v, dv), "o": _desc_5d(out, dv)}
    if residual is not None:
        descs["r"] = _desc_5d(residual, dv)
    if store_attn:
        descs["a"] = _desc_seq(q.shape, axis, heads, dv)
    geo = _geometry(q.shape, axis, descs)
    st = geo.layouts
    nseqh = nseq * heads
    t = p.fwd
    meta = dict(SEQ_DIMS=geo.seq_dims, TOK_DIMS=geo.tok_dims, BLOCK_DK=p.block_dk, BLOCK_DV=t.block_dv,
                PREC=PRECISION, num_warps=t.num_warps, num_stages=t.num_stages, maxnreg=t.maxnreg,
                **LAUNCH_OPTIONS)
    if p.kind == "packed":
        G = max(1, t.block_m // L)
        n_prog = triton.cdiv(nseqh, G)
        # split Dv over a second grid dim (in whole BLOCK_DV chunks) when one split leaves the GPU idle
        n_chunks = max(1, triton.cdiv(dv, t.block_dv))  # Dv = 0 still writes lse
        splits = min(n_chunks, max(1, triton.cdiv(MIN_PROGRAMS, n_prog)))
        per_prog = triton.cdiv(n_chunks, splits) * t.block_dv
        _attn3d_fwd_packed[(n_prog, max(1, triton.cdiv(dv, per_prog)))](
            q, k, v, out, residual, gamma, lse, st["q"], st["k"], st["v"], st["o"], st.get("r"), geo.sizes,
            nseqh, heads, L, dk, dv, G, per_prog, _qk_scale(scale, dk),
            TOKEN_MAJOR=geo.token_major(G), BLOCK_M=t.block_m, **meta)
    else:
        grid = (triton.cdiv(L, t.block_m) * nseqh, max(1, triton.cdiv(dv, t.block_dv)))
        _attn3d_fwd_flash[grid](
            q, k, v, out, residual, attn, gamma, lse, st["q"], st["k"], st["v"], st["o"], st.get("r"),
            st.get("a"), geo.sizes, heads, L, dk, dv, _qk_scale(scale, dk),
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, **meta)
    return out, lse, attn


@on_tensor_device
def backward(grad_out, q, k, v, o, lse, axis: str, heads: int, scale: float, gamma, p: Plan):
    """Attention backward, on q's device, for a ``forward`` that ran with the same arguments.

    ``grad_out`` like v (any strides). ``o`` and ``lse`` are read by the flash family only (the packed
    kernel recomputes the softmax of its complete rows): ``o`` is what delta is taken from, the output
    itself (no epilogue) or the saved attention ``[N, heads, L, dv]``. Returns (dq, dk, dv, dgamma
    fp32 scalar or None); dresidual is grad_out itself."""
    B, Dk, T, H, W = q.shape
    Dv = v.shape[1]
    dk, dv = Dk // heads, Dv // heads
    nseq, L = seq_count_and_length(q.shape, axis)
    nseqh = nseq * heads
    dq, dk_, dv_ = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    need_delta = p.kind == "flash" or gamma is not None
    delta = torch.zeros((nseq, heads, L), device=q.device, dtype=torch.float32) if need_delta else None
    if v.numel() == 0:  # no positions or no value channels: the output depends on nothing
        dq.zero_(), dk_.zero_(), dv_.zero_()
        return dq, dk_, dv_, (q.new_zeros((), dtype=torch.float32) if gamma is not None else None)
    qk_scale = _qk_scale(scale, dk)
    t = p.bwd
    descs = {"q": _desc_5d(q, dk), "k": _desc_5d(k, dk), "v": _desc_5d(v, dv), "do": _desc_5d(grad_out, dv),
             "dq": _desc_5d(dq, dk), "dk": _desc_5d(dk_, dk), "dv": _desc_5d(dv_, dv)}
    if p.kind == "flash":
        descs["o"] = _desc_seq(q.shape, axis, heads, dv) if o.dim() == 4 else _desc_5d(o, dv)
    geo = _geometry(q.shape, axis, descs)
    st = geo.layouts
    meta = dict(SEQ_DIMS=geo.seq_dims, TOK_DIMS=geo.tok_dims, **LAUNCH_OPTIONS)
    if p.kind == "packed":
        G = max(1, t.block_m // L)
        _attn3d_bwd_packed[(triton.cdiv(nseqh, G),)](
            q, k, v, grad_out, dq, dk_, dv_, delta, gamma,
            st["q"], st["k"], st["v"], st["do"], st["dq"], st["dk"], st["dv"], geo.sizes,
            nseqh, heads, L, dk, dv, G, qk_scale, scale,
            TOKEN_MAJOR=geo.token_major(G), BLOCK_M=t.block_m, BLOCK_DK=p.block_dk, BLOCK_DV=t.block_dv,
            PREC=PRECISION, num_warps=t.num_warps, num_stages=t.num_stages, maxnreg=t.maxnreg, **meta)
    else:
        dbm, dbdv, dw = DELTA_TILE
        _attn3d_bwd_delta[(triton.cdiv(L, dbm) * nseqh,)](
            grad_out, o, delta, st["do"], st["o"], geo.sizes, heads, L, dv,
            BLOCK_M=dbm, BLOCK_DV=dbdv, num_warps=dw, num_stages=2, **meta)
        blocks = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_DK=p.block_dk, BLOCK_DV=t.block_dv,
                      PREC=PRECISION, num_warps=t.num_warps, num_stages=t.num_stages, maxnreg=t.maxnreg, **meta)
        _attn3d_bwd_dq[(triton.cdiv(L, t.block_m) * nseqh,)](
            q, k, v, grad_out, dq, lse, delta, gamma, st["q"], st["k"], st["v"], st["do"], st["dq"], geo.sizes,
            heads, L, dk, dv, qk_scale, scale, **blocks)
        one = dv <= t.block_dv
        _attn3d_bwd_dkdv[(triton.cdiv(L, t.block_n) * nseqh, 1 if one else 1 + triton.cdiv(dv, t.block_dv))](
            q, k, v, grad_out, dk_, dv_, lse, delta, gamma,
            st["q"], st["k"], st["v"], st["do"], st["dk"], st["dv"], geo.sizes,
            heads, L, dk, dv, qk_scale, scale, ONE_DV_CHUNK=one, **blocks)
    dgamma = delta.sum() if gamma is not None else None
    return dq, dk_, dv_, dgamma


# ---- ahead-of-time compile specs --------------------------------------------------------------------
# compile_check builds what the JIT builds: each workload below runs the launchers on CPU tensors with
# the kernel launches recorded (not run), and every recorded launch becomes a spec with the JIT's own
# specialisation of its arguments for the target arch.

_SPEC_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _odd_strided(shape, dtype):
    """A [B, D, T, H, W] view with no unit, no 16-divisible and no chaining stride: every index dim
    stays separate and no load vectorises (the layout that needs the most registers)."""
    strides, acc = [0] * 5, 3
    for d in (4, 3, 2, 1, 0):
        strides[d] = acc
        acc = acc * shape[d] + 2 * d + 1
        acc += acc % 16 == 0
    return torch.empty(acc, dtype=dtype).as_strided(shape, strides)


def layout_tensors(layout: str, shape, dv: int, dtype):
    """(q, k, v, residual) [B, D, T, H, W] on CPU in one of the layouts the op is given: ``contiguous``
    (NCTHW), ``channels_last`` (NTHWC memory), ``temporal_proj`` (the channel slices of one
    temporal_proj output ``[B, T, H, W, 2 Dk + Dv]``, as the STSSA head passes them, with a
    channels-last residual) or ``strided`` (see ``_odd_strided``)."""
    B, Dk, T, H, W = shape
    cl = torch.channels_last_3d
    if layout == "temporal_proj":
        y = torch.empty(B, T, H, W, 2 * Dk + dv, dtype=dtype)
        q, k, v = (t.permute(0, 4, 1, 2, 3) for t in y.split([Dk, Dk, dv], dim=-1))
        return q, k, v, torch.empty(B, dv, T, H, W, dtype=dtype, memory_format=cl)
    if layout == "strided":
        return tuple(_odd_strided((B, d, T, H, W), dtype) for d in (Dk, Dk, dv, dv))
    fmt = cl if layout == "channels_last" else torch.contiguous_format
    return tuple(torch.empty(B, d, T, H, W, dtype=dtype, memory_format=fmt) for d in (Dk, Dk, dv, dv))


def record_call(cc: int, layout: str, dtype, shape, dv: int, axis: str, heads: int = 1):
    """Recorded kernel launches of one forward + backward with residual and gamma (the STSSA head's
    call) on arch ``cc``: [(Launch, config label)]."""
    from ._launch import capture_launches

    q, k, v, r = layout_tensors(layout, shape, dv, dtype)
    nseq, L = seq_count_and_length(q.shape, axis)
    p = plan(cc, L, q.shape[1] // heads, dv // heads, dtype)
    gamma = torch.zeros((), dtype=torch.float32)
    with capture_launches() as launches:
        out, lse, attn = forward(q, k, v, axis, heads, 1.0, r, gamma, p)
        backward(torch.empty_like(out), q, k, v, attn if attn is not None else out, lse, axis, heads, 1.0,
                 gamma, p)
    return [(ln, _config_label(ln, dtype)) for ln in launches]


def _config_label(launch, dtype) -> str:
    kw = launch.kwargs
    tag = next(t for t, d in _SPEC_DTYPES.items() if d == dtype)
    parts = [tag, f"BM={kw['BLOCK_M']}"]
    parts += [f"BN={kw['BLOCK_N']}"] if "BLOCK_N" in kw else []
    parts += [f"BDK={kw['BLOCK_DK']}"] if "BLOCK_DK" in kw else []
    parts += [f"BDV={kw['BLOCK_DV']}", f"w{kw['num_warps']}"]
    label = " ".join(parts)
    if "ONE_DV_CHUNK" in kw:
        label += " Dv<=BDV" if kw["ONE_DV_CHUNK"] else " wide-Dv"
    return label


def compile_workloads(cc: int) -> list[tuple]:
    """(layout, dtype tag, shape [B, Dk, T, H, W], Dv, axis) calls whose launches compile_check builds
    on arch ``cc``:

    * ``strided`` for every dtype the dispatcher runs on Triton there (not bf16 on sm_75, which runs
      PyTorch math) and every tile ``plan`` can pick (packed on the spatial and temporal axes; flash for
      each padded head dim with narrow and wide Dv): the register worst case of each tile;
    * the layouts the op is given in the STSSA head (contiguous, channels-last, temporal_proj slices)
      for the 16-bit dtype a training run uses there (bf16 autocast; fp16 on sm_75), packed on both
      axes and flash on the full axis."""
    fam = arch_family(cc)
    calls = []
    for dt in ("fp16", "fp32") if fam == 75 else ("fp16", "bf16", "fp32"):
        calls += [("strided", dt, (2, 16, 3, 7, 7), 24, "spatial"), ("strided", dt, (2, 16, 8, 3, 5), 24, "temporal")]
        bits = 32 if dt == "fp32" else 16
        for bdk, (fwd, bwd) in FLASH_CONFIGS[(fam, bits)].items():
            narrow = min(fwd[2], bwd[2])
            calls += [("strided", dt, (1, bdk, 2, 5, 7), narrow, "full"),
                      ("strided", dt, (1, bdk, 2, 5, 7), 2 * max(fwd[2], bwd[2]) + 16, "full")]
    real = "fp16" if fam == 75 else "bf16"
    for layout in ("contiguous", "channels_last", "temporal_proj"):
        calls += [(layout, real, (2, 64, 4, 7, 7), 256, "spatial"), (layout, real, (2, 64, 8, 7, 7), 256, "temporal")]
    for layout in ("contiguous", "channels_last"):
        calls += [(layout, real, (1, 64, 4, 14, 14), 64, "full")]
    return calls


def compile_specs(cc: int):
    """Every kernel variant the JIT compiles for ``compile_workloads(cc)``, once each (KernelSpec list)."""
    from ..compile_check import specs_from_launches

    recorded = []
    for layout, dt, shape, dv, axis in compile_workloads(cc):
        recorded += [(ln, label, layout) for ln, label in record_call(cc, layout, _SPEC_DTYPES[dt], shape, dv, axis)]
    return specs_from_launches(recorded, cc)


def retarget(launcher: str, args: tuple, kwargs: dict, cc: int) -> tuple[tuple, dict]:
    """A recorded call of ``forward``/``backward`` with its plan replaced by what ``plan`` picks on
    arch ``cc`` (recorded under the interpreter or on another GPU)."""
    import inspect

    bound = inspect.signature(globals()[launcher]).bind(*args, **kwargs)
    a = bound.arguments
    q, v, heads = a["q"], a["v"], a["heads"]
    _, L = seq_count_and_length(q.shape, a["axis"])
    a["p"] = plan(cc, L, q.shape[1] // heads, v.shape[1] // heads, q.dtype)
    return bound.args, bound.kwargs
