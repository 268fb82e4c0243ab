"""Triton kernels for one layer-normalized LSTM or GRU layer, one direction, whole sequence.

The math is fastseq.reference.layer_norm_rnn's. The input's share of the gates,
LN(x W_ih^T; a_ih) + b_ih for every step, is one GEMM and one layer norm before the kernel
(fastseq.ops.layer_norm_rnn_layer); the kernel runs the recurrence with its layer norms fused:
that of the recurrent projection p = h W_hh^T (over the G*H gate columns of a row) and the
LSTM's of the cell state (over H). As kernels/rnn/launch.py: one program owns BLOCK_B batch rows
and all hidden units and loops over time, so a row's normalization statistics are a reduction
inside one program, never across programs. Each statistic takes two passes over the row (the
mean, then the mean squared deviation), as torch's layer norm is exact to rounding and
E[v^2] - E[v]^2 in fp32 is not when the mean is large.

Forward, per step (a barrier between phases: they exchange values through scratch memory):
  A  p = h_{t-1} W_hh^T into pbuf (fp32), row sums of p     A2  row variance of p
  B  gates = gates_x + a_hh * LN(p) + b_hh; the cell: LSTM c_t into cbuf (and o into pbuf),
     GRU h_t (done)
  LSTM only:  C1  row variance of c_t   C2  h_t = o tanh(a_c * LN(c_t) + b_c)
Workspace per step and row: the plain layer's (LSTM i, f, g, o, c_t; GRU r, z, n, W_hn-part),
the LSTM's LN(c_t) without gain and shift, then the normalized recurrent projection LN(p)
without its gain (G*H columns); stats [T, B, S]: 1/std of p, then the LSTM's 1/std of c_t
(fp32). LN(c_t) is saved rather than recomputed from c_t: in bf16 the saved c_t is rounded, and
(c_t - mean) * rstd from it lost up to 5x the accuracy of torch's bf16 gradients (H=5).

Backward, per step (opposite order): LSTM 1) da = dL/d(a_c LN(c_t) + b_c), the o gate, and the
row sums of LN's backward over H; 2) dc_t, the i, f, g gates, dc_{t-1}, and the row sums of the
recurrent LN's backward over G*H; GRU 1+2) its gates as the plain layer. Then 3) dp = the
recurrent LN's backward, 4) dh_{t-1} += dp W_hh. The gains' and W_hh's gradients are sums
over all steps afterwards (fastseq/ops/layer_norm_rnn.py).
"""
import inspect

import torch
import triton
import triton.language as tl

from ..common import (GPU_DOT, INTERPRETED, accumulator_dtype, dot_precision, launch_spec,
                      new_output, tanh, tl_accumulator_dtype)
from ..recurrent_layout import GATES, LN_PROJECTION_COLUMN, LN_STATS, LN_WORKSPACE, MODE_IDS
from ..rnn.launch import add_state_gradient, batch_tile, step_index, store_state
from ..cell_math import accumulate_projection, cell_backward_math, cell_forward_math, load_saved


@triton.jit
def _row_variance(buf_ptr, rows_b, mask_b, mean, N, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr):
    """Mean squared deviation from `mean` [BLOCK_B] of the first N columns of rows rows_b of a
    row-major buffer with N columns per row."""
    total = tl.zeros((BLOCK_B,), mean.dtype)
    for k0 in range(0, N, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = mask_b[:, None] & (offs < N)[None, :]
        v = tl.load(buf_ptr + rows_b[:, None] * N + offs[None, :], mask=mask, other=0.0)
        d = tl.where(mask, v - mean[:, None], 0.0)
        total += tl.sum(d * d, axis=1)
    return total / N


@triton.jit
def _load_gates(base, H, mask, G: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The tiles of gates 0..G-1 at base + g*H (gate-major columns) in ACC_DTYPE; G is 3 or 4,
    and the fourth tile is zeros when G is 3."""
    v0 = tl.load(base, mask=mask, other=0.0).to(ACC_DTYPE)
    v1 = tl.load(base + H, mask=mask, other=0.0).to(ACC_DTYPE)
    v2 = tl.load(base + 2 * H, mask=mask, other=0.0).to(ACC_DTYPE)
    if G == 4:
        v3 = tl.load(base + 3 * H, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        v3 = tl.zeros_like(v0)
    return v0, v1, v2, v3


@triton.jit
def _store_gates(base, H, mask, v0, v1, v2, v3, G: tl.constexpr):
    ty = base.dtype.element_ty
    tl.store(base, v0.to(ty), mask=mask)
    tl.store(base + H, v1.to(ty), mask=mask)
    tl.store(base + 2 * H, v2.to(ty), mask=mask)
    if G == 4:
        tl.store(base + 3 * H, v3.to(ty), mask=mask)


@triton.jit
def _ln_rnn_forward_kernel(
    gx_ptr, h0_ptr, c0_ptr, w_hh_ptr, b_hh_ptr, a_hh_ptr, a_c_ptr, b_c_ptr, len_ptr,
    y_ptr, hn_ptr, cn_ptr, ws_ptr, stats_ptr, hbuf_ptr, cbuf_ptr, pbuf_ptr,
    T, B, H, eps,
    MODE: tl.constexpr, G: tl.constexpr, WS: tl.constexpr, NP: tl.constexpr, S: tl.constexpr,
    HAS_B_HH: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, SAVE_WS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    offs_b, mask_b, rows_b, lengths = batch_tile(len_ptr, T, B, HAS_LENGTHS, BLOCK_B)
    out_ty = y_ptr.dtype.element_ty
    BH = B * H
    GH = G * H

    for j0 in range(0, H, BLOCK_H):
        offs_h = j0 + tl.arange(0, BLOCK_H)
        mask = mask_b[:, None] & (offs_h < H)[None, :]
        state = rows_b[:, None] * H + offs_h[None, :]
        tl.store(hbuf_ptr + state, tl.load(h0_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE), mask=mask)
        if MODE == 0:
            tl.store(cbuf_ptr + state, tl.load(c0_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE), mask=mask)
    tl.debug_barrier()

    for step in range(0, T):
        t = step_index(step, T, REVERSE)
        t64 = t.to(tl.int64)
        h_read = hbuf_ptr + (step % 2) * BH
        h_write = hbuf_ptr + ((step + 1) % 2) * BH
        valid = (t < lengths)[:, None]
        if SAVE_WS:  # else stats_ptr is None
            stats = stats_ptr + t64 * B * S + rows_b * S

        # A: p = h_{t-1} W_hh^T (every gate of a tile of units) and its row sums.
        p_sum = tl.zeros((BLOCK_B,), ACC_DTYPE)
        for j0 in range(0, H, BLOCK_H):
            offs_h = j0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            mask = mask_b[:, None] & mask_h[None, :]
            zero = tl.zeros((BLOCK_B, BLOCK_H), ACC_DTYPE)
            p0, p1, p2, p3 = accumulate_projection(
                zero, zero, zero, zero, h_read, w_hh_ptr, rows_b, mask_b, offs_h, mask_h, H, H,
                G, 2, BLOCK_K, PRECISION, UPCAST)
            _store_gates(pbuf_ptr + rows_b[:, None] * GH + offs_h[None, :], H, mask, p0, p1, p2, p3, G)
            p_sum += tl.sum(p0 + p1 + p2 + p3, axis=1)  # masked columns are zeros
        p_mean = p_sum / GH
        tl.debug_barrier()
        # A2: the row variance of p.
        p_rstd = 1.0 / tl.sqrt(_row_variance(pbuf_ptr, rows_b, mask_b, p_mean, GH, BLOCK_B, BLOCK_H) + eps)
        tl.debug_barrier()

        # B: the gates from the normalized projection, then the cell.
        c_sum = tl.zeros((BLOCK_B,), ACC_DTYPE)
        for j0 in range(0, H, BLOCK_H):
            offs_h = j0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            mask = mask_b[:, None] & mask_h[None, :]
            state = rows_b[:, None] * H + offs_h[None, :]
            p_tile = pbuf_ptr + rows_b[:, None] * GH + offs_h[None, :]
            p0, p1, p2, p3 = _load_gates(p_tile, H, mask, G, ACC_DTYPE)
            n0 = (p0 - p_mean[:, None]) * p_rstd[:, None]
            n1 = (p1 - p_mean[:, None]) * p_rstd[:, None]
            n2 = (p2 - p_mean[:, None]) * p_rstd[:, None]
            n3 = (p3 - p_mean[:, None]) * p_rstd[:, None]
            a0, a1, a2, a3 = _load_gates(a_hh_ptr + offs_h, H, mask_h, G, ACC_DTYPE)
            q0 = n0 * a0[None, :]
            q1 = n1 * a1[None, :]
            q2 = n2 * a2[None, :]
            q3 = n3 * a3[None, :]
            if HAS_B_HH:
                b0, b1, b2, b3 = _load_gates(b_hh_ptr + offs_h, H, mask_h, G, ACC_DTYPE)
                q0 += b0[None, :]
                q1 += b1[None, :]
                q2 += b2[None, :]
                q3 += b3[None, :]
            gx0, gx1, gx2, gx3 = _load_gates(gx_ptr + t64 * B * GH + rows_b[:, None] * GH + offs_h[None, :],
                                             H, mask, G, ACC_DTYPE)
            if SAVE_WS:  # else ws_ptr is None
                ws = ws_ptr + t64 * B * WS * H + rows_b[:, None] * (WS * H) + offs_h[None, :]
                _store_gates(ws + NP * H, H, mask, n0, n1, n2, n3, G)
            h_prev = tl.load(h_read + state, mask=mask, other=0.0)
            if MODE == 0:
                c_prev = tl.load(cbuf_ptr + state, mask=mask, other=0.0)
                h_unused, c_new, w0, w1, w2, w3 = cell_forward_math(
                    0, gx0 + q0, gx1 + q1, gx2 + q2, gx3 + q3, h_prev, c_prev)
                c_new = tl.where(valid, c_new, c_prev)
                tl.store(cbuf_ptr + state, c_new, mask=mask)
                tl.store(p_tile + 3 * H, w3, mask=mask)  # o, for phase C2
                c_sum += tl.sum(tl.where(mask, c_new, 0.0), axis=1)
                if SAVE_WS:
                    _store_gates(ws, H, mask, w0, w1, w2, w3, 4)
                    tl.store(ws + 4 * H, c_new.to(out_ty), mask=mask)
            else:
                # The GRU's recurrent n-gate share (b_hn included) goes to slot 3: r multiplies it.
                h_new, c_unused, w0, w1, w2, w3 = cell_forward_math(
                    1, gx0 + q0, gx1 + q1, gx2, q2, h_prev, h_prev)
                h_new = tl.where(valid, h_new, h_prev)
                tl.store(h_write + state, h_new, mask=mask)
                tl.store(y_ptr + t64 * BH + state, tl.where(valid, h_new, 0.0).to(out_ty), mask=mask)
                if SAVE_WS:
                    _store_gates(ws, H, mask, w0, w1, w2, w3, 4)
        if SAVE_WS:
            tl.store(stats, p_rstd, mask=mask_b)

        if MODE == 0:
            c_mean = c_sum / H
            tl.debug_barrier()
            # C1: the row variance of c_t; C2: h_t = o tanh(a_c LN(c_t) + b_c).
            c_rstd = 1.0 / tl.sqrt(_row_variance(cbuf_ptr, rows_b, mask_b, c_mean, H, BLOCK_B, BLOCK_H) + eps)
            for j0 in range(0, H, BLOCK_H):
                offs_h = j0 + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                mask = mask_b[:, None] & mask_h[None, :]
                state = rows_b[:, None] * H + offs_h[None, :]
                c_new = tl.load(cbuf_ptr + state, mask=mask, other=0.0)
                o = tl.load(pbuf_ptr + rows_b[:, None] * GH + 3 * H + offs_h[None, :], mask=mask, other=0.0)
                a_c = tl.load(a_c_ptr + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)
                b_c = tl.load(b_c_ptr + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)
                c_hat = (c_new - c_mean[:, None]) * c_rstd[:, None]
                h_new = o * tanh(c_hat * a_c[None, :] + b_c[None, :])
                if SAVE_WS:
                    ws = ws_ptr + t64 * B * WS * H + rows_b[:, None] * (WS * H) + offs_h[None, :]
                    tl.store(ws + 5 * H, c_hat.to(out_ty), mask=mask)
                h_new = tl.where(valid, h_new, tl.load(h_read + state, mask=mask, other=0.0))
                tl.store(h_write + state, h_new, mask=mask)
                tl.store(y_ptr + t64 * BH + state, tl.where(valid, h_new, 0.0).to(out_ty), mask=mask)
            if SAVE_WS:
                tl.store(stats + 1, c_rstd, mask=mask_b)
        tl.debug_barrier()

    store_state(hbuf_ptr + (T % 2) * BH, cbuf_ptr, hn_ptr, cn_ptr, rows_b, mask_b, H, MODE, BLOCK_H)


@triton.jit
def _ln_rnn_backward_kernel(
    gy_ptr, ghn_ptr, gcn_ptr, h0_ptr, c0_ptr, w_hh_ptr, a_hh_ptr, a_c_ptr, b_c_ptr, y_ptr, ws_ptr,
    stats_ptr, len_ptr,
    dgx_ptr, dq_ptr, dp_ptr, da_ptr, dh0_ptr, dc0_ptr, dhbuf_ptr, dcbuf_ptr, dqbuf_ptr,
    T, B, H,
    MODE: tl.constexpr, G: tl.constexpr, WS: tl.constexpr, NP: tl.constexpr, S: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_GRAD_CN: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    offs_b, mask_b, rows_b, lengths = batch_tile(len_ptr, T, B, HAS_LENGTHS, BLOCK_B)
    out_ty = dgx_ptr.dtype.element_ty
    BH = B * H
    GH = G * H

    for j0 in range(0, H, BLOCK_H):
        offs_h = j0 + tl.arange(0, BLOCK_H)
        mask = mask_b[:, None] & (offs_h < H)[None, :]
        state = rows_b[:, None] * H + offs_h[None, :]
        tl.store(dhbuf_ptr + state, tl.load(ghn_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE), mask=mask)
        if MODE == 0:
            if HAS_GRAD_CN:
                dc_init = tl.load(gcn_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
            else:
                dc_init = tl.zeros((BLOCK_B, BLOCK_H), ACC_DTYPE)
            tl.store(dcbuf_ptr + state, dc_init, mask=mask)
    tl.debug_barrier()

    for step in range(0, T):
        t = step_index(step, T, not REVERSE)
        valid = (t < lengths)[:, None]
        if REVERSE:
            t_prev = t + 1
            has_prev = (t_prev < lengths)[:, None]
        else:
            t_prev = t - 1
            has_prev = (t_prev >= 0) & (lengths > 0)[:, None]
        t_prev_safe = tl.minimum(tl.maximum(t_prev, 0), T - 1).to(tl.int64)
        t64 = t.to(tl.int64)
        stats = stats_ptr + t64 * B * S + rows_b * S
        p_rstd = tl.load(stats, mask=mask_b, other=1.0).to(ACC_DTYPE)
        if MODE == 0:
            c_rstd = tl.load(stats + 1, mask=mask_b, other=1.0).to(ACC_DTYPE)
        else:
            c_rstd = tl.full((BLOCK_B,), 1.0, ACC_DTYPE)
        ws_rows = ws_ptr + t64 * B * WS * H + rows_b[:, None] * (WS * H)

        # LSTM 1: the row sums of the cell-state layer norm's backward, from
        # da = dh o (1 - tanh(a)^2), a = a_c LN(c_t) + b_c (read only: phase 2 recomputes da).
        dc_s1 = tl.zeros((BLOCK_B,), ACC_DTYPE)
        dc_s2 = tl.zeros((BLOCK_B,), ACC_DTYPE)
        if MODE == 0:
            for j0 in range(0, H, BLOCK_H):
                offs_h = j0 + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                mask = mask_b[:, None] & mask_h[None, :]
                state = rows_b[:, None] * H + offs_h[None, :]
                dh = tl.load(dhbuf_ptr + state, mask=mask, other=0.0) + \
                    tl.where(valid, tl.load(gy_ptr + t64 * BH + state, mask=mask, other=0.0).to(ACC_DTYPE), 0.0)
                ws = ws_rows + offs_h[None, :]
                o = tl.load(ws + 3 * H, mask=mask, other=0.0).to(ACC_DTYPE)
                c_hat = tl.load(ws + 5 * H, mask=mask, other=0.0).to(ACC_DTYPE)
                a_c = tl.load(a_c_ptr + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)[None, :]
                b_c = tl.load(b_c_ptr + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)[None, :]
                u = tanh(c_hat * a_c + b_c)
                d_chat = tl.where(valid & mask, dh * o * (1.0 - u * u) * a_c, 0.0)
                dc_s1 += tl.sum(d_chat, axis=1)
                dc_s2 += tl.sum(d_chat * c_hat, axis=1)
        dc_m1 = dc_s1 / H
        dc_m2 = dc_s2 / H

        # 2: the gate gradients of step t (to dgates_x; the GRU's recurrent ones, which differ
        # in the n gate, to dq), the paths to h_{t-1} and c_{t-1} that skip W_hh, and the row sums
        # of the recurrent layer norm's backward. dqbuf keeps this step's recurrent-gate
        # gradients in fp32 for phase 3.
        dn_s1 = tl.zeros((BLOCK_B,), ACC_DTYPE)
        dn_s2 = tl.zeros((BLOCK_B,), ACC_DTYPE)
        for j0 in range(0, H, BLOCK_H):
            offs_h = j0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            mask = mask_b[:, None] & mask_h[None, :]
            state = rows_b[:, None] * H + offs_h[None, :]
            dh = tl.load(dhbuf_ptr + state, mask=mask, other=0.0) + \
                tl.where(valid, tl.load(gy_ptr + t64 * BH + state, mask=mask, other=0.0).to(ACC_DTYPE), 0.0)
            ws = ws_rows + offs_h[None, :]
            w0, w1, w2, w3 = load_saved(ws, H, mask, MODE, ACC_DTYPE, dh)
            zero = tl.zeros_like(dh)
            if MODE == 0:
                c_hat = tl.load(ws + 5 * H, mask=mask, other=0.0).to(ACC_DTYPE)
                a_c = tl.load(a_c_ptr + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)[None, :]
                b_c = tl.load(b_c_ptr + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)[None, :]
                u = tanh(c_hat * a_c + b_c)
                da = dh * w3 * (1.0 - u * u)
                d3 = dh * u * w3 * (1.0 - w3)
                dc_ln = c_rstd[:, None] * (da * a_c - dc_m1[:, None] - c_hat * dc_m2[:, None])
                dc_next = tl.load(dcbuf_ptr + state, mask=mask, other=0.0)
                dc = dc_next + dc_ln
                ws_prev = ws_ptr + t_prev_safe * B * WS * H + rows_b[:, None] * (WS * H) + offs_h[None, :]
                c_prev = tl.where(has_prev,
                                  tl.load(ws_prev + 4 * H, mask=mask, other=0.0).to(ACC_DTYPE),
                                  tl.load(c0_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE))
                d0 = dc * w2 * w0 * (1.0 - w0)
                d1 = dc * c_prev * w1 * (1.0 - w1)
                d2 = dc * w0 * (1.0 - w2 * w2)
                d0 = tl.where(valid, d0, 0.0)
                d1 = tl.where(valid, d1, 0.0)
                d2 = tl.where(valid, d2, 0.0)
                d3 = tl.where(valid, d3, 0.0)
                tl.store(da_ptr + t64 * BH + state, tl.where(valid, da, 0.0).to(out_ty), mask=mask)
                tl.store(dcbuf_ptr + state, tl.where(valid, dc * w1, dc_next), mask=mask)
                tl.store(dhbuf_ptr + state, tl.where(valid, 0.0, dh), mask=mask)  # h_{t-1} only feeds W_hh
                r0, r1, r2, r3 = d0, d1, d2, d3
            else:
                h_new = tl.load(y_ptr + t64 * BH + state, mask=mask, other=0.0).to(ACC_DTYPE)
                h_prev = tl.where(has_prev,
                                  tl.load(y_ptr + t_prev_safe * BH + state, mask=mask, other=0.0).to(ACC_DTYPE),
                                  tl.load(h0_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE))
                d0, d1, d2, d3, dn_hh, dh_direct, dc_unused = cell_backward_math(
                    1, dh, zero, w0, w1, w2, w3, h_prev, zero, h_new, zero)
                d0 = tl.where(valid, d0, 0.0)
                d1 = tl.where(valid, d1, 0.0)
                d2 = tl.where(valid, d2, 0.0)
                r0, r1, r2, r3 = d0, d1, tl.where(valid, dn_hh, 0.0), zero
                _store_gates(dq_ptr + t64 * B * GH + rows_b[:, None] * GH + offs_h[None, :], H, mask,
                             r0, r1, r2, r3, 3)
                tl.store(dhbuf_ptr + state, tl.where(valid, dh_direct, dh), mask=mask)
            _store_gates(dgx_ptr + t64 * B * GH + rows_b[:, None] * GH + offs_h[None, :], H, mask,
                         d0, d1, d2, d3, G)
            _store_gates(dqbuf_ptr + rows_b[:, None] * GH + offs_h[None, :], H, mask, r0, r1, r2, r3, G)
            n0, n1, n2, n3 = _load_gates(ws + NP * H, H, mask, G, ACC_DTYPE)
            a0, a1, a2, a3 = _load_gates(a_hh_ptr + offs_h, H, mask_h, G, ACC_DTYPE)
            dn0 = r0 * a0[None, :]
            dn1 = r1 * a1[None, :]
            dn2 = r2 * a2[None, :]
            dn3 = r3 * a3[None, :]
            dn_s1 += tl.sum(dn0 + dn1 + dn2 + dn3, axis=1)
            dn_s2 += tl.sum(dn0 * n0 + dn1 * n1 + dn2 * n2 + dn3 * n3, axis=1)
        dn_m1 = dn_s1 / GH
        dn_m2 = dn_s2 / GH
        tl.debug_barrier()

        # 3: dp = the recurrent layer norm's backward, p = h_{t-1} W_hh^T.
        for j0 in range(0, H, BLOCK_H):
            offs_h = j0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            mask = mask_b[:, None] & mask_h[None, :]
            r0, r1, r2, r3 = _load_gates(dqbuf_ptr + rows_b[:, None] * GH + offs_h[None, :], H, mask, G, ACC_DTYPE)
            n0, n1, n2, n3 = _load_gates(ws_rows + offs_h[None, :] + NP * H, H, mask, G, ACC_DTYPE)
            a0, a1, a2, a3 = _load_gates(a_hh_ptr + offs_h, H, mask_h, G, ACC_DTYPE)
            scale = tl.where(valid, p_rstd[:, None], 0.0)
            dp0 = scale * (r0 * a0[None, :] - dn_m1[:, None] - n0 * dn_m2[:, None])
            dp1 = scale * (r1 * a1[None, :] - dn_m1[:, None] - n1 * dn_m2[:, None])
            dp2 = scale * (r2 * a2[None, :] - dn_m1[:, None] - n2 * dn_m2[:, None])
            dp3 = scale * (r3 * a3[None, :] - dn_m1[:, None] - n3 * dn_m2[:, None])
            _store_gates(dp_ptr + t64 * B * GH + rows_b[:, None] * GH + offs_h[None, :], H, mask,
                         dp0, dp1, dp2, dp3, G)
        tl.debug_barrier()

        # 4: dh_{t-1} += dp @ W_hh, reducing over the G*H gate columns.
        add_state_gradient(dhbuf_ptr, dp_ptr + t64 * B * GH, w_hh_ptr, rows_b, mask_b, H, GH,
                           BLOCK_H, BLOCK_K, PRECISION, UPCAST)
        tl.debug_barrier()

    store_state(dhbuf_ptr, dcbuf_ptr, dh0_ptr, dc0_ptr, rows_b, mask_b, H, MODE, BLOCK_H)


def layer_norm_config(dtype: torch.dtype, kernel: str, mode: str) -> dict:
    """16 batch rows and 16 units per tile, at every batch size: the plain layer kernels' tile
    (kernels/rnn/launch.py: layer_config) with its narrower column tile, as these keep more alive
    (four gates of p, their normalized values, gains and input shares in phase B). The fp32 and
    fp64 LSTM forward spilled (LDL/STL in the sm_90 SASS) with 4 warps and does not with 8
    (tests/gpu/test_triton_gpu_compile.py). Under triton 3.6 the fp32 LSTM backward spilled with 4
    warps too, and the fp32 GRU backward with 8 (clean with 4), so the warps follow the mode."""
    wide = dtype in (torch.float32, torch.float64)
    warps = 8 if wide and (kernel == "forward" or mode == "lstm") else 4
    return {"BLOCK_B": 16, "BLOCK_H": 16, "BLOCK_K": 16 if wide else 32, "num_warps": warps}


def layer_norm_rnn_forward(mode, gates_x, h0, c0, w_hh, b_hh, ln_hh_weight, ln_c_weight, ln_c_bias,
                           lengths, eps, reverse, save_workspace):
    """Launch the forward kernel. gates_x [T, B, G*H] = LN(x W_ih^T; a_ih) + b_ih. Returns
    (y [T, B, H], h_n, c_n (LSTM, else empty), workspace [T, B, WS*H], stats [T, B, S] fp32
    (fp64 for fp64 input)); workspace and stats are empty without save_workspace."""
    T, B, GH = gates_x.shape
    H = h0.shape[1]
    lstm = mode == "lstm"
    acc = accumulator_dtype(gates_x.dtype)
    y = new_output((T, B, H), gates_x)
    h_n = new_output((B, H), gates_x)
    c_n = new_output((B if lstm else 0, H), gates_x)
    ws = new_output((T if save_workspace else 0, B, LN_WORKSPACE[mode] * H), gates_x)
    stats = new_output((T if save_workspace else 0, B, LN_STATS[mode]), gates_x.new_empty(0, dtype=acc))
    if B == 0 or H == 0:
        return y, h_n, c_n, ws, stats
    if T == 0:
        h_n.copy_(h0)
        if lstm:
            c_n.copy_(c0)
        return y, h_n, c_n, ws, stats
    hbuf = torch.empty((2, B, H), dtype=acc, device=gates_x.device)
    cbuf = torch.empty((B if lstm else 1, H), dtype=acc, device=gates_x.device)
    pbuf = torch.empty((B, GH), dtype=acc, device=gates_x.device)
    launch = layer_norm_launch("forward", mode, gates_x.dtype, has_lengths=lengths is not None,
                               reverse=reverse, PRECISION=dot_precision(gates_x.dtype),
                               UPCAST=INTERPRETED, HAS_B_HH=b_hh is not None,
                               SAVE_WS=ws.numel() > 0)
    grid = (triton.cdiv(B, launch["BLOCK_B"]),)
    saved = ws.numel() > 0
    _ln_rnn_forward_kernel[grid](
        gx_ptr=gates_x, h0_ptr=h0, c0_ptr=c0 if lstm else None, w_hh_ptr=w_hh, b_hh_ptr=b_hh,
        a_hh_ptr=ln_hh_weight, a_c_ptr=ln_c_weight if lstm else None,
        b_c_ptr=ln_c_bias if lstm else None, len_ptr=lengths, y_ptr=y, hn_ptr=h_n,
        cn_ptr=c_n if lstm else None, ws_ptr=ws if saved else None,
        stats_ptr=stats if saved else None, hbuf_ptr=hbuf, cbuf_ptr=cbuf, pbuf_ptr=pbuf,
        T=T, B=B, H=H, eps=eps, **launch)
    return y, h_n, c_n, ws, stats


def layer_norm_rnn_backward(mode, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, ln_hh_weight,
                            ln_c_weight, ln_c_bias, y, workspace, stats, lengths, reverse):
    """Launch the backward kernel. Returns (dgates_x [T, B, G*H], dq [T, B, G*H] (the GRU's
    gradient of LN(p; a_hh) + b_hh, which differs from dgates_x in the n gate; else empty),
    dp [T, B, G*H] (of p = h_{t-1} W_hh^T), da [T, B, H] (LSTM: of a_c LN(c_t) + b_c; else
    empty), dh0, dc0 (LSTM, else empty))."""
    T, B, H = y.shape
    G = GATES[mode]
    lstm, gru = mode == "lstm", mode == "gru"
    dgx = new_output((T, B, G * H), y)
    dq = new_output((T if gru else 0, B, G * H), y)
    dp = new_output((T, B, G * H), y)
    da = new_output((T if lstm else 0, B, H), y)
    dh0 = new_output((B, H), y)
    dc0 = new_output((B if lstm else 0, H), y)
    if B == 0 or H == 0:
        return dgx, dq, dp, da, dh0, dc0
    if T == 0:
        dh0.copy_(grad_h_n)
        if lstm:
            dc0.copy_(grad_c_n if grad_c_n is not None else torch.zeros_like(dc0))
        return dgx, dq, dp, da, dh0, dc0
    acc = accumulator_dtype(y.dtype)
    dhbuf = torch.empty((B, H), dtype=acc, device=y.device)
    dcbuf = torch.empty((B if lstm else 1, H), dtype=acc, device=y.device)
    dqbuf = torch.empty((B, G * H), dtype=acc, device=y.device)
    launch = layer_norm_launch("backward", mode, y.dtype, has_lengths=lengths is not None,
                               reverse=reverse, PRECISION=dot_precision(y.dtype),
                               UPCAST=INTERPRETED, HAS_GRAD_CN=grad_c_n is not None)
    grid = (triton.cdiv(B, launch["BLOCK_B"]),)
    _ln_rnn_backward_kernel[grid](
        gy_ptr=grad_y, ghn_ptr=grad_h_n, gcn_ptr=grad_c_n, h0_ptr=h0,
        c0_ptr=c0 if lstm else None, w_hh_ptr=w_hh, a_hh_ptr=ln_hh_weight,
        a_c_ptr=ln_c_weight if lstm else None, b_c_ptr=ln_c_bias if lstm else None, y_ptr=y,
        ws_ptr=workspace, stats_ptr=stats, len_ptr=lengths, dgx_ptr=dgx,
        dq_ptr=dq if gru else None, dp_ptr=dp, da_ptr=da if lstm else None, dh0_ptr=dh0,
        dc0_ptr=dc0 if lstm else None, dhbuf_ptr=dhbuf, dcbuf_ptr=dcbuf, dqbuf_ptr=dqbuf,
        T=T, B=B, H=H, **launch)
    return dgx, dq, dp, da, dh0, dc0


def layer_norm_launch(kernel, mode, dtype, *, has_lengths, reverse, PRECISION, UPCAST,
                      **flags) -> dict:
    """The forward or backward kernel's constexprs and warps for this call (the launch and its
    specs); flags: the forward's HAS_B_HH and SAVE_WS, the backward's HAS_GRAD_CN."""
    return dict(MODE=MODE_IDS[mode], G=GATES[mode], WS=LN_WORKSPACE[mode],
                NP=LN_PROJECTION_COLUMN[mode], S=LN_STATS[mode], HAS_LENGTHS=has_lengths,
                REVERSE=reverse, PRECISION=PRECISION, UPCAST=UPCAST,
                ACC_DTYPE=tl_accumulator_dtype(dtype), **flags,
                **layer_norm_config(dtype, kernel, mode))


def launch_specs() -> list[dict]:
    """What the compile test checks: the layer-normalized LSTM and GRU, forward and backward,
    in bf16 and fp32, on the longest path (reverse, lengths, biases, workspace)."""
    specs = []
    for kernel, fn in (("forward", _ln_rnn_forward_kernel), ("backward", _ln_rnn_backward_kernel)):
        for mode in ("lstm", "gru"):
            lstm = mode == "lstm"
            flags = ({"HAS_B_HH": True, "SAVE_WS": True} if kernel == "forward"
                     else {"HAS_GRAD_CN": lstm})
            # The tensors the mode has not are absent (None), as the launchers pass them.
            lstm_only = ("c0_ptr", "a_c_ptr", "b_c_ptr", "cn_ptr", "gcn_ptr", "da_ptr", "dc0_ptr")
            absent = [name for name in (("dq_ptr",) if lstm else lstm_only)
                      if name in inspect.signature(fn.fn).parameters]
            for dtype in (torch.bfloat16, torch.float32):
                state = accumulator_dtype(dtype)
                pointers = {"len_ptr": "i32", **{name: state for name in (
                    "stats_ptr", "hbuf_ptr", "cbuf_ptr", "pbuf_ptr", "dhbuf_ptr", "dcbuf_ptr",
                    "dqbuf_ptr")}}
                specs.append(launch_spec(fn, dtype, layer_norm_launch(
                    kernel, mode, dtype, has_lengths=True, reverse=True, **GPU_DOT, **flags),
                    pointers=pointers, scalars={"eps": "fp32"}, gemm=True, absent=absent))
    return specs
