"""Fused Transformer-XL relative-position attention: the forward kernel and the helpers its
backward kernels (kernels/rel_attention/backward.py) share. Nothing of size Lq x Lk is ever
written to memory (except the gradient of a float mask that requires grad).

The math is fastseq.reference.rel_attention's. With M = Lk - Lq memory keys, query i and key j
are at distance d = M + i - j and read position row clamp(d + pos_offset, 0, P - 1):

    score[i, j] = (qu_i . k_j + qv_i . pos[row(i, j)]) * scale

where qu = q + content_bias and qv = q + position_bias (added by the caller, so the biases'
gradients are the sums of d(qu) and d(qv)). Key j is visible to query i iff d >= 0 (causal),
d < window (when there is a window) and the extra mask allows it.

The position term inside a tile. A query block [i0, i0 + BLOCK_M) and a key block
[j0, j0 + BLOCK_N) meet at BLOCK_M + BLOCK_N - 1 consecutive distances (the band), from
d0 = M + i0 - j0 - (BLOCK_N - 1) up; tile element (a, c) needs band column a - c + BLOCK_N - 1.
A GEMM qv . pos_band^T followed by a gather along the diagonals (tl.gather) computes the term
without ever materialising the Lq x Lk matrix or the original's pad-and-reshape shift.
  * The forward keeps its query block while it streams key blocks, and the band of key block
    j0 + BLOCK_N is the band of j0 moved down by BLOCK_N distances. So it cuts the band into
    chunks of BLOCK_N distances, computes only chunk 0 of each key block (one
    [BLOCK_M, BLOCK_N] GEMM, as much work as q k^T), and carries the previous one or two blocks'
    chunk 0 (BLOCK_M = BLOCK_N or 2 BLOCK_N) to serve as this block's chunks 1 and 2.
  * The backward kernels stream query blocks (dK/dV) or read every tile of a block diagonal
    (d(pos)), where no chunk repeats: they compute the whole band, BAND = the next power of two
    of BLOCK_M + BLOCK_N - 1 rows (2 BLOCK_N for square tiles: twice the q k^T GEMM's work).

Layout: qu, qv [B, H, Lq, E], k [B, H, Lk, E], v [B, H, Lk, EV], pos [P, H, E], all with any
strides; out [B, H, Lq, EV]; lse [B, H, Lq] (natural log). Masks, dropout, exp2 softmax and
the zero rows of rows with nothing visible are kernels/attention/kernel.py's.
"""
import triton
import triton.language as tl

from ..attention.kernel import (apply_mask, dropout_keep, finish_rows, online_softmax,
                                split_range)
from ..common import dot_acc


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
    """The pos rows of the distances first_distance + offs_band: clamped to [0, P), so
    every load is in bounds (rows past the band's BLOCK_M + BLOCK_N - 1 are never gathered)."""
    return tl.minimum(tl.maximum(first_distance + offs_band + pos_offset, 0), P - 1)


@triton.jit
def band_index(offs_m0, offs_n0, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: the band column of tile element (a, c), a - c + BLOCK_N - 1."""
    return offs_m0[:, None] - offs_n0[None, :] + (BLOCK_N - 1)


@triton.jit
def first_chunk_scores(qv, pos_ptr, start_m, start_n, offs_n0, offs_d, stride_pp, stride_pd, E,
                      P, MEM, pos_offset, half_index, BLOCK_N: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """qv . pos^T over chunk 0 of the key block's band (its BLOCK_N smallest distances, from
    MEM + start_m - start_n - (BLOCK_N - 1)), gathered to tile coordinates by half_index:
    element (a, c) holds column a - c - 1 (mod BLOCK_N) of the chunk."""
    rows = pos_band_rows(MEM + start_m - start_n - (BLOCK_N - 1), offs_n0, P, pos_offset)
    pos_t = tl.load(pos_ptr + rows[None, :] * stride_pp + offs_d[:, None] * stride_pd,
                    mask=offs_d[:, None] < E, other=0.0)
    half = dot_acc(qv, pos_t, tl.zeros((qv.shape[0], BLOCK_N), ACC_DTYPE), PRECISION, UPCAST)
    return tl.gather(half, half_index, axis=1)


@triton.jit
def rel_forward_block(acc, l_i, m_i, older, old, qu, qv, start_m, start_n, offs_m, offs_n0,
                      offs_d, offs_dv, half_index, chunk, k_ptr, v_ptr, pos_ptr, stride_kn,
                      stride_kd, stride_vn, stride_vd, stride_pp, stride_pd, E, EV, L, S, P, MEM,
                      pos_offset, window, mask_ptr, stride_mm, stride_mn, qk_scale2, seed,
                      dropout_p, BLOCK_N: tl.constexpr, THREE_CHUNKS: tl.constexpr,
                      MASK_KIND: tl.constexpr, CHECK_CAUSAL: tl.constexpr,
                      CHECK_WINDOW: tl.constexpr, CHECK_COLUMNS: tl.constexpr,
                      DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of the online softmax. Its band of BLOCK_M + BLOCK_N - 1 distances is cut
    into chunks of BLOCK_N; chunk k of this key block is chunk 0 of the block k before it. So
    only chunk 0 is computed here, one [BLOCK_M, BLOCK_N] GEMM (as much work as q k^T), and the
    loop carries the previous blocks' chunk 0, already gathered: `old` (one block back) and
    `older` (two back; with THREE_CHUNKS, BLOCK_M = 2 BLOCK_N, else a [1, 1] placeholder that
    costs no registers). Element (a, c) of the tile takes chunk
    `chunk[a, c]`. Then qu k^T on top, the running sums and p @ v as in the attention kernel.
    Returns the new (older, old) as well."""
    offs_n = start_n + offs_n0
    k_t = tl.load(k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                  mask=(offs_n[None, :] < S) & (offs_d[:, None] < E), other=0.0)
    current = first_chunk_scores(qv, pos_ptr, start_m, start_n, offs_n0, offs_d, stride_pp,
                                stride_pd, E, P, MEM, pos_offset, half_index, BLOCK_N, PRECISION,
                                UPCAST, acc.dtype)
    if THREE_CHUNKS:
        position = tl.where(chunk == 0, current, tl.where(chunk == 1, old, older))
        older = old
    else:
        position = tl.where(chunk == 0, current, old)
    qk = dot_acc(qu, k_t, position, PRECISION, UPCAST)
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
    return acc, l_i, m_new, older, current


@triton.jit
def rel_attention_forward_kernel(
        qu_ptr, qv_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, lse_ptr, mask_ptr, seed_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_pp, stride_ph, stride_pd,
        stride_ob, stride_oh, stride_om, stride_od, stride_mb, stride_mh, stride_mm, stride_mn,
        H, L, S, E, EV, P, pos_offset, window, qk_scale2, dropout_p, length_bucket,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
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
    q_offsets = (b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                 + offs_d[None, :] * stride_qd)
    q_mask = (offs_m[:, None] < L) & (offs_d[None, :] < E)
    qu = tl.load(qu_ptr + q_offsets, mask=q_mask, other=0.0)
    qv = tl.load(qv_ptr + q_offsets, mask=q_mask, other=0.0)
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    pos_ptr += h * stride_ph
    if MASK_KIND != 0:  # NO_MASK: mask_ptr is None (a constexpr)
        mask_ptr += b * stride_mb + h * stride_mh
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr) + bh
    tl.static_assert(BLOCK_M == BLOCK_N or BLOCK_M == 2 * BLOCK_N,
                     "the forward's band chunks need BLOCK_M = BLOCK_N or 2 BLOCK_N")
    # Tile element (a, c) reads band column a - c + BLOCK_N - 1: chunk (a - c + BLOCK_N - 1) //
    # BLOCK_N, column a - c - 1 (mod BLOCK_N) within it.
    diff = offs_m0[:, None] - offs_n0[None, :] - 1
    half_index = (diff + BLOCK_N) % BLOCK_N
    chunk = (diff + BLOCK_N) // BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    lo, free_lo, free_hi, hi = query_block_key_ranges(start_m, S, MEM, window, BLOCK_M, BLOCK_N,
                                                      IS_CAUSAL, HAS_WINDOW)
    # The first block's chunks 1 and 2: chunk 0 of the one and two blocks before it.
    old = first_chunk_scores(qv, pos_ptr, start_m, lo - BLOCK_N, offs_n0, offs_d, stride_pp,
                            stride_pd, E, P, MEM, pos_offset, half_index, BLOCK_N, PRECISION,
                            UPCAST, ACC_DTYPE)
    older = tl.zeros((1, 1), ACC_DTYPE)
    if BLOCK_M > BLOCK_N:
        older = first_chunk_scores(qv, pos_ptr, start_m, lo - 2 * BLOCK_N, offs_n0, offs_d,
                                  stride_pp, stride_pd, E, P, MEM, pos_offset, half_index,
                                  BLOCK_N, PRECISION, UPCAST, ACC_DTYPE)
    # Three loops over one block function: the window's edge, the blocks every row sees whole,
    # the causal diagonal and the ragged last block. Consecutive blocks throughout, so each
    # passes its chunk 0 on to the next ones.
    for start_n in range(lo, free_lo, BLOCK_N):
        acc, l_i, m_i, older, old = rel_forward_block(
            acc, l_i, m_i, older, old, qu, qv, start_m, start_n, offs_m, offs_n0, offs_d,
            offs_dv, half_index, chunk, k_ptr, v_ptr, pos_ptr, stride_kn, stride_kd, stride_vn,
            stride_vd, stride_pp, stride_pd, E, EV, L, S, P, MEM, pos_offset, window, mask_ptr,
            stride_mm, stride_mn, qk_scale2, seed, dropout_p, BLOCK_N, BLOCK_M > BLOCK_N, MASK_KIND, IS_CAUSAL,
            HAS_WINDOW, True, DROPOUT, PRECISION, UPCAST)
    for start_n in range(free_lo, free_hi, BLOCK_N):
        acc, l_i, m_i, older, old = rel_forward_block(
            acc, l_i, m_i, older, old, qu, qv, start_m, start_n, offs_m, offs_n0, offs_d,
            offs_dv, half_index, chunk, k_ptr, v_ptr, pos_ptr, stride_kn, stride_kd, stride_vn,
            stride_vd, stride_pp, stride_pd, E, EV, L, S, P, MEM, pos_offset, window, mask_ptr,
            stride_mm, stride_mn, qk_scale2, seed, dropout_p, BLOCK_N, BLOCK_M > BLOCK_N, MASK_KIND, False, False,
            False, DROPOUT, PRECISION, UPCAST)
    for start_n in range(free_hi, hi, BLOCK_N):
        acc, l_i, m_i, older, old = rel_forward_block(
            acc, l_i, m_i, older, old, qu, qv, start_m, start_n, offs_m, offs_n0, offs_d,
            offs_dv, half_index, chunk, k_ptr, v_ptr, pos_ptr, stride_kn, stride_kd, stride_vn,
            stride_vd, stride_pp, stride_pd, E, EV, L, S, P, MEM, pos_offset, window, mask_ptr,
            stride_mm, stride_mn, qk_scale2, seed, dropout_p, BLOCK_N, BLOCK_M > BLOCK_N, MASK_KIND, IS_CAUSAL,
            HAS_WINDOW, True, DROPOUT, PRECISION, UPCAST)
    out, lse = finish_rows(acc, l_i, m_i, dropout_p, DROPOUT)
    row_ok = offs_m < L
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
             + offs_dv[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < EV))
    tl.store(lse_ptr + bh * L + offs_m, lse.to(lse_ptr.dtype.element_ty), mask=row_ok)
