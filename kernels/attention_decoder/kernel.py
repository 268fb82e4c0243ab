"""Global attention of one decoder query over its encoder states (fastseq.ops.global_attention;
the math is fastseq.reference.attention_decoder's): score, softmax and context in one program
per (batch row, query), in three passes over the keys: (1) the scores, chunked over the
attention dim A, written raw into the row's alignment output while a running max and sum give
its log-sum-exp; (2) the alignments normalised in place; (3) the context, chunked over the value
dim. Keys and values are read once each; the additive score's tanh(q + k_j) exists a
[BLOCK_S, BLOCK_A] tile at a time, never as [B, S, A] (its U h_j, the keys, is computed once per
sequence by the caller). Any A and Dv (OpenNMT's 1024 included): nothing is held whole.

The backward: a query kernel (the same grid) writes the score gradients [B, T, S], d(query),
the additive vector's per-program partial sums and d(extra); a key kernel (additive only, one
program per batch row and key tile) sums d(keys) over the queries. d(values) = p^T d(context)
and the dot score's d(keys) = dscore^T q are GEMMs (the launcher's).
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    """tanh through exp of a non-positive argument (never overflows)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _key_count(len_ptr, b, S, HAS_LENGTHS: tl.constexpr):
    if HAS_LENGTHS:
        return tl.minimum(tl.load(len_ptr + b).to(tl.int32), S)
    return S


@triton.jit
def _hidden_tile(q_row, k_row, e_row, offs_s, mask_s, offs_a, mask_a, stride_qa, stride_ks,
                 stride_ka, stride_es, stride_ea, HAS_EXTRA: tl.constexpr,
                 ACC_DTYPE: tl.constexpr):
    """q + k_j (+ e_j) for a [BLOCK_S, BLOCK_A] tile."""
    q = tl.load(q_row + offs_a * stride_qa, mask=mask_a, other=0.0).to(ACC_DTYPE)
    k = tl.load(k_row + offs_s[:, None] * stride_ks + offs_a[None, :] * stride_ka,
                mask=mask_s[:, None] & mask_a[None, :], other=0.0).to(ACC_DTYPE)
    x = k + q[None, :]
    if HAS_EXTRA:
        x += tl.load(e_row + offs_s[:, None] * stride_es + offs_a[None, :] * stride_ea,
                     mask=mask_s[:, None] & mask_a[None, :], other=0.0).to(ACC_DTYPE)
    return x, q, k


@triton.jit
def global_attention_forward_kernel(
    q_ptr, k_ptr, val_ptr, vec_ptr, e_ptr, len_ptr, out_ptr, align_ptr, lse_ptr,
    stride_qb, stride_qt, stride_qa, stride_kb, stride_ks, stride_ka,
    stride_vb, stride_vs, stride_vd, stride_eb, stride_et, stride_es, stride_ea,
    T, S, A, DV, scale,
    ADDITIVE: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1)
    row = b.to(tl.int64) * T + t
    n_keys = _key_count(len_ptr, b, S, HAS_LENGTHS)
    q_row = q_ptr + b.to(tl.int64) * stride_qb + t.to(tl.int64) * stride_qt
    k_row = k_ptr + b.to(tl.int64) * stride_kb
    e_row = e_ptr + b.to(tl.int64) * stride_eb + t.to(tl.int64) * stride_et
    align_row = align_ptr + row * S
    # Pass 1: scores (base 2) into the alignment row, running max and sum.
    m = tl.full([1], float("-inf"), ACC_DTYPE)
    l = tl.zeros([1], ACC_DTYPE)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_row = offs_s < S
        mask_s = offs_s < n_keys
        sc = tl.zeros([BLOCK_S], ACC_DTYPE)
        for a0 in range(0, A, BLOCK_A):
            offs_a = a0 + tl.arange(0, BLOCK_A)
            mask_a = offs_a < A
            if ADDITIVE:
                x, q, k = _hidden_tile(q_row, k_row, e_row, offs_s, mask_s, offs_a, mask_a,
                                       stride_qa, stride_ks, stride_ka, stride_es, stride_ea,
                                       HAS_EXTRA,
                                       ACC_DTYPE)
                vec = tl.load(vec_ptr + offs_a, mask=mask_a, other=0.0).to(ACC_DTYPE)
                sc += tl.sum(_tanh(x) * vec[None, :], axis=1)
            else:
                q = tl.load(q_row + offs_a * stride_qa, mask=mask_a, other=0.0).to(ACC_DTYPE)
                k = tl.load(k_row + offs_s[:, None] * stride_ks + offs_a[None, :] * stride_ka,
                            mask=mask_s[:, None] & mask_a[None, :], other=0.0).to(ACC_DTYPE)
                sc += tl.sum(k * q[None, :], axis=1)
        sc = tl.where(mask_s, sc * (scale * LOG2E), float("-inf"))
        tl.store(align_row + offs_s, sc.to(align_ptr.dtype.element_ty), mask=in_row)
        m_new = tl.maximum(m, tl.max(sc, axis=0, keep_dims=True))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(sc - m_safe), axis=0, keep_dims=True)
        m = m_new
    seen = l > 0
    lse = tl.where(seen, m + tl.log2(tl.where(seen, l, 1.0)), float("inf"))
    tl.store(lse_ptr + row + tl.arange(0, 1), lse)
    tl.debug_barrier()
    # Pass 2: the alignments, normalised in place.
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_row = offs_s < S
        sc = tl.load(align_row + offs_s, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
        p = tl.where(offs_s < n_keys, tl.exp2(sc - lse), 0.0)
        tl.store(align_row + offs_s, p.to(align_ptr.dtype.element_ty), mask=in_row)
    tl.debug_barrier()
    # Pass 3: the context, a chunk of the value dim at a time.
    val_row = val_ptr + b.to(tl.int64) * stride_vb
    for d0 in range(0, DV, BLOCK_DV):
        offs_d = d0 + tl.arange(0, BLOCK_DV)
        mask_d = offs_d < DV
        acc = tl.zeros([BLOCK_DV], ACC_DTYPE)
        for s0 in range(0, n_keys, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask_s = offs_s < n_keys
            p = tl.load(align_row + offs_s, mask=mask_s, other=0.0).to(ACC_DTYPE)
            val = tl.load(val_row + offs_s[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                          mask=mask_s[:, None] & mask_d[None, :], other=0.0).to(ACC_DTYPE)
            acc += tl.sum(p[:, None] * val, axis=0)
        tl.store(out_ptr + row * DV + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def global_attention_backward_query_kernel(
    q_ptr, k_ptr, val_ptr, vec_ptr, e_ptr, len_ptr, align_ptr, dout_ptr, dalign_ptr,
    dscore_ptr, dq_ptr, dvec_ptr, de_ptr,
    stride_qb, stride_qt, stride_qa, stride_kb, stride_ks, stride_ka,
    stride_vb, stride_vs, stride_vd, stride_eb, stride_et, stride_es, stride_ea,
    T, S, A, DV, scale,
    ADDITIVE: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_DALIGN: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_DV: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Score gradients dscore [B, T, S] (of the scaled score), d(query) [B, T, A], the additive
    vector's partial sums [B * T, A] and d(extra) [B, T, S, A], for one (row, query)."""
    b = tl.program_id(0)
    t = tl.program_id(1)
    row = b.to(tl.int64) * T + t
    n_keys = _key_count(len_ptr, b, S, HAS_LENGTHS)
    q_row = q_ptr + b.to(tl.int64) * stride_qb + t.to(tl.int64) * stride_qt
    k_row = k_ptr + b.to(tl.int64) * stride_kb
    e_row = e_ptr + b.to(tl.int64) * stride_eb + t.to(tl.int64) * stride_et
    val_row = val_ptr + b.to(tl.int64) * stride_vb
    align_row = align_ptr + row * S
    dscore_row = dscore_ptr + row * S
    # Pass 1: g_j = d(context) . values_j (+ d(alignment)_j), kept in dscore; sum_j p_j g_j.
    total = tl.zeros([1], ACC_DTYPE)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < n_keys
        g = tl.zeros([BLOCK_S], ACC_DTYPE)
        for d0 in range(0, DV, BLOCK_DV):
            offs_d = d0 + tl.arange(0, BLOCK_DV)
            mask_d = offs_d < DV
            dout = tl.load(dout_ptr + row * DV + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
            val = tl.load(val_row + offs_s[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                          mask=mask_s[:, None] & mask_d[None, :], other=0.0).to(ACC_DTYPE)
            g += tl.sum(val * dout[None, :], axis=1)
        if HAS_DALIGN:
            g += tl.load(dalign_ptr + row * S + offs_s, mask=mask_s, other=0.0).to(ACC_DTYPE)
        p = tl.load(align_row + offs_s, mask=mask_s, other=0.0).to(ACC_DTYPE)
        total += tl.sum(p * g, axis=0, keep_dims=True)
        tl.store(dscore_row + offs_s, g.to(dscore_ptr.dtype.element_ty), mask=offs_s < S)
    tl.debug_barrier()
    # Pass 2: dscore_j = scale p_j (g_j - sum_k p_k g_k) (zero for hidden keys).
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < n_keys
        p = tl.load(align_row + offs_s, mask=mask_s, other=0.0).to(ACC_DTYPE)
        g = tl.load(dscore_row + offs_s, mask=mask_s, other=0.0).to(ACC_DTYPE)
        ds = tl.where(mask_s, scale * p * (g - total), 0.0)
        tl.store(dscore_row + offs_s, ds.to(dscore_ptr.dtype.element_ty), mask=offs_s < S)
    tl.debug_barrier()
    # Pass 3: d(query) (and the additive vector's and extra's), a chunk of A at a time.
    for a0 in range(0, A, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        mask_a = offs_a < A
        dq = tl.zeros([BLOCK_A], ACC_DTYPE)
        dvec = tl.zeros([BLOCK_A], ACC_DTYPE)
        if ADDITIVE:
            vec = tl.load(vec_ptr + offs_a, mask=mask_a, other=0.0).to(ACC_DTYPE)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask_s = offs_s < n_keys
            ds = tl.load(dscore_row + offs_s, mask=mask_s, other=0.0).to(ACC_DTYPE)
            if ADDITIVE:
                x, q, k = _hidden_tile(q_row, k_row, e_row, offs_s, mask_s, offs_a, mask_a,
                                       stride_qa, stride_ks, stride_ka, stride_es, stride_ea,
                                       HAS_EXTRA,
                                       ACC_DTYPE)
                h = _tanh(x)
                dvec += tl.sum(ds[:, None] * h, axis=0)
                dx = ds[:, None] * vec[None, :] * (1.0 - h * h)
                dq += tl.sum(dx, axis=0)
                if HAS_EXTRA:
                    tl.store(de_ptr + (row * S + offs_s[:, None]) * A + offs_a[None, :],
                             dx.to(de_ptr.dtype.element_ty),
                             mask=(offs_s < S)[:, None] & mask_a[None, :])
            else:
                k = tl.load(k_row + offs_s[:, None] * stride_ks + offs_a[None, :] * stride_ka,
                            mask=mask_s[:, None] & mask_a[None, :], other=0.0).to(ACC_DTYPE)
                dq += tl.sum(ds[:, None] * k, axis=0)
        tl.store(dq_ptr + row * A + offs_a, dq.to(dq_ptr.dtype.element_ty), mask=mask_a)
        if ADDITIVE:
            tl.store(dvec_ptr + row * A + offs_a, dvec, mask=mask_a)


@triton.jit
def global_attention_backward_key_kernel(
    q_ptr, k_ptr, vec_ptr, e_ptr, len_ptr, dscore_ptr, dk_ptr,
    stride_qb, stride_qt, stride_qa, stride_kb, stride_ks, stride_ka,
    stride_eb, stride_et, stride_es, stride_ea,
    T, S, A,
    HAS_EXTRA: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The additive score's d(keys) [B, S, A] for one batch row's key tile, summed over its
    queries: sum_t dscore_tj v (1 - tanh(q_t + k_j + e_tj)^2)."""
    b = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    n_keys = _key_count(len_ptr, b, S, HAS_LENGTHS)
    mask_s = offs_s < n_keys
    k_row = k_ptr + b.to(tl.int64) * stride_kb
    for a0 in range(0, A, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        mask_a = offs_a < A
        vec = tl.load(vec_ptr + offs_a, mask=mask_a, other=0.0).to(ACC_DTYPE)
        dk = tl.zeros([BLOCK_S, BLOCK_A], ACC_DTYPE)
        for t in range(0, T):
            q_row = q_ptr + b.to(tl.int64) * stride_qb + t * stride_qt
            e_row = e_ptr + b.to(tl.int64) * stride_eb + t * stride_et
            x, q, k = _hidden_tile(q_row, k_row, e_row, offs_s, mask_s, offs_a, mask_a,
                                   stride_qa, stride_ks, stride_ka, stride_es, stride_ea,
                                   HAS_EXTRA,
                                   ACC_DTYPE)
            h = _tanh(x)
            ds = tl.load(dscore_ptr + (b.to(tl.int64) * T + t) * S + offs_s, mask=mask_s,
                         other=0.0).to(ACC_DTYPE)
            dk += ds[:, None] * vec[None, :] * (1.0 - h * h)
        tl.store(dk_ptr + (b.to(tl.int64) * S + offs_s[:, None]) * A + offs_a[None, :],
                 dk.to(dk_ptr.dtype.element_ty),
                 mask=(offs_s < S)[:, None] & mask_a[None, :])
