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

from ..common import dot_acc, tanh_accurate
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
def cache_rows(offs_n, table_ptr, PAGE_SIZE, NUM_PAGES, stride_b, stride_n, end,
               PAGED: tl.constexpr):
    """The memory offsets of cache positions offs_n (a row's): contiguous, n * stride_n; paged,
    page * stride_b + (n % PAGE_SIZE) * stride_n with page = the row's block table entry
    n // PAGE_SIZE, clamped to the pool (a bad entry reads a wrong page, never outside)."""
    if PAGED:
        page = tl.load(table_ptr + offs_n // PAGE_SIZE, mask=offs_n < end, other=0)
        page = tl.minimum(tl.maximum(page, 0), NUM_PAGES - 1)
        rows = page.to(tl.int64) * stride_b + (offs_n % PAGE_SIZE) * stride_n
    else:  # one return of one type (the compiler refuses returns of int32 and int64)
        rows = offs_n.to(tl.int64) * stride_n
    return rows


@triton.jit
def rotary(x, x_pair, positions, offs_d, cos_ptr, sin_ptr, stride_ro, ROTARY_DIM, ROTARY_LEN,
           INTERLEAVED: tl.constexpr):
    """x [.., BLOCK_D] rotated at `positions` (broadcasting against x's rows) by the cos/sin
    tables [positions, ROTARY_DIM / 2], FlashAttention's rotary: dims below ROTARY_DIM pair up
    (half-split: d and d + R/2, GPT-NeoX; interleaved: 2k and 2k + 1, GPT-J), the first of a
    pair becomes x cos - x_pair sin and the second x cos + x_pair sin; x_pair is x read at each
    dim's partner (rotary_partner). Computed in fp32 (fp64 for fp64 x); positions are clamped to the tables'
    ROTARY_LEN rows (the caller checks them where it can without a sync)."""
    positions = tl.minimum(tl.maximum(positions, 0), ROTARY_LEN - 1)
    half = ROTARY_DIM // 2
    if INTERLEAVED:
        freq = offs_d // 2
        first = offs_d % 2 == 0
    else:
        freq = offs_d % half
        first = offs_d < half
    rotated = offs_d < ROTARY_DIM
    cos = tl.load(cos_ptr + positions * stride_ro + freq, mask=rotated, other=1.0)
    sin = tl.load(sin_ptr + positions * stride_ro + freq, mask=rotated, other=0.0)
    if x.dtype == tl.float64:
        work = x
        pair = x_pair
    else:
        work = x.to(tl.float32)
        pair = x_pair.to(tl.float32)
    sign = tl.where(first, -1.0, 1.0)
    out = work * cos.to(work.dtype) + sign * pair * sin.to(work.dtype)
    return tl.where(rotated, out, work).to(x.dtype)


@triton.jit
def rotary_partner(offs_d, ROTARY_DIM, INTERLEAVED: tl.constexpr):
    """Each dim's rotary partner (itself past ROTARY_DIM)."""
    half = ROTARY_DIM // 2
    if INTERLEAVED:
        partner = offs_d ^ 1
    else:
        partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
    return tl.where(offs_d < ROTARY_DIM, partner, offs_d)


@triton.jit
def attention_decode_split_kernel(
        q_ptr, k_ptr, v_ptr, kv_len_ptr, part_out_ptr, part_lse_ptr, key_start_ptr,
        batch_index_ptr, block_table_ptr, alibi_ptr, rotary_pos_ptr, cos_ptr, sin_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_tb, stride_ab, stride_ah, stride_ro,
        HQ, GROUP, LQ, E, EV, SPLITS, split_size, qk_scale2, softcap_scale, causal_offset,
        window, PAGE_SIZE, NUM_PAGES, ROTARY_DIM, ROTARY_LEN,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        LEFTPAD: tl.constexpr, BATCH_INDEX: tl.constexpr, PAGED: tl.constexpr,
        SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, ROTARY: tl.constexpr,
        INTERLEAVED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        ACC_DTYPE: tl.constexpr):
    """Program (key range, batch * key/value head, row block): the partial softmax of BLOCK_M of
    the G x Lq rows (row r: query head kv_head * G + r // Lq, query row r % Lq) over the keys
    [split * split_size, (split + 1) * split_size). LEFTPAD: keys below key_start[b] are
    padding; BATCH_INDEX: batch row b reads cache row batch_index[b]; PAGED: the cache is a
    pool of pages [NUM_PAGES, Hk, PAGE_SIZE, E] and the row's positions live where its block
    table says; SOFTCAP / ALIBI: kernels/attention/kernel.py's score modifiers, the query row's
    position (kv_len - Lq + i) as the diagonal; ROTARY: the query rows are rotated as they are
    loaded, at positions rotary_pos[b] + i when causal or windowed, else all at rotary_pos[b]
    (FlashAttention's rule; the new keys were rotated by the append)."""
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
    q_rows = q_ptr + b * stride_qb + head[:, None] * stride_qh + qrow[:, None] * stride_qm
    q = tl.load(q_rows + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    if ROTARY:
        partner = rotary_partner(offs_d, ROTARY_DIM, INTERLEAVED)
        q_pair = tl.load(q_rows + partner[None, :] * stride_qd,
                         mask=row_ok[:, None] & (partner[None, :] < E), other=0.0)
        positions = tl.load(rotary_pos_ptr + b) + tl.zeros_like(qrow)[:, None]
        if IS_CAUSAL or HAS_WINDOW:  # FlashAttention's rule: else every row at the first
            positions += qrow[:, None]
        q = rotary(q, q_pair, positions, offs_d[None, :],
                   cos_ptr, sin_ptr, stride_ro, ROTARY_DIM, ROTARY_LEN, INTERLEAVED)
    kv_len = tl.load(kv_len_ptr + b)
    # The keys this range holds that any row of the step can see: below kv_len, and (causal)
    # up to the last row's position, (window) from the first row's window start, (left
    # padding) from the row's first real key.
    start = split * split_size
    end = tl.minimum(start + split_size, kv_len)
    if IS_CAUSAL:
        end = tl.minimum(end, LQ + kv_len + causal_offset)
    if HAS_WINDOW:
        first_key = tl.maximum(kv_len + causal_offset - window + 1, 0)
        start = tl.maximum(start, first_key // BLOCK_N * BLOCK_N)
    key_lo = 0
    if LEFTPAD:
        key_lo = tl.load(key_start_ptr + b)
        start = tl.maximum(start, tl.maximum(key_lo, 0) // BLOCK_N * BLOCK_N)
    row = b
    if BATCH_INDEX:
        row = tl.load(batch_index_ptr + b)
    table = block_table_ptr
    if PAGED:
        table += row * stride_tb
    else:
        k_ptr += row.to(tl.int64) * stride_kb
        v_ptr += row.to(tl.int64) * stride_vb
    k_ptr += kv_h * stride_kh
    v_ptr += kv_h * stride_vh
    alibi2 = 0.0
    if ALIBI:
        alibi2 = tl.load(alibi_ptr + b * stride_ab + head * stride_ah).to(ACC_DTYPE) * 1.4426950408889634
    acc, l_i, m_i = empty_rows(BLOCK_M, BLOCK_DV, ACC_DTYPE)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        key_rows = cache_rows(offs_n, table, PAGE_SIZE, NUM_PAGES, stride_kb, stride_kn, end,
                              PAGED)
        k_t = tl.load(k_ptr + key_rows[None, :] + offs_d[:, None] * stride_kd,
                      mask=(offs_n[None, :] < end) & (offs_d[:, None] < E), other=0.0)
        qk = dot_acc(q, k_t, tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE), PRECISION, UPCAST)
        seen = visible_keys(offs_n[None, :], qrow[:, None], kv_len, causal_offset, window,
                            IS_CAUSAL, HAS_WINDOW) & (offs_n[None, :] < end)
        if LEFTPAD:
            seen = seen & (offs_n[None, :] >= key_lo)
        if SOFTCAP:
            s = tanh_accurate(qk * softcap_scale) * qk_scale2
        else:
            s = qk * qk_scale2
        if ALIBI:
            position = qrow[:, None] + kv_len + causal_offset
            s = s - alibi2[:, None] * tl.abs(position - offs_n[None, :]).to(s.dtype)
        s = tl.where(seen, s, float("-inf"))
        p, alpha, l_i, m_i = online_softmax(s, m_i, l_i)
        value_rows = cache_rows(offs_n, table, PAGE_SIZE, NUM_PAGES, stride_vb, stride_vn, end,
                                PAGED)
        v = tl.load(v_ptr + value_rows[:, None] + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < end) & (offs_dv[None, :] < EV), other=0.0)
        acc = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
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
        part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, sinks_ptr, stride_ob, stride_oh,
        stride_om, stride_od, HQ, LQ, EV, SPLITS,
        BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
        SINKS: tl.constexpr):
    """Program (batch * query head * query row): the ranges' partial softmaxes combined,
    weighted by 2^(lse_s - lse); out in the output dtype, lse in natural log (-inf and zeros
    for a row no range saw anything of). The partials are read CHUNK_S ranges at a time (all
    128 ranges x 256 values at once would be 256 fp32 registers a thread at 4 warps). SINKS:
    the head's sink logit joins the denominator here, once, with no value."""
    row = tl.program_id(0)
    b = row // (HQ * LQ)
    h = (row // LQ) % HQ
    i = row % LQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_s = tl.load(part_lse_ptr + row * SPLITS + offs_s, mask=offs_s < SPLITS,
                    other=float("-inf"))
    top = tl.max(lse_s, 0)
    if SINKS:
        sink2 = tl.load(sinks_ptr + h).to(lse_s.dtype) * 1.4426950408889634
        top = tl.maximum(top, sink2)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp2(lse_s - top), 0)
    if SINKS:
        total += tl.exp2(sink2 - top)
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
        k_cache_ptr, v_cache_ptr, k_ptr, v_ptr, cache_len_ptr, batch_index_ptr,
        block_table_ptr, cos_ptr, sin_ptr,
        stride_cb, stride_ch, stride_cn, stride_cd, stride_wb, stride_wh, stride_wn, stride_wd,
        stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
        stride_tb, stride_ro, HK, S_MAX, E, EV, PAGE_SIZE, NUM_PAGES, ROTARY_DIM, ROTARY_LEN,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BATCH_INDEX: tl.constexpr,
        PAGED: tl.constexpr, ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Program (batch * key/value head, new row i): key and value row i written to cache
    position cache_len[b] + i (of cache row batch_index[b]; paged: where the row's block table
    puts that position), the key rotated at that position first (ROTARY). A position at or
    past S_MAX is not written (the caller checks for overflow where it can without a host
    sync; the kernel never writes outside the cache)."""
    bh = tl.program_id(0)
    i = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    pos = tl.load(cache_len_ptr + b) + i
    ok = (pos >= 0) & (pos < S_MAX)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row = b
    if BATCH_INDEX:
        row = tl.load(batch_index_ptr + b)
    key_row = k_ptr + b * stride_kb + h * stride_kh + i * stride_kn
    key = tl.load(key_row + offs_d * stride_kd, mask=offs_d < E)
    if ROTARY:
        partner = rotary_partner(offs_d, ROTARY_DIM, INTERLEAVED)
        key = rotary(key, tl.load(key_row + partner * stride_kd, mask=partner < E), pos,
                     offs_d, cos_ptr, sin_ptr, stride_ro, ROTARY_DIM, ROTARY_LEN, INTERLEAVED)
    safe_pos = tl.minimum(tl.maximum(pos, 0), S_MAX - 1)
    if PAGED:
        key_at = cache_rows(safe_pos, block_table_ptr + row * stride_tb, PAGE_SIZE, NUM_PAGES,
                            stride_cb, stride_cn, S_MAX, True)
        value_at = cache_rows(safe_pos, block_table_ptr + row * stride_tb, PAGE_SIZE,
                              NUM_PAGES, stride_wb, stride_wn, S_MAX, True)
    else:
        key_at = row.to(tl.int64) * stride_cb + safe_pos * stride_cn
        value_at = row.to(tl.int64) * stride_wb + safe_pos * stride_wn
    tl.store(k_cache_ptr + key_at + h * stride_ch + offs_d * stride_cd, key,
             mask=ok & (offs_d < E))
    value = tl.load(v_ptr + b * stride_vb + h * stride_vh + i * stride_vn + offs_dv * stride_vd,
                    mask=offs_dv < EV)
    tl.store(v_cache_ptr + value_at + h * stride_wh + offs_dv * stride_wd, value,
             mask=ok & (offs_dv < EV))
