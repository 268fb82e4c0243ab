"""Split-KV attention for a few query rows against a long key cache ("flash-decoding"), and the
in-place append of new keys and values to a preallocated cache.

Why a second forward kernel: the fused forward (kernel.py) gives each program a block of >= 16
query rows and walks every key alone, so a decode step (1-16 rows per sequence) runs B x H
programs, each reading its whole cache: at batch 1 with 32 heads, 32 of an H200's 132 SMs
stream the cache and the rest idle. Here the keys are split into ranges, one program per
(range, batch, key/value head, row block), each writes a partial softmax (its rows' output
normalised by its own sum, and that sum's log in base 2), and a second kernel combines the
ranges' partials. The G query heads that share a key/value head (GQA/MQA) and the step's query
rows are one tile of G x Lq rows, so each key is read once per key/value head, not per query
head.

Which keys a row sees (per batch row b, query row i):
  * keys j < kv_len[b], the row's filled cache (per-row lengths: a ragged batch);
  * causal: j <= i + kv_len[b] + causal_offset, i.e. the query rows are the last ones of the
    visible sequence when causal_offset = -Lq (a decode step: bottom-right alignment);
  * a window of `window` keys (> 0): j > i + kv_len[b] + causal_offset - window.
A row that sees nothing gives zeros and lse = -inf, as the fused kernel does.

Layout: q [B, Hq, Lq, E], caches [B, Hk, S_max, E|EV] (any strides), kv_len int32 [B];
partials out [B, Hq, Lq, SPLITS, EV] and lse [B, Hq, Lq, SPLITS] in fp32 (contiguous).
"""
import triton
import triton.language as tl

from ..common import dot_acc
from ..attention.kernel import online_softmax


@triton.jit
def visible_keys(key_cols, query_rows, kv_len, causal_offset, window, IS_CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr):
    """Which keys (key_cols [1, N]) each query row (query_rows [M, 1], its index in the step)
    sees: inside the filled cache, and not after it (causal) or too far before it (window)."""
    last = query_rows + kv_len + causal_offset
    seen = key_cols < kv_len
    if IS_CAUSAL:
        seen = seen & (key_cols <= last)
    if HAS_WINDOW:
        seen = seen & (key_cols > last - window)
    return seen


@triton.jit
def empty_rows(BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(acc, l, m) of rows that have seen no key yet."""
    return (tl.zeros((BLOCK_M, BLOCK_DV), ACC_DTYPE), tl.zeros((BLOCK_M,), ACC_DTYPE),
            tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE))


@triton.jit
def load_keys_t(k_ptr, offs_n, offs_d, stride_kn, stride_kd, end, E):
    """K^T [BLOCK_D, BLOCK_N] of the keys offs_n below `end` (the range's end), zeros past it."""
    return tl.load(k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                   mask=(offs_n[None, :] < end) & (offs_d[:, None] < E), other=0.0)


@triton.jit
def add_values(acc, p, alpha, v_ptr, offs_n, offs_dv, stride_vn, stride_vd, end, EV,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc rescaled by alpha plus p @ V of the keys offs_n below `end`."""
    v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(offs_n[:, None] < end) & (offs_dv[None, :] < EV), other=0.0)
    return dot_acc(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)


@triton.jit
def attention_decode_split_kernel(
        q_ptr, k_ptr, v_ptr, kv_len_ptr, part_out_ptr, part_lse_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        HQ, GROUP, LQ, E, EV, SPLITS, split_size, qk_scale2, causal_offset, window,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Program (key range, batch * key/value head, row block): the partial softmax of BLOCK_M of
    the G x Lq rows (row r: query head kv_head * G + r // Lq, query row r % Lq) over the keys
    [split * split_size, (split + 1) * split_size)."""
    split = tl.program_id(0)
    bkv = tl.program_id(1)
    HK = HQ // GROUP
    b = bkv // HK
    kv_h = bkv % HK
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * LQ
    head = kv_h * GROUP + rows // LQ
    qrow = rows % LQ
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + qrow[:, None] * stride_qm
                + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    kv_len = tl.load(kv_len_ptr + b)
    # The keys this range holds that any row of the step can see: below kv_len, and (causal)
    # up to the last row's position, (window) from the first row's window start.
    start = split * split_size
    end = tl.minimum(start + split_size, kv_len)
    if IS_CAUSAL:
        end = tl.minimum(end, LQ + kv_len + causal_offset)
    if HAS_WINDOW:
        first_key = tl.maximum(kv_len + causal_offset - window + 1, 0)
        start = tl.maximum(start, first_key // BLOCK_N * BLOCK_N)
    k_ptr += b * stride_kb + kv_h * stride_kh
    v_ptr += b * stride_vb + kv_h * stride_vh
    acc, l_i, m_i = empty_rows(BLOCK_M, BLOCK_DV, ACC_DTYPE)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        k_t = load_keys_t(k_ptr, offs_n, offs_d, stride_kn, stride_kd, end, E)
        qk = dot_acc(q, k_t, tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE), PRECISION, UPCAST)
        seen = visible_keys(offs_n[None, :], qrow[:, None], kv_len, causal_offset, window,
                            IS_CAUSAL, HAS_WINDOW) & (offs_n[None, :] < end)
        s = tl.where(seen, qk * qk_scale2, float("-inf"))
        p, alpha, l_i, m_i = online_softmax(s, m_i, l_i)
        acc = add_values(acc, p, alpha, v_ptr, offs_n, offs_dv, stride_vn, stride_vd, end, EV,
                         PRECISION, UPCAST)
    store_partial(acc, l_i, m_i, part_out_ptr, part_lse_ptr,
                  ((b * HQ + head) * LQ + qrow) * SPLITS + split, row_ok, offs_dv, EV)


@triton.jit
def store_partial(acc, l_i, m_i, part_out_ptr, part_lse_ptr, part, row_ok, offs_dv, EV):
    """A range's partial softmax of its rows: out normalised by the range's own sum, and that
    sum's log in base 2 (-inf, with zeros, for a row that saw no key of the range). `part`:
    each row's index into the [.., SPLITS] partials."""
    seen_any = l_i > 0
    safe_l = tl.where(seen_any, l_i, 1.0)
    lse2 = tl.where(seen_any, m_i + tl.log2(safe_l), float("-inf"))
    tl.store(part_out_ptr + part[:, None] * EV + offs_dv[None, :], acc / safe_l[:, None],
             mask=row_ok[:, None] & (offs_dv[None, :] < EV))
    tl.store(part_lse_ptr + part, lse2, mask=row_ok)


@triton.jit
def attention_decode_combine_kernel(
        part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, stride_ob, stride_oh, stride_om,
        stride_od, HQ, LQ, EV, SPLITS,
        BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Program (batch * query head * query row): the ranges' partial softmaxes combined,
    weighted by 2^(lse_s - lse); out in the output dtype, lse in natural log (-inf and zeros
    for a row no range saw anything of). The partials are read CHUNK_S ranges at a time (all
    128 ranges x 256 values at once would be 256 fp32 registers a thread at 4 warps)."""
    row = tl.program_id(0)
    b = row // (HQ * LQ)
    h = (row // LQ) % HQ
    i = row % LQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_s = tl.load(part_lse_ptr + row * SPLITS + offs_s, mask=offs_s < SPLITS,
                    other=float("-inf"))
    top = tl.max(lse_s, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp2(lse_s - top), 0)
    out = tl.zeros((BLOCK_DV,), lse_s.dtype)
    offs_c = tl.arange(0, CHUNK_S)
    for s0 in range(0, SPLITS, CHUNK_S):
        ranges = s0 + offs_c
        weight = tl.exp2(tl.load(part_lse_ptr + row * SPLITS + ranges, mask=ranges < SPLITS,
                                 other=float("-inf")) - top)
        parts = tl.load(part_out_ptr + (row * SPLITS + ranges[:, None]) * EV + offs_dv[None, :],
                        mask=(ranges[:, None] < SPLITS) & (offs_dv[None, :] < EV), other=0.0)
        out += tl.sum(parts * weight[:, None], 0)
    safe_total = tl.where(total > 0, total, 1.0)
    out = out / safe_total
    lse = tl.where(total > 0, (top + tl.log2(safe_total)) * 0.6931471805599453, float("-inf"))
    tl.store(out_ptr + b * stride_ob + h * stride_oh + i * stride_om + offs_dv * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=offs_dv < EV)
    tl.store(lse_ptr + row, lse.to(lse_ptr.dtype.element_ty))


@triton.jit
def kv_cache_append_kernel(
        k_cache_ptr, v_cache_ptr, k_ptr, v_ptr, cache_len_ptr,
        stride_cb, stride_ch, stride_cn, stride_cd, stride_wb, stride_wh, stride_wn, stride_wd,
        stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
        HK, S_MAX, E, EV, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Program (batch * key/value head, new row i): key and value row i written to cache
    position cache_len[b] + i. A position at or past S_MAX is not written (the caller checks
    for overflow where it can without a host sync; the kernel never writes outside the
    cache)."""
    bh = tl.program_id(0)
    i = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    pos = tl.load(cache_len_ptr + b) + i
    ok = (pos >= 0) & (pos < S_MAX)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key = tl.load(k_ptr + b * stride_kb + h * stride_kh + i * stride_kn + offs_d * stride_kd,
                  mask=offs_d < E)
    tl.store(k_cache_ptr + b * stride_cb + h * stride_ch + pos * stride_cn + offs_d * stride_cd,
             key, mask=ok & (offs_d < E))
    value = tl.load(v_ptr + b * stride_vb + h * stride_vh + i * stride_vn + offs_dv * stride_vd,
                    mask=offs_dv < EV)
    tl.store(v_cache_ptr + b * stride_wb + h * stride_wh + pos * stride_wn
             + offs_dv * stride_wd, value, mask=ok & (offs_dv < EV))
