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

Causal is torch's top-left alignment (query i sees keys j <= i, also for L != S). Key blocks that
lie entirely below the diagonal and inside S run without any masking code; only the diagonal
and the ragged last block pay for it (two loops over one block function with constexpr flags).

Dropout draws a Philox number per (batch, head, row, column) from a seed drawn from torch's
generator by the caller: the backward regenerates exactly the forward's keep-mask.

Backward (deterministic, no atomics): delta = rowsum(dO * O) - dlse comes from the caller; one
kernel per key block and query head accumulates dK and dV over every query block (GQA: the
group's heads are summed afterwards), another per query block accumulates dQ.
"""
import triton
import triton.language as tl

from ..common import dot_acc

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
def query_block_key_range(start_m, S, causal_shift, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(end of the key blocks the query block [start_m, start_m + BLOCK_M) sees with no causal
    or column check, end of all the keys it sees). Causal: query i sees keys j <= i +
    causal_shift (0: torch's top-left alignment; S - L: bottom-right, as a decode step against
    a cache), so keys j <= start_m + causal_shift are visible to every row of the block and
    the blocks wholly left of the diagonal and inside S need no masking. Both ends are clamped
    at 0 (a negative shift leaves the first rows nothing to see)."""
    if IS_CAUSAL:
        free = tl.maximum(tl.minimum(start_m + 1 + causal_shift, S), 0)
        end = tl.maximum(tl.minimum(S, start_m + BLOCK_M + causal_shift), 0)
        return free // BLOCK_N * BLOCK_N, end
    return S // BLOCK_N * BLOCK_N, S


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
def scores_base2(qk, query_rows, key_cols, L, S, mask_ptr, stride_mm, stride_mn, qk_scale2,
                 causal_shift, MASK_KIND: tl.constexpr, CHECK_CAUSAL: tl.constexpr,
                 CHECK_COLUMNS: tl.constexpr):
    """The scores of a tile in base 2, -inf where a key is not visible to a query. query_rows
    and key_cols as in apply_mask, so the same code serves q k^T tiles and k q^T tiles."""
    s = apply_mask(qk * qk_scale2, query_rows, key_cols, L, S, mask_ptr, stride_mm, stride_mn,
                   MASK_KIND)
    if CHECK_CAUSAL:
        s = tl.where(key_cols <= query_rows + causal_shift, s, float("-inf"))
    if CHECK_COLUMNS:
        s = tl.where(key_cols < S, s, float("-inf"))
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
def forward_block(acc, l_i, m_i, q, start_n, offs_m, offs_n0, offs_d, offs_dv, k_ptr, v_ptr,
                  stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S, mask_ptr, stride_mm,
                  stride_mn, qk_scale2, seed, dropout_p, causal_shift,
                  MASK_KIND: tl.constexpr, CHECK_CAUSAL: tl.constexpr,
                  CHECK_COLUMNS: tl.constexpr, DROPOUT: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of the online softmax: rescale the running sums, add p @ v."""
    offs_n = start_n + offs_n0
    k_t = tl.load(k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                  mask=(offs_n[None, :] < S) & (offs_d[:, None] < E), other=0.0)
    qk = dot_acc(q, k_t, tl.zeros((q.shape[0], k_t.shape[1]), acc.dtype), PRECISION, UPCAST)
    s = scores_base2(qk, offs_m[:, None], offs_n[None, :], L, S, mask_ptr, stride_mm,
                     stride_mn, qk_scale2, causal_shift, MASK_KIND, CHECK_CAUSAL, CHECK_COLUMNS)
    p, alpha, l_i, m_new = online_softmax(s, m_i, l_i)
    if DROPOUT:
        p = tl.where(dropout_keep(seed, offs_m[:, None], offs_n[None, :], S, dropout_p), p, 0.0)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(offs_n[:, None] < S) & (offs_dv[None, :] < EV), other=0.0)
    acc = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
    return acc, l_i, m_new


@triton.jit
def attention_forward_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, mask_ptr, seed_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
        stride_mb, stride_mh, stride_mm, stride_mn,
        H, GROUP, L, S, E, EV, qk_scale2, dropout_p, causal_shift, length_bucket,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, SHIFTED: tl.constexpr,
        MASK_KIND: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        ACC_DTYPE: tl.constexpr):
    """Program (query block, batch * head): out and lse of BLOCK_M query rows. length_bucket is
    unused here: it is the autotuner's key (kernels/attention/launch.py)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    if not SHIFTED:  # a compile-time 0: unshifted launches keep their registers
        causal_shift = 0
    b, h, kv_h = program_heads(bh, H, GROUP)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < E), other=0.0)
    k_ptr += b * stride_kb + kv_h * stride_kh
    v_ptr += b * stride_vb + kv_h * stride_vh
    if MASK_KIND != 0:  # NO_MASK: mask_ptr is None (a constexpr)
        mask_ptr += b * stride_mb + h * stride_mh
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr) + bh
    acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    free_end, end = query_block_key_range(start_m, S, causal_shift, BLOCK_M, BLOCK_N, IS_CAUSAL)
    for start_n in range(0, free_end, BLOCK_N):
        acc, l_i, m_i = forward_block(
            acc, l_i, m_i, q, start_n, offs_m, offs_n0, offs_d, offs_dv, k_ptr, v_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S, mask_ptr, stride_mm,
            stride_mn, qk_scale2, seed, dropout_p, causal_shift, MASK_KIND, False, False, DROPOUT,
            PRECISION, UPCAST)
    for start_n in range(free_end, end, BLOCK_N):
        acc, l_i, m_i = forward_block(
            acc, l_i, m_i, q, start_n, offs_m, offs_n0, offs_d, offs_dv, k_ptr, v_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S, mask_ptr, stride_mm,
            stride_mn, qk_scale2, seed, dropout_p, causal_shift, MASK_KIND, IS_CAUSAL, True,
            DROPOUT, PRECISION, UPCAST)
    out, lse = finish_rows(acc, l_i, m_i, dropout_p, DROPOUT)
    row_ok = offs_m < L
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
             + offs_dv[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < EV))
    tl.store(lse_ptr + bh * L + offs_m, lse.to(lse_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def probabilities(q, k, offs_m, offs_n, lse2, L, S, mask_ptr, stride_mm, stride_mn, qk_scale2,
                  causal_shift, MASK_KIND: tl.constexpr, CHECK_CAUSAL: tl.constexpr,
                  CHECK_COLUMNS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The softmax probabilities of a tile, recomputed from the forward's log-sum-exp (base 2;
    lse2 is 0 for a row with nothing visible, whose scores are all -inf)."""
    qk = dot_acc(q, tl.trans(k), tl.zeros((q.shape[0], k.shape[0]), lse2.dtype), PRECISION, UPCAST)
    s = scores_base2(qk, offs_m[:, None], offs_n[None, :], L, S, mask_ptr, stride_mm,
                     stride_mn, qk_scale2, causal_shift, MASK_KIND, CHECK_CAUSAL, CHECK_COLUMNS)
    return tl.exp2(s - lse2[:, None])


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
                        seed, dropout_p, causal_shift, MASK_KIND: tl.constexpr,
                        CHECK_CAUSAL: tl.constexpr,
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
                       qk_scale2, causal_shift, MASK_KIND, CHECK_CAUSAL, False)
    return accumulate_key_gradients(dk, dv, s_t, q_t, v, do, lse2, delta, query_rows,
                                    key_cols, L, S, dmask_ptr, seed, dropout_p, DROPOUT,
                                    MASK_GRAD, PRECISION, UPCAST)


@triton.jit
def accumulate_key_gradients(dk, dv, s_t, q_t, v, do, lse2, delta, query_rows, key_cols, L, S,
                             dmask_ptr, seed, dropout_p, DROPOUT: tl.constexpr,
                             MASK_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                             UPCAST: tl.constexpr):
    """A tile's share of dV += P^T dO and dK += dS^T q (and of the float mask's gradient), from
    its transposed base-2 scores s_t [BLOCK_N, BLOCK_M] and the query operand q_t [D, BLOCK_M]
    the scores were computed with; query_rows [1, BLOCK_M], key_cols [BLOCK_N, 1]."""
    p_t = tl.exp2(s_t - lse2[None, :])
    dp_t = dot_acc(v, tl.trans(do), tl.zeros_like(p_t), PRECISION, UPCAST)
    p_used = p_t
    if DROPOUT:
        keep = dropout_keep(seed, query_rows, key_cols, S, dropout_p)
        p_used = tl.where(keep, p_t / (1.0 - dropout_p), 0.0)
        dp_t = tl.where(keep, dp_t / (1.0 - dropout_p), 0.0)
    ds_t = p_t * (dp_t - delta[None, :])
    dv = dot_acc(p_used.to(do.dtype), do, dv, PRECISION, UPCAST)
    dk = dot_acc(ds_t.to(q_t.dtype), tl.trans(q_t), dk, PRECISION, UPCAST)
    if MASK_GRAD:
        tl.store(dmask_ptr + query_rows * S + key_cols, ds_t.to(dmask_ptr.dtype.element_ty),
                 mask=(query_rows < L) & (key_cols < S))
    return dk, dv


@triton.jit
def attention_backward_key_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, seed_ptr, dk_ptr, dv_ptr,
        dmask_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom,
        stride_dod, stride_mb, stride_mh, stride_mm, stride_mn,
        H, GROUP, L, S, E, EV, qk_scale2, scale, dropout_p, causal_shift, length_bucket,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, SHIFTED: tl.constexpr,
        MASK_KIND: tl.constexpr,
        DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Program (key block, batch * query head): dK and dV of BLOCK_N keys, summed over every
    query block that sees them, for one query head. dk [B, H, S, E] and dv [B, H, S, EV] are
    contiguous, per query head: with GQA the launcher sums each group's heads afterwards (as
    FlashAttention-2 does; deterministic, and G times the programs; looping over the group
    inside the program made more configurations spill on sm_90). dmask [B, H, L, S] likewise."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    if not SHIFTED:  # a compile-time 0: unshifted launches keep their registers
        causal_shift = 0
    b, h, kv_h = program_heads(bh, H, GROUP)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = offs_n[:, None] < S
    k = tl.load(k_ptr + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=cols & (offs_d[None, :] < E), other=0.0)
    v = tl.load(v_ptr + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vn
                + offs_dv[None, :] * stride_vd, mask=cols & (offs_dv[None, :] < EV), other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), ACC_DTYPE)
    if IS_CAUSAL:
        # Query rows i < start_n - causal_shift see none of these keys; from the first row at
        # or past the block's last key (shifted), every row sees all of them (no causal check).
        # Clamped at 0 before dividing (Triton's integer division truncates toward zero).
        first = tl.maximum(start_n - causal_shift, 0) // BLOCK_M * BLOCK_M
        free_start = tl.minimum(
            tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0), BLOCK_M) * BLOCK_M,
            tl.cdiv(L, BLOCK_M) * BLOCK_M)
    else:
        first = 0
        free_start = 0
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr) + bh
    q_ptr += b * stride_qb + h * stride_qh
    do_ptr += b * stride_dob + h * stride_doh
    if MASK_KIND != 0:  # NO_MASK: mask_ptr is None (a constexpr)
        mask_ptr += b * stride_mb + h * stride_mh
    if MASK_GRAD:  # else dmask_ptr is None
        dmask_ptr += bh.to(tl.int64) * L * S
    lse_ptr += bh * L
    delta_ptr += bh * L
    for start_m in range(first, free_start, BLOCK_M):
        dk, dv = key_block_gradients(
            dk, dv, k, v, start_m, offs_n, offs_m0, offs_d, offs_dv, q_ptr, do_ptr, lse_ptr,
            delta_ptr, dmask_ptr, stride_qm, stride_qd, stride_dom, stride_dod, E, EV, L, S,
            mask_ptr, stride_mm, stride_mn, qk_scale2, seed, dropout_p, causal_shift, MASK_KIND,
            IS_CAUSAL, DROPOUT, MASK_GRAD, PRECISION, UPCAST, ACC_DTYPE)
    for start_m in range(free_start, L, BLOCK_M):
        dk, dv = key_block_gradients(
            dk, dv, k, v, start_m, offs_n, offs_m0, offs_d, offs_dv, q_ptr, do_ptr, lse_ptr,
            delta_ptr, dmask_ptr, stride_qm, stride_qd, stride_dom, stride_dod, E, EV, L, S,
            mask_ptr, stride_mm, stride_mn, qk_scale2, seed, dropout_p, causal_shift, MASK_KIND,
            False, DROPOUT, MASK_GRAD, PRECISION, UPCAST, ACC_DTYPE)
    out_rows = bh.to(tl.int64) * S + offs_n
    tl.store(dk_ptr + out_rows[:, None] * E + offs_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=cols & (offs_d[None, :] < E))
    tl.store(dv_ptr + out_rows[:, None] * EV + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=cols & (offs_dv[None, :] < EV))


@triton.jit
def query_block_gradient(dq, q, do, lse2, delta, start_n, offs_m, offs_n0, offs_d, offs_dv,
                         k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S,
                         mask_ptr, stride_mm, stride_mn, qk_scale2, seed, dropout_p, causal_shift,
                         MASK_KIND: tl.constexpr, CHECK_CAUSAL: tl.constexpr,
                         CHECK_COLUMNS: tl.constexpr, DROPOUT: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key block's share of dQ for a query block."""
    offs_n = start_n + offs_n0
    cols = offs_n[:, None] < S
    k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=cols & (offs_d[None, :] < E), other=0.0)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=cols & (offs_dv[None, :] < EV), other=0.0)
    p = probabilities(q, k, offs_m, offs_n, lse2, L, S, mask_ptr, stride_mm, stride_mn,
                      qk_scale2, causal_shift, MASK_KIND, CHECK_CAUSAL, CHECK_COLUMNS, PRECISION,
                      UPCAST)
    ds, _ = score_gradient(p, do, v, offs_m, offs_n, delta, S, seed, dropout_p, DROPOUT,
                           PRECISION, UPCAST)
    return dot_acc(ds.to(k.dtype), k, dq, PRECISION, UPCAST)


@triton.jit
def attention_backward_query_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, seed_ptr, dq_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom,
        stride_dod, stride_mb, stride_mh, stride_mm, stride_mn,
        H, GROUP, L, S, E, EV, qk_scale2, scale, dropout_p, causal_shift, length_bucket,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, SHIFTED: tl.constexpr,
        MASK_KIND: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        ACC_DTYPE: tl.constexpr):
    """Program (query block, batch * head): dQ of BLOCK_M rows (dq [B, H, L, E] contiguous)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    if not SHIFTED:  # a compile-time 0: unshifted launches keep their registers
        causal_shift = 0
    b, h, kv_h = program_heads(bh, H, GROUP)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m[:, None] < L
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=rows & (offs_d[None, :] < E), other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=rows & (offs_dv[None, :] < EV), other=0.0)
    lse2, delta = load_row_stats(lse_ptr + bh * L, delta_ptr + bh * L, offs_m, L, ACC_DTYPE)
    k_ptr += b * stride_kb + kv_h * stride_kh
    v_ptr += b * stride_vb + kv_h * stride_vh
    if MASK_KIND != 0:  # NO_MASK: mask_ptr is None (a constexpr)
        mask_ptr += b * stride_mb + h * stride_mh
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr) + bh
    dq = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    free_end, end = query_block_key_range(start_m, S, causal_shift, BLOCK_M, BLOCK_N, IS_CAUSAL)
    for start_n in range(0, free_end, BLOCK_N):
        dq = query_block_gradient(
            dq, q, do, lse2, delta, start_n, offs_m, offs_n0, offs_d, offs_dv, k_ptr, v_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S, mask_ptr, stride_mm,
            stride_mn, qk_scale2, seed, dropout_p, causal_shift, MASK_KIND, False, False, DROPOUT,
            PRECISION, UPCAST)
    for start_n in range(free_end, end, BLOCK_N):
        dq = query_block_gradient(
            dq, q, do, lse2, delta, start_n, offs_m, offs_n0, offs_d, offs_dv, k_ptr, v_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, E, EV, L, S, mask_ptr, stride_mm,
            stride_mn, qk_scale2, seed, dropout_p, causal_shift, MASK_KIND, IS_CAUSAL, True,
            DROPOUT, PRECISION, UPCAST)
    out_rows = bh.to(tl.int64) * L + offs_m
    tl.store(dq_ptr + out_rows[:, None] * E + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=rows & (offs_d[None, :] < E))
