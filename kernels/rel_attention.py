"""Fused Transformer-XL relative-position attention: the forward kernel and the helpers its
backward kernels (kernels/rel_attention_backward.py) share. Nothing of size Lq x Lk is ever
written to memory (except the gradient of a float mask that requires grad).

The math is fastseq.reference.rel_attention's. With M = Lk - Lq memory keys, query i and key j
are at distance d = M + i - j and read position row clamp(d + pos_offset, 0, P - 1):

    score[i, j] = (qu_i . k_j + qv_i . pos[row(i, j)]) * scale

where qu = q + content_bias and qv = q + position_bias (added by the caller, so the biases'
gradients are the sums of d(qu) and d(qv)). Key j is visible to query i iff d >= 0 (causal),
d < window (when there is a window) and the extra mask allows it.

The position term inside a tile. A query block [i0, i0 + BLOCK_M) and a key block
[j0, j0 + BLOCK_N) meet at BLOCK_M + BLOCK_N - 1 consecutive distances, from
d0 = M + i0 - j0 - (BLOCK_N - 1) up. So the kernel loads that band of pos rows (BAND rows, the
next power of two), computes one tile GEMM band = qv . pos_band^T [BLOCK_M, BAND], and takes
element (a, c) of the tile from band[a, a - c + BLOCK_N - 1] (tl.gather along the diagonals),
accumulating qu . k^T on top. The GEMM spends BAND / BLOCK_N times the content term's FLOPs
(2x for square tiles) in exchange for never materialising the Lq x Lk term nor the original's
pad-and-reshape shift.

Layout: qu, qv [B, H, Lq, E], k [B, H, Lk, E], v [B, H, Lk, EV], pos [P, H, E], all with any
strides; out [B, H, Lq, EV]; lse [B, H, Lq] (natural log). Masks, dropout, exp2 softmax and
the zero rows of rows with nothing visible are kernels/attention.py's.
"""
import triton
import triton.language as tl

from .attention import apply_mask, dropout_keep, finish_rows, online_softmax
from .common import dot_acc


@triton.jit
def split_range(lo, free_lo, free_hi, hi):
    """(a, b) splitting the block loop [lo, hi) into [lo, a) and [b, hi), which need the
    visibility checks, and [a, b), which needs none (the free range [free_lo, free_hi) clipped;
    empty when it lies outside [lo, hi) or hi <= lo)."""
    a = tl.minimum(tl.maximum(free_lo, lo), hi)
    b = tl.minimum(tl.maximum(free_hi, a), hi)
    return a, b


@triton.jit
def query_block_key_ranges(start_m, S, MEM, window, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                           HAS_WINDOW: tl.constexpr):
    """(lo, a, b, hi) for the query block [start_m, start_m + BLOCK_M): keys [lo, hi) can be
    visible to some of its rows; keys in [a, b) are visible to all of them (blocks there skip
    the checks). Causal: key j <= i + MEM; window: key j > i + MEM - window."""
    if IS_CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M + MEM)
        free_hi = tl.minimum(start_m + MEM + 1, S) // BLOCK_N * BLOCK_N
    else:
        hi = S
        free_hi = S // BLOCK_N * BLOCK_N
    if HAS_WINDOW:
        lo = tl.maximum(start_m + MEM - window + 1, 0) // BLOCK_N * BLOCK_N
        free_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M + MEM - window, 0), BLOCK_N) * BLOCK_N
    else:
        lo = 0
        free_lo = 0
    a, b = split_range(lo, free_lo, free_hi, hi)
    return lo, a, b, hi


@triton.jit
def relative_visibility(s, query_rows, key_cols, S, MEM, window, CHECK_CAUSAL: tl.constexpr,
                        CHECK_WINDOW: tl.constexpr, CHECK_COLUMNS: tl.constexpr):
    """s with -inf where the causal rule (distance >= 0), the window (distance < window) or the
    key count hides a key; query_rows and key_cols shaped to broadcast as in apply_mask."""
    if CHECK_CAUSAL or CHECK_WINDOW:
        distance = MEM + query_rows - key_cols
        if CHECK_CAUSAL:
            s = tl.where(distance >= 0, s, float("-inf"))
        if CHECK_WINDOW:
            s = tl.where(distance < window, s, float("-inf"))
    if CHECK_COLUMNS:
        s = tl.where(key_cols < S, s, float("-inf"))
    return s


@triton.jit
def pos_band_rows(first_distance, offs_band, P, pos_offset):
    """The pos rows of the band's distances first_distance + [0, BAND): clamped to [0, P), so
    every load is in bounds (rows past the band's BLOCK_M + BLOCK_N - 1 are never gathered)."""
    return tl.minimum(tl.maximum(first_distance + offs_band + pos_offset, 0), P - 1)


@triton.jit
def band_index(offs_m0, offs_n0, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: the band column of tile element (a, c), a - c + BLOCK_N - 1."""
    return offs_m0[:, None] - offs_n0[None, :] + (BLOCK_N - 1)


@triton.jit
def rel_forward_block(acc, l_i, m_i, qu, qv, start_m, start_n, offs_m, offs_n0, offs_d,
                      offs_dv, offs_band, gather_index, k_ptr, v_ptr, pos_ptr, stride_kn,
                      stride_kd, stride_vn, stride_vd, stride_pp, stride_pd, E, EV, L, S, P,
                      MEM, pos_offset, window, mask_ptr, stride_mm, stride_mn, qk_scale2, seed,
                      dropout_p, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                      CHECK_CAUSAL: tl.constexpr, CHECK_WINDOW: tl.constexpr,
                      CHECK_COLUMNS: tl.constexpr, DROPOUT: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of the online softmax: the band GEMM, the diagonal gather, qu k^T on top,
    then the running sums and p @ v as in the attention kernel."""
    offs_n = start_n + offs_n0
    k_t = tl.load(k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                  mask=(offs_n[None, :] < S) & (offs_d[:, None] < E), other=0.0)
    rows = pos_band_rows(MEM + start_m - start_n - (BLOCK_N - 1), offs_band, P, pos_offset)
    pos_t = tl.load(pos_ptr + rows[None, :] * stride_pp + offs_d[:, None] * stride_pd,
                    mask=offs_d[:, None] < E, other=0.0)
    band = dot_acc(qv, pos_t, tl.zeros((qv.shape[0], pos_t.shape[1]), acc.dtype), PRECISION,
                   UPCAST)
    qk = dot_acc(qu, k_t, tl.gather(band, gather_index, axis=1), PRECISION, UPCAST)
    s = apply_mask(qk * qk_scale2, offs_m[:, None], offs_n[None, :], L, S, mask_ptr, stride_mm,
                   stride_mn, MASK_KIND)
    s = relative_visibility(s, offs_m[:, None], offs_n[None, :], S, MEM, window, CHECK_CAUSAL,
                            CHECK_WINDOW, CHECK_COLUMNS)
    p, alpha, l_i, m_new = online_softmax(s, m_i, l_i)
    if DROPOUT:
        p = tl.where(dropout_keep(seed, offs_m[:, None], offs_n[None, :], S, dropout_p), p, 0.0)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(offs_n[:, None] < S) & (offs_dv[None, :] < EV), other=0.0)
    acc = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
    return acc, l_i, m_new


@triton.jit
def rel_attention_forward_kernel(
        qu_ptr, qv_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, lse_ptr, mask_ptr, seed_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_pp, stride_ph, stride_pd,
        stride_ob, stride_oh, stride_om, stride_od, stride_mb, stride_mh, stride_mm, stride_mn,
        H, L, S, E, EV, P, pos_offset, window, qk_scale2, dropout_p, length_bucket,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Program (query block, batch * head): out and lse of BLOCK_M query rows. qu and qv share
    strides (the caller makes both from the same query). length_bucket: the autotuner's key."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    MEM = S - L
    start_m = pid_m * BLOCK_M
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_m0
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_band = tl.arange(0, BAND)
    q_offsets = (b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                 + offs_d[None, :] * stride_qd)
    q_mask = (offs_m[:, None] < L) & (offs_d[None, :] < E)
    qu = tl.load(qu_ptr + q_offsets, mask=q_mask, other=0.0)
    qv = tl.load(qv_ptr + q_offsets, mask=q_mask, other=0.0)
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    pos_ptr += h * stride_ph
    mask_ptr += b * stride_mb + h * stride_mh
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr) + bh
    gather_index = band_index(offs_m0, offs_n0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    lo, free_lo, free_hi, hi = query_block_key_ranges(start_m, S, MEM, window, BLOCK_M, BLOCK_N,
                                                      IS_CAUSAL, HAS_WINDOW)
    # Three loops over one block function: the window's edge, the blocks every row sees whole,
    # the causal diagonal and the ragged last block.
    for start_n in range(lo, free_lo, BLOCK_N):
        acc, l_i, m_i = rel_forward_block(
            acc, l_i, m_i, qu, qv, start_m, start_n, offs_m, offs_n0, offs_d, offs_dv,
            offs_band, gather_index, k_ptr, v_ptr, pos_ptr, stride_kn, stride_kd, stride_vn,
            stride_vd, stride_pp, stride_pd, E, EV, L, S, P, MEM, pos_offset, window, mask_ptr,
            stride_mm, stride_mn, qk_scale2, seed, dropout_p, BLOCK_N, MASK_KIND, IS_CAUSAL,
            HAS_WINDOW, True, DROPOUT, PRECISION, UPCAST)
    for start_n in range(free_lo, free_hi, BLOCK_N):
        acc, l_i, m_i = rel_forward_block(
            acc, l_i, m_i, qu, qv, start_m, start_n, offs_m, offs_n0, offs_d, offs_dv,
            offs_band, gather_index, k_ptr, v_ptr, pos_ptr, stride_kn, stride_kd, stride_vn,
            stride_vd, stride_pp, stride_pd, E, EV, L, S, P, MEM, pos_offset, window, mask_ptr,
            stride_mm, stride_mn, qk_scale2, seed, dropout_p, BLOCK_N, MASK_KIND, False, False,
            False, DROPOUT, PRECISION, UPCAST)
    for start_n in range(free_hi, hi, BLOCK_N):
        acc, l_i, m_i = rel_forward_block(
            acc, l_i, m_i, qu, qv, start_m, start_n, offs_m, offs_n0, offs_d, offs_dv,
            offs_band, gather_index, k_ptr, v_ptr, pos_ptr, stride_kn, stride_kd, stride_vn,
            stride_vd, stride_pp, stride_pd, E, EV, L, S, P, MEM, pos_offset, window, mask_ptr,
            stride_mm, stride_mn, qk_scale2, seed, dropout_p, BLOCK_N, MASK_KIND, IS_CAUSAL,
            HAS_WINDOW, True, DROPOUT, PRECISION, UPCAST)
    out, lse = finish_rows(acc, l_i, m_i, dropout_p, DROPOUT)
    row_ok = offs_m < L
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
             + offs_dv[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < EV))
    tl.store(lse_ptr + bh * L + offs_m, lse.to(lse_ptr.dtype.element_ty), mask=row_ok)
