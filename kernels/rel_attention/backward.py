"""Backward kernels of the fused relative-position attention (kernels/rel_attention/forward.py).

Deterministic (no atomics, every sum in a fixed order), three kernels, each recomputing the
probabilities from the forward's log-sum-exp (delta = rowsum(dO * O) - dlse from the caller):
  * dK, dV: program per (key block, batch * head), streaming the query blocks that see it;
    dK = scale * dS^T qu, computed transposed as kernels/attention/kernel.py does;
  * d(qu), d(qv): program per (query block, batch * head), streaming key blocks;
    d(qu) = scale * dS k, and d(qv) = scale * dBand pos_band, where dBand [BLOCK_M, BAND] is
    dS scattered back along the diagonals it was gathered from (itself a gather);
  * d(pos): pos rows are shared by every tile on a block diagonal, so with square tiles
    (BLOCK x BLOCK) all tiles with the same (query block - key block) meet the same band of
    2 * BLOCK - 1 distances. One program per (block diagonal, head) sums dBand^T qv over the
    batch and the diagonal's tiles into one [BAND, E] band in registers and writes it once;
    the launcher adds the overlapping halves of neighbouring bands and folds the distances onto
    the pos rows they read (the clamp sends many distances to rows 0 and P - 1) with plain
    torch sums. Workspace: H x (#diagonals) x 2 BLOCK x E fp32, linear in the lengths.
"""
import triton
import triton.language as tl

from ..attention.kernel import (accumulate_key_gradients, apply_mask, load_row_stats,
                                score_gradient, split_range)
from ..common import dot_acc
from .forward import (band_index, pos_band_rows, query_block_key_ranges,
                            relative_visibility)


@triton.jit
def scatter_index(offs_m0, offs_band, BLOCK_N: tl.constexpr):
    """(index, valid) [BLOCK_M, BAND]: band column r of row a took tile column
    a + BLOCK_N - 1 - r in the forward's gather (valid when that column is in the tile)."""
    column = offs_m0[:, None] + (BLOCK_N - 1) - offs_band[None, :]
    valid = (column >= 0) & (column < BLOCK_N)
    return tl.minimum(tl.maximum(column, 0), BLOCK_N - 1), valid


@triton.jit
def band_gradient(ds, scatter_columns, scatter_valid):
    """dBand [BLOCK_M, BAND]: the score gradient moved back onto the band columns."""
    return tl.where(scatter_valid, tl.gather(ds, scatter_columns, axis=1), 0.0)


@triton.jit
def rel_probabilities(qu, qv, k, pos_band, offs_m, offs_n, lse2, gather_index, L, S, MEM,
                      window, mask_ptr, stride_mm, stride_mn, qk_scale2,
                      MASK_KIND: tl.constexpr, CHECK_CAUSAL: tl.constexpr,
                      CHECK_WINDOW: tl.constexpr, CHECK_COLUMNS: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The probabilities of a [BLOCK_M, BLOCK_N] tile from the forward's lse (base 2; rows past
    L read lse2 = +inf and give 0). k [BLOCK_N, E], pos_band [BAND, E] as loaded."""
    band = dot_acc(qv, tl.trans(pos_band), tl.zeros((qv.shape[0], pos_band.shape[0]),
                                                     lse2.dtype), PRECISION, UPCAST)
    qk = dot_acc(qu, tl.trans(k), tl.gather(band, gather_index, axis=1), PRECISION, UPCAST)
    s = apply_mask(qk * qk_scale2, offs_m[:, None], offs_n[None, :], L, S, mask_ptr, stride_mm,
                   stride_mn, MASK_KIND)
    s = relative_visibility(s, offs_m[:, None], offs_n[None, :], S, MEM, window, CHECK_CAUSAL,
                            CHECK_WINDOW, CHECK_COLUMNS)
    return tl.exp2(s - lse2[:, None])


@triton.jit
def rel_key_block_gradients(dk, dv, k, v, start_m, start_n, offs_n, offs_m0, offs_d, offs_dv,
                            offs_band, gather_index_t, qu_ptr, qv_ptr, do_ptr, pos_ptr,
                            lse_ptr, delta_ptr, dmask_ptr, stride_qm, stride_qd, stride_dom,
                            stride_dod, stride_pp, stride_pd, E, EV, L, S, P, MEM, pos_offset,
                            window, mask_ptr, stride_mm, stride_mn, qk_scale2, seed, dropout_p,
                            BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                            CHECK_CAUSAL: tl.constexpr, CHECK_WINDOW: tl.constexpr,
                            DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
                            PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                            ACC_DTYPE: tl.constexpr):
    """One query block's share of dK and dV for a key block, transposed: P^T [BLOCK_N, BLOCK_M]
    from k qu^T plus the band term band^T = pos_band qv^T gathered along axis 0."""
    offs_m = start_m + offs_m0
    query_rows = offs_m[None, :]
    key_cols = offs_n[:, None]
    q_mask = (query_rows < L) & (offs_d[:, None] < E)
    qu_t = tl.load(qu_ptr + query_rows * stride_qm + offs_d[:, None] * stride_qd, mask=q_mask,
                   other=0.0)
    qv_t = tl.load(qv_ptr + query_rows * stride_qm + offs_d[:, None] * stride_qd, mask=q_mask,
                   other=0.0)
    do = tl.load(do_ptr + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=(offs_m[:, None] < L) & (offs_dv[None, :] < EV), other=0.0)
    rows = pos_band_rows(MEM + start_m - start_n - (BLOCK_N - 1), offs_band, P, pos_offset)
    pos_band = tl.load(pos_ptr + rows[:, None] * stride_pp + offs_d[None, :] * stride_pd,
                       mask=offs_d[None, :] < E, other=0.0)
    lse2, delta = load_row_stats(lse_ptr, delta_ptr, offs_m, L, ACC_DTYPE)
    band_t = dot_acc(pos_band, qv_t, tl.zeros((pos_band.shape[0], qv_t.shape[1]), ACC_DTYPE),
                     PRECISION, UPCAST)
    qk_t = dot_acc(k, qu_t, tl.gather(band_t, gather_index_t, axis=0), PRECISION, UPCAST)
    s_t = apply_mask(qk_t * qk_scale2, query_rows, key_cols, L, S, mask_ptr, stride_mm,
                     stride_mn, MASK_KIND)
    s_t = relative_visibility(s_t, query_rows, key_cols, S, MEM, window, CHECK_CAUSAL,
                              CHECK_WINDOW, False)
    return accumulate_key_gradients(dk, dv, s_t, qu_t, v, do, lse2, delta, query_rows,
                                    key_cols, L, S, dmask_ptr, seed, dropout_p, DROPOUT,
                                    MASK_GRAD, PRECISION, UPCAST)


@triton.jit
def rel_attention_backward_key_kernel(
        qu_ptr, qv_ptr, k_ptr, v_ptr, pos_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, seed_ptr,
        dk_ptr, dv_ptr, dmask_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_pp, stride_ph, stride_pd,
        stride_dob, stride_doh, stride_dom, stride_dod, stride_mb, stride_mh, stride_mm,
        stride_mn, H, L, S, E, EV, P, pos_offset, window, qk_scale2, scale, dropout_p,
        length_bucket, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
        MASK_GRAD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        ACC_DTYPE: tl.constexpr):
    """Program (key block, batch * head): dK and dV of BLOCK_N keys (dk [B, H, S, E],
    dv [B, H, S, EV] and dmask [B, H, L, S] contiguous)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    MEM = S - L
    start_n = pid_n * BLOCK_N
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_n0
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_band = tl.arange(0, BAND)
    cols = offs_n[:, None] < S
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=cols & (offs_d[None, :] < E), other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
                + offs_dv[None, :] * stride_vd, mask=cols & (offs_dv[None, :] < EV), other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), ACC_DTYPE)
    # Query rows that can see these keys, and those that see all of them (no checks): causal
    # needs i >= j - MEM, the window i < j - MEM + window.
    if IS_CAUSAL:
        lo = tl.maximum(start_n - MEM, 0) // BLOCK_M * BLOCK_M
        free_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - MEM, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        free_lo = 0
    if HAS_WINDOW:
        hi = tl.minimum(L, start_n + BLOCK_N - 1 - MEM + window)
        free_hi = tl.maximum(start_n - MEM + window, 0) // BLOCK_M * BLOCK_M
    else:
        hi = L
        free_hi = tl.cdiv(L, BLOCK_M) * BLOCK_M
    free_lo, free_hi = split_range(lo, free_lo, free_hi, hi)
    # Rows from free_lo on see every key of the block causally, so the last loop (the window's
    # edge) checks the window only.
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr) + bh
    # [BLOCK_N, BLOCK_M]: the band row of transposed tile element (c, a), a - c + BLOCK_N - 1.
    gather_index_t = tl.trans(band_index(offs_m0, offs_n0, BLOCK_N))
    qu_ptr += b * stride_qb + h * stride_qh
    qv_ptr += b * stride_qb + h * stride_qh
    do_ptr += b * stride_dob + h * stride_doh
    pos_ptr += h * stride_ph
    if MASK_KIND != 0:  # NO_MASK: mask_ptr is None (a constexpr)
        mask_ptr += b * stride_mb + h * stride_mh
    if MASK_GRAD:  # else dmask_ptr is None
        dmask_ptr += bh.to(tl.int64) * L * S
    lse_ptr += bh * L
    delta_ptr += bh * L
    for start_m in range(lo, free_lo, BLOCK_M):
        dk, dv = rel_key_block_gradients(
            dk, dv, k, v, start_m, start_n, offs_n, offs_m0, offs_d, offs_dv, offs_band,
            gather_index_t, qu_ptr, qv_ptr, do_ptr, pos_ptr, lse_ptr, delta_ptr, dmask_ptr,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_pp, stride_pd, E, EV, L, S, P,
            MEM, pos_offset, window, mask_ptr, stride_mm, stride_mn, qk_scale2, seed, dropout_p,
            BLOCK_N, MASK_KIND, IS_CAUSAL, HAS_WINDOW, DROPOUT, MASK_GRAD, PRECISION, UPCAST,
            ACC_DTYPE)
    for start_m in range(free_lo, free_hi, BLOCK_M):
        dk, dv = rel_key_block_gradients(
            dk, dv, k, v, start_m, start_n, offs_n, offs_m0, offs_d, offs_dv, offs_band,
            gather_index_t, qu_ptr, qv_ptr, do_ptr, pos_ptr, lse_ptr, delta_ptr, dmask_ptr,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_pp, stride_pd, E, EV, L, S, P,
            MEM, pos_offset, window, mask_ptr, stride_mm, stride_mn, qk_scale2, seed, dropout_p,
            BLOCK_N, MASK_KIND, False, False, DROPOUT, MASK_GRAD, PRECISION, UPCAST, ACC_DTYPE)
    for start_m in range(free_hi, hi, BLOCK_M):
        dk, dv = rel_key_block_gradients(
            dk, dv, k, v, start_m, start_n, offs_n, offs_m0, offs_d, offs_dv, offs_band,
            gather_index_t, qu_ptr, qv_ptr, do_ptr, pos_ptr, lse_ptr, delta_ptr, dmask_ptr,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_pp, stride_pd, E, EV, L, S, P,
            MEM, pos_offset, window, mask_ptr, stride_mm, stride_mn, qk_scale2, seed, dropout_p,
            BLOCK_N, MASK_KIND, False, HAS_WINDOW, DROPOUT, MASK_GRAD, PRECISION, UPCAST,
            ACC_DTYPE)
    out_rows = bh.to(tl.int64) * S + offs_n
    tl.store(dk_ptr + out_rows[:, None] * E + offs_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=cols & (offs_d[None, :] < E))
    tl.store(dv_ptr + out_rows[:, None] * EV + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=cols & (offs_dv[None, :] < EV))


@triton.jit
def rel_query_block_gradients(dqu, dqv, qu, qv, do, lse2, delta, start_m, start_n, offs_m,
                              offs_n0, offs_d, offs_dv, offs_band, gather_index,
                              scatter_columns, scatter_valid, k_ptr, v_ptr, pos_ptr, stride_kn,
                              stride_kd, stride_vn, stride_vd, stride_pp, stride_pd, E, EV, L,
                              S, P, MEM, pos_offset, window, mask_ptr, stride_mm, stride_mn,
                              qk_scale2, seed, dropout_p, BLOCK_N: tl.constexpr,
                              MASK_KIND: tl.constexpr, CHECK_CAUSAL: tl.constexpr,
                              CHECK_WINDOW: tl.constexpr, CHECK_COLUMNS: tl.constexpr,
                              DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                              UPCAST: tl.constexpr):
    """One key block's share of d(qu) and d(qv) for a query block."""
    offs_n = start_n + offs_n0
    cols = offs_n[:, None] < S
    k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=cols & (offs_d[None, :] < E), other=0.0)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=cols & (offs_dv[None, :] < EV), other=0.0)
    rows = pos_band_rows(MEM + start_m - start_n - (BLOCK_N - 1), offs_band, P, pos_offset)
    pos_band = tl.load(pos_ptr + rows[:, None] * stride_pp + offs_d[None, :] * stride_pd,
                       mask=offs_d[None, :] < E, other=0.0)
    p = rel_probabilities(qu, qv, k, pos_band, offs_m, offs_n, lse2, gather_index, L, S, MEM,
                          window, mask_ptr, stride_mm, stride_mn, qk_scale2, MASK_KIND,
                          CHECK_CAUSAL, CHECK_WINDOW, CHECK_COLUMNS, PRECISION, UPCAST)
    ds, _ = score_gradient(p, do, v, offs_m, offs_n, delta, S, seed, dropout_p, DROPOUT,
                           PRECISION, UPCAST)
    dqu = dot_acc(ds.to(k.dtype), k, dqu, PRECISION, UPCAST)
    dband = band_gradient(ds, scatter_columns, scatter_valid)
    dqv = dot_acc(dband.to(pos_band.dtype), pos_band, dqv, PRECISION, UPCAST)
    return dqu, dqv


@triton.jit
def rel_attention_backward_query_kernel(
        qu_ptr, qv_ptr, k_ptr, v_ptr, pos_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, seed_ptr,
        dqu_ptr, dqv_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_pp, stride_ph, stride_pd,
        stride_dob, stride_doh, stride_dom, stride_dod, stride_mb, stride_mh, stride_mm,
        stride_mn, H, L, S, E, EV, P, pos_offset, window, qk_scale2, scale, dropout_p,
        length_bucket, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Program (query block, batch * head): d(qu) and d(qv) of BLOCK_M rows ([B, H, L, E]
    contiguous each)."""
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
    rows_ok = offs_m[:, None] < L
    q_offsets = (b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                 + offs_d[None, :] * stride_qd)
    q_mask = rows_ok & (offs_d[None, :] < E)
    qu = tl.load(qu_ptr + q_offsets, mask=q_mask, other=0.0)
    qv = tl.load(qv_ptr + q_offsets, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=rows_ok & (offs_dv[None, :] < EV),
                 other=0.0)
    lse2, delta = load_row_stats(lse_ptr + bh * L, delta_ptr + bh * L, offs_m, L, ACC_DTYPE)
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    pos_ptr += h * stride_ph
    if MASK_KIND != 0:  # NO_MASK: mask_ptr is None (a constexpr)
        mask_ptr += b * stride_mb + h * stride_mh
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr) + bh
    gather_index = band_index(offs_m0, offs_n0, BLOCK_N)
    scatter_columns, scatter_valid = scatter_index(offs_m0, offs_band, BLOCK_N)
    dqu = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    dqv = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    lo, free_lo, free_hi, hi = query_block_key_ranges(start_m, S, MEM, window, BLOCK_M, BLOCK_N,
                                                      IS_CAUSAL, HAS_WINDOW)
    for start_n in range(lo, free_lo, BLOCK_N):
        dqu, dqv = rel_query_block_gradients(
            dqu, dqv, qu, qv, do, lse2, delta, start_m, start_n, offs_m, offs_n0, offs_d,
            offs_dv, offs_band, gather_index, scatter_columns, scatter_valid, k_ptr, v_ptr,
            pos_ptr, stride_kn, stride_kd, stride_vn, stride_vd, stride_pp, stride_pd, E, EV, L,
            S, P, MEM, pos_offset, window, mask_ptr, stride_mm, stride_mn, qk_scale2, seed,
            dropout_p, BLOCK_N, MASK_KIND, IS_CAUSAL, HAS_WINDOW, True, DROPOUT, PRECISION,
            UPCAST)
    for start_n in range(free_lo, free_hi, BLOCK_N):
        dqu, dqv = rel_query_block_gradients(
            dqu, dqv, qu, qv, do, lse2, delta, start_m, start_n, offs_m, offs_n0, offs_d,
            offs_dv, offs_band, gather_index, scatter_columns, scatter_valid, k_ptr, v_ptr,
            pos_ptr, stride_kn, stride_kd, stride_vn, stride_vd, stride_pp, stride_pd, E, EV, L,
            S, P, MEM, pos_offset, window, mask_ptr, stride_mm, stride_mn, qk_scale2, seed,
            dropout_p, BLOCK_N, MASK_KIND, False, False, False, DROPOUT, PRECISION, UPCAST)
    for start_n in range(free_hi, hi, BLOCK_N):
        dqu, dqv = rel_query_block_gradients(
            dqu, dqv, qu, qv, do, lse2, delta, start_m, start_n, offs_m, offs_n0, offs_d,
            offs_dv, offs_band, gather_index, scatter_columns, scatter_valid, k_ptr, v_ptr,
            pos_ptr, stride_kn, stride_kd, stride_vn, stride_vd, stride_pp, stride_pd, E, EV, L,
            S, P, MEM, pos_offset, window, mask_ptr, stride_mm, stride_mn, qk_scale2, seed,
            dropout_p, BLOCK_N, MASK_KIND, IS_CAUSAL, HAS_WINDOW, True, DROPOUT, PRECISION,
            UPCAST)
    out_offsets = (bh.to(tl.int64) * L + offs_m)[:, None] * E + offs_d[None, :]
    tl.store(dqu_ptr + out_offsets, (dqu * scale).to(dqu_ptr.dtype.element_ty), mask=q_mask)
    tl.store(dqv_ptr + out_offsets, (dqv * scale).to(dqv_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def rel_attention_backward_pos_kernel(
        qu_ptr, qv_ptr, k_ptr, v_ptr, pos_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, seed_ptr,
        dband_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_pp, stride_ph, stride_pd,
        stride_dob, stride_doh, stride_dom, stride_dod, stride_mb, stride_mh, stride_mm,
        stride_mn, B, H, L, S, E, EV, P, pos_offset, window, qk_scale2, scale, dropout_p,
        length_bucket, BLOCK: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Program (block diagonal, head): the gradient of the band of pos rows that the diagonal's
    tiles read, summed over the batch and the tiles, scaled; dband [H, #diagonals, BAND, E]
    contiguous. Diagonal t (program axis 0 minus the number of key blocks - 1) holds the tiles
    (query block a, key block a - t), whose band starts at distance MEM + t * BLOCK - BLOCK + 1."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    MEM = S - L
    key_blocks = tl.cdiv(S, BLOCK)
    t = pid_t - (key_blocks - 1)
    first_distance = MEM + t * BLOCK - (BLOCK - 1)
    offs_0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_band = tl.arange(0, BAND)
    rows = pos_band_rows(first_distance, offs_band, P, pos_offset)
    pos_band = tl.load(pos_ptr + h * stride_ph + rows[:, None] * stride_pp
                       + offs_d[None, :] * stride_pd, mask=offs_d[None, :] < E, other=0.0)
    gather_index = band_index(offs_0, offs_0, BLOCK)
    scatter_columns, scatter_valid = scatter_index(offs_0, offs_band, BLOCK)
    dband = tl.zeros((BAND, BLOCK_D), ACC_DTYPE)
    # A diagonal wholly outside the causal region or the window has no visible element.
    visible = True
    if IS_CAUSAL:
        visible = first_distance + 2 * BLOCK - 2 >= 0
    if HAS_WINDOW:
        visible = visible & (first_distance < window)
    a_lo = tl.maximum(t, 0)
    a_hi = tl.minimum(tl.cdiv(L, BLOCK), key_blocks + t)
    if not visible:
        a_hi = a_lo
    for b in range(0, B):
        seed = 0
        if DROPOUT:
            seed = tl.load(seed_ptr) + b * H + h
        bh = b * H + h
        for a in range(a_lo, a_hi):
            start_m = a * BLOCK
            start_n = (a - t) * BLOCK
            offs_m = start_m + offs_0
            offs_n = start_n + offs_0
            rows_ok = offs_m[:, None] < L
            cols = offs_n[:, None] < S
            q_offsets = (b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                         + offs_d[None, :] * stride_qd)
            q_mask = rows_ok & (offs_d[None, :] < E)
            qu = tl.load(qu_ptr + q_offsets, mask=q_mask, other=0.0)
            qv = tl.load(qv_ptr + q_offsets, mask=q_mask, other=0.0)
            k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn
                        + offs_d[None, :] * stride_kd, mask=cols & (offs_d[None, :] < E),
                        other=0.0)
            v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
                        + offs_dv[None, :] * stride_vd, mask=cols & (offs_dv[None, :] < EV),
                        other=0.0)
            do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                         + offs_dv[None, :] * stride_dod,
                         mask=rows_ok & (offs_dv[None, :] < EV), other=0.0)
            lse2, delta = load_row_stats(lse_ptr + bh * L, delta_ptr + bh * L, offs_m, L,
                                         ACC_DTYPE)
            head_mask = mask_ptr  # None without a mask (NO_MASK)
            if MASK_KIND != 0:
                head_mask = mask_ptr + b * stride_mb + h * stride_mh
            p = rel_probabilities(qu, qv, k, pos_band, offs_m, offs_n, lse2, gather_index, L, S,
                                  MEM, window, head_mask,
                                  stride_mm, stride_mn, qk_scale2, MASK_KIND, IS_CAUSAL,
                                  HAS_WINDOW, True, PRECISION, UPCAST)
            ds, _ = score_gradient(p, do, v, offs_m, offs_n, delta, S, seed, dropout_p, DROPOUT,
                                   PRECISION, UPCAST)
            band_grad = band_gradient(ds, scatter_columns, scatter_valid)
            dband = dot_acc(tl.trans(band_grad).to(qv.dtype), qv, dband, PRECISION, UPCAST)
    out_offsets = ((h * tl.num_programs(0) + pid_t).to(tl.int64) * BAND + offs_band)[:, None] * E
    tl.store(dband_ptr + out_offsets + offs_d[None, :],
             (dband * scale).to(dband_ptr.dtype.element_ty), mask=offs_d[None, :] < E)
