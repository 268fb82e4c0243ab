"""Two attentions in one launch: the Block-Recurrent Transformer's attention step
(fastseq.ops.block_recurrent_attention; the math is fastseq.reference.block_recurrent's).

Part 1 (grid axis 2 = 0): query row i against keys 0..S1-1, the row sitting at key position
i + S1 - L (the last L keys line up with the queries, the previous block first). With WINDOWED,
key j is visible iff 1 <= d <= window for d = i + S1 - L - j: exactly the `window` keys before
the row, never itself (the original's causal mask), and HAS_BIAS adds bias[h, d] (the T5
bucket bias, gathered per distance by the caller). Part 2 (axis 2 = 1): row i against every key
of its group g = (i + group_offset) // group_size (the recurrent state the row's block reads);
groups are consecutive row ranges, each program holds rows of one group. Each part keeps its
own online softmax: the original concatenates the two outputs, it never mixes their scores.
score = qk_scale * q.k (+ bias), computed in base-2 units (times log2(e)) for exp2; the
row's log-sum-exp is kept so (in base 2), and a row with no visible key gives zeros (lse =
+inf, so the backward's probabilities are 0 there).

Every kernel takes both parts; a program whose tile lies past its part's rows or keys returns.
Nothing L x S is ever written: scores live in registers a tile at a time.
"""
import triton
import triton.language as tl

from ..common import dot_acc

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _group_rows(g, L, group_size, group_offset):
    """First and end row of group g (consecutive: rows whose (i + offset) // size == g)."""
    r0 = tl.maximum(g * group_size - group_offset, 0)
    r1 = tl.minimum((g + 1) * group_size - group_offset, L)
    return r0, r1


@triton.jit
def _row_tile_keys(m0, L, S, window, WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Part 1's (key_offset, first key, end key) for the row tile starting at m0: the keys any
    of its rows can see. The forward and the dQ kernel must agree on them."""
    key_offset = S - L
    lo = 0
    hi = S
    if WINDOWED:
        lo = tl.maximum(m0 + key_offset - window, 0)
        hi = tl.minimum(m0 + BLOCK_M - 1 + key_offset, S)
    return key_offset, lo, hi


@triton.jit
def _group_row_tile(pid, tiles_per_group, L, group_size, group_offset, BLOCK_M: tl.constexpr):
    """Part 2's (group, first row, end row) of program pid: tiles_per_group programs a group,
    each a BLOCK_M-row tile of that group's rows."""
    g = pid // tiles_per_group
    r0, r1 = _group_rows(g, L, group_size, group_offset)
    return g, r0 + (pid % tiles_per_group) * BLOCK_M, r1


@triton.jit
def _load_keys_t(k_base, offs_n, n_mask, offs_d, d_mask, stride_kn, stride_kd):
    """Keys of a tile, transposed: [BLOCK_D, BLOCK_N]."""
    return tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                   mask=n_mask[None, :] & d_mask[:, None], other=0.0)


@triton.jit
def _scores(q, kt, offs_n, n_mask, rows, key_offset, window, bias_base, qk_scale,
            WINDOWED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr):
    """(scores [BLOCK_M, BLOCK_N] in base-2 units (score * log2(e)), visible [BLOCK_M,
    BLOCK_N], distance). The scale and log2(e) multiply the dot product once (one rounding, as
    plain PyTorch's one scaling), the bias is scaled on its own."""
    s = dot_acc(q, kt, tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE), PRECISION, UPCAST) * (qk_scale * LOG2E)
    distance = rows[:, None] + key_offset - offs_n[None, :]
    visible = n_mask[None, :] & (rows >= 0)[:, None]
    if WINDOWED:
        visible = visible & (distance >= 1) & (distance <= window)
        if HAS_BIAS:
            s += tl.load(bias_base + distance, mask=visible, other=0.0).to(ACC_DTYPE) * LOG2E
    return s, visible, distance


@triton.jit
def _forward_tile(q_base, k_base, v_base, o_base, lse_base, rows, row_mask,
                  stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                  lo, hi, key_offset, window, bias_base, qk_scale, D, DV,
                  WINDOWED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One tile of rows against keys lo..hi-1: out rows (contiguous [*, DV]) and their lse."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < D
    dv_mask = offs_dv < DV
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC_DTYPE)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        kt = _load_keys_t(k_base, offs_n, n_mask, offs_d, d_mask, stride_kn, stride_kd)
        s, visible, _ = _scores(q, kt, offs_n, n_mask, rows, key_offset, window, bias_base,
                                qk_scale, WINDOWED, HAS_BIAS, BLOCK_M, BLOCK_N, ACC_DTYPE,
                                PRECISION, UPCAST)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: all p are 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        acc = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m = m_new
    seen = l > 0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    tl.store(o_base + rows[:, None] * DV + offs_dv[None, :], out.to(o_base.dtype.element_ty),
             mask=row_mask[:, None] & dv_mask[None, :])
    # lse in base-2 units, the backward's (never returned by the public op)
    lse = tl.where(seen, m + tl.log2(tl.where(seen, l, 1.0)), float("inf"))
    tl.store(lse_base + rows, lse, mask=row_mask)


@triton.jit
def block_recurrent_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, bias_ptr,
    q2_ptr, k2_ptr, v2_ptr, out2_ptr, lse2_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_q2b, stride_q2h, stride_q2m, stride_q2d,
    stride_k2b, stride_k2h, stride_k2g, stride_k2n, stride_k2d,
    stride_v2b, stride_v2h, stride_v2g, stride_v2n, stride_v2d,
    H, L, S, S2, G, D, DV, window, group_size, group_offset, tiles_per_group,
    qk_scale, qk_scale2,
    WINDOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if tl.program_id(2) == 0:
        m0 = pid * BLOCK_M
        if m0 < L:
            rows = m0 + tl.arange(0, BLOCK_M)
            key_offset, lo, hi = _row_tile_keys(m0, L, S, window, WINDOWED, BLOCK_M)
            _forward_tile(q_ptr + b * stride_qb + h * stride_qh,
                          k_ptr + b * stride_kb + h * stride_kh,
                          v_ptr + b * stride_vb + h * stride_vh,
                          out_ptr + bh.to(tl.int64) * L * DV, lse_ptr + bh.to(tl.int64) * L,
                          rows, rows < L, stride_qm, stride_qd, stride_kn, stride_kd,
                          stride_vn, stride_vd, lo, hi, key_offset, window,
                          bias_ptr + h * (window + 1), qk_scale, D, DV, WINDOWED, HAS_BIAS,
                          BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, ACC_DTYPE, PRECISION, UPCAST)
    else:
        g, m0, r1 = _group_row_tile(pid, tiles_per_group, L, group_size, group_offset, BLOCK_M)
        if g < G:
            if m0 < r1:
                rows = m0 + tl.arange(0, BLOCK_M)
                _forward_tile(q2_ptr + b * stride_q2b + h * stride_q2h,
                              k2_ptr + b * stride_k2b + h * stride_k2h + g.to(tl.int64) * stride_k2g,
                              v2_ptr + b * stride_v2b + h * stride_v2h + g.to(tl.int64) * stride_v2g,
                              out2_ptr + bh.to(tl.int64) * L * DV, lse2_ptr + bh.to(tl.int64) * L,
                              rows, rows < r1, stride_q2m, stride_q2d, stride_k2n, stride_k2d,
                              stride_v2n, stride_v2d, 0, S2, 0, 0, bias_ptr, qk_scale2, D, DV,
                              False, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, ACC_DTYPE,
                              PRECISION, UPCAST)


@triton.jit
def _key_tile_backward(q_base, k_base, v_base, do_base, lse_base, delta_base, dk_base, dv_base,
                       keys, key_mask, row_lo, row_hi,
                       stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                       key_offset, window, bias_base, qk_scale, D, DV,
                       WINDOWED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV of one key tile (contiguous [*, D] and [*, DV]) from rows row_lo..row_hi-1."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < D
    dv_mask = offs_dv < DV
    kt = _load_keys_t(k_base, keys, key_mask, offs_d, d_mask, stride_kn, stride_kd)
    v = tl.load(v_base + keys[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=key_mask[:, None] & dv_mask[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC_DTYPE)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_hi
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * DV + offs_dv[None, :],
                     mask=row_mask[:, None] & dv_mask[None, :], other=0.0)
        lse = tl.load(lse_base + rows, mask=row_mask, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_mask, other=0.0)
        s, visible, _ = _scores(q, kt, keys, key_mask, rows, key_offset, window, bias_base,
                                qk_scale, WINDOWED, HAS_BIAS, BLOCK_M, BLOCK_N, ACC_DTYPE,
                                PRECISION, UPCAST)
        visible = visible & row_mask[:, None]
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dv = dot_acc(tl.trans(p).to(do.dtype), do, dv, PRECISION, UPCAST)
        dp = dot_acc(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE), PRECISION,
                     UPCAST)
        ds = p * (dp - delta[:, None])
        dk = dot_acc(tl.trans(ds).to(q.dtype), q, dk, PRECISION, UPCAST)
    tl.store(dk_base + keys[:, None] * D + offs_d[None, :],
             (dk * qk_scale).to(dk_base.dtype.element_ty),
             mask=key_mask[:, None] & d_mask[None, :])
    tl.store(dv_base + keys[:, None] * DV + offs_dv[None, :], dv.to(dv_base.dtype.element_ty),
             mask=key_mask[:, None] & dv_mask[None, :])


@triton.jit
def block_recurrent_backward_key_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, bias_ptr,
    q2_ptr, k2_ptr, v2_ptr, do2_ptr, lse2_ptr, delta2_ptr, dk2_ptr, dv2_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_q2b, stride_q2h, stride_q2m, stride_q2d,
    stride_k2b, stride_k2h, stride_k2g, stride_k2n, stride_k2d,
    stride_v2b, stride_v2h, stride_v2g, stride_v2n, stride_v2d,
    H, L, S, S2, G, D, DV, window, group_size, group_offset, key_tiles_per_group,
    qk_scale, qk_scale2,
    WINDOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows_base = bh.to(tl.int64) * L
    if tl.program_id(2) == 0:
        n0 = pid * BLOCK_N
        if n0 < S:
            keys = n0 + tl.arange(0, BLOCK_N)
            key_offset = S - L
            row_lo = 0
            row_hi = L
            if WINDOWED:  # the rows that can see any key of the tile
                row_lo = tl.maximum(n0 - key_offset + 1, 0)
                row_hi = tl.minimum(n0 + BLOCK_N - key_offset + window, L)
            _key_tile_backward(q_ptr + b * stride_qb + h * stride_qh,
                               k_ptr + b * stride_kb + h * stride_kh,
                               v_ptr + b * stride_vb + h * stride_vh,
                               do_ptr + rows_base * DV, lse_ptr + rows_base,
                               delta_ptr + rows_base, dk_ptr + bh.to(tl.int64) * S * D,
                               dv_ptr + bh.to(tl.int64) * S * DV, keys, keys < S, row_lo, row_hi,
                               stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                               key_offset, window, bias_ptr + h * (window + 1), qk_scale, D, DV,
                               WINDOWED, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
                               ACC_DTYPE, PRECISION, UPCAST)
    else:
        g = pid // key_tiles_per_group
        if g < G:
            r0, r1 = _group_rows(g, L, group_size, group_offset)
            keys = (pid % key_tiles_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)
            keys_base = (bh.to(tl.int64) * G + g) * S2
            _key_tile_backward(q2_ptr + b * stride_q2b + h * stride_q2h,
                               k2_ptr + b * stride_k2b + h * stride_k2h + g.to(tl.int64) * stride_k2g,
                               v2_ptr + b * stride_v2b + h * stride_v2h + g.to(tl.int64) * stride_v2g,
                               do2_ptr + rows_base * DV, lse2_ptr + rows_base,
                               delta2_ptr + rows_base, dk2_ptr + keys_base * D,
                               dv2_ptr + keys_base * DV, keys, keys < S2, r0, r1,
                               stride_q2m, stride_q2d, stride_k2n, stride_k2d, stride_v2n,
                               stride_v2d, 0, 0, bias_ptr, qk_scale2, D, DV, False, False,
                               BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, ACC_DTYPE, PRECISION, UPCAST)


@triton.jit
def _query_tile_backward(q_base, k_base, v_base, do_base, lse_base, delta_base, dq_base,
                         dbias_base, rows, row_mask, lo, hi,
                         stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                         key_offset, window, bias_base, qk_scale, D, DV,
                         WINDOWED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                         UPCAST: tl.constexpr):
    """dQ of one tile of rows (contiguous [*, D]) and, with a bias, its share of d(bias): the
    score gradients added at their distances (fp32 or fp64 atomics, summed over the batch)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < D
    dv_mask = offs_dv < DV
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    do = tl.load(do_base + rows[:, None] * DV + offs_dv[None, :],
                 mask=row_mask[:, None] & dv_mask[None, :], other=0.0)
    lse = tl.load(lse_base + rows, mask=row_mask, other=float("inf"))
    delta = tl.load(delta_base + rows, mask=row_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        kt = _load_keys_t(k_base, offs_n, n_mask, offs_d, d_mask, stride_kn, stride_kd)
        s, visible, distance = _scores(q, kt, offs_n, n_mask, rows, key_offset, window,
                                       bias_base, qk_scale, WINDOWED, HAS_BIAS, BLOCK_M,
                                       BLOCK_N, ACC_DTYPE, PRECISION, UPCAST)
        visible = visible & row_mask[:, None]
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                     mask=n_mask[None, :] & dv_mask[:, None], other=0.0)
        dp = dot_acc(do, vt, tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = dot_acc(ds.to(kt.dtype), tl.trans(kt), dq, PRECISION, UPCAST)
        if HAS_BIAS:
            tl.atomic_add(dbias_base + distance, ds, mask=visible)
    tl.store(dq_base + rows[:, None] * D + offs_d[None, :],
             (dq * qk_scale).to(dq_base.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def block_recurrent_backward_query_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, bias_ptr, dbias_ptr,
    q2_ptr, k2_ptr, v2_ptr, do2_ptr, lse2_ptr, delta2_ptr, dq2_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_q2b, stride_q2h, stride_q2m, stride_q2d,
    stride_k2b, stride_k2h, stride_k2g, stride_k2n, stride_k2d,
    stride_v2b, stride_v2h, stride_v2g, stride_v2n, stride_v2d,
    H, L, S, S2, G, D, DV, window, group_size, group_offset, tiles_per_group,
    qk_scale, qk_scale2,
    WINDOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows_base = bh.to(tl.int64) * L
    if tl.program_id(2) == 0:
        m0 = pid * BLOCK_M
        if m0 < L:
            rows = m0 + tl.arange(0, BLOCK_M)
            key_offset, lo, hi = _row_tile_keys(m0, L, S, window, WINDOWED, BLOCK_M)
            _query_tile_backward(q_ptr + b * stride_qb + h * stride_qh,
                                 k_ptr + b * stride_kb + h * stride_kh,
                                 v_ptr + b * stride_vb + h * stride_vh,
                                 do_ptr + rows_base * DV, lse_ptr + rows_base,
                                 delta_ptr + rows_base, dq_ptr + rows_base * D,
                                 dbias_ptr + h * (window + 1), rows, rows < L, lo, hi,
                                 stride_qm, stride_qd, stride_kn, stride_kd, stride_vn,
                                 stride_vd, key_offset, window, bias_ptr + h * (window + 1),
                                 qk_scale, D, DV, WINDOWED, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_D,
                                 BLOCK_DV, ACC_DTYPE, PRECISION, UPCAST)
    else:
        g, m0, r1 = _group_row_tile(pid, tiles_per_group, L, group_size, group_offset, BLOCK_M)
        if g < G:
            if m0 < r1:
                rows = m0 + tl.arange(0, BLOCK_M)
                _query_tile_backward(q2_ptr + b * stride_q2b + h * stride_q2h,
                                     k2_ptr + b * stride_k2b + h * stride_k2h + g.to(tl.int64) * stride_k2g,
                                     v2_ptr + b * stride_v2b + h * stride_v2h + g.to(tl.int64) * stride_v2g,
                                     do2_ptr + rows_base * DV, lse2_ptr + rows_base,
                                     delta2_ptr + rows_base, dq2_ptr + rows_base * D, dbias_ptr,
                                     rows, rows < r1, 0, S2, stride_q2m, stride_q2d, stride_k2n,
                                     stride_k2d, stride_v2n, stride_v2d, 0, 0, bias_ptr,
                                     qk_scale2, D, DV, False, False, BLOCK_M, BLOCK_N, BLOCK_D,
                                     BLOCK_DV, ACC_DTYPE, PRECISION, UPCAST)
