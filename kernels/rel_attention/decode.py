"""Split-KV relative-position attention for a few query rows (a Transformer-XL generation step:
1-16 new rows against memory + segment), forward only.

The split kernel of kernels/kv_cache/kernel.py with the Transformer-XL score: each program
takes a range of keys of one (batch, head) and every query row, and adds the position term
qv_i . pos[row(M + i - j)] per key block from the band of pos rows the block needs (BLOCK_M +
BLOCK_N - 1 consecutive distances: one [BLOCK_M, BAND] GEMM against the band, then a gather
along the diagonals, as the fused kernels' backward does; kernels/rel_attention/forward.py
explains the band). Its partial softmaxes go through the attention decode's combine kernel.

Layout: qu = q + content_bias and qv = q + position_bias [B, H, Lq, E] (same strides), k
[B, H, Lk, E], v [B, H, Lk, EV], pos [P, H, E], any strides; partials [B, H, Lq, SPLITS, EV]
and [B, H, Lq, SPLITS] fp32 (contiguous). Visibility as fastseq.ops.rel_attention's: M = Lk -
Lq memory keys, distance d = M + i - j, causal d >= 0, window d < window.
"""
import triton
import triton.language as tl

from ..kv_cache.kernel import add_values, empty_rows, load_keys_t, store_partial
from ..attention.kernel import online_softmax
from ..common import dot_acc
from .forward import band_index, pos_band_rows, relative_visibility


@triton.jit
def rel_attention_decode_split_kernel(
        qu_ptr, qv_ptr, k_ptr, v_ptr, pos_ptr, part_out_ptr, part_lse_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_pp, stride_ph, stride_pd,
        H, LQ, S, E, EV, P, MEM, window, pos_offset, SPLITS, split_size, qk_scale2,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        ACC_DTYPE: tl.constexpr):
    """Program (key range, batch * head): the partial softmax of the Lq (<= BLOCK_M) query
    rows over keys [split * split_size, (split + 1) * split_size)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_band = tl.arange(0, BAND)
    q_offsets = b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q_mask = row_ok[:, None] & (offs_d[None, :] < E)
    qu = tl.load(qu_ptr + q_offsets, mask=q_mask, other=0.0)
    qv = tl.load(qv_ptr + q_offsets, mask=q_mask, other=0.0)
    # Keys any row can see in this range: causal up to the last row's position (M + Lq - 1 =
    # S - 1: every key), window from the first row's (d < window: j > M - window).
    start = split * split_size
    end = tl.minimum(start + split_size, S)
    if HAS_WINDOW:
        start = tl.maximum(start, tl.maximum(MEM - window + 1, 0) // BLOCK_N * BLOCK_N)
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    pos_ptr += h * stride_ph
    gather_index = band_index(rows, offs_n0, BLOCK_N)
    acc, l_i, m_i = empty_rows(BLOCK_M, BLOCK_DV, ACC_DTYPE)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        k_t = load_keys_t(k_ptr, offs_n, offs_d, stride_kn, stride_kd, end, E)
        # Tile element (a, c) is at distance MEM + a - (start_n + c): band column
        # a - c + BLOCK_N - 1 of the band that starts at MEM - start_n - (BLOCK_N - 1).
        band_rows = pos_band_rows(MEM - start_n - (BLOCK_N - 1), offs_band, P, pos_offset)
        pos_t = tl.load(pos_ptr + band_rows[None, :] * stride_pp + offs_d[:, None] * stride_pd,
                        mask=offs_d[:, None] < E, other=0.0)
        band = dot_acc(qv, pos_t, tl.zeros((BLOCK_M, BAND), ACC_DTYPE), PRECISION, UPCAST)
        qk = dot_acc(qu, k_t, tl.gather(band, gather_index, axis=1), PRECISION, UPCAST)
        s = relative_visibility(qk * qk_scale2, rows[:, None], offs_n[None, :], end, MEM, window,
                                IS_CAUSAL, HAS_WINDOW, True)
        p, alpha, l_i, m_i = online_softmax(s, m_i, l_i)
        acc = add_values(acc, p, alpha, v_ptr, offs_n, offs_dv, stride_vn, stride_vd, end, EV,
                         PRECISION, UPCAST)
    store_partial(acc, l_i, m_i, part_out_ptr, part_lse_ptr, (bh * LQ + rows) * SPLITS + split,
                  row_ok, offs_dv, EV)
