"""Triton kernels for ``attention3d``: fused self-attention over one axis of a video feature map.

Maths, per sequence ``s`` and head ``h`` (``i, j`` tokens of the sequence, ``c`` a channel of the head)::

    S_ij   = scale * sum_c q[c, i] k[c, j]                    (Dk/heads channels)
    lse_i  = log sum_j exp(S_ij);   P_ij = exp(S_ij - lse_i)
    A_ic   = sum_j P_ij v[c, j]                              (Dv/heads channels)
    out    = residual + gamma * A                            (epilogue terms when given)

backward (``dY`` = grad of out, ``dO = gamma dY``)::

    dV_jc  = sum_i P_ij dO_ic
    dP_ij  = sum_c dO_ic v_jc;   delta_i = sum_j P_ij dP_ij = sum_c dO_ic A_ic
    dS_ij  = P_ij (dP_ij - delta_i);   dQ = scale dS K;   dK = scale dS^T Q
    dgamma = sum_ic dY_ic A_ic;        dresidual = dY

Layout: tensors are read and written where they lie, ``[B, D, T, H, W]`` with arbitrary strides
(contiguous, ``channels_last_3d``, slices). A sequence is a set of (b, t, h, w) positions; the host
splits the four position dims into *sequence* dims and *token* dims (spatial: (b, t) | (h, w);
temporal: (b, h, w) | (t); full: (b) | (t, h, w)), drops size-1 dims and merges neighbours whose
strides chain in every tensor, so the common layouts index a token with one multiply (and a
contiguous token stride of 1 is specialised by Triton, giving coalesced vector loads). Tiles are
loaded channel-major (``[D, tokens]``) so that, when no stride is provably 1, the fastest-varying
index is the token, which is the unit-stride one in the NCTHW layout a Conv3d produces.

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
  the complete rows, delta = rowsum(P * dP) needs no saved output).
* **flash** (longer L): FlashAttention-2 style. The forward streams key blocks with an online softmax;
  wide Dv is split over a grid dimension, which recomputes S = QK^T once per Dv block
  (n_dv_blocks * 2 L^2 Dk extra flops) in exchange for an O(BLOCK_M x BLOCK_DV) accumulator that fits
  in registers and more parallelism; the alternative, one program looping over Dv, would need the
  probabilities of every key block kept on chip or written out (O(L^2)). The backward is a delta
  pre-pass plus separate dq and dk/dv kernels, so no atomics are used and the backward is
  deterministic by construction (``torch.use_deterministic_algorithms(True)`` needs nothing extra).
  For Dv wider than one block dk (which needs the full dP = dO V^T) and dv (split over Dv blocks)
  run as two launches of the same kernel.

All statistics and accumulations are fp32. fp32 inputs use exact fp32 products
(``input_precision="ieee"``, torch.matmul's default contract); fp16/bf16 use the matrix units (sm_80
HMMA, sm_90 HGMMA; sm_75 FFMA, see ``stssa_kernels.ops.attention3d`` for what that means for dispatch).
Offsets are 64-bit.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# --------------------------------------------------------------------------------------------------
# index helpers
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
def _base(seq, head, SN1, SN2, sh, s0, s1, s2, SEQ_DIMS: tl.constexpr):
    """Offset of (sequence, head) inside one tensor."""
    return _split_off(seq, SN1, SN2, s0, s1, s2, SEQ_DIMS) + head.to(tl.int64) * sh


# --------------------------------------------------------------------------------------------------
# packed kernels: several complete short sequences per program
# --------------------------------------------------------------------------------------------------


@triton.jit
def _packed_rows(pid, G, L, NSEQH, BLOCK_M: tl.constexpr, TOKEN_MAJOR: tl.constexpr):
    """Row r of the tile -> (local sequence g, token n, validity). Token-major order puts neighbouring
    sequences in neighbouring rows (the unit-stride direction of the temporal axis in NCTHW)."""
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


@triton.jit
def _block_of_sequence(L, HEADS, BLOCK: tl.constexpr):
    """Program axis 0 -> (sequence-head index gs, sequence, head, token indices of this block, their mask).
    The blocks of one sequence are adjacent program ids, so its K/V stay hot in L2."""
    nb = tl.cdiv(L, BLOCK)
    gs = tl.program_id(0) // nb
    i = (tl.program_id(0) % nb) * BLOCK + tl.arange(0, BLOCK)
    return gs, gs // HEADS, gs % HEADS, i, i < L


@triton.jit
def _channels(start, N, BLOCK: tl.constexpr):
    """Channels start .. start + BLOCK - 1 as an int64 column [BLOCK, 1] (offsets past 2^31 stay exact)
    and its in-range mask."""
    c = start + tl.arange(0, BLOCK)
    return c[:, None].to(tl.int64), (c < N)[:, None]


@triton.jit
def _packed_softmax(Q, K, q_row, k_row, sqc, skc, g, ok, DK, qk_scale,
                    BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, PREC: tl.constexpr):
    """P = softmax(S) of one packed tile, S = scale * Q K^T with keys of other sequences masked. The
    forward and backward kernels both call this (Triton inlines it), so the backward's P is the
    forward's bit for bit. Returns (P [BLOCK_M, BLOCK_M] fp32, row max m, row sum l) in the exp2
    domain; padding rows get m = 0 and l = 1."""
    # Dk in chunks: the operand tiles stay small for any Dk
    s = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for d0 in range(0, DK, BLOCK_DK):
        d64, d_ok = _channels(d0, DK, BLOCK_DK)
        m2 = d_ok & ok[None, :]
        qT = tl.load(Q + q_row[None, :] + d64 * sqc, mask=m2, other=0.0)
        kT = tl.load(K + k_row[None, :] + d64 * skc, mask=m2, other=0.0)
        s += tl.dot(tl.trans(qT), kT, input_precision=PREC)
    same = (g[:, None] == g[None, :]) & ok[None, :]
    s = tl.where(same, s * qk_scale, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # rows with no valid key (padding rows)
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    l = tl.where(l == 0.0, 1.0, l)
    return p * (1.0 / l)[:, None], m, l


@triton.jit
def _attn3d_fwd_packed(
    Q, K, V, O, R, GAMMA, LSE,
    sqc, sqh, sqs0, sqs1, sqs2, sqt0, sqt1, sqt2,
    skc, skh, sks0, sks1, sks2, skt0, skt1, skt2,
    svc, svh, svs0, svs1, svs2, svt0, svt1, svt2,
    soc, soh, sos0, sos1, sos2, sot0, sot1, sot2,
    src, srh, srs0, srs1, srs2, srt0, srt1, srt2,
    NSEQH, HEADS, L, SN1, SN2, TN1, TN2, DK, DV, G, DV_PER_PROG, qk_scale,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr, TOKEN_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_GAMMA: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_dv = tl.program_id(1)
    g, gs, n, ok = _packed_rows(pid, G, L, NSEQH, BLOCK_M, TOKEN_MAJOR)
    seq = gs // HEADS
    head = gs % HEADS
    q_row = _base(seq, head, SN1, SN2, sqh, sqs0, sqs1, sqs2, SEQ_DIMS) + _split_off(n, TN1, TN2, sqt0, sqt1, sqt2, TOK_DIMS)
    k_row = _base(seq, head, SN1, SN2, skh, sks0, sks1, sks2, SEQ_DIMS) + _split_off(n, TN1, TN2, skt0, skt1, skt2, TOK_DIMS)
    v_row = _base(seq, head, SN1, SN2, svh, svs0, svs1, svs2, SEQ_DIMS) + _split_off(n, TN1, TN2, svt0, svt1, svt2, TOK_DIMS)
    o_row = _base(seq, head, SN1, SN2, soh, sos0, sos1, sos2, SEQ_DIMS) + _split_off(n, TN1, TN2, sot0, sot1, sot2, TOK_DIMS)

    p, m, l = _packed_softmax(Q, K, q_row, k_row, sqc, skc, g, ok, DK, qk_scale, BLOCK_M, BLOCK_DK, PREC)
    tl.store(LSE + gs.to(tl.int64) * L + n, (m + tl.log2(l)) * 0.6931471805599453, mask=ok & (pid_dv == 0))

    pv = p.to(V.dtype.element_ty)
    if HAS_GAMMA:
        gamma = tl.load(GAMMA).to(tl.float32)
    if HAS_RES:
        r_row = _base(seq, head, SN1, SN2, srh, srs0, srs1, srs2, SEQ_DIMS) + _split_off(n, TN1, TN2, srt0, srt1, srt2, TOK_DIMS)
    dv_lo = pid_dv * DV_PER_PROG
    dv_hi = tl.minimum(dv_lo + DV_PER_PROG, DV)
    for c0 in range(dv_lo, dv_hi, BLOCK_DV):
        c64, c_ok = _channels(c0, DV, BLOCK_DV)
        m2 = c_ok & ok[None, :]
        vT = tl.load(V + v_row[None, :] + c64 * svc, mask=m2, other=0.0)
        oT = tl.trans(tl.dot(pv, tl.trans(vT), input_precision=PREC))  # [BLOCK_DV, BLOCK_M]
        if HAS_GAMMA:
            oT = oT * gamma
        if HAS_RES:
            oT += tl.load(R + r_row[None, :] + c64 * src, mask=m2, other=0.0).to(tl.float32)
        tl.store(O + o_row[None, :] + c64 * soc, oT.to(O.dtype.element_ty), mask=m2)


@triton.jit
def _attn3d_bwd_packed(
    Q, K, V, DO, DQ, DK_, DV_, LSE, DELTA, GAMMA,
    sqc, sqh, sqs0, sqs1, sqs2, sqt0, sqt1, sqt2,
    skc, skh, sks0, sks1, sks2, skt0, skt1, skt2,
    svc, svh, svs0, svs1, svs2, svt0, svt1, svt2,
    sdoc, sdoh, sdos0, sdos1, sdos2, sdot0, sdot1, sdot2,
    sdqc, sdqh, sdqs0, sdqs1, sdqs2, sdqt0, sdqt1, sdqt2,
    sdkc, sdkh, sdks0, sdks1, sdks2, sdkt0, sdkt1, sdkt2,
    sdvc, sdvh, sdvs0, sdvs1, sdvs2, sdvt0, sdvt1, sdvt2,
    NSEQH, HEADS, L, SN1, SN2, TN1, TN2, DK, DV, G, qk_scale, sm_scale,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr, TOKEN_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_GAMMA: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    g, gs, n, ok = _packed_rows(pid, G, L, NSEQH, BLOCK_M, TOKEN_MAJOR)
    seq = gs // HEADS
    head = gs % HEADS
    q_row = _base(seq, head, SN1, SN2, sqh, sqs0, sqs1, sqs2, SEQ_DIMS) + _split_off(n, TN1, TN2, sqt0, sqt1, sqt2, TOK_DIMS)
    k_row = _base(seq, head, SN1, SN2, skh, sks0, sks1, sks2, SEQ_DIMS) + _split_off(n, TN1, TN2, skt0, skt1, skt2, TOK_DIMS)
    v_row = _base(seq, head, SN1, SN2, svh, svs0, svs1, svs2, SEQ_DIMS) + _split_off(n, TN1, TN2, svt0, svt1, svt2, TOK_DIMS)
    do_row = _base(seq, head, SN1, SN2, sdoh, sdos0, sdos1, sdos2, SEQ_DIMS) + _split_off(n, TN1, TN2, sdot0, sdot1, sdot2, TOK_DIMS)
    dv_row = _base(seq, head, SN1, SN2, sdvh, sdvs0, sdvs1, sdvs2, SEQ_DIMS) + _split_off(n, TN1, TN2, sdvt0, sdvt1, sdvt2, TOK_DIMS)

    # Whole rows are in the tile: redo the softmax exactly as the forward did (the same function)
    # instead of reading the fp32 lse back (whose rounding, eps * |S|, would unnormalise P at very
    # large logits).
    p, _, _ = _packed_softmax(Q, K, q_row, k_row, sqc, skc, g, ok, DK, qk_scale, BLOCK_M, BLOCK_DK, PREC)

    if HAS_GAMMA:
        gamma = tl.load(GAMMA).to(tl.float32)
    # One sweep over Dv: dP = dY V^T accumulates while each dV chunk (needs only P) is finished and stored.
    pT = tl.trans(p).to(DO.dtype.element_ty)
    dp = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for c0 in range(0, DV, BLOCK_DV):
        c64, c_ok = _channels(c0, DV, BLOCK_DV)
        m2 = c_ok & ok[None, :]
        doT = tl.load(DO + do_row[None, :] + c64 * sdoc, mask=m2, other=0.0)
        vT = tl.load(V + v_row[None, :] + c64 * svc, mask=m2, other=0.0)
        dp += tl.dot(tl.trans(doT), vT, input_precision=PREC)
        dvT = tl.trans(tl.dot(pT, tl.trans(doT), input_precision=PREC))
        if HAS_GAMMA:
            dvT = dvT * gamma
        tl.store(DV_ + dv_row[None, :] + c64 * sdvc, dvT.to(DV_.dtype.element_ty), mask=m2)
    # delta' = rowsum(P * dY V^T) = rowsum(dY * A): exact here because the whole row is in the tile.
    delta = tl.sum(p * dp, 1)
    if HAS_GAMMA:
        tl.store(DELTA + gs.to(tl.int64) * L + n, delta, mask=ok)  # summed by the host into dgamma
        ds = p * (dp - delta[:, None]) * gamma
    else:
        ds = p * (dp - delta[:, None])
    ds = ds.to(Q.dtype.element_ty)
    dsT = tl.trans(ds)

    dq_row = _base(seq, head, SN1, SN2, sdqh, sdqs0, sdqs1, sdqs2, SEQ_DIMS) + _split_off(n, TN1, TN2, sdqt0, sdqt1, sdqt2, TOK_DIMS)
    dk_row = _base(seq, head, SN1, SN2, sdkh, sdks0, sdks1, sdks2, SEQ_DIMS) + _split_off(n, TN1, TN2, sdkt0, sdkt1, sdkt2, TOK_DIMS)
    for d0 in range(0, DK, BLOCK_DK):
        d64, d_ok = _channels(d0, DK, BLOCK_DK)
        m2 = d_ok & ok[None, :]
        qT = tl.load(Q + q_row[None, :] + d64 * sqc, mask=m2, other=0.0)
        kT = tl.load(K + k_row[None, :] + d64 * skc, mask=m2, other=0.0)
        dqT = tl.trans(tl.dot(ds, tl.trans(kT), input_precision=PREC)) * sm_scale
        dkT = tl.trans(tl.dot(dsT, tl.trans(qT), input_precision=PREC)) * sm_scale
        tl.store(DQ + dq_row[None, :] + d64 * sdqc, dqT.to(DQ.dtype.element_ty), mask=m2)
        tl.store(DK_ + dk_row[None, :] + d64 * sdkc, dkT.to(DK_.dtype.element_ty), mask=m2)


# --------------------------------------------------------------------------------------------------
# flash kernels: long sequences, online softmax over key blocks
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attn3d_fwd_flash(
    Q, K, V, O, R, A, GAMMA, LSE,
    sqc, sqh, sqs0, sqs1, sqs2, sqt0, sqt1, sqt2,
    skc, skh, sks0, sks1, sks2, skt0, skt1, skt2,
    svc, svh, svs0, svs1, svs2, svt0, svt1, svt2,
    soc, soh, sos0, sos1, sos2, sot0, sot1, sot2,
    src, srh, srs0, srs1, srs2, srt0, srt1, srt2,
    sac, sah, sas0, sas1, sas2, sat0, sat1, sat2,
    HEADS, L, SN1, SN2, TN1, TN2, DK, DV, qk_scale,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_GAMMA: tl.constexpr, STORE_ATTN: tl.constexpr, PREC: tl.constexpr,
):
    gs, seq, head, mi, m_ok = _block_of_sequence(L, HEADS, BLOCK_M)
    q_base = _base(seq, head, SN1, SN2, sqh, sqs0, sqs1, sqs2, SEQ_DIMS)
    k_base = _base(seq, head, SN1, SN2, skh, sks0, sks1, sks2, SEQ_DIMS)
    v_base = _base(seq, head, SN1, SN2, svh, svs0, svs1, svs2, SEQ_DIMS)
    d64, d_ok = _channels(0, DK, BLOCK_DK)
    c64, c_ok = _channels(tl.program_id(1) * BLOCK_DV, DV, BLOCK_DV)
    pid_dv = tl.program_id(1)
    qT = tl.load(Q + q_base + _split_off(mi, TN1, TN2, sqt0, sqt1, sqt2, TOK_DIMS)[None, :] + d64 * sqc,
                 mask=d_ok & m_ok[None, :], other=0.0)
    q = tl.trans(qT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        ni = n0 + tl.arange(0, BLOCK_N)
        n_ok = ni < L
        kT = tl.load(K + k_base + _split_off(ni, TN1, TN2, skt0, skt1, skt2, TOK_DIMS)[None, :] + d64 * skc,
                     mask=d_ok & n_ok[None, :], other=0.0)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # the first block always holds key 0, so m_new is finite from the first iteration on
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vT = tl.load(V + v_base + _split_off(ni, TN1, TN2, svt0, svt1, svt2, TOK_DIMS)[None, :] + c64 * svc,
                     mask=c_ok & n_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), tl.trans(vT), input_precision=PREC)
        m_i = m_new

    acc = acc * (1.0 / l_i)[:, None]
    tl.store(LSE + gs.to(tl.int64) * L + mi, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok & (pid_dv == 0))
    accT = tl.trans(acc)
    m2 = c_ok & m_ok[None, :]
    if STORE_ATTN:
        a_off = _base(seq, head, SN1, SN2, sah, sas0, sas1, sas2, SEQ_DIMS) + _split_off(mi, TN1, TN2, sat0, sat1, sat2, TOK_DIMS)
        tl.store(A + a_off[None, :] + c64 * sac, accT.to(A.dtype.element_ty), mask=m2)
    if HAS_GAMMA:
        accT = accT * tl.load(GAMMA).to(tl.float32)
    if HAS_RES:
        r_off = _base(seq, head, SN1, SN2, srh, srs0, srs1, srs2, SEQ_DIMS) + _split_off(mi, TN1, TN2, srt0, srt1, srt2, TOK_DIMS)
        accT += tl.load(R + r_off[None, :] + c64 * src, mask=m2, other=0.0).to(tl.float32)
    o_off = _base(seq, head, SN1, SN2, soh, sos0, sos1, sos2, SEQ_DIMS) + _split_off(mi, TN1, TN2, sot0, sot1, sot2, TOK_DIMS)
    tl.store(O + o_off[None, :] + c64 * soc, accT.to(O.dtype.element_ty), mask=m2)


@triton.jit
def _attn3d_bwd_delta(
    DO, A, DELTA,
    sdoc, sdoh, sdos0, sdos1, sdos2, sdot0, sdot1, sdot2,
    sac, sah, sas0, sas1, sas2, sat0, sat1, sat2,
    HEADS, L, SN1, SN2, TN1, TN2, DV,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta'_i = sum_c dY_ic A_ic (A = attention output before the epilogue), fp32."""
    gs, seq, head, mi, m_ok = _block_of_sequence(L, HEADS, BLOCK_M)
    do_off = _base(seq, head, SN1, SN2, sdoh, sdos0, sdos1, sdos2, SEQ_DIMS) + _split_off(mi, TN1, TN2, sdot0, sdot1, sdot2, TOK_DIMS)
    a_off = _base(seq, head, SN1, SN2, sah, sas0, sas1, sas2, SEQ_DIMS) + _split_off(mi, TN1, TN2, sat0, sat1, sat2, TOK_DIMS)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, DV, BLOCK_DV):
        c64, c_ok = _channels(c0, DV, BLOCK_DV)
        m2 = c_ok & m_ok[None, :]
        doT = tl.load(DO + do_off[None, :] + c64 * sdoc, mask=m2, other=0.0).to(tl.float32)
        aT = tl.load(A + a_off[None, :] + c64 * sac, mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(doT * aT, 0)
    tl.store(DELTA + gs.to(tl.int64) * L + mi, acc, mask=m_ok)


@triton.jit
def _attn3d_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, GAMMA,
    sqc, sqh, sqs0, sqs1, sqs2, sqt0, sqt1, sqt2,
    skc, skh, sks0, sks1, sks2, skt0, skt1, skt2,
    svc, svh, svs0, svs1, svs2, svt0, svt1, svt2,
    sdoc, sdoh, sdos0, sdos1, sdos2, sdot0, sdot1, sdot2,
    sdqc, sdqh, sdqs0, sdqs1, sdqs2, sdqt0, sdqt1, sdqt2,
    HEADS, L, SN1, SN2, TN1, TN2, DK, DV, qk_scale, sm_scale,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_GAMMA: tl.constexpr, PREC: tl.constexpr,
):
    gs, seq, head, mi, m_ok = _block_of_sequence(L, HEADS, BLOCK_M)
    k_base = _base(seq, head, SN1, SN2, skh, sks0, sks1, sks2, SEQ_DIMS)
    v_base = _base(seq, head, SN1, SN2, svh, svs0, svs1, svs2, SEQ_DIMS)
    d64, d_ok = _channels(0, DK, BLOCK_DK)
    q_off = _base(seq, head, SN1, SN2, sqh, sqs0, sqs1, sqs2, SEQ_DIMS) + _split_off(mi, TN1, TN2, sqt0, sqt1, sqt2, TOK_DIMS)
    do_off = _base(seq, head, SN1, SN2, sdoh, sdos0, sdos1, sdos2, SEQ_DIMS) + _split_off(mi, TN1, TN2, sdot0, sdot1, sdot2, TOK_DIMS)
    q = tl.trans(tl.load(Q + q_off[None, :] + d64 * sqc, mask=d_ok & m_ok[None, :], other=0.0))
    lse2 = tl.load(LSE + gs.to(tl.int64) * L + mi, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + gs.to(tl.int64) * L + mi, mask=m_ok, other=0.0)
    if HAS_GAMMA:
        gamma = tl.load(GAMMA).to(tl.float32)
        delta = delta * gamma

    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        ni = n0 + tl.arange(0, BLOCK_N)
        n_ok = ni < L
        kT = tl.load(K + k_base + _split_off(ni, TN1, TN2, skt0, skt1, skt2, TOK_DIMS)[None, :] + d64 * skc,
                     mask=d_ok & n_ok[None, :], other=0.0)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        p = tl.where(n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        v_tok = v_base + _split_off(ni, TN1, TN2, svt0, svt1, svt2, TOK_DIMS)[None, :]
        # dP = dY V^T over Dv chunks (one for narrow Dv; the dY chunk re-reads hit L1/L2)
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, DV, BLOCK_DV):
            cc64, cc_ok = _channels(c0, DV, BLOCK_DV)
            doT_c = tl.load(DO + do_off[None, :] + cc64 * sdoc, mask=cc_ok & m_ok[None, :], other=0.0)
            vT_c = tl.load(V + v_tok + cc64 * svc, mask=cc_ok & n_ok[None, :], other=0.0)
            dp += tl.dot(tl.trans(doT_c), vT_c, input_precision=PREC)
        if HAS_GAMMA:
            dp = dp * gamma
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(K.dtype.element_ty), tl.trans(kT), input_precision=PREC)
    dq = dq * sm_scale
    dq_off = _base(seq, head, SN1, SN2, sdqh, sdqs0, sdqs1, sdqs2, SEQ_DIMS) + _split_off(mi, TN1, TN2, sdqt0, sdqt1, sdqt2, TOK_DIMS)
    tl.store(DQ + dq_off[None, :] + d64 * sdqc, tl.trans(dq).to(DQ.dtype.element_ty), mask=d_ok & m_ok[None, :])


@triton.jit
def _dkdv_tile(
    Q, K, V, DO, DK_, DV_, LSE, DELTA, GAMMA,
    sqc, sqt0, sqt1, sqt2, skc, skt0, skt1, skt2, svc, svt0, svt1, svt2,
    sdoc, sdot0, sdot1, sdot2, sdkc, sdkt0, sdkt1, sdkt2, sdvc, sdvt0, sdvt1, sdvt2,
    q_base, k_base, v_base, do_base, dk_base, dv_base, gs, pid_n, dv_block,
    L, TN1, TN2, DK, DV, qk_scale, sm_scale,
    TOK_DIMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, ONE_DV_CHUNK: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
    HAS_GAMMA: tl.constexpr, PREC: tl.constexpr,
):
    ni = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ni < L
    d64, d_ok = _channels(0, DK, BLOCK_DK)
    c64, c_ok = _channels(dv_block * BLOCK_DV, DV, BLOCK_DV)
    k_off = k_base + _split_off(ni, TN1, TN2, skt0, skt1, skt2, TOK_DIMS)
    v_off = v_base + _split_off(ni, TN1, TN2, svt0, svt1, svt2, TOK_DIMS)
    k = tl.trans(tl.load(K + k_off[None, :] + d64 * skc, mask=d_ok & n_ok[None, :], other=0.0))  # [BN, BDK]
    if HAS_GAMMA:
        gamma = tl.load(GAMMA).to(tl.float32)
    if COMPUTE_DK and ONE_DV_CHUNK:
        v = tl.trans(tl.load(V + v_off[None, :] + c64 * svc, mask=c_ok & n_ok[None, :], other=0.0))  # [BN, BDV]

    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for m0 in range(0, L, BLOCK_M):
        mi = m0 + tl.arange(0, BLOCK_M)
        m_ok = mi < L
        q_tok = q_base + _split_off(mi, TN1, TN2, sqt0, sqt1, sqt2, TOK_DIMS)[None, :]
        do_tok = do_base + _split_off(mi, TN1, TN2, sdot0, sdot1, sdot2, TOK_DIMS)[None, :]
        qT = tl.load(Q + q_tok + d64 * sqc, mask=d_ok & m_ok[None, :], other=0.0)
        lse2 = tl.load(LSE + gs.to(tl.int64) * L + mi, mask=m_ok, other=0.0) * 1.4426950408889634
        sT = tl.dot(k, qT, input_precision=PREC) * qk_scale                          # [BN, BM]
        pT = tl.where(m_ok[None, :], tl.exp2(sT - lse2[None, :]), 0.0)
        if COMPUTE_DV or ONE_DV_CHUNK:
            doT = tl.load(DO + do_tok + c64 * sdoc, mask=c_ok & m_ok[None, :], other=0.0)  # [BDV, BM]
        if COMPUTE_DV:
            dv += tl.dot(pT.to(DO.dtype.element_ty), tl.trans(doT), input_precision=PREC)
        if COMPUTE_DK:
            if ONE_DV_CHUNK:
                dpT = tl.dot(v, doT, input_precision=PREC)
            else:
                dpT = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for c0 in range(0, DV, BLOCK_DV):
                    cc64, cc_ok = _channels(c0, DV, BLOCK_DV)
                    vT_c = tl.load(V + v_off[None, :] + cc64 * svc, mask=cc_ok & n_ok[None, :], other=0.0)
                    doT_c = tl.load(DO + do_tok + cc64 * sdoc, mask=cc_ok & m_ok[None, :], other=0.0)
                    dpT += tl.dot(tl.trans(vT_c), doT_c, input_precision=PREC)
            delta = tl.load(DELTA + gs.to(tl.int64) * L + mi, mask=m_ok, other=0.0)
            if HAS_GAMMA:
                dsT = pT * (dpT - delta[None, :]) * gamma
            else:
                dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(Q.dtype.element_ty), tl.trans(qT), input_precision=PREC)
    if COMPUTE_DK:
        dk_off = dk_base + _split_off(ni, TN1, TN2, sdkt0, sdkt1, sdkt2, TOK_DIMS)
        tl.store(DK_ + dk_off[None, :] + d64 * sdkc, tl.trans(dk * sm_scale).to(DK_.dtype.element_ty),
                 mask=d_ok & n_ok[None, :])
    if COMPUTE_DV:
        if HAS_GAMMA:
            dv = dv * gamma
        dv_off = dv_base + _split_off(ni, TN1, TN2, sdvt0, sdvt1, sdvt2, TOK_DIMS)
        tl.store(DV_ + dv_off[None, :] + c64 * sdvc, tl.trans(dv).to(DV_.dtype.element_ty), mask=c_ok & n_ok[None, :])


@triton.jit
def _attn3d_bwd_dkdv(
    Q, K, V, DO, DK_, DV_, LSE, DELTA, GAMMA,
    sqc, sqh, sqs0, sqs1, sqs2, sqt0, sqt1, sqt2,
    skc, skh, sks0, sks1, sks2, skt0, skt1, skt2,
    svc, svh, svs0, svs1, svs2, svt0, svt1, svt2,
    sdoc, sdoh, sdos0, sdos1, sdos2, sdot0, sdot1, sdot2,
    sdkc, sdkh, sdks0, sdks1, sdks2, sdkt0, sdkt1, sdkt2,
    sdvc, sdvh, sdvs0, sdvs1, sdvs2, sdvt0, sdvt1, sdvt2,
    HEADS, L, SN1, SN2, TN1, TN2, DK, DV, qk_scale, sm_scale,
    SEQ_DIMS: tl.constexpr, TOK_DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    ONE_DV_CHUNK: tl.constexpr, HAS_GAMMA: tl.constexpr, PREC: tl.constexpr,
):
    """One program per key block. dk needs the full dP = dO V^T (all of Dv), dv only its own Dv block.
    Dv <= BLOCK_DV: each program computes both. Wider: grid dim 1 has 1 + n_dv_blocks programs per key
    block; program 0 computes dk (summing dP over Dv chunks), program j >= 1 the dv of Dv block j - 1."""
    nb = tl.cdiv(L, BLOCK_N)
    pid_n = tl.program_id(0) % nb
    gs = tl.program_id(0) // nb
    pid_dv = tl.program_id(1)
    seq = gs // HEADS
    head = gs % HEADS
    q_base = _base(seq, head, SN1, SN2, sqh, sqs0, sqs1, sqs2, SEQ_DIMS)
    k_base = _base(seq, head, SN1, SN2, skh, sks0, sks1, sks2, SEQ_DIMS)
    v_base = _base(seq, head, SN1, SN2, svh, svs0, svs1, svs2, SEQ_DIMS)
    do_base = _base(seq, head, SN1, SN2, sdoh, sdos0, sdos1, sdos2, SEQ_DIMS)
    dk_base = _base(seq, head, SN1, SN2, sdkh, sdks0, sdks1, sdks2, SEQ_DIMS)
    dv_base = _base(seq, head, SN1, SN2, sdvh, sdvs0, sdvs1, sdvs2, SEQ_DIMS)
    if ONE_DV_CHUNK:
        _dkdv_tile(Q, K, V, DO, DK_, DV_, LSE, DELTA, GAMMA,
                   sqc, sqt0, sqt1, sqt2, skc, skt0, skt1, skt2, svc, svt0, svt1, svt2,
                   sdoc, sdot0, sdot1, sdot2, sdkc, sdkt0, sdkt1, sdkt2, sdvc, sdvt0, sdvt1, sdvt2,
                   q_base, k_base, v_base, do_base, dk_base, dv_base, gs, pid_n, 0,
                   L, TN1, TN2, DK, DV, qk_scale, sm_scale,
                   TOK_DIMS, BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DV, True, True, True, HAS_GAMMA, PREC)
    elif pid_dv == 0:
        _dkdv_tile(Q, K, V, DO, DK_, DV_, LSE, DELTA, GAMMA,
                   sqc, sqt0, sqt1, sqt2, skc, skt0, skt1, skt2, svc, svt0, svt1, svt2,
                   sdoc, sdot0, sdot1, sdot2, sdkc, sdkt0, sdkt1, sdkt2, sdvc, sdvt0, sdvt1, sdvt2,
                   q_base, k_base, v_base, do_base, dk_base, dv_base, gs, pid_n, 0,
                   L, TN1, TN2, DK, DV, qk_scale, sm_scale,
                   TOK_DIMS, BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DV, False, True, False, HAS_GAMMA, PREC)
    else:
        _dkdv_tile(Q, K, V, DO, DK_, DV_, LSE, DELTA, GAMMA,
                   sqc, sqt0, sqt1, sqt2, skc, skt0, skt1, skt2, svc, svt0, svt1, svt2,
                   sdoc, sdot0, sdot1, sdot2, sdkc, sdkt0, sdkt1, sdkt2, sdvc, sdvt0, sdvt1, sdvt2,
                   q_base, k_base, v_base, do_base, dk_base, dv_base, gs, pid_n, pid_dv - 1,
                   L, TN1, TN2, DK, DV, qk_scale, sm_scale,
                   TOK_DIMS, BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DV, False, False, True, HAS_GAMMA, PREC)


# --------------------------------------------------------------------------------------------------
# host side: layout analysis, block-configuration tables, launchers
# --------------------------------------------------------------------------------------------------

# Position dims (indices into [B, D, T, H, W]) that form a sequence / the tokens of a sequence.
_AXIS_DIMS = {"spatial": ((0, 2), (3, 4)), "temporal": ((0, 3, 4), (2,)), "full": ((0,), (2, 3, 4))}


def seq_count_and_length(shape, axis: str) -> tuple[int, int]:
    """(number of sequences, tokens per sequence) of a [B, D, T, H, W] map for ``axis``."""
    seq_pos, tok_pos = _AXIS_DIMS[axis]
    return math.prod(shape[p] for p in seq_pos), math.prod(shape[p] for p in tok_pos)


def _desc_5d(x: torch.Tensor, head_dim: int):
    """(channel stride, head stride, {position dim: stride}) of a [B, D, T, H, W] tensor."""
    st = x.stride()
    return st[1], head_dim * st[1], {0: st[0], 2: st[2], 3: st[3], 4: st[4]}


def _desc_seq(shape, axis: str, heads: int, d: int):
    """Same for a contiguous "sequence layout" tensor [sequences, heads, L, d] (the saved attention
    output), expressed in the position dims of the 5-D map it came from."""
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
    return 1, L * d, strides


def _merge(shape, pos, descs):
    """Drop size-1 dims and merge neighbours whose strides chain in every tensor -> [(size, strides)]."""
    merged = []
    for p in pos:
        size = shape[p]
        if size == 1:
            continue
        st = [ds[2][p] for ds in descs]
        if merged and all(prev == size * s for prev, s in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * size, st)
        else:
            merged.append((size, st))
    return merged or [(1, [0] * len(descs))]


@dataclasses.dataclass
class _Geometry:
    seq_dims: int
    tok_dims: int
    sizes: tuple  # (SN1, SN2, TN1, TN2)
    strides: list  # per tensor: (sc, sh, s0, s1, s2, t0, t1, t2)


def _geometry(shape, axis: str, descs) -> _Geometry:
    seq_pos, tok_pos = _AXIS_DIMS[axis]
    sq, tk = _merge(shape, seq_pos, descs), _merge(shape, tok_pos, descs)
    strides = []
    for i, (sc, sh, _) in enumerate(descs):
        s = [st[i] for _, st in sq] + [0] * (3 - len(sq))
        t = [st[i] for _, st in tk] + [0] * (3 - len(tk))
        strides.append((sc, sh, *s, *t))
    sz = lambda m, j: m[j][0] if len(m) > j else 1  # noqa: E731
    return _Geometry(len(sq), len(tk), (sz(sq, 1), sz(sq, 2), sz(tk, 1), sz(tk, 2)), strides)


def _flat(geo: _Geometry):
    return [s for st in geo.strides for s in st]


# ---- block configurations: data, one row per (arch family, element size) --------------------------
# UNMEASURED on GPUs: chosen from tile arithmetic and the compile check (no register spills, shared
# memory within the arch's limit, for the generic-stride build: the kernels index by arbitrary strides,
# so every element of a tile carries its own 64-bit address unless Triton specialises a unit stride,
# which is why the tiles are smaller and the warps more than in contiguous-layout attention kernels).
# `benchmarks/attn3d.py` prints the entry that ran so the tables can be tuned from measurements.
# sm_75 runs tl.dot on FFMA for every dtype, so it gets the fp32 (FFMA) tiles and packs fewer
# sequences per tile: the block-diagonal waste of packing costs real FFMA time there, while on
# tensor-core archs it fills otherwise idle MMA cycles.

# (family, bits) -> (BLOCK_M, BLOCK_DK, BLOCK_DV, num_warps, num_stages); L <= BLOCK_M runs packed (the
# packed kernels loop over Dk and Dv in chunks, so any head width fits: the flash kernels hold a whole
# Dk tile and stop at MAX_HEAD_DIM). 64 rows everywhere, so the AVA head's 7x7 = 49-token frames run
# packed whatever Dk. The FFMA tiles (sm_75, and fp32 on every arch) take 16-wide chunks: with 32-wide
# ones the sm_75 fp16 backward needs 255 registers and spills 192-464 bytes (compile_check); 16-wide:
# 128-172 (fwd) / 124-195 (bwd) registers and no spill on sm_75/80/90.
PACKED_CONFIGS = {
    (75, 16): (64, 16, 16, 8, 1), (75, 32): (64, 16, 16, 8, 1),
    (80, 16): (64, 32, 64, 8, 2), (80, 32): (64, 16, 16, 8, 1),
    (90, 16): (64, 32, 64, 8, 2), (90, 32): (64, 16, 16, 8, 1),
}
# (family, bits) -> padded head dim BLOCK_DK -> (forward tile, backward tile), each
# (BLOCK_M, BLOCK_N, BLOCK_DV, num_warps, num_stages)
_MMA16 = {64: ((64, 64, 64, 8, 2), (64, 32, 64, 8, 2)),
          128: ((64, 64, 64, 8, 2), (32, 32, 64, 8, 2)),
          256: ((64, 32, 64, 8, 2), (32, 16, 64, 8, 2))}
_FFMA16 = {64: ((64, 32, 32, 8, 1), (32, 16, 32, 8, 1)),   # sm_75: fp16/bf16 converted to fp32 for FFMA
           128: ((64, 32, 32, 8, 1), (16, 32, 32, 8, 1)),
           256: ((32, 32, 32, 8, 1), (16, 16, 32, 8, 1))}
_FFMA32 = {64: ((64, 32, 32, 8, 1), (32, 16, 32, 8, 1)),
           128: ((32, 16, 32, 8, 1), (32, 16, 32, 8, 1)),
           256: ((32, 32, 32, 8, 1), (32, 16, 32, 8, 1))}
# ptxas on sm_90 caps this dk/dv kernel at 128 registers and spills with (32, 16); (16, 32) fits
_FFMA32_SM90 = {**_FFMA32, 128: ((32, 16, 32, 8, 1), (16, 32, 32, 8, 1))}
FLASH_CONFIGS = {
    (75, 16): _FFMA16, (75, 32): _FFMA32,
    (80, 16): _MMA16, (80, 32): _FFMA32,
    (90, 16): _MMA16, (90, 32): _FFMA32_SM90,
}
MAX_HEAD_DIM = 256  # q/k channels per head the flash kernels take in one tile
DELTA_TILE = (64, 64, 4)  # delta pre-pass: (BLOCK_M, BLOCK_DV, num_warps), every arch and dtype
# A packed forward with fewer programs than this splits Dv over a second grid dimension (each split
# recomputes the tiny packed softmax) to fill the GPU.
MIN_PROGRAMS = 256


def arch_family(cc: int) -> int:
    return 90 if cc >= 90 else 80 if cc >= 80 else 75


def _pow2(x: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(x))


@dataclasses.dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    block_dv: int
    num_warps: int
    num_stages: int


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
    bm, bdk, bdv, w, st = PACKED_CONFIGS[(fam, bits)]
    if L <= bm:
        t = Tile(bm, bm, bdv, w, st)
        return Plan("packed", fam, bits, bdk, t, t)
    if dk > MAX_HEAD_DIM:
        return None
    bdk = _pow2(dk, 64)  # head dims below 64 are padded: QK^T is rarely the cost next to PV
    fwd, bwd = FLASH_CONFIGS[(fam, bits)][bdk]
    return Plan("flash", fam, bits, bdk, Tile(*fwd), Tile(*bwd))


def _precision(dtype: torch.dtype, fam: int) -> str:
    # fp32 inputs get exact fp32 products (torch.matmul's default contract, allow_tf32=False); the
    # tensor-core paths are fp16/bf16. A TF32 variant would double the fp32 configurations to compile.
    return "ieee"


# ---- launchers --------------------------------------------------------------------------------------


def forward(q, k, v, axis: str, heads: int, scale: float, residual, gamma, p: Plan):
    """Launch the forward. Returns (out [B, Dv, T, H, W] laid out like v, lse [N, heads, L] fp32,
    attn [N, heads, L, Dv/heads] or None). ``attn`` (the pre-epilogue output) is written only by the
    flash family when residual/gamma are present: its backward takes delta from it."""
    B, Dk, T, H, W = q.shape
    Dv = v.shape[1]
    dk, dv = Dk // heads, Dv // heads
    nseq, L = seq_count_and_length(q.shape, axis)
    out = torch.empty_like(v)
    lse = torch.empty((nseq, heads, L), device=q.device, dtype=torch.float32)
    store_attn = p.kind == "flash" and (residual is not None or gamma is not None)
    attn = torch.empty((nseq, heads, L, dv), device=q.device, dtype=v.dtype) if store_attn else None
    if out.numel() == 0 or q.numel() == 0:
        if out.numel():
            out.zero_() if residual is None else out.copy_(residual)
        if attn is not None:
            attn.zero_()
        return out, lse.zero_(), attn
    res = residual if residual is not None else out
    descs = [_desc_5d(q, dk), _desc_5d(k, dk), _desc_5d(v, dv), _desc_5d(out, dv), _desc_5d(res, dv)]
    if p.kind == "flash":
        descs.append(_desc_seq(q.shape, axis, heads, dv) if store_attn else _desc_5d(out, dv))
    geo = _geometry(q.shape, axis, descs)
    nseqh = nseq * heads
    qk_scale = scale * LOG2E
    g = gamma if gamma is not None else lse
    t = p.fwd
    common = dict(SEQ_DIMS=geo.seq_dims, TOK_DIMS=geo.tok_dims, BLOCK_DK=p.block_dk, BLOCK_DV=t.block_dv,
                  HAS_RES=residual is not None, HAS_GAMMA=gamma is not None, PREC=_precision(q.dtype, p.family),
                  num_warps=t.num_warps, num_stages=t.num_stages)
    if p.kind == "packed":
        G = max(1, t.block_m // L)
        n_prog = triton.cdiv(nseqh, G)
        n_chunks = triton.cdiv(dv, t.block_dv)
        groups = min(n_chunks, max(1, triton.cdiv(MIN_PROGRAMS, n_prog)))
        per_prog = triton.cdiv(n_chunks, groups) * t.block_dv
        groups = triton.cdiv(dv, per_prog)
        # token-major rows when neighbouring sequences are closer in memory than neighbouring tokens
        sq, tk = geo.strides[0][2 + geo.seq_dims - 1], geo.strides[0][5 + geo.tok_dims - 1]
        token_major = G > 1 and abs(sq) < abs(tk)
        _attn3d_fwd_packed[(n_prog, groups)](
            q, k, v, out, res, g, lse, *_flat(geo)[:40],
            nseqh, heads, L, *geo.sizes, dk, dv, G, per_prog, qk_scale,
            TOKEN_MAJOR=token_major, BLOCK_M=t.block_m, **common)
    else:
        a = attn if attn is not None else out
        grid = (triton.cdiv(L, t.block_m) * nseqh, triton.cdiv(dv, t.block_dv))
        _attn3d_fwd_flash[grid](
            q, k, v, out, res, a, g, lse, *_flat(geo),
            heads, L, *geo.sizes, dk, dv, qk_scale,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, STORE_ATTN=store_attn, **common)
    return out, lse, attn


def backward(grad_out, q, k, v, o, lse, axis: str, heads: int, scale: float, gamma, p: Plan):
    """Launch the backward. ``o`` is what delta is taken from on the flash path: the output itself
    (no epilogue) or the saved attention ``[N, heads, L, dv]``; ignored by the packed kernel.
    Returns (dq, dk, dv, dgamma or None); dresidual is grad_out itself."""
    B, Dk, T, H, W = q.shape
    Dv = v.shape[1]
    dk, dv = Dk // heads, Dv // heads
    nseq, L = seq_count_and_length(q.shape, axis)
    nseqh = nseq * heads
    dq, dk_, dv_ = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.zeros((nseq, heads, L), device=q.device, dtype=torch.float32)
    if q.numel() == 0 or v.numel() == 0:
        dq.zero_(), dk_.zero_(), dv_.zero_()
        return dq, dk_, dv_, (delta.sum() if gamma is not None else None)
    g = gamma if gamma is not None else lse
    qk_scale = scale * LOG2E
    prec = _precision(q.dtype, p.family)
    t = p.bwd
    if p.kind == "packed":
        descs = [_desc_5d(t, d) for t, d in ((q, dk), (k, dk), (v, dv), (grad_out, dv), (dq, dk), (dk_, dk), (dv_, dv))]
        geo = _geometry(q.shape, axis, descs)
        G = max(1, t.block_m // L)
        sq, tk = geo.strides[0][2 + geo.seq_dims - 1], geo.strides[0][5 + geo.tok_dims - 1]
        _attn3d_bwd_packed[(triton.cdiv(nseqh, G),)](
            q, k, v, grad_out, dq, dk_, dv_, lse, delta, g, *_flat(geo),
            nseqh, heads, L, *geo.sizes, dk, dv, G, qk_scale, scale,
            SEQ_DIMS=geo.seq_dims, TOK_DIMS=geo.tok_dims, TOKEN_MAJOR=G > 1 and abs(sq) < abs(tk),
            BLOCK_M=t.block_m, BLOCK_DK=p.block_dk, BLOCK_DV=t.block_dv,
            HAS_GAMMA=gamma is not None, PREC=prec, num_warps=t.num_warps, num_stages=t.num_stages)
    else:
        o_desc = _desc_seq(q.shape, axis, heads, dv) if o.dim() == 4 else _desc_5d(o, dv)
        descs = [_desc_5d(t, d) for t, d in ((q, dk), (k, dk), (v, dv), (grad_out, dv), (dq, dk), (dk_, dk), (dv_, dv))]
        geo = _geometry(q.shape, axis, descs + [o_desc])
        st = geo.strides
        flat = lambda idx: [s for i in idx for s in st[i]]  # noqa: E731
        meta = dict(SEQ_DIMS=geo.seq_dims, TOK_DIMS=geo.tok_dims)
        _attn3d_bwd_delta[(triton.cdiv(L, DELTA_TILE[0]) * nseqh,)](
            grad_out, o, delta, *flat([3, 7]), heads, L, *geo.sizes, dv,
            BLOCK_M=DELTA_TILE[0], BLOCK_DV=DELTA_TILE[1], num_warps=DELTA_TILE[2], num_stages=2, **meta)
        one = dv <= t.block_dv
        blocks = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_DK=p.block_dk, BLOCK_DV=t.block_dv,
                      HAS_GAMMA=gamma is not None, PREC=prec, num_warps=t.num_warps, num_stages=t.num_stages,
                      **meta)
        _attn3d_bwd_dq[(triton.cdiv(L, t.block_m) * nseqh,)](
            q, k, v, grad_out, dq, lse, delta, g, *flat([0, 1, 2, 3, 4]),
            heads, L, *geo.sizes, dk, dv, qk_scale, scale, **blocks)
        n_blocks = triton.cdiv(L, t.block_n) * nseqh
        args = (q, k, v, grad_out, dk_, dv_, lse, delta, g, *flat([0, 1, 2, 3, 5, 6]),
                heads, L, *geo.sizes, dk, dv, qk_scale, scale)
        _attn3d_bwd_dkdv[(n_blocks, 1 if one else 1 + triton.cdiv(dv, t.block_dv))](*args, ONE_DV_CHUNK=one, **blocks)
    dgamma = delta.sum() if gamma is not None else None
    return dq, dk_, dv_, dgamma


# ---- ahead-of-time compile specs --------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_FLOAT_ARGS = {"qk_scale", "sm_scale"}
_DATA_PTRS = {"Q", "K", "V", "O", "R", "A", "DO", "DQ", "DK_", "DV_"}
_FP32_PTRS = {"LSE", "DELTA", "GAMMA"}


def _spec(fn, name: str, config: str, dtype: str, constexprs: dict, num_warps: int, num_stages: int):
    from ..compile_check import KernelSpec

    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in _FP32_PTRS:
            sig[a] = "*fp32"
        elif a in _DATA_PTRS:
            sig[a] = f"*{dtype}"
        elif a in _FLOAT_ARGS:
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    # torch allocations are 16-byte aligned, which Triton's JIT sees and specialises on; strides are
    # left unspecialised (the generic-layout build, the heaviest in registers)
    attrs = {a: 16 for a in fn.arg_names if a in _DATA_PTRS or a in _FP32_PTRS}
    return KernelSpec(name=name, config=config, fn=fn, signature=sig, constexprs=constexprs,
                      num_warps=num_warps, num_stages=num_stages, attrs=attrs)


def compile_specs(cc: int):
    """Every kernel configuration ``plan`` can pick on compute capability ``cc``: each tile of each
    kernel (packed forward/backward, flash forward, delta, dq, dk/dv narrow and wide-Dv) for fp16, bf16
    and fp32. Index/epilogue switches are compiled at their most register-hungry setting (3-dim
    sequence and token indexing with no unit stride, residual + gamma + saved attention)."""
    fam = arch_family(cc)
    idx = dict(SEQ_DIMS=3, TOK_DIMS=3, PREC="ieee")
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        bits = 32 if dt == "fp32" else 16
        bm, bdk, bdv, w, st = PACKED_CONFIGS[(fam, bits)]
        cfg = f"{dt} BM={bm} BDK={bdk} BDV={bdv} w{w}"
        ce = dict(idx, TOKEN_MAJOR=True, BLOCK_M=bm, BLOCK_DK=bdk, BLOCK_DV=bdv, HAS_GAMMA=True)
        specs.append(_spec(_attn3d_fwd_packed, "attn3d_fwd_packed", cfg, dt, dict(ce, HAS_RES=True), w, st))
        specs.append(_spec(_attn3d_bwd_packed, "attn3d_bwd_packed", cfg, dt, ce, w, st))
        dbm, dbdv, dw = DELTA_TILE
        specs.append(_spec(_attn3d_bwd_delta, "attn3d_bwd_delta", f"{dt} BM={dbm} BDV={dbdv} w{dw}", dt,
                           dict(SEQ_DIMS=3, TOK_DIMS=3, BLOCK_M=dbm, BLOCK_DV=dbdv), dw, 2))
        for bdk, (fwd, bwd) in FLASH_CONFIGS[(fam, bits)].items():
            fbm, fbn, fbdv, fw, fst = fwd
            cfg = f"{dt} BM={fbm} BN={fbn} BDK={bdk} BDV={fbdv} w{fw}"
            ce = dict(idx, BLOCK_M=fbm, BLOCK_N=fbn, BLOCK_DK=bdk, BLOCK_DV=fbdv, HAS_GAMMA=True)
            specs.append(_spec(_attn3d_fwd_flash, "attn3d_fwd_flash", cfg, dt,
                               dict(ce, HAS_RES=True, STORE_ATTN=True), fw, fst))
            bbm, bbn, bbdv, bw, bst = bwd
            cfg = f"{dt} BM={bbm} BN={bbn} BDK={bdk} BDV={bbdv} w{bw}"
            ce = dict(idx, BLOCK_M=bbm, BLOCK_N=bbn, BLOCK_DK=bdk, BLOCK_DV=bbdv, HAS_GAMMA=True)
            specs.append(_spec(_attn3d_bwd_dq, "attn3d_bwd_dq", cfg, dt, ce, bw, bst))
            for one in (True, False):
                specs.append(_spec(_attn3d_bwd_dkdv, "attn3d_bwd_dkdv", cfg + (" Dv<=BDV" if one else " wide-Dv"), dt,
                                   dict(ce, ONE_DV_CHUNK=one), bw, bst))
    return specs
