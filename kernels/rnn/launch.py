"""Triton kernels for one recurrent layer over a whole sequence, in one direction or in both
at once (a bidirectional call stacks every per-direction tensor on a leading dimension of 2 and
launches a second row of programs, program_id(1), for the other direction).

The input projection of every step (x W_ih^T + b_ih) is one GEMM done before the kernel; the
kernel runs the recurrence. One program owns a tile of BLOCK_B batch rows and all hidden units,
and loops over time: programs never wait on each other (Triton's interpreter runs them one
after another), and a step's barrier is a barrier inside one program. The state is kept in
fp32 (fp64 for fp64 input) in scratch memory, double-buffered for h (every unit of step t+1 reads all of h_t), and
fed to the recurrent GEMM in the weights' dtype.

Variable lengths: a row whose sequence has ended (t >= length) keeps its state and outputs
zeros, so its final state is the one at its last valid step; in the reverse direction a row of
length n starts at step n-1. Backward runs the steps in the opposite order: a pointwise phase
writes the gate gradients of step t, then a GEMM phase turns them into dh_{t-1}. The weight
gradient is one GEMM over all steps afterwards (fastseq.ops.rnn_layer).

Workspace per step and unit: LSTM i, f, g, o, c_t; GRU r, z, n, W_hn h + b_hn; plain RNN none.

Zoneout (LSTM h and c, GRU h): per-step weights m [T, B, H], h_t = m h_{t-1} + (1 - m) h~_t;
y and the workspace's c_t hold the zoned-out states, the backward recomputes the LSTM's
c~_t = f c_{t-1} + i g (the math of csrc/include/fastseq/rnn_layer.h).
"""
import inspect

import torch
import triton
import triton.language as tl

from ..common import (GPU_DOT, INTERPRETED, accumulator_dtype, dot_acc, dot_precision,
                      launch_spec, new_output, tl_accumulator_dtype)
from ..recurrent_layout import GATES, LAYER_WORKSPACE, MODE_IDS
from ..cell_math import accumulate_projection, cell_backward_math, cell_forward_math, load_saved


@triton.jit
def step_index(step, T, REVERSE: tl.constexpr):
    if REVERSE:
        t = T - 1 - step
    else:
        t = step
    return t


@triton.jit
def _runs_reversed(REVERSE: tl.constexpr):
    """Whether this program's direction runs from the last step: direction 0 as REVERSE says,
    direction 1 (program_id(1) of a bidirectional call) the other way."""
    if REVERSE:
        reverse = tl.program_id(1) == 0
    else:
        reverse = tl.program_id(1) == 1
    return reverse


@triton.jit
def batch_tile(len_ptr, T, B, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's batch rows (offsets, mask, int64 rows) and their sequence lengths (T for
    every row when no lengths are given)."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    if HAS_LENGTHS:
        lengths = tl.load(len_ptr + offs_b, mask=mask_b, other=0)
    else:
        lengths = tl.full((BLOCK_B,), T, tl.int32)
    return offs_b, mask_b, offs_b.to(tl.int64), lengths


@triton.jit
def add_state_gradient(dh_ptr, dgates_ptr, w_hh_ptr, rows_b, mask_b, H, GH,
                       BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr):
    """dh[rows_b] += dgates[rows_b] @ W_hh: the recurrent gates' share of dh_{t-1}, reducing
    over the G*H gate columns; dh [B, H] (fp32 scratch), dgates [B, G*H] (one step's),
    W_hh [G*H, H]."""
    for k0 in range(0, H, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        mask_k = offs_k < H
        mask = mask_b[:, None] & mask_k[None, :]
        state = rows_b[:, None] * H + offs_k[None, :]
        acc = tl.load(dh_ptr + state, mask=mask, other=0.0)
        for j0 in range(0, GH, BLOCK_K):
            offs_j = j0 + tl.arange(0, BLOCK_K)
            mask_j = offs_j < GH
            a = tl.load(dgates_ptr + rows_b[:, None] * GH + offs_j[None, :],
                        mask=mask_b[:, None] & mask_j[None, :], other=0.0)
            w = tl.load(w_hh_ptr + offs_j.to(tl.int64)[:, None] * H + offs_k[None, :],
                        mask=mask_j[:, None] & mask_k[None, :], other=0.0)
            acc = dot_acc(a.to(w.dtype), w, acc, PRECISION, UPCAST)
        tl.store(dh_ptr + state, acc, mask=mask)


@triton.jit
def store_state(h_src, c_src, h_dst, c_dst, rows_b, mask_b, H, MODE: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """Copy the rows' state (h, and c for the LSTM) from scratch to outputs, cast to theirs."""
    for j0 in range(0, H, BLOCK_H):
        offs_h = j0 + tl.arange(0, BLOCK_H)
        mask = mask_b[:, None] & (offs_h < H)[None, :]
        state = rows_b[:, None] * H + offs_h[None, :]
        tl.store(h_dst + state, tl.load(h_src + state, mask=mask, other=0.0).to(h_dst.dtype.element_ty), mask=mask)
        if MODE == 0:
            tl.store(c_dst + state, tl.load(c_src + state, mask=mask, other=0.0).to(c_dst.dtype.element_ty),
                     mask=mask)


@triton.jit
def _rnn_layer_forward_kernel(
    gx_ptr, h0_ptr, c0_ptr, w_hh_ptr, b_hh_ptr, len_ptr, zh_ptr, zc_ptr,
    y_ptr, hn_ptr, cn_ptr, ws_ptr, hbuf_ptr, cbuf_ptr,
    T, B, H,
    MODE: tl.constexpr, G: tl.constexpr, WS: tl.constexpr,
    HAS_B_HH: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, SAVE_WS: tl.constexpr,
    DIRECTIONS: tl.constexpr,
    HAS_ZH: tl.constexpr, HAS_ZC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    offs_b, mask_b, rows_b, lengths = batch_tile(len_ptr, T, B, HAS_LENGTHS, BLOCK_B)
    out_ty = y_ptr.dtype.element_ty
    BH = B * H
    # Direction d = program_id(1) of a stacked (bidirectional) call: its slice of every tensor.
    # A constexpr, so that one-direction kernels carry none of it (the offsets made the bf16
    # backward spill on sm_90).
    reverse = REVERSE
    if DIRECTIONS == 2:
        d = tl.program_id(1).to(tl.int64)
        reverse = _runs_reversed(REVERSE)
        gx_ptr += d * T * B * G * H
        h0_ptr += d * BH
        w_hh_ptr += d * G * H * H
        y_ptr += d * T * BH
        hn_ptr += d * BH
        hbuf_ptr += d * 2 * BH
        cbuf_ptr += d * BH
        # Absent tensors are None (constexpr): only the present ones move.
        if MODE == 0:
            c0_ptr += d * BH
            cn_ptr += d * BH
        if HAS_B_HH:
            b_hh_ptr += d * G * H
        if HAS_ZH:
            zh_ptr += d * T * BH
        if HAS_ZC:
            zc_ptr += d * T * BH
        if SAVE_WS:
            ws_ptr += d * T * B * WS * H

    # State buffers start as h0 (buffer 0) and c0.
    for j0 in range(0, H, BLOCK_H):
        offs_h = j0 + tl.arange(0, BLOCK_H)
        mask = mask_b[:, None] & (offs_h < H)[None, :]
        state = rows_b[:, None] * H + offs_h[None, :]
        tl.store(hbuf_ptr + state, tl.load(h0_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE), mask=mask)
        if MODE == 0:
            tl.store(cbuf_ptr + state, tl.load(c0_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE), mask=mask)
    tl.debug_barrier()

    for step in range(0, T):
        t = tl.where(reverse, T - 1 - step, step)
        h_read = hbuf_ptr + (step % 2) * BH
        h_write = hbuf_ptr + ((step + 1) % 2) * BH
        valid = (t < lengths)[:, None]
        for j0 in range(0, H, BLOCK_H):
            offs_h = j0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            mask = mask_b[:, None] & mask_h[None, :]
            state = rows_b[:, None] * H + offs_h[None, :]
            gx = gx_ptr + t.to(tl.int64) * B * G * H + rows_b[:, None] * (G * H) + offs_h[None, :]
            acc0 = tl.load(gx, mask=mask, other=0.0).to(ACC_DTYPE)
            acc1 = tl.zeros_like(acc0)
            acc2 = tl.zeros_like(acc0)
            acc3 = tl.zeros_like(acc0)
            if G >= 3:
                acc1 = tl.load(gx + H, mask=mask, other=0.0).to(ACC_DTYPE)
                acc2 = tl.load(gx + 2 * H, mask=mask, other=0.0).to(ACC_DTYPE)
            if G == 4:
                acc3 = tl.load(gx + 3 * H, mask=mask, other=0.0).to(ACC_DTYPE)
            if HAS_B_HH:
                acc0 += tl.load(b_hh_ptr + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)[None, :]
                if G >= 3:
                    acc1 += tl.load(b_hh_ptr + H + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)[None, :]
                    b2 = tl.load(b_hh_ptr + 2 * H + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)[None, :]
                    if MODE == 1:
                        acc3 += b2  # the GRU's b_hn joins W_hn h, which r multiplies
                    else:
                        acc2 += b2
                if G == 4:
                    acc3 += tl.load(b_hh_ptr + 3 * H + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)[None, :]
            # The GRU's recurrent n-gate projection goes to slot 3 (r multiplies it), else 2.
            acc0, acc1, acc2, acc3 = accumulate_projection(
                acc0, acc1, acc2, acc3, h_read, w_hh_ptr, rows_b, mask_b, offs_h, mask_h, H, H,
                G, 2 + (MODE == 1), BLOCK_K, PRECISION, UPCAST)
            h_prev = tl.load(h_read + state, mask=mask, other=0.0)
            if MODE == 0:
                c_prev = tl.load(cbuf_ptr + state, mask=mask, other=0.0)
            else:
                c_prev = tl.zeros_like(h_prev)
            h_new, c_new, w0, w1, w2, w3 = cell_forward_math(MODE, acc0, acc1, acc2, acc3, h_prev, c_prev)
            if HAS_ZH:
                m = tl.load(zh_ptr + t.to(tl.int64) * BH + state, mask=mask, other=0.0).to(ACC_DTYPE)
                h_new = m * h_prev + (1.0 - m) * h_new
            if HAS_ZC:
                m = tl.load(zc_ptr + t.to(tl.int64) * BH + state, mask=mask, other=0.0).to(ACC_DTYPE)
                c_new = m * c_prev + (1.0 - m) * c_new
            h_new = tl.where(valid, h_new, h_prev)
            tl.store(h_write + state, h_new, mask=mask)
            tl.store(y_ptr + t.to(tl.int64) * BH + state, tl.where(valid, h_new, 0.0).to(out_ty), mask=mask)
            if MODE == 0:
                c_new = tl.where(valid, c_new, c_prev)
                tl.store(cbuf_ptr + state, c_new, mask=mask)
            if SAVE_WS:
                ws = ws_ptr + t.to(tl.int64) * B * WS * H + rows_b[:, None] * (WS * H) + offs_h[None, :]
                tl.store(ws, w0.to(out_ty), mask=mask)
                tl.store(ws + H, w1.to(out_ty), mask=mask)
                tl.store(ws + 2 * H, w2.to(out_ty), mask=mask)
                tl.store(ws + 3 * H, w3.to(out_ty), mask=mask)
                if MODE == 0:
                    tl.store(ws + 4 * H, c_new.to(out_ty), mask=mask)
        tl.debug_barrier()

    store_state(hbuf_ptr + (T % 2) * BH, cbuf_ptr, hn_ptr, cn_ptr, rows_b, mask_b, H, MODE, BLOCK_H)


@triton.jit
def _rnn_layer_backward_kernel(
    gy_ptr, ghn_ptr, gcn_ptr, h0_ptr, c0_ptr, w_hh_ptr, y_ptr, ws_ptr, len_ptr, zh_ptr, zc_ptr,
    dgx_ptr, dgh_ptr, dh0_ptr, dc0_ptr, dhbuf_ptr, dcbuf_ptr,
    T, B, H,
    MODE: tl.constexpr, G: tl.constexpr, WS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_GRAD_CN: tl.constexpr, REVERSE: tl.constexpr, DIRECTIONS: tl.constexpr,
    HAS_ZH: tl.constexpr, HAS_ZC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    offs_b, mask_b, rows_b, lengths = batch_tile(len_ptr, T, B, HAS_LENGTHS, BLOCK_B)
    out_ty = dgx_ptr.dtype.element_ty
    BH = B * H
    GH = G * H
    reverse = REVERSE  # the direction's slices, as in the forward
    if DIRECTIONS == 2:
        d = tl.program_id(1).to(tl.int64)
        reverse = _runs_reversed(REVERSE)
        gy_ptr += d * T * BH
        ghn_ptr += d * BH
        h0_ptr += d * BH
        w_hh_ptr += d * GH * H
        y_ptr += d * T * BH
        dgx_ptr += d * T * B * GH
        dh0_ptr += d * BH
        dhbuf_ptr += d * BH
        dcbuf_ptr += d * BH
        # Absent tensors are None (constexpr): only the present ones move.
        if MODE == 0:
            c0_ptr += d * BH
            dc0_ptr += d * BH
        if MODE == 1:
            dgh_ptr += d * T * B * GH
        if MODE <= 1:
            ws_ptr += d * T * B * WS * H
        if HAS_GRAD_CN:
            gcn_ptr += d * BH
        if HAS_ZH:
            zh_ptr += d * T * BH
        if HAS_ZC:
            zc_ptr += d * T * BH
    # dgh holds the gradients of the recurrent pre-activations: the GRU's differ from dgx in
    # the n gate; the other cells share dgx.
    if MODE == 1:
        drec_ptr = dgh_ptr
    else:
        drec_ptr = dgx_ptr

    # dh flowing into h_T and dc into c_T.
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
        # Steps in the opposite order of the forward.
        t = tl.where(reverse, step, T - 1 - step)
        valid = (t < lengths)[:, None]
        # The previous state of step t came from step t+1 (reverse; h0 at the row's end) or t-1.
        t_prev = tl.where(reverse, t + 1, t - 1)
        has_prev = tl.where(reverse, t_prev < lengths, (t_prev >= 0) & (lengths > 0))[:, None]
        t_prev_safe = tl.minimum(tl.maximum(t_prev, 0), T - 1).to(tl.int64)
        t64 = t.to(tl.int64)

        # Phase 1: gate gradients of step t, and the paths to h_{t-1}, c_{t-1} that skip W_hh.
        for j0 in range(0, H, BLOCK_H):
            offs_h = j0 + tl.arange(0, BLOCK_H)
            mask = mask_b[:, None] & (offs_h < H)[None, :]
            state = rows_b[:, None] * H + offs_h[None, :]
            dh_next = tl.load(dhbuf_ptr + state, mask=mask, other=0.0)
            dh = dh_next + tl.where(valid, tl.load(gy_ptr + t64 * BH + state, mask=mask, other=0.0).to(ACC_DTYPE), 0.0)
            h_new = tl.load(y_ptr + t64 * BH + state, mask=mask, other=0.0).to(ACC_DTYPE)
            h_prev = tl.where(has_prev,
                              tl.load(y_ptr + t_prev_safe * BH + state, mask=mask, other=0.0).to(ACC_DTYPE),
                              tl.load(h0_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE))
            zero = tl.zeros_like(dh)
            if MODE <= 1:  # plain RNNs save no workspace (None)
                ws = ws_ptr + t64 * B * WS * H + rows_b[:, None] * (WS * H) + offs_h[None, :]
                w0, w1, w2, w3 = load_saved(ws, H, mask, MODE, ACC_DTYPE, dh)
            else:
                w0, w1, w2, w3 = zero, zero, zero, zero
            if MODE == 0:
                dc = tl.load(dcbuf_ptr + state, mask=mask, other=0.0)
                c_new = tl.load(ws + 4 * H, mask=mask, other=0.0).to(ACC_DTYPE)
                ws_prev = ws_ptr + t_prev_safe * B * WS * H + rows_b[:, None] * (WS * H) + offs_h[None, :]
                c_prev = tl.where(has_prev,
                                  tl.load(ws_prev + 4 * H, mask=mask, other=0.0).to(ACC_DTYPE),
                                  tl.load(c0_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE))
            else:
                dc = zero
                c_new = zero
                c_prev = zero
            # Zoneout: the cell's new state takes the (1 - m) share, the previous state m.
            m_h = zero
            m_c = zero
            if HAS_ZH:
                m_h = tl.load(zh_ptr + t64 * BH + state, mask=mask, other=0.0).to(ACC_DTYPE)
            if HAS_ZC:
                m_c = tl.load(zc_ptr + t64 * BH + state, mask=mask, other=0.0).to(ACC_DTYPE)
                c_new = w1 * c_prev + w0 * w2  # c~_t = f c_{t-1} + i g, before zoneout
            d0, d1, d2, d3, dn_hh, dh_direct, dc_prev = cell_backward_math(
                MODE, (1.0 - m_h) * dh, (1.0 - m_c) * dc, w0, w1, w2, w3, h_prev, c_prev, h_new, c_new)
            dh_direct += m_h * dh
            dc_prev += m_c * dc
            dg = dgx_ptr + t64 * B * GH + rows_b[:, None] * GH + offs_h[None, :]
            tl.store(dg, tl.where(valid, d0, 0.0).to(out_ty), mask=mask)
            if G >= 3:
                tl.store(dg + H, tl.where(valid, d1, 0.0).to(out_ty), mask=mask)
                tl.store(dg + 2 * H, tl.where(valid, d2, 0.0).to(out_ty), mask=mask)
            if G == 4:
                tl.store(dg + 3 * H, tl.where(valid, d3, 0.0).to(out_ty), mask=mask)
            if MODE == 1:
                dgr = dgh_ptr + t64 * B * GH + rows_b[:, None] * GH + offs_h[None, :]
                tl.store(dgr, tl.where(valid, d0, 0.0).to(out_ty), mask=mask)
                tl.store(dgr + H, tl.where(valid, d1, 0.0).to(out_ty), mask=mask)
                tl.store(dgr + 2 * H, tl.where(valid, dn_hh, 0.0).to(out_ty), mask=mask)
            if MODE == 0:
                tl.store(dcbuf_ptr + state, tl.where(valid, dc_prev, dc), mask=mask)
            # A finished row passes dh through unchanged; a running one keeps the direct path.
            tl.store(dhbuf_ptr + state, tl.where(valid, dh_direct, dh), mask=mask)
        tl.debug_barrier()

        # Phase 2: dh_{t-1} += dgates_rec(t) @ W_hh, reducing over the G*H gate columns.
        add_state_gradient(dhbuf_ptr, drec_ptr + t64 * B * GH, w_hh_ptr, rows_b, mask_b, H, GH,
                           BLOCK_H, BLOCK_K, PRECISION, UPCAST)
        tl.debug_barrier()

    store_state(dhbuf_ptr, dcbuf_ptr, dh0_ptr, dc0_ptr, rows_b, mask_b, H, MODE, BLOCK_H)


def layer_config(batch: int, dtype: torch.dtype, kernel: str, zoneout: bool = False,
                 directions: int = 1) -> dict:
    """One program per 16 batch rows, at every batch size: programs are this kernel's only
    parallelism (B=64 gives 4 of them), and 16-row tiles were the only ones free of spills in
    the sm_90 SASS of every mode in bf16 and fp32 (tests/gpu/test_triton_gpu_compile.py). These
    kernels keep far more alive than the cell step (every gate of a tile, h_prev, c, int64
    pointer blocks at 2 registers per element): with 32 or 64 rows ptxas capped them at 128
    registers (256 threads) and spilled 36+ bytes in 3-14 of 16 configurations. The backward
    needs BLOCK_H=16 (fp32 LSTM spilled at 32), and so does the forward with zoneout in fp32
    (the LSTM with both masks spilled at 32). BLOCK_K as the cell kernel's, but 16 for the
    backward of both directions at once: with 32, the bf16 RNN and zoneout-LSTM backward spilled
    (the direction's pointer offsets), with 4 warps or 8."""
    wide = dtype in (torch.float32, torch.float64)
    block_k = 16 if wide or (kernel == "backward" and directions == 2) else 32
    block_h = 32 if kernel == "forward" and not (zoneout and wide) else 16
    return {"BLOCK_B": 16, "BLOCK_H": block_h, "BLOCK_K": block_k, "num_warps": 4}


def _stacked(*tensors):
    """Per-direction inputs with a leading direction dimension (added when absent)."""
    return [t.unsqueeze(0) if t is not None else None for t in tensors]


def rnn_layer_forward(mode, gates_x, h0, c0, w_hh, b_hh, lengths, zoneout_h, zoneout_c, reverse,
                      save_workspace):
    """Launch the forward kernel. gates_x [T, B, G*H] (x W_ih^T + b_ih), h0/c0 [B, H], lengths
    int32 [B] or None, zoneout weights [T, B, H] or None. Returns (y [T, B, H], h_n, c_n,
    workspace [T, B, WS*H]).

    Bidirectional: every per-direction tensor (all but lengths) stacked on a leading dimension
    of 2 (gates_x [2, T, B, G*H], w_hh [2, G*H, H], ...), outputs likewise; direction 1 runs
    against direction 0 (which `reverse` describes), both in one launch."""
    stacked = gates_x.dim() == 4
    if not stacked:
        gates_x, h0, c0, w_hh, b_hh, zoneout_h, zoneout_c = _stacked(
            gates_x, h0, c0, w_hh, b_hh, zoneout_h, zoneout_c)
    D, T, B, _ = gates_x.shape
    H = h0.shape[-1]
    lstm = mode == "lstm"
    y = new_output((D, T, B, H), gates_x)
    h_n = new_output((D, B, H), gates_x)
    c_n = new_output((D, B if lstm else 0, H), gates_x)
    ws_columns = LAYER_WORKSPACE[mode] * H if save_workspace else 0
    ws = new_output((D, T if ws_columns else 0, B, ws_columns), gates_x)
    outputs = (y, h_n, c_n, ws)
    if B > 0 and H > 0 and T == 0:
        h_n.copy_(h0)
        if lstm:
            c_n.copy_(c0)
    elif B > 0 and H > 0:
        acc = accumulator_dtype(gates_x.dtype)  # state and accumulation: fp32 (fp64 for fp64 input)
        hbuf = torch.empty((D, 2, B, H), dtype=acc, device=gates_x.device)
        cbuf = torch.empty((D, B if lstm else 1, H), dtype=acc, device=gates_x.device)
        launch = layer_launch(
            "forward", mode, gates_x.dtype, B, directions=D, has_lengths=lengths is not None,
            reverse=reverse, has_zh=zoneout_h is not None, has_zc=zoneout_c is not None,
            PRECISION=dot_precision(gates_x.dtype), UPCAST=INTERPRETED,
            HAS_B_HH=b_hh is not None, SAVE_WS=ws.numel() > 0)
        grid = (triton.cdiv(B, launch["BLOCK_B"]), D)
        _rnn_layer_forward_kernel[grid](
            gx_ptr=gates_x, h0_ptr=h0, c0_ptr=c0, w_hh_ptr=w_hh, b_hh_ptr=b_hh,
            len_ptr=lengths, zh_ptr=zoneout_h, zc_ptr=zoneout_c,
            y_ptr=y, hn_ptr=h_n, cn_ptr=c_n if lstm else None,
            ws_ptr=ws if ws.numel() else None, hbuf_ptr=hbuf, cbuf_ptr=cbuf,
            T=T, B=B, H=H, **launch)
    return outputs if stacked else tuple(t[0] for t in outputs)


def rnn_layer_backward(mode, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, y, workspace, lengths,
                       zoneout_h, zoneout_c, reverse):
    """Launch the backward kernel. Returns (dgates_x [T, B, G*H], dgates_h [T, B, G*H] (GRU,
    else empty), dh0 [B, H], dc0 [B, H] (LSTM, else empty)); stacked directions as the
    forward's."""
    stacked = y.dim() == 4
    if not stacked:
        grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, y, workspace, zoneout_h, zoneout_c = _stacked(
            grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, y, workspace, zoneout_h, zoneout_c)
    D, T, B, H = y.shape
    G = GATES[mode]
    gru, lstm = mode == "gru", mode == "lstm"
    dgx = new_output((D, T, B, G * H), y)
    dgh = new_output((D, T if gru else 0, B, G * H), y)
    dh0 = new_output((D, B, H), y)
    dc0 = new_output((D, B if lstm else 0, H), y)
    outputs = (dgx, dgh, dh0, dc0)
    if B > 0 and H > 0 and T == 0:
        dh0.copy_(grad_h_n)
        if lstm:
            dc0.copy_(grad_c_n if grad_c_n is not None else torch.zeros_like(dc0))
    elif B > 0 and H > 0:
        acc = accumulator_dtype(y.dtype)
        dhbuf = torch.empty((D, B, H), dtype=acc, device=y.device)
        dcbuf = torch.empty((D, B if lstm else 1, H), dtype=acc, device=y.device)
        launch = layer_launch(
            "backward", mode, y.dtype, B, directions=D, has_lengths=lengths is not None,
            reverse=reverse, has_zh=zoneout_h is not None, has_zc=zoneout_c is not None,
            PRECISION=dot_precision(y.dtype), UPCAST=INTERPRETED,
            HAS_GRAD_CN=grad_c_n is not None)
        grid = (triton.cdiv(B, launch["BLOCK_B"]), D)
        _rnn_layer_backward_kernel[grid](
            gy_ptr=grad_y, ghn_ptr=grad_h_n, gcn_ptr=grad_c_n, h0_ptr=h0, c0_ptr=c0,
            w_hh_ptr=w_hh, y_ptr=y, ws_ptr=workspace if LAYER_WORKSPACE[mode] else None,
            len_ptr=lengths, zh_ptr=zoneout_h, zc_ptr=zoneout_c,
            dgx_ptr=dgx, dgh_ptr=dgh if gru else None, dh0_ptr=dh0, dc0_ptr=dc0 if lstm else None,
            dhbuf_ptr=dhbuf, dcbuf_ptr=dcbuf, T=T, B=B, H=H, **launch)
    return outputs if stacked else tuple(t[0] for t in outputs)


def layer_launch(kernel, mode, dtype, batch, *, directions, has_lengths, reverse, has_zh, has_zc,
                 PRECISION, UPCAST, **flags) -> dict:
    """The forward or backward kernel's constexprs and warps for this call (the launch and its
    specs); flags: the forward's HAS_B_HH and SAVE_WS, the backward's HAS_GRAD_CN."""
    return dict(MODE=MODE_IDS[mode], G=GATES[mode], WS=max(LAYER_WORKSPACE[mode], 1),
                HAS_LENGTHS=has_lengths, REVERSE=reverse, DIRECTIONS=directions, HAS_ZH=has_zh,
                HAS_ZC=has_zc, PRECISION=PRECISION, UPCAST=UPCAST,
                ACC_DTYPE=tl_accumulator_dtype(dtype), **flags,
                **layer_config(batch, dtype, kernel, has_zh or has_zc, directions))


def _layer_spec(kernel, mode, dtype, zoneout=False, directions=1):
    """One spec on the longest path: reverse with lengths, biases, workspace, and with zoneout
    the masks the mode takes (one tile shape at every batch size: batch 1 stands for all). The
    tensors the mode has not are absent (None) as the launchers pass them."""
    lstm, gru, saves = mode == "lstm", mode == "gru", LAYER_WORKSPACE[mode] > 0
    flags = ({"HAS_B_HH": True, "SAVE_WS": saves} if kernel == "forward"
             else {"HAS_GRAD_CN": lstm})
    has_zh, has_zc = zoneout, zoneout and lstm
    launch = layer_launch(kernel, mode, dtype, 1, directions=directions, has_lengths=True,
                          reverse=True, has_zh=has_zh, has_zc=has_zc, **GPU_DOT, **flags)
    present = {"c0_ptr": lstm, "cn_ptr": lstm, "dc0_ptr": lstm, "gcn_ptr": lstm,
               "dgh_ptr": gru, "ws_ptr": saves, "zh_ptr": has_zh, "zc_ptr": has_zc}
    state = accumulator_dtype(dtype)  # the kernels' scratch state buffers
    pointers = {"len_ptr": "i32", "hbuf_ptr": state, "cbuf_ptr": state, "dhbuf_ptr": state,
                "dcbuf_ptr": state}
    fn = _rnn_layer_forward_kernel if kernel == "forward" else _rnn_layer_backward_kernel
    arguments = inspect.signature(fn.fn).parameters
    return launch_spec(fn, dtype, launch, pointers=pointers, gemm=True,
                       absent=[name for name, has in present.items()
                               if not has and name in arguments])


def launch_specs() -> list[dict]:
    """What the compile test checks: forward and backward of each mode in bf16 and fp32; of
    the LSTM and GRU with zoneout; both directions at once (every mode; the LSTM with
    zoneout too)."""
    specs = []
    for kernel in ("forward", "backward"):
        for dtype in (torch.bfloat16, torch.float32):
            specs += [_layer_spec(kernel, mode, dtype) for mode in MODE_IDS]
            specs += [_layer_spec(kernel, mode, dtype, zoneout=True) for mode in ("lstm", "gru")]
            specs += [_layer_spec(kernel, mode, dtype, zoneout=zoneout, directions=2)
                      for mode in MODE_IDS
                      for zoneout in ((False, True) if mode == "lstm" else (False,))]
    return specs
