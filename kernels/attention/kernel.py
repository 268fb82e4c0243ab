"""Fused scaled dot-product attention (FlashAttention-2's algorithm): a forward kernel and two
backward kernels, nothing of size L x S ever written to memory (except the gradient of a float
mask, which is L x S by definition and written only when that mask requires grad).

Layout: query [B, H, L, E], key [B, H/G, S, E], value [B, H/G, S, EV] with any strides (G query
heads share a key/value head: GQA), out [B, H, L, EV], lse [B, H, L] fp32 (natural log). The
mask, when there is one, is passed as a [B, H, L, S] view with broadcast (zero) strides, so a
key-padding mask [B, 1, 1, S] is read as it is stored.

Scores live in base 2 inside the kernels: s2 = (q.k) * scale * log2(e) + mask * log2(e), so the
softmax uses exp2 (one MUFU op) and the scale is folded into one multiply. A row with no visible
key keeps m = -inf and l = 0 and gives zeros and lse = -inf (torch gives NaN).

Visibility, all of it computed from indices (nothing L x S read but a mask tensor): query i's
diagonal is key i + shift (shift 0: torch's top-left alignment; SHIFTED: bottom-right, the last
query row meets the last visible key, shift = key_hi - L). RIGHT_BOUND: keys j <= i + shift +
window_right (causal: window_right 0); LEFT_BOUND: j >= i + shift - window_left; KEY_RANGE: each
batch row sees keys key_start[b] <= j < key_end[b] (padding given as lengths). Key blocks that
every row of a query block sees run without any checking code; only the blocks crossing an edge
pay for it (three loops over one block function with a constexpr flag).

Score modifiers (FlashAttention's definitions): SOFTCAP replaces q.k * scale by
softcap * tanh(q.k * scale / softcap) (the backward multiplies dS by 1 - tanh^2); ALIBI adds
-slope[b, h] * |i + shift - j|; SINKS adds a per-head logit to every row's softmax denominator
(no value: a row's probabilities sum to less than one; its lse includes the sink).

VARLEN (packed sequences, FlashAttention's varlen layout): the tensors hold every sequence's rows
one after another (batch strides 0), sequence b's query rows are cu_q[b]:cu_q[b+1] and its keys
cu_k[b]:cu_k[b+1]; the grid covers the longest sequence and programs past a sequence's end
store nothing.

Dropout draws a Philox number per (batch, head, row, column) from a seed drawn from torch's
generator by the caller: the backward regenerates exactly the forward's keep-mask.

Backward (deterministic, no atomics): delta = rowsum(dO * O) - dlse comes from the caller; one
kernel per key block and query head accumulates dK and dV over every query block (GQA: the
group's heads are summed afterwards), another per query block accumulates dQ.
"""
import triton
import triton.language as tl

from ..common import dot_acc, tanh_accurate

LOG2E = tl.constexpr(1.4426950408889634)  # a global a @jit function may read

# MASK_KIND: none, a bool or float [L, S] tile per (batch, head), or one bool or float row of S
# keys shared by every query
NO_MASK, BOOL_MASK, FLOAT_MASK, BOOL_KEY_MASK, FLOAT_KEY_MASK = 0, 1, 2, 3, 4


@triton.jit
def dropout_keep(seed, query_rows, key_cols, S, dropout_p):
    """The keep-mask of a tile: Philox(seed of this batch-head, i*S + j). query_rows and
    key_cols are the tile's query and key indices shaped to broadcast ([M, 1] and [1, N], or
    [1, M] and [N, 1] for a transposed tile)."""
    return tl.rand(seed, query_rows * S + key_cols) >= dropout_p


@triton.jit
def program_heads(bh, H, GROUP):
    """(batch, query head, key/value head) of program axis 1 (batch * query heads)."""
    h = bh % H
    return bh // H, h, h // GROUP


@triton.jit
def apply_mask(s, query_rows, key_cols, L, S, mask_ptr, stride_mm, stride_mn,
               MASK_KIND: tl.constexpr):
    """Base-2 scores s with the attention mask applied (-inf where a bool mask hides a key, a
    float mask added in base 2). query_rows and key_cols are the tile's query and key indices
    shaped to broadcast ([M, 1] and [1, N], or [1, M] and [N, 1] for a transposed tile)."""
    if MASK_KIND == 1 or MASK_KIND == 2:
        in_bounds = (query_rows < L) & (key_cols < S)
        ptrs = mask_ptr + query_rows * stride_mm + key_cols * stride_mn
        if MASK_KIND == 1:
            keep = tl.load(ptrs, mask=in_bounds, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            bias = tl.load(ptrs, mask=in_bounds, other=0.0).to(s.dtype)
            s = s + bias * 1.4426950408889634
    if MASK_KIND == 3 or MASK_KIND == 4:
        # One mask row for every query (stride 0 over rows: key padding [B, 1, 1, S]): a
        # BLOCK_N vector instead of a tile of per-element pointers (a 128 x 64 tile of them is
        # 128 registers a thread at 4 warps and made the forward spill on sm_90).
        ptrs = mask_ptr + key_cols * stride_mn
        if MASK_KIND == 3:
            keep = tl.load(ptrs, mask=key_cols < S, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            bias = tl.load(ptrs, mask=key_cols < S, other=0.0).to(s.dtype)
            s = s + bias * 1.4426950408889634
    return s


@triton.jit
def online_softmax(s, m_i, l_i):
    """One key block of the online softmax over base-2 scores s [M, N]: (p = exp2(s - m_new),
    alpha = the factor that rescales the running sums, l_new, m_new)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen nothing visible yet keeps m = -inf: shift by 0 so no -inf - -inf.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def finish_rows(acc, l_i, m_i, dropout_p, DROPOUT: tl.constexpr):
    """(out = acc / l (scaled by 1/(1-p) under dropout), lse in natural log) of finished rows;
    a row that saw no visible key gives zeros and lse = -inf."""
    seen = l_i > 0
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    return acc * inv_l[:, None], lse




@triton.jit
def add_sink(acc, l_i, m_i, sink2):
    """The running sums of finished rows with the head's sink logit (base 2) joined: it adds
    exp2(sink2) to the denominator and nothing to the numerator (gpt-oss's attention sinks)."""
    m_new = tl.maximum(m_i, sink2)
    alpha = tl.exp2(m_i - m_new)  # a row that saw nothing (m = -inf) keeps acc = l = 0
    return acc * alpha[:, None], l_i * alpha + tl.exp2(sink2 - m_new), m_new


@triton.jit
def split_range(lo, free_lo, free_hi, hi):
    """(a, b) splitting the block loop [lo, hi) into [lo, a) and [b, hi), which need the
    visibility checks, and [a, b), which needs none (the free range [free_lo, free_hi) clipped;
    empty when it lies outside [lo, hi) or hi <= lo)."""
    a = tl.minimum(tl.maximum(free_lo, lo), hi)
    b = tl.minimum(tl.maximum(free_hi, a), hi)
    return a, b


@triton.jit
def sequence_geometry(b, L, S, cu_q_ptr, cu_k_ptr, key_start_ptr, key_end_ptr,
                      VARLEN: tl.constexpr, KEY_RANGE: tl.constexpr, SHIFTED: tl.constexpr):
    """(first query row, query rows, first key, keys, key_lo, key_hi, shift) of batch row (or
    packed sequence) b: the rows and keys live at q0 .. q0 + L and k0 .. k0 + S of the tensors,
    keys key_lo <= j < key_hi can be visible (clamped to [0, S]: a bad range reads nothing out
    of bounds), and query i's diagonal is key i + shift."""
    q0 = 0
    k0 = 0
    if VARLEN:  # offsets clamped to the tensors' rows: bad ones never read out of bounds
        q0 = tl.minimum(tl.maximum(tl.load(cu_q_ptr + b), 0), L)
        L = tl.minimum(tl.maximum(tl.load(cu_q_ptr + b + 1), q0), L) - q0
        k0 = tl.minimum(tl.maximum(tl.load(cu_k_ptr + b), 0), S)
        S = tl.minimum(tl.maximum(tl.load(cu_k_ptr + b + 1), k0), S) - k0
    key_lo = 0
    key_hi = S
    if KEY_RANGE:
        key_lo = tl.maximum(tl.load(key_start_ptr + b), 0)
        key_hi = tl.minimum(tl.load(key_end_ptr + b), S)
    shift = 0
    if SHIFTED:
        shift = key_hi - L
    return q0, L, k0, S, key_lo, key_hi, shift


@triton.jit
def query_block_key_range(start_m, L, key_lo, key_hi, shift, window_left, window_right,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          LEFT_BOUND: tl.constexpr, RIGHT_BOUND: tl.constexpr):
    """(lo, a, b, hi) for the query rows [start_m, start_m + BLOCK_M) below L: the key blocks
    they may see start in [lo, hi); every row sees the blocks in [a, b) whole (no checks). A
    block with no row (past a packed sequence's end) gets an empty range."""
    last_m = tl.minimum(start_m + BLOCK_M, L) - 1
    lo = key_lo
    free_lo = key_lo
    hi = key_hi
    free_hi = key_hi
    if LEFT_BOUND:
        lo = tl.maximum(lo, start_m + shift - window_left)
        free_lo = tl.maximum(free_lo, last_m + shift - window_left)
    if RIGHT_BOUND:
        hi = tl.minimum(hi, last_m + shift + window_right + 1)
        free_hi = tl.minimum(free_hi, start_m + shift + window_right + 1)
    lo = tl.maximum(lo, 0) // BLOCK_N * BLOCK_N
    hi = tl.where(last_m >= start_m, hi, lo)
    free_lo = tl.cdiv(tl.maximum(free_lo, 0), BLOCK_N) * BLOCK_N
    free_hi = tl.maximum(free_hi, 0) // BLOCK_N * BLOCK_N
    a, b = split_range(lo, free_lo, free_hi, hi)
    return lo, a, b, hi


@triton.jit
def key_block_query_range(start_n, L, key_lo, key_hi, shift, window_left, window_right,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          LEFT_BOUND: tl.constexpr, RIGHT_BOUND: tl.constexpr,
                          KEY_RANGE: tl.constexpr):
    """(lo, a, b, hi) over query rows for the keys [start_n, start_n + BLOCK_N): rows in
    [lo, hi) may see some of them, rows in [a, b) see every one below key_hi (no checks; keys
    past it are never stored). A block with no visible key gets an empty range."""
    first_n = tl.maximum(start_n, key_lo)
    last_n = tl.minimum(start_n + BLOCK_N, key_hi) - 1
    lo = 0
    free_lo = 0
    hi = L
    free_hi = tl.cdiv(L, BLOCK_M) * BLOCK_M  # rows past L add nothing (their lse reads +inf)
    if RIGHT_BOUND:  # row i sees key j when i >= j - shift - window_right
        lo = tl.maximum(first_n - shift - window_right, 0)
        free_lo = start_n + BLOCK_N - 1 - shift - window_right
    if LEFT_BOUND:  # ... and when i <= j - shift + window_left
        hi = tl.minimum(last_n - shift + window_left + 1, L)
        free_hi = start_n - shift + window_left + 1
    if KEY_RANGE:  # a block crossing the range's edges checks every row
        inside = (start_n >= key_lo) & (start_n + BLOCK_N <= key_hi)
        free_hi = tl.where(inside, free_hi, free_lo)
    lo = lo // BLOCK_M * BLOCK_M
    hi = tl.where(first_n <= last_n, hi, lo)
    free_lo = tl.cdiv(tl.maximum(free_lo, 0), BLOCK_M) * BLOCK_M
    free_hi = tl.maximum(free_hi, 0) // BLOCK_M * BLOCK_M
    a, b = split_range(lo, free_lo, free_hi, hi)
    return lo, a, b, hi


@triton.jit
def scores_base2(qk, query_rows, key_cols, L, S, mask_ptr, stride_mm, stride_mn, qk_scale2,
                 softcap_scale, alibi2, shift, window_left, window_right, key_lo, key_hi,
                 MASK_KIND: tl.constexpr, CHECK: tl.constexpr, LEFT_BOUND: tl.constexpr,
                 RIGHT_BOUND: tl.constexpr, KEY_RANGE: tl.constexpr, SOFTCAP: tl.constexpr,
                 ALIBI: tl.constexpr):
    """The scores of a tile in base 2 from its dot products qk, -inf where a key is not visible
    to a query (CHECK: the tile crosses an edge of what its rows see). query_rows and key_cols
    as in apply_mask, so the same code serves q k^T tiles and k q^T tiles. SOFTCAP:
    qk_scale2 = softcap * log2(e) and softcap_scale = scale / softcap."""
    if SOFTCAP:
        s = tanh_accurate(qk * softcap_scale) * qk_scale2
    else:
        s = qk * qk_scale2
    s = apply_mask(s, query_rows, key_cols, L, S, mask_ptr, stride_mm, stride_mn, MASK_KIND)
    if ALIBI:
        s = s - alibi2 * tl.abs(query_rows + shift - key_cols).to(s.dtype)
    if CHECK:
        seen = key_cols < key_hi
        if KEY_RANGE:
            seen = seen & (key_cols >= key_lo)
        if RIGHT_BOUND:
            seen = seen & (key_cols <= query_rows + shift + window_right)
        if LEFT_BOUND:
            seen = seen & (key_cols >= query_rows + shift - window_left)
        s = tl.where(seen, s, float("-inf"))
    return s


@triton.jit
def softcap_derivative(qk, softcap_scale):
    """d(softcap * tanh(x / softcap)) / dx at x = qk * scale: 1 - tanh^2."""
    t = tanh_accurate(qk * softcap_scale)
    return 1.0 - t * t


@triton.jit
def forward_block(acc, l_i, m_i, q, start_n, offs_m, offs_n0, offs_d, offs_dv, k_ptr, v_ptr,
                  stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S, mask_ptr, stride_mm,
                  stride_mn, qk_scale2, softcap_scale, alibi2, shift, window_left, window_right,
                  key_lo, key_hi, seed, dropout_p, MASK_KIND: tl.constexpr, CHECK: tl.constexpr,
                  LEFT_BOUND: tl.constexpr, RIGHT_BOUND: tl.constexpr, KEY_RANGE: tl.constexpr,
                  SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of the online softmax: rescale the running sums, add p @ v."""
    offs_n = start_n + offs_n0
    k_t = tl.load(k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                  mask=(offs_n[None, :] < S) & (offs_d[:, None] < E), other=0.0)
    qk = dot_acc(q, k_t, tl.zeros((q.shape[0], k_t.shape[1]), acc.dtype), PRECISION, UPCAST)
    s = scores_base2(qk, offs_m[:, None], offs_n[None, :], L, S, mask_ptr, stride_mm,
                     stride_mn, qk_scale2, softcap_scale, alibi2, shift, window_left,
                     window_right, key_lo, key_hi, MASK_KIND, CHECK, LEFT_BOUND, RIGHT_BOUND,
                     KEY_RANGE, SOFTCAP, ALIBI)
    p, alpha, l_i, m_new = online_softmax(s, m_i, l_i)
    if DROPOUT:
        p = tl.where(dropout_keep(seed, offs_m[:, None], offs_n[None, :], S, dropout_p), p, 0.0)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(offs_n[:, None] < S) & (offs_dv[None, :] < EV), other=0.0)
    acc = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
    return acc, l_i, m_new


@triton.jit
def attention_forward_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, mask_ptr, seed_ptr, cu_q_ptr, cu_k_ptr,
        key_start_ptr, key_end_ptr, alibi_ptr, sinks_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
        stride_mb, stride_mh, stride_mm, stride_mn, stride_lb, stride_lh, stride_ab, stride_ah,
        H, GROUP, L, S, E, EV, qk_scale2, softcap_scale, dropout_p, window_left, window_right,
        length_bucket,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, LEFT_BOUND: tl.constexpr, RIGHT_BOUND: tl.constexpr,
        SHIFTED: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr,
        KEY_RANGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
        SINKS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Program (query block, batch * head): out and lse of BLOCK_M query rows. length_bucket is
    unused here: it is the autotuner's key (kernels/attention/launch.py)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, kv_h = program_heads(bh, H, GROUP)
    q0, L, k0, S, key_lo, key_hi, shift = sequence_geometry(
        b, L, S, cu_q_ptr, cu_k_ptr, key_start_ptr, key_end_ptr, VARLEN, KEY_RANGE, SHIFTED)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + (q0 + offs_m[:, None]) * stride_qm
                + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < E), other=0.0)
    k_ptr += b * stride_kb + kv_h * stride_kh + k0 * stride_kn
    v_ptr += b * stride_vb + kv_h * stride_vh + k0 * stride_vn
    if MASK_KIND != 0:  # NO_MASK: mask_ptr is None (a constexpr)
        mask_ptr += b * stride_mb + h * stride_mh
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr) + bh
    alibi2 = 0.0
    if ALIBI:
        alibi2 = tl.load(alibi_ptr + b * stride_ab + h * stride_ah).to(ACC_DTYPE) * LOG2E
    acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    lo, a, b_free, hi = query_block_key_range(start_m, L, key_lo, key_hi, shift, window_left,
                                              window_right, BLOCK_M, BLOCK_N, LEFT_BOUND,
                                              RIGHT_BOUND)
    if LEFT_BOUND or KEY_RANGE:  # else [lo, a) is empty: no third loop to compile
        for start_n in range(lo, a, BLOCK_N):
            acc, l_i, m_i = forward_block(
                acc, l_i, m_i, q, start_n, offs_m, offs_n0, offs_d, offs_dv, k_ptr, v_ptr,
                stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S, mask_ptr, stride_mm,
                stride_mn, qk_scale2, softcap_scale, alibi2, shift, window_left, window_right,
                key_lo, key_hi, seed, dropout_p, MASK_KIND, True, LEFT_BOUND, RIGHT_BOUND,
                KEY_RANGE, SOFTCAP, ALIBI, DROPOUT, PRECISION, UPCAST)
    if not (LEFT_BOUND or KEY_RANGE):
        a = 0
    for start_n in range(a, b_free, BLOCK_N):
        acc, l_i, m_i = forward_block(
            acc, l_i, m_i, q, start_n, offs_m, offs_n0, offs_d, offs_dv, k_ptr, v_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S, mask_ptr, stride_mm,
            stride_mn, qk_scale2, softcap_scale, alibi2, shift, window_left, window_right,
            key_lo, key_hi, seed, dropout_p, MASK_KIND, False, LEFT_BOUND, RIGHT_BOUND,
            KEY_RANGE, SOFTCAP, ALIBI, DROPOUT, PRECISION, UPCAST)
    for start_n in range(b_free, hi, BLOCK_N):
        acc, l_i, m_i = forward_block(
            acc, l_i, m_i, q, start_n, offs_m, offs_n0, offs_d, offs_dv, k_ptr, v_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S, mask_ptr, stride_mm,
            stride_mn, qk_scale2, softcap_scale, alibi2, shift, window_left, window_right,
            key_lo, key_hi, seed, dropout_p, MASK_KIND, True, LEFT_BOUND, RIGHT_BOUND,
            KEY_RANGE, SOFTCAP, ALIBI, DROPOUT, PRECISION, UPCAST)
    if SINKS:
        acc, l_i, m_i = add_sink(acc, l_i, m_i, tl.load(sinks_ptr + h).to(ACC_DTYPE) * LOG2E)
    out, lse = finish_rows(acc, l_i, m_i, dropout_p, DROPOUT)
    row_ok = offs_m < L
    tl.store(out_ptr + b * stride_ob + h * stride_oh + (q0 + offs_m[:, None]) * stride_om
             + offs_dv[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < EV))
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + q0 + offs_m,
             lse.to(lse_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def load_row_stats(lse_ptr, delta_ptr, offs_m, L, ACC_DTYPE: tl.constexpr):
    """(lse in base 2, delta) of the rows offs_m. Rows past L read lse2 = +inf, so their
    probabilities are 0 and they add nothing; rows with nothing visible (lse = -inf) read 0."""
    lse = tl.load(lse_ptr + offs_m, mask=offs_m < L, other=float("inf")).to(ACC_DTYPE)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + offs_m, mask=offs_m < L, other=0.0).to(ACC_DTYPE)
    return lse2, delta


@triton.jit
def score_gradient(p, do, v, offs_m, offs_n, delta, S, seed, dropout_p,
                   DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """(dS = P * (dP - delta), the probabilities as they multiplied V in the forward)."""
    dp = dot_acc(do, tl.trans(v), tl.zeros_like(p), PRECISION, UPCAST)
    p_used = p
    if DROPOUT:
        keep = dropout_keep(seed, offs_m[:, None], offs_n[None, :], S, dropout_p)
        p_used = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    return p * (dp - delta[:, None]), p_used


@triton.jit
def key_block_gradients(dk, dv, k, v, start_m, offs_n, offs_m0, offs_d, offs_dv, q_ptr, do_ptr,
                        lse_ptr, delta_ptr, dmask_ptr, stride_qm, stride_qd, stride_dom,
                        stride_dod, E, EV, L, S, mask_ptr, stride_mm, stride_mn, qk_scale2,
                        softcap_scale, alibi2, shift, window_left, window_right, key_lo, key_hi,
                        seed, dropout_p, MASK_KIND: tl.constexpr, CHECK: tl.constexpr,
                        LEFT_BOUND: tl.constexpr, RIGHT_BOUND: tl.constexpr,
                        KEY_RANGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                        DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        ACC_DTYPE: tl.constexpr):
    """One query block's share of dK and dV (and of the float mask's gradient) for a key block.

    Computed transposed, as Triton's fused-attention tutorial does: P^T = exp2(k q^T - lse) is
    [BLOCK_N, BLOCK_M], so dV += P^T dO and dK += dS^T q take the tiles as they come out of the
    dots; only loaded operands are transposed. (Transposing the computed P and dS instead made
    every candidate configuration of this kernel spill on sm_90 at head dim 64.)"""
    offs_m = start_m + offs_m0
    query_rows = offs_m[None, :]
    key_cols = offs_n[:, None]
    q_t = tl.load(q_ptr + query_rows * stride_qm + offs_d[:, None] * stride_qd,
                  mask=(query_rows < L) & (offs_d[:, None] < E), other=0.0)
    do = tl.load(do_ptr + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=(offs_m[:, None] < L) & (offs_dv[None, :] < EV), other=0.0)
    lse2, delta = load_row_stats(lse_ptr, delta_ptr, offs_m, L, ACC_DTYPE)
    qk_t = dot_acc(k, q_t, tl.zeros((k.shape[0], q_t.shape[1]), ACC_DTYPE), PRECISION, UPCAST)
    s_t = scores_base2(qk_t, query_rows, key_cols, L, S, mask_ptr, stride_mm, stride_mn,
                       qk_scale2, softcap_scale, alibi2, shift, window_left, window_right,
                       key_lo, key_hi, MASK_KIND, CHECK, LEFT_BOUND, RIGHT_BOUND, KEY_RANGE,
                       SOFTCAP, ALIBI)
    factor = 1.0
    if SOFTCAP:
        factor = softcap_derivative(qk_t, softcap_scale)
    return scaled_key_gradients(dk, dv, s_t, q_t, v, do, lse2, delta, query_rows, key_cols, L,
                                S, dmask_ptr, seed, dropout_p, factor, DROPOUT, MASK_GRAD,
                                SOFTCAP, PRECISION, UPCAST)


@triton.jit
def scaled_key_gradients(dk, dv, s_t, q_t, v, do, lse2, delta, query_rows, key_cols, L, S,
                         dmask_ptr, seed, dropout_p, score_factor, DROPOUT: tl.constexpr,
                         MASK_GRAD: tl.constexpr, SCALED: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """A tile's share of dV += P^T dO and dK += (dS * score_factor)^T q (and of the float mask's
    gradient, dS), from its transposed base-2 scores s_t [BLOCK_N, BLOCK_M] and the query
    operand q_t [D, BLOCK_M] the scores were computed with; query_rows [1, BLOCK_M], key_cols
    [BLOCK_N, 1]. SCALED: score_factor is the soft-cap's derivative (a tile), else unused."""
    p_t = tl.exp2(s_t - lse2[None, :])
    dp_t = dot_acc(v, tl.trans(do), tl.zeros_like(p_t), PRECISION, UPCAST)
    p_used = p_t
    if DROPOUT:
        keep = dropout_keep(seed, query_rows, key_cols, S, dropout_p)
        p_used = tl.where(keep, p_t / (1.0 - dropout_p), 0.0)
        dp_t = tl.where(keep, dp_t / (1.0 - dropout_p), 0.0)
    ds_t = p_t * (dp_t - delta[None, :])
    dv = dot_acc(p_used.to(do.dtype), do, dv, PRECISION, UPCAST)
    if MASK_GRAD:
        tl.store(dmask_ptr + query_rows * S + key_cols, ds_t.to(dmask_ptr.dtype.element_ty),
                 mask=(query_rows < L) & (key_cols < S))
    if SCALED:
        ds_t = ds_t * score_factor
    dk = dot_acc(ds_t.to(q_t.dtype), tl.trans(q_t), dk, PRECISION, UPCAST)
    return dk, dv


@triton.jit
def accumulate_key_gradients(dk, dv, s_t, q_t, v, do, lse2, delta, query_rows, key_cols, L, S,
                             dmask_ptr, seed, dropout_p, DROPOUT: tl.constexpr,
                             MASK_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                             UPCAST: tl.constexpr):
    """scaled_key_gradients without a score factor (relative attention's backward)."""
    return scaled_key_gradients(dk, dv, s_t, q_t, v, do, lse2, delta, query_rows, key_cols, L,
                                S, dmask_ptr, seed, dropout_p, 1.0, DROPOUT, MASK_GRAD, False,
                                PRECISION, UPCAST)


@triton.jit
def attention_backward_key_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, seed_ptr, cu_q_ptr, cu_k_ptr,
        key_start_ptr, key_end_ptr, alibi_ptr, dk_ptr, dv_ptr, dmask_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom,
        stride_dod, stride_mb, stride_mh, stride_mm, stride_mn, stride_lb, stride_lh,
        stride_ab, stride_ah, stride_gb, stride_gh,
        H, GROUP, L, S, E, EV, qk_scale2, softcap_scale, scale, dropout_p, window_left,
        window_right, length_bucket,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, LEFT_BOUND: tl.constexpr, RIGHT_BOUND: tl.constexpr,
        SHIFTED: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr,
        KEY_RANGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
        SINKS: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Program (key block, batch * query head): dK and dV of BLOCK_N keys, summed over every
    query block that sees them, for one query head. dk and dv rows are per query head, E and
    EV contiguous, at row b * stride_gb + h * stride_gh + key (dense [B, H, S, *], packed
    [1, H, Tk, *]): with GQA the launcher sums each group's heads afterwards (as
    FlashAttention-2 does; deterministic, and G times the programs; looping over the group
    inside the program made more configurations spill on sm_90). dmask [B, H, L, S] likewise.
    SINKS changes nothing here (the sink's probability is in the lse; its own gradient is
    summed by the caller)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, kv_h = program_heads(bh, H, GROUP)
    q0, L, k0, S, key_lo, key_hi, shift = sequence_geometry(
        b, L, S, cu_q_ptr, cu_k_ptr, key_start_ptr, key_end_ptr, VARLEN, KEY_RANGE, SHIFTED)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = offs_n[:, None] < S
    k = tl.load(k_ptr + b * stride_kb + kv_h * stride_kh + (k0 + offs_n[:, None]) * stride_kn
                + offs_d[None, :] * stride_kd, mask=cols & (offs_d[None, :] < E), other=0.0)
    v = tl.load(v_ptr + b * stride_vb + kv_h * stride_vh + (k0 + offs_n[:, None]) * stride_vn
                + offs_dv[None, :] * stride_vd, mask=cols & (offs_dv[None, :] < EV), other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), ACC_DTYPE)
    lo, a, b_free, hi = key_block_query_range(start_n, L, key_lo, key_hi, shift, window_left,
                                              window_right, BLOCK_M, BLOCK_N, LEFT_BOUND,
                                              RIGHT_BOUND, KEY_RANGE)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr) + bh
    alibi2 = 0.0
    if ALIBI:
        alibi2 = tl.load(alibi_ptr + b * stride_ab + h * stride_ah).to(ACC_DTYPE) * LOG2E
    q_ptr += b * stride_qb + h * stride_qh + q0 * stride_qm
    do_ptr += b * stride_dob + h * stride_doh + q0 * stride_dom
    if MASK_KIND != 0:  # NO_MASK: mask_ptr is None (a constexpr)
        mask_ptr += b * stride_mb + h * stride_mh
    if MASK_GRAD:  # else dmask_ptr is None
        dmask_ptr += bh.to(tl.int64) * L * S
    row0 = b * stride_lb + h * stride_lh + q0
    lse_ptr += row0
    delta_ptr += row0
    if RIGHT_BOUND or KEY_RANGE:  # else [lo, a) is empty: no third loop to compile
        for start_m in range(lo, a, BLOCK_M):
            dk, dv = key_block_gradients(
                dk, dv, k, v, start_m, offs_n, offs_m0, offs_d, offs_dv, q_ptr, do_ptr, lse_ptr,
                delta_ptr, dmask_ptr, stride_qm, stride_qd, stride_dom, stride_dod, E, EV, L, S,
                mask_ptr, stride_mm, stride_mn, qk_scale2, softcap_scale, alibi2, shift,
                window_left, window_right, key_lo, key_hi, seed, dropout_p, MASK_KIND, True,
                LEFT_BOUND, RIGHT_BOUND, KEY_RANGE, SOFTCAP, ALIBI, DROPOUT, MASK_GRAD, PRECISION,
                UPCAST, ACC_DTYPE)
    for start_m in range(a, b_free, BLOCK_M):
        dk, dv = key_block_gradients(
            dk, dv, k, v, start_m, offs_n, offs_m0, offs_d, offs_dv, q_ptr, do_ptr, lse_ptr,
            delta_ptr, dmask_ptr, stride_qm, stride_qd, stride_dom, stride_dod, E, EV, L, S,
            mask_ptr, stride_mm, stride_mn, qk_scale2, softcap_scale, alibi2, shift,
            window_left, window_right, key_lo, key_hi, seed, dropout_p, MASK_KIND, False,
            LEFT_BOUND, RIGHT_BOUND, KEY_RANGE, SOFTCAP, ALIBI, DROPOUT, MASK_GRAD, PRECISION,
            UPCAST, ACC_DTYPE)
    for start_m in range(b_free, hi, BLOCK_M):
        dk, dv = key_block_gradients(
            dk, dv, k, v, start_m, offs_n, offs_m0, offs_d, offs_dv, q_ptr, do_ptr, lse_ptr,
            delta_ptr, dmask_ptr, stride_qm, stride_qd, stride_dom, stride_dod, E, EV, L, S,
            mask_ptr, stride_mm, stride_mn, qk_scale2, softcap_scale, alibi2, shift,
            window_left, window_right, key_lo, key_hi, seed, dropout_p, MASK_KIND, True,
            LEFT_BOUND, RIGHT_BOUND, KEY_RANGE, SOFTCAP, ALIBI, DROPOUT, MASK_GRAD, PRECISION,
            UPCAST, ACC_DTYPE)
    out_rows = (b * stride_gb + h * stride_gh + k0).to(tl.int64) + offs_n
    tl.store(dk_ptr + out_rows[:, None] * E + offs_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=cols & (offs_d[None, :] < E))
    tl.store(dv_ptr + out_rows[:, None] * EV + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=cols & (offs_dv[None, :] < EV))


@triton.jit
def query_block_gradient(dq, q, do, lse2, delta, start_n, offs_m, offs_n0, offs_d, offs_dv,
                         k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S,
                         mask_ptr, stride_mm, stride_mn, qk_scale2, softcap_scale, alibi2, shift,
                         window_left, window_right, key_lo, key_hi, seed, dropout_p,
                         MASK_KIND: tl.constexpr, CHECK: tl.constexpr,
                         LEFT_BOUND: tl.constexpr, RIGHT_BOUND: tl.constexpr,
                         KEY_RANGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                         DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key block's share of dQ for a query block: P recomputed from the forward's
    log-sum-exp (base 2; lse2 is 0 for a row with nothing visible, whose scores are all -inf)."""
    offs_n = start_n + offs_n0
    cols = offs_n[:, None] < S
    k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=cols & (offs_d[None, :] < E), other=0.0)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=cols & (offs_dv[None, :] < EV), other=0.0)
    qk = dot_acc(q, tl.trans(k), tl.zeros((q.shape[0], k.shape[0]), lse2.dtype), PRECISION,
                 UPCAST)
    s = scores_base2(qk, offs_m[:, None], offs_n[None, :], L, S, mask_ptr, stride_mm,
                     stride_mn, qk_scale2, softcap_scale, alibi2, shift, window_left,
                     window_right, key_lo, key_hi, MASK_KIND, CHECK, LEFT_BOUND, RIGHT_BOUND,
                     KEY_RANGE, SOFTCAP, ALIBI)
    p = tl.exp2(s - lse2[:, None])
    ds, _ = score_gradient(p, do, v, offs_m, offs_n, delta, S, seed, dropout_p, DROPOUT,
                           PRECISION, UPCAST)
    if SOFTCAP:
        ds = ds * softcap_derivative(qk, softcap_scale)
    return dot_acc(ds.to(k.dtype), k, dq, PRECISION, UPCAST)


@triton.jit
def attention_backward_query_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, seed_ptr, cu_q_ptr, cu_k_ptr,
        key_start_ptr, key_end_ptr, alibi_ptr, dq_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom,
        stride_dod, stride_mb, stride_mh, stride_mm, stride_mn, stride_lb, stride_lh,
        stride_ab, stride_ah,
        H, GROUP, L, S, E, EV, qk_scale2, softcap_scale, scale, dropout_p, window_left,
        window_right, length_bucket,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, LEFT_BOUND: tl.constexpr, RIGHT_BOUND: tl.constexpr,
        SHIFTED: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr,
        KEY_RANGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
        SINKS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Program (query block, batch * head): dQ of BLOCK_M rows, E contiguous, laid out as the
    lse rows are ([B, H, L, E] dense, [1, H, Tq, E] packed)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, kv_h = program_heads(bh, H, GROUP)
    q0, L, k0, S, key_lo, key_hi, shift = sequence_geometry(
        b, L, S, cu_q_ptr, cu_k_ptr, key_start_ptr, key_end_ptr, VARLEN, KEY_RANGE, SHIFTED)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m[:, None] < L
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + (q0 + offs_m[:, None]) * stride_qm
                + offs_d[None, :] * stride_qd, mask=rows & (offs_d[None, :] < E), other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + (q0 + offs_m[:, None]) * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=rows & (offs_dv[None, :] < EV), other=0.0)
    row0 = b * stride_lb + h * stride_lh + q0
    lse2, delta = load_row_stats(lse_ptr + row0, delta_ptr + row0, offs_m, L, ACC_DTYPE)
    k_ptr += b * stride_kb + kv_h * stride_kh + k0 * stride_kn
    v_ptr += b * stride_vb + kv_h * stride_vh + k0 * stride_vn
    if MASK_KIND != 0:  # NO_MASK: mask_ptr is None (a constexpr)
        mask_ptr += b * stride_mb + h * stride_mh
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr) + bh
    alibi2 = 0.0
    if ALIBI:
        alibi2 = tl.load(alibi_ptr + b * stride_ab + h * stride_ah).to(ACC_DTYPE) * LOG2E
    dq = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    lo, a, b_free, hi = query_block_key_range(start_m, L, key_lo, key_hi, shift, window_left,
                                              window_right, BLOCK_M, BLOCK_N, LEFT_BOUND,
                                              RIGHT_BOUND)
    if LEFT_BOUND or KEY_RANGE:  # else [lo, a) is empty: no third loop to compile
        for start_n in range(lo, a, BLOCK_N):
            dq = query_block_gradient(
                dq, q, do, lse2, delta, start_n, offs_m, offs_n0, offs_d, offs_dv, k_ptr, v_ptr,
                stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S, mask_ptr, stride_mm,
                stride_mn, qk_scale2, softcap_scale, alibi2, shift, window_left, window_right,
                key_lo, key_hi, seed, dropout_p, MASK_KIND, True, LEFT_BOUND, RIGHT_BOUND,
                KEY_RANGE, SOFTCAP, ALIBI, DROPOUT, PRECISION, UPCAST)
    for start_n in range(a, b_free, BLOCK_N):
        dq = query_block_gradient(
            dq, q, do, lse2, delta, start_n, offs_m, offs_n0, offs_d, offs_dv, k_ptr, v_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S, mask_ptr, stride_mm,
            stride_mn, qk_scale2, softcap_scale, alibi2, shift, window_left, window_right,
            key_lo, key_hi, seed, dropout_p, MASK_KIND, False, LEFT_BOUND, RIGHT_BOUND,
            KEY_RANGE, SOFTCAP, ALIBI, DROPOUT, PRECISION, UPCAST)
    for start_n in range(b_free, hi, BLOCK_N):
        dq = query_block_gradient(
            dq, q, do, lse2, delta, start_n, offs_m, offs_n0, offs_d, offs_dv, k_ptr, v_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S, mask_ptr, stride_mm,
            stride_mn, qk_scale2, softcap_scale, alibi2, shift, window_left, window_right,
            key_lo, key_hi, seed, dropout_p, MASK_KIND, True, LEFT_BOUND, RIGHT_BOUND,
            KEY_RANGE, SOFTCAP, ALIBI, DROPOUT, PRECISION, UPCAST)
    out_rows = row0.to(tl.int64) + offs_m
    tl.store(dq_ptr + out_rows[:, None] * E + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=rows & (offs_d[None, :] < E))
