"""Triton kernels of ``temporal_proj``: several temporal (kt x 1 x 1) convolutions of one input as
one implicit GEMM, forward and backward.

Math. Projection ``i`` has weight ``W_i[N_i, C, kt_i]`` (a Conv3d weight without its 1x1 spatial
dims), ``p_i = kt_i // 2``, and for every position ``m = (b, t, h, w)``

    Y[m, col_i + n] = bias[col_i + n] + sum_{j < kt_i} sum_c W_i[n, c, j] * x[b, c, t + j - p_i, h, w]

with zero for ``t + j - p_i`` outside ``[0, T)``. Over all projections this is one GEMM
``Y[M, sum N] = sum_taps X_tap[M, C] @ W_tap[C, N]`` with ``M = B*T*H*W`` rows; a tap only shifts the
rows of ``x`` by ``(j - p_i) * H*W``, so nothing is materialised (no im2col).

Operand layouts (built by ``stssa_kernels.ops.temporal_proj``):

* ``x`` with any strides; the launcher hands channels-last memory ``[B, T, H, W, C]`` to the kernel
  (copying if needed) because then the GEMM's reduction dim C is contiguous and loads vectorise.
* packed weight ``WP[R, C]``, ``R = sum_i kt_i * N_i``: row ``row_i + j * N_i + n`` holds
  ``W_i[n, :, j]``, i.e. every tap of every projection is a K-contiguous ``[N_i, C]`` block, the
  nn.Linear layout, which serves as the B operand of the forward (K-major) and of grad-x (N-major).
* packed output ``Y[M, sum N]`` row-major = ``[B, T, H, W, sum N]``: each projection's output is a
  column slice, i.e. per position one contiguous channel vector (the row-major GEMM result, stored
  with 16-byte vectors; attention reads tokens' channel vectors from it).

Padded-tap FLOPs. Concatenating every weight zero-padded to the largest kt (one conv with a
``[sum N, C, 7]`` weight) would spend ``7 * sum N`` tap-GEMMs where ``sum_i kt_i N_i`` are needed:
1.75x the work for STSSA's three 7-tap + three 1-tap projections of equal width. Here every output
tile belongs to one projection (tiles never straddle projections, see ``_fwd_tiles``) and loops over
that projection's own taps only; grad-x loops per projection over its own taps; grad-W has one tile
row per (projection, tap). The centre tap's x tile is read by the tiles of every projection.

Memory-traffic floor (forward): read x once (M*C), the weights once (R*C), write Y once (M*sum N);
FLOPs 2*M*C*R. The grouped tile order (GROUP_M) keeps the x rows of a group of M tiles in L2 while
the N tiles sweep over them, so DRAM traffic stays near that floor. Backward: grad-x is the
transposed implicit GEMM (reduction over (projection, tap, n)), grad-W a GEMM with the reduction over
all M positions per (projection, tap); grad-bias is a column sum of dY done by torch in the ops layer.

All kernels accumulate in fp32 and store in the output dtype. Offsets that can pass 2**31 (anything
multiplied by a stride or by a row length) are computed in int64.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from ._launch import LAUNCH_OPTIONS, on_tensor_device

# Size arguments that only enter index math or row masks: the JIT need not compile "== 1" / "% 16"
# variants of them. C and NTOT stay specialised (their divisibility lets K-contiguous loads vectorise).
_NO_SPECIALISE = ["M", "T", "H", "W", "num_n_tiles", "num_proj", "num_w_tiles"]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M consecutive M tiles sweep all N tiles before the next group, so
    the A rows of a group are reused from L2 (Triton matmul tutorial order)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _positions(offs_m, T, H, W, s_b, s_t, s_h, s_w):
    """Element offsets (int64) of positions m = ((b*T + t)*H + h)*W + w in a strided 5-D tensor, and t."""
    w = offs_m % W
    h = (offs_m // W) % H
    t = (offs_m // (W * H)) % T
    b = offs_m // (W * H * T)
    off = b.to(tl.int64) * s_b + t.to(tl.int64) * s_t + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w
    return off, t


@triton.jit(do_not_specialize=_NO_SPECIALISE)
def _temporal_proj_fwd_kernel(
    X, WP, BIAS, Y, NTILES,
    M, C, T, H, W, NTOT, num_n_tiles,
    s_xb, s_xt, s_xh, s_xw,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, ALIGN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Y[m, col + n] for one (BLOCK_M positions) x (BLOCK_N channels of one projection) tile.

    NTILES[pid_n] = (row_i, n_start, N_i, kt_i, col_i) describes the tile's projection.
    """
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_n_tiles, GROUP_M)
    tab = NTILES + pid_n * 5
    row_i = tl.load(tab)
    n_start = tl.multiple_of(tl.load(tab + 1), ALIGN)
    n_i = tl.multiple_of(tl.load(tab + 2), ALIGN)
    kt = tl.load(tab + 3)
    col_i = tl.multiple_of(tl.load(tab + 4), ALIGN)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < n_i
    x_row, t = _positions(offs_m, T, H, W, s_xb, s_xt, s_xh, s_xw)
    w_row = (row_i + offs_n).to(tl.int64) * C  # tap 0 of this projection

    # One flat loop over (tap, K block) rather than two nested loops: the software pipeliner only
    # overlaps loads with MMAs inside one loop, and C/BLOCK_K alone can be short (C=256 -> 4).
    k_tiles = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, kt * k_tiles):
        j = it // k_tiles
        k0 = (it - j * k_tiles) * BLOCK_K
        dt = j - kt // 2
        t_in = t + dt
        a_ok = m_ok & (t_in >= 0) & (t_in < T)  # zero padding in time
        k_ok = (k0 + offs_k) < C
        a = tl.load(X + (x_row + dt.to(tl.int64) * s_xt)[:, None] + (k0 + offs_k)[None, :],
                    mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(WP + (w_row + (j * n_i).to(tl.int64) * C)[None, :] + (k0 + offs_k)[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + col_i + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = Y + offs_m.to(tl.int64)[:, None] * NTOT + (col_i + offs_n)[None, :]
    tl.store(y, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=_NO_SPECIALISE)
def _temporal_proj_bwd_dx_kernel(
    DY, WP, DX, PROJ,
    M, C, T, H, W, NTOT, num_proj,
    s_db, s_dt, s_dh, s_dw,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, ALIGN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """grad_x[m, c] = sum_i sum_j sum_n dY[m - (j - p_i)*H*W, col_i + n] * W_i[n, c, j].

    PROJ[i] = (row_i, N_i, kt_i, col_i). Rows whose source time t - (j - p_i) falls outside [0, T)
    correspond to padding taps of the forward and contribute nothing.
    """
    pid_m, pid_c = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C, BLOCK_C), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    c_ok = offs_c < C
    HW = H * W
    t = (offs_m // HW) % T

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for p in range(0, num_proj):
        row_i = tl.load(PROJ + p * 4)
        n_i = tl.multiple_of(tl.load(PROJ + p * 4 + 1), ALIGN)
        kt = tl.load(PROJ + p * 4 + 2)
        col_i = tl.multiple_of(tl.load(PROJ + p * 4 + 3), ALIGN)
        k_tiles = tl.cdiv(n_i, BLOCK_K)
        for it in range(0, kt * k_tiles):
            j = it // k_tiles
            n0 = (it - j * k_tiles) * BLOCK_K
            dt = j - kt // 2
            t_src = t - dt
            a_ok = m_ok & (t_src >= 0) & (t_src < T)
            k_ok = (n0 + offs_k) < n_i
            a = tl.load(DY + (offs_m - dt * HW).to(tl.int64)[:, None] * NTOT + (col_i + n0 + offs_k)[None, :],
                        mask=a_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(WP + (row_i + j * n_i + n0 + offs_k).to(tl.int64)[:, None] * C + offs_c[None, :],
                        mask=k_ok[:, None] & c_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    dx_row, _ = _positions(offs_m, T, H, W, s_db, s_dt, s_dh, s_dw)
    dx = DX + dx_row[:, None] + offs_c[None, :]
    tl.store(dx, acc.to(DX.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=_NO_SPECIALISE)
def _temporal_proj_bwd_dw_kernel(
    DY, X, DW, WTILES,
    M, C, T, H, W, NTOT, num_w_tiles,
    s_xb, s_xt, s_xh, s_xw,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr, ALIGN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """grad_WP[row + n, c] = sum_m dY[m, col + n] * x[m shifted by dt in time, c] for one
    (projection, tap, BLOCK_N channels) x (BLOCK_C input channels) tile; the reduction runs over
    all M positions.

    WTILES[pid_w] = (row of this tap's block, n_start, N_i, dt = j - p_i, col_i).
    """
    pid_w, pid_c = _swizzle(tl.program_id(0), num_w_tiles, tl.cdiv(C, BLOCK_C), GROUP_N)
    tab = WTILES + pid_w * 5
    row_j = tl.load(tab)
    n_start = tl.multiple_of(tl.load(tab + 1), ALIGN)
    n_i = tl.multiple_of(tl.load(tab + 2), ALIGN)
    dt = tl.load(tab + 3)
    col_i = tl.multiple_of(tl.load(tab + 4), ALIGN)

    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n_ok = offs_n < n_i
    c_ok = offs_c < C
    x_shift = dt.to(tl.int64) * s_xt

    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        x_row, t = _positions(offs_m, T, H, W, s_xb, s_xt, s_xh, s_xw)
        t_in = t + dt
        x_ok = m_ok & (t_in >= 0) & (t_in < T)
        dy = tl.load(DY + offs_m.to(tl.int64)[None, :] * NTOT + (col_i + offs_n)[:, None],
                     mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        xs = tl.load(X + (x_row + x_shift)[:, None] + offs_c[None, :],
                     mask=x_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(dy, xs, acc, input_precision=INPUT_PRECISION)

    dw = DW + (row_j + offs_n).to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(dw, acc.to(DW.dtype.element_ty), mask=n_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Tile configurations (data; picked by `pick_config`, enumerated by `compile_specs`)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Block sizes of the three kernels. fwd tiles (M, N=out ch, K=C); dx tiles (M, C, K=out ch);
    dw tiles (N=out ch, C, K=positions)."""
    name: str
    fwd: tuple  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    dx: tuple   # (BLOCK_M, BLOCK_C, BLOCK_K, num_warps, num_stages)
    dw: tuple   # (BLOCK_N, BLOCK_C, BLOCK_K, num_warps, num_stages)
    group: int = 8


# UNMEASURED: none of these has been timed on a GPU yet (the project machine has none). They are the
# usual starting points of Triton's matmul tutorial for fp16/bf16 with fp32 accumulation:
# 128x128x32 / 4 warps / 4 stages on Ampere (HMMA, cp.async pipeline), 128x256x64 / 8 warps /
# 3 stages on Hopper (HGMMA wants a wide N and 8 warps). `benchmarks/temporal_proj.py` times them
# against cuDNN/cuBLAS; update this table from its JSON.
CONFIGS = {
    # dx with 8 warps: its channels-last tap addressing spills 8 bytes at 4 warps under triton 3.6
    "sm80": TileConfig("sm80", fwd=(128, 128, 32, 4, 4), dx=(128, 128, 32, 8, 4), dw=(128, 128, 32, 4, 4)),
    "sm90": TileConfig("sm90", fwd=(128, 256, 64, 8, 3), dx=(128, 128, 64, 4, 4), dw=(128, 128, 64, 8, 3)),
    # Narrow projections (max C_out or C < 128): a 128-wide tile would be mostly masked.
    "small": TileConfig("small", fwd=(64, 64, 32, 4, 3), dx=(64, 64, 32, 4, 3), dw=(64, 64, 32, 4, 3)),
}


def _family(cc: int) -> int:
    """90 for sm_90/100/103 (228 KB of shared memory per block), else 80 (sm_80/86/89/120/121)."""
    return 90 if 90 <= cc < 120 else 80


def pick_config(cc: int | None, in_channels: int, out_channels) -> TileConfig:
    """Tile configuration for compute capability ``cc`` (major*10+minor; None = interpreter)."""
    if cc is None or max(out_channels) < 128 or in_channels < 128:
        return CONFIGS["small"]
    # by family: the sm90 tiles need 128-147 KB of shared memory, which sm_120/121 (family 80) lack
    return CONFIGS["sm90"] if _family(cc) == 90 else CONFIGS["sm80"]


def configs_for_arch(cc: int) -> list[TileConfig]:
    """Every configuration `pick_config` can return for this arch."""
    if cc < 80:
        return []  # the dispatcher never runs Triton on sm_75: tl.dot lowers to FFMA there
    return [CONFIGS["sm90"] if _family(cc) == 90 else CONFIGS["sm80"], CONFIGS["small"]]


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    # fp32 operands get exact products (as torch's fp32 conv on CPU, and cuBLAS without TF32); the
    # dispatcher sends fp32 CUDA calls to cuBLAS anyway. Ignored for fp16/bf16.
    return "ieee" if dtype == torch.float32 else "tf32"


def channel_align(out_channels) -> int:
    """ALIGN constexpr: 16 when every projection width is a multiple of 16, so that the column offset
    of every tile is too and Y/dY rows can be accessed with 16-byte vectors; else 1 (no hint)."""
    return 16 if all(n % 16 == 0 for n in out_channels) else 1


@functools.lru_cache(maxsize=256)
def _tables(out_channels: tuple, kernel_sizes: tuple, block_n: int, block_nw: int, device: str):
    """int32 tile tables for a projection set, cached per (shape, block, device) so that a call
    does not pay a host-to-device copy.

    fwd: per output tile (row_i, n_start, N_i, kt_i, col_i); tiles never straddle projections.
    proj: per projection (row_i, N_i, kt_i, col_i).
    dw: per (projection, tap, n tile) (row of the tap block, n_start, N_i, dt, col_i).
    """
    fwd, proj, dw = [], [], []
    row = col = 0
    for n, kt in zip(out_channels, kernel_sizes):
        proj.append((row, n, kt, col))
        for n0 in range(0, n, block_n):
            fwd.append((row, n0, n, kt, col))
        for j in range(kt):
            for n0 in range(0, n, block_nw):
                dw.append((row + j * n, n0, n, j - kt // 2, col))
        row += kt * n
        col += n
    mk = lambda rows: torch.tensor(rows, dtype=torch.int32).reshape(-1).to(device)  # noqa: E731
    return mk(fwd), len(fwd), mk(proj), len(proj), mk(dw), len(dw)


def k_operand(x: torch.Tensor) -> torch.Tensor:
    """x with unit channel stride (channels-last memory): the kernels index channels with stride 1,
    which makes the GEMM's K dim contiguous so loads vectorise. Copies only when needed."""
    if x.stride(1) == 1 or x.shape[1] == 1:
        return x
    return x.contiguous(memory_format=torch.channels_last_3d)


@on_tensor_device
def temporal_proj_fwd(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None,
                      out_channels: list, kernel_sizes: list, cfg: TileConfig) -> torch.Tensor:
    """Forward. x ``[B, C, T, H, W]`` (any strides), wp ``[sum kt_i N_i, C]`` contiguous, bias
    ``[sum N_i]`` or None, all one dtype.

    Returns ``Y[B, T, H, W, sum N_i]`` contiguous (see the module docstring).
    """
    B, C, T, H, W = x.shape
    x = k_operand(x)
    M, ntot = B * T * H * W, sum(out_channels)
    y = torch.empty((B, T, H, W, ntot), device=x.device, dtype=x.dtype)
    if M == 0 or ntot == 0:
        return y
    if C == 0:
        return y.copy_(bias.expand_as(y)) if bias is not None else y.zero_()
    bm, bn, bk, nw, ns = cfg.fwd
    ntab, n_tiles, *_ = _tables(tuple(out_channels), tuple(kernel_sizes), bn, cfg.dw[0], str(x.device))
    grid = (triton.cdiv(M, bm) * n_tiles,)
    _temporal_proj_fwd_kernel[grid](
        x, wp, bias if bias is not None else y, y, ntab,
        M, C, T, H, W, ntot, n_tiles,
        x.stride(0), x.stride(2), x.stride(3), x.stride(4),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group,
        ALIGN=channel_align(out_channels), INPUT_PRECISION=_precision(x.dtype), num_warps=nw, num_stages=ns,
        **LAUNCH_OPTIONS,
    )
    return y


@on_tensor_device
def temporal_proj_bwd(dy: torch.Tensor, x: torch.Tensor, wp: torch.Tensor, out_channels: list,
                      kernel_sizes: list, need_dx: bool, need_dw: bool, cfg: TileConfig):
    """Backward of `temporal_proj_fwd` for x and the packed weight (grad-bias, a column sum of dY,
    is left to the caller).

    dy ``[B, T, H, W, sum N]`` contiguous. Returns ``(dx, dwp)``: dx ``[B, C, T, H, W]`` in
    channels_last_3d memory (or None), dwp ``[sum kt_i N_i, C]`` contiguous (or None).
    """
    B, C, T, H, W = x.shape
    M, ntot = B * T * H * W, sum(out_channels)
    _, _, ptab, n_proj, wtab, n_wtiles = _tables(tuple(out_channels), tuple(kernel_sizes), cfg.fwd[1],
                                                cfg.dw[0], str(x.device))
    align, prec = channel_align(out_channels), _precision(x.dtype)
    dx = dwp = None
    if need_dx:
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last_3d)
        if dx.numel() and ntot == 0:
            dx.zero_()
        elif dx.numel():
            bm, bc, bk, nw, ns = cfg.dx
            grid = (triton.cdiv(M, bm) * triton.cdiv(C, bc),)
            _temporal_proj_bwd_dx_kernel[grid](
                dy, wp, dx, ptab, M, C, T, H, W, ntot, n_proj,
                dx.stride(0), dx.stride(2), dx.stride(3), dx.stride(4),
                BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=bk, GROUP_M=cfg.group, ALIGN=align,
                INPUT_PRECISION=prec, num_warps=nw, num_stages=ns, **LAUNCH_OPTIONS,
            )
    if need_dw:
        dwp = torch.empty_like(wp, memory_format=torch.contiguous_format)
        if dwp.numel() and M == 0:
            dwp.zero_()
        elif dwp.numel():
            xk = k_operand(x)
            bn, bc, bk, nw, ns = cfg.dw
            grid = (n_wtiles * triton.cdiv(C, bc),)
            _temporal_proj_bwd_dw_kernel[grid](
                dy, xk, dwp, wtab, M, C, T, H, W, ntot, n_wtiles,
                xk.stride(0), xk.stride(2), xk.stride(3), xk.stride(4),
                BLOCK_N=bn, BLOCK_C=bc, BLOCK_K=bk, GROUP_N=cfg.group, ALIGN=align,
                INPUT_PRECISION=prec, num_warps=nw, num_stages=ns, **LAUNCH_OPTIONS,
            )
    return dx, dwp


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m stssa_kernels.compile_check)
# ----------------------------------------------------------------------------------------------
def compile_workloads(cc: int) -> list[tuple]:
    """(dtype, C, out_channels, kernel_sizes) calls whose launches compile_check builds on arch ``cc``:
    one per tile configuration ``pick_config`` can return there, in fp16 and bf16. The dispatcher
    (``stssa_kernels.ops.temporal_proj``) runs Triton on CUDA only for fp16/bf16 on sm_80+ and only
    for aligned shapes (C and every C_out a multiple of 16); sm_75 has none (tl.dot lowers to FFMA)."""
    calls = []
    for cfg in configs_for_arch(cc):
        C, oc = (64, [64, 64, 32]) if cfg.name == "small" else (256, [256, 256, 128])
        calls += [(dt, C, oc, [7, 7, 1]) for dt in ("fp16", "bf16")]
    return calls


def record_call(cc: int, dtype, C: int, out_channels, kernel_sizes, bias: bool = True):
    """Recorded kernel launches of one forward (+ backward for x and the weights) on arch ``cc``:
    [(Launch, config label)]. x arrives channels-last, as the STSSA head's LayerNorm output does
    (an NCTHW x is copied to it by ``k_operand`` first)."""
    from ._launch import capture_launches

    B, T, H, W = 2, 8, 7, 7
    x = torch.empty(B, C, T, H, W, dtype=dtype, memory_format=torch.channels_last_3d)
    wp = torch.empty(sum(k * n for k, n in zip(kernel_sizes, out_channels)), C, dtype=dtype)
    b = torch.empty(sum(out_channels), dtype=dtype) if bias else None
    cfg = pick_config(cc, C, out_channels)
    with capture_launches() as launches:
        y = temporal_proj_fwd(x, wp, b, out_channels, kernel_sizes, cfg)
        temporal_proj_bwd(torch.empty_like(y), x, wp, out_channels, kernel_sizes, True, True, cfg)
    tag = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    out = []
    for ln in launches:
        kw = ln.kwargs
        blocks = [v for k, v in kw.items() if k.startswith("BLOCK_")]
        flags = "".join(f" {k.lower()}={int(v)}" for k, v in kw.items() if isinstance(v, bool) and k not in LAUNCH_OPTIONS)
        out.append((ln, f"{cfg.name} {tag}{flags} {'x'.join(map(str, blocks))} w{kw['num_warps']} s{kw['num_stages']}"))
    return out


def compile_specs(cc: int) -> list:
    """Every kernel variant the JIT compiles for ``compile_workloads(cc)`` (with and without bias)."""
    from ..compile_check import specs_from_launches

    recorded = []
    for dt, C, oc, ks in compile_workloads(cc):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dt]
        for bias in (False, True):
            recorded += [(ln, label, "channels_last") for ln, label in record_call(cc, dtype, C, oc, ks, bias)]
    return specs_from_launches(recorded, cc)


def retarget(launcher: str, args: tuple, kwargs: dict, cc: int) -> tuple[tuple, dict]:
    """A recorded call of ``temporal_proj_fwd``/``temporal_proj_bwd`` with its tile configuration
    replaced by what ``pick_config`` picks on arch ``cc``."""
    import inspect

    bound = inspect.signature(globals()[launcher]).bind(*args, **kwargs)
    a = bound.arguments
    a["cfg"] = pick_config(cc, a["x"].shape[1], a["out_channels"])
    return bound.args, bound.kwargs
