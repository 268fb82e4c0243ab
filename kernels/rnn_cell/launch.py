"""Triton kernels for one recurrent cell step (LSTM, GRU, tanh/relu RNN), forward and backward.

Forward: one program owns a BLOCK_B x BLOCK_H tile of (batch row, hidden unit) pairs and all
gates of those units, so both gate GEMMs (x @ W_ih^T and h @ W_hh^T, tl.dot with fp32
accumulation), the biases, the activations and the state update run in one launch. The gates
are written only when a backward will need them (SAVE_WS).

Backward: one elementwise kernel turns (dh', dc') into the gate pre-activation gradients; the
input, state and weight gradients are GEMMs over those (cuBLAS), as cuDNN's backward does.

Gate order and formulas are PyTorch's: LSTM i, f, g, o; GRU r, z, n with
n = tanh(W_in x + b_in + r * (W_hn h + b_hn)). Tensors are contiguous; gate-major columns
(column g*H + j is gate g of unit j). The workspace holds LSTM i, f, g, o or GRU r, z, n, hn.
"""
import torch
import triton
import triton.language as tl

from ..common import (GPU_DOT, INTERPRETED, dot_precision, launch_spec, new_output,
                      tl_accumulator_dtype)
from ..recurrent_layout import GATES, MODE_IDS, WORKSPACE
from ..cell_math import accumulate_projection, cell_backward_math, cell_forward_math, load_saved


@triton.jit
def _bias(b_ptr, gate, H, offs_h, mask_h, ACC_DTYPE: tl.constexpr):
    return tl.load(b_ptr + gate * H + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)[None, :]


@triton.jit
def _rnn_cell_forward_kernel(
    x_ptr, hx_ptr, cx_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr,
    hy_ptr, cy_ptr, ws_ptr,
    B, I, H,
    MODE: tl.constexpr, G: tl.constexpr,
    HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, SAVE_WS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_h = offs_h < H
    mask_b = offs_b < B
    rows_b = offs_b.to(tl.int64)

    # Gate slots: acc0..acc{G-1} hold gates 0..G-1 (input and recurrent parts summed), except
    # that the GRU keeps W_hn h in acc3, because the reset gate multiplies it alone.
    acc0 = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DTYPE)
    acc1 = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DTYPE)
    acc2 = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DTYPE)
    acc3 = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DTYPE)

    acc0, acc1, acc2, acc3 = accumulate_projection(
        acc0, acc1, acc2, acc3, x_ptr, w_ih_ptr, rows_b, mask_b, offs_h, mask_h, I, H,
        G, 2, BLOCK_K, PRECISION, UPCAST)
    # The GRU's recurrent n-gate projection goes to slot 3 (r multiplies it), else 2.
    acc0, acc1, acc2, acc3 = accumulate_projection(
        acc0, acc1, acc2, acc3, hx_ptr, w_hh_ptr, rows_b, mask_b, offs_h, mask_h, H, H,
        G, 2 + (MODE == 1), BLOCK_K, PRECISION, UPCAST)

    if HAS_B_IH:
        acc0 += _bias(b_ih_ptr, 0, H, offs_h, mask_h, ACC_DTYPE)
        if G >= 3:
            acc1 += _bias(b_ih_ptr, 1, H, offs_h, mask_h, ACC_DTYPE)
            acc2 += _bias(b_ih_ptr, 2, H, offs_h, mask_h, ACC_DTYPE)
        if G == 4:
            acc3 += _bias(b_ih_ptr, 3, H, offs_h, mask_h, ACC_DTYPE)
    if HAS_B_HH:
        acc0 += _bias(b_hh_ptr, 0, H, offs_h, mask_h, ACC_DTYPE)
        if G >= 3:
            acc1 += _bias(b_hh_ptr, 1, H, offs_h, mask_h, ACC_DTYPE)
        if MODE == 0:
            acc2 += _bias(b_hh_ptr, 2, H, offs_h, mask_h, ACC_DTYPE)
            acc3 += _bias(b_hh_ptr, 3, H, offs_h, mask_h, ACC_DTYPE)
        if MODE == 1:
            acc3 += _bias(b_hh_ptr, 2, H, offs_h, mask_h, ACC_DTYPE)

    mask = mask_b[:, None] & mask_h[None, :]
    state = rows_b[:, None] * H + offs_h[None, :]
    out_ty = hy_ptr.dtype.element_ty
    h_prev = tl.load(hx_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
    if MODE == 0:
        c_prev = tl.load(cx_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        c_prev = tl.zeros_like(h_prev)
    h_new, c_new, w0, w1, w2, w3 = cell_forward_math(MODE, acc0, acc1, acc2, acc3, h_prev, c_prev)
    tl.store(hy_ptr + state, h_new.to(out_ty), mask=mask)
    if MODE == 0:
        tl.store(cy_ptr + state, c_new.to(out_ty), mask=mask)
    if SAVE_WS:
        ws = ws_ptr + rows_b[:, None] * (4 * H) + offs_h[None, :]
        tl.store(ws, w0.to(out_ty), mask=mask)
        tl.store(ws + H, w1.to(out_ty), mask=mask)
        tl.store(ws + 2 * H, w2.to(out_ty), mask=mask)
        tl.store(ws + 3 * H, w3.to(out_ty), mask=mask)


@triton.jit
def _rnn_cell_backward_kernel(
    grad_hy_ptr, grad_cy_ptr, hx_ptr, cx_ptr, hy_ptr, cy_ptr, ws_ptr,
    dg_ih_ptr, dg_hh_ptr, dh_direct_ptr, dcx_ptr,
    B, H,
    MODE: tl.constexpr, G: tl.constexpr, HAS_GRAD_CY: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_b = offs_b.to(tl.int64)
    mask = (offs_b < B)[:, None] & (offs_h < H)[None, :]
    state = rows_b[:, None] * H + offs_h[None, :]
    dg = dg_ih_ptr + rows_b[:, None] * (G * H) + offs_h[None, :]
    out_ty = dg_ih_ptr.dtype.element_ty
    dh = tl.load(grad_hy_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
    zero = tl.zeros_like(dh)
    if HAS_GRAD_CY:
        dc = tl.load(grad_cy_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        dc = zero
    h_prev = tl.load(hx_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
    h_new = tl.load(hy_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
    if MODE == 0:
        c_prev = tl.load(cx_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
        c_new = tl.load(cy_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        c_prev = zero
        c_new = zero
    if MODE <= 1:  # plain RNNs save no workspace (ws_ptr None)
        ws = ws_ptr + rows_b[:, None] * (4 * H) + offs_h[None, :]
        w0, w1, w2, w3 = load_saved(ws, H, mask, MODE, ACC_DTYPE, dh)
    else:
        w0, w1, w2, w3 = zero, zero, zero, zero
    d0, d1, d2, d3, dn_hh, dh_direct, dc_prev = cell_backward_math(
        MODE, dh, dc, w0, w1, w2, w3, h_prev, c_prev, h_new, c_new)
    tl.store(dg, d0.to(out_ty), mask=mask)
    if G >= 3:
        tl.store(dg + H, d1.to(out_ty), mask=mask)
        tl.store(dg + 2 * H, d2.to(out_ty), mask=mask)
    if G == 4:
        tl.store(dg + 3 * H, d3.to(out_ty), mask=mask)
    if MODE == 0:
        tl.store(dcx_ptr + state, dc_prev.to(out_ty), mask=mask)
    if MODE == 1:
        dg_hh = dg_hh_ptr + rows_b[:, None] * (G * H) + offs_h[None, :]
        tl.store(dg_hh, d0.to(out_ty), mask=mask)
        tl.store(dg_hh + H, d1.to(out_ty), mask=mask)
        tl.store(dg_hh + 2 * H, dn_hh.to(out_ty), mask=mask)
        tl.store(dh_direct_ptr + state, dh_direct.to(out_ty), mask=mask)


def forward_config(batch: int, dtype: torch.dtype) -> dict:
    """Launch configuration of the forward kernel: block sizes and warps.

    tl.dot needs every block dim >= 16. Small batches (decoding) get a 16-row tile; larger ones
    32 or 64 rows, so that each weight tile loaded feeds more rows. Register budget, read off
    the sm_90 SASS (tests/gpu/test_triton_gpu_compile.py compiles exactly these configurations):
    4 gate accumulators of BLOCK_B x 32 spill at 4 warps from BLOCK_B=32 up, so those get 8;
    fp32/fp64 dots run on FMA/DMMA units, which hold K-slices of all 4 weight tiles in
    registers, and spilled at BLOCK_K=32 (LSTM, 4 warps): they take BLOCK_K=16. Tile sizes are
    still first guesses for speed, to be tuned on an H100. fp64 (gradcheck-sized work) keeps
    the 16-row tile at every batch: under triton 3.6 its 64-row tile spilled at 8 warps.
    """
    block_b = 16 if dtype == torch.float64 else min(64, max(16, triton.next_power_of_2(batch)))
    block_k = 16 if dtype in (torch.float32, torch.float64) else 32
    return {"BLOCK_B": block_b, "BLOCK_H": 32, "BLOCK_K": block_k,
            "num_warps": 4 if block_b == 16 else 8}


# The backward kernel is elementwise: 16 x 64 units per program, 4 warps (8 units a thread).
BACKWARD_CONFIG = {"BLOCK_B": 16, "BLOCK_H": 64, "num_warps": 4}


def rnn_cell_forward(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, save_workspace):
    """Launch the forward kernel on checked, contiguous tensors. Returns (hy, cy, workspace)."""
    B, I = input.shape
    H = hx.shape[1]
    hy = new_output((B, H), input)
    cy = new_output((B if mode == "lstm" else 0, H), input)
    ws_columns = WORKSPACE[mode] * H if save_workspace else 0
    ws = new_output((B if ws_columns else 0, ws_columns), input)
    if B == 0 or H == 0:
        return hy, cy, ws
    launch = forward_launch(mode, input.dtype, B, has_b_ih=b_ih is not None,
                            has_b_hh=b_hh is not None, save_ws=ws.numel() > 0,
                            PRECISION=dot_precision(input.dtype), UPCAST=INTERPRETED)
    grid = (triton.cdiv(H, launch["BLOCK_H"]), triton.cdiv(B, launch["BLOCK_B"]))
    lstm = mode == "lstm"
    _rnn_cell_forward_kernel[grid](
        x_ptr=input, hx_ptr=hx, cx_ptr=cx if lstm else None, w_ih_ptr=w_ih, w_hh_ptr=w_hh,
        b_ih_ptr=b_ih, b_hh_ptr=b_hh, hy_ptr=hy, cy_ptr=cy if lstm else None,
        ws_ptr=ws if ws.numel() else None, B=B, I=I, H=H, **launch)
    return hy, cy, ws


def rnn_cell_backward(mode, grad_hy, grad_cy, hx, cx, hy, cy, workspace):
    """Launch the backward kernel. Returns (dgates_ih, dgates_hh, dh_prev_direct, dcx)."""
    B, H = hy.shape
    G = GATES[mode]
    gru, lstm = mode == "gru", mode == "lstm"
    dg_ih = new_output((B, G * H), hy)
    dg_hh = new_output((B if gru else 0, G * H), hy)
    dh_direct = new_output((B if gru else 0, H), hy)
    dcx = new_output((B if lstm else 0, H), hy)
    if B == 0 or H == 0:
        return dg_ih, dg_hh, dh_direct, dcx
    launch = backward_launch(mode, hy.dtype, has_grad_cy=grad_cy is not None)
    grid = (triton.cdiv(H, launch["BLOCK_H"]), triton.cdiv(B, launch["BLOCK_B"]))
    _rnn_cell_backward_kernel[grid](
        grad_hy_ptr=grad_hy, grad_cy_ptr=grad_cy, hx_ptr=hx, cx_ptr=cx if lstm else None,
        hy_ptr=hy, cy_ptr=cy if lstm else None,
        ws_ptr=workspace if WORKSPACE[mode] else None, dg_ih_ptr=dg_ih,
        dg_hh_ptr=dg_hh if gru else None, dh_direct_ptr=dh_direct if gru else None,
        dcx_ptr=dcx if lstm else None, B=B, H=H, **launch)
    return dg_ih, dg_hh, dh_direct, dcx


def forward_launch(mode, dtype, batch, *, has_b_ih, has_b_hh, save_ws, PRECISION, UPCAST) -> dict:
    """The forward kernel's constexprs and warps for this call (the launch and its specs)."""
    return dict(MODE=MODE_IDS[mode], G=GATES[mode], HAS_B_IH=has_b_ih, HAS_B_HH=has_b_hh,
                SAVE_WS=save_ws, PRECISION=PRECISION, UPCAST=UPCAST,
                ACC_DTYPE=tl_accumulator_dtype(dtype), **forward_config(batch, dtype))


def backward_launch(mode, dtype, *, has_grad_cy) -> dict:
    return dict(MODE=MODE_IDS[mode], G=GATES[mode], HAS_GRAD_CY=has_grad_cy,
                ACC_DTYPE=tl_accumulator_dtype(dtype), **BACKWARD_CONFIG)


def launch_specs() -> list[dict]:
    """What the compile test checks: every mode's forward in bf16 and fp32 at the three
    batch tiles (batch 1, 32, 100: 16, 32 and 64 rows), fp16 and fp64 on the largest cell
    (LSTM), every backward in bf16 and fp32; each on its longest path (biases, workspace,
    the LSTM's cell gradient)."""
    specs = []
    for mode in MODE_IDS:
        for dtype in (torch.bfloat16, torch.float32):
            specs += [_forward_spec(mode, dtype, batch) for batch in (1, 32, 100)]
            specs.append(_backward_spec(mode, dtype))
    for dtype in (torch.float16, torch.float64):
        specs += [_forward_spec("lstm", dtype, batch) for batch in (1, 100)]
    return specs


def _forward_spec(mode, dtype, batch):
    """Biases, and the workspace the mode saves; the tensors the mode has not are absent (None)
    as the launcher passes them."""
    lstm, saves = mode == "lstm", WORKSPACE[mode] > 0
    launch = forward_launch(mode, dtype, batch, has_b_ih=True, has_b_hh=True, save_ws=saves,
                            **GPU_DOT)
    absent = ([] if lstm else ["cx_ptr", "cy_ptr"]) + ([] if saves else ["ws_ptr"])
    return launch_spec(_rnn_cell_forward_kernel, dtype, launch, gemm=True, absent=absent)


def _backward_spec(mode, dtype):
    lstm, gru = mode == "lstm", mode == "gru"
    absent = (([] if lstm else ["grad_cy_ptr", "cx_ptr", "cy_ptr", "dcx_ptr"])
              + ([] if gru else ["dg_hh_ptr", "dh_direct_ptr"])
              + ([] if WORKSPACE[mode] else ["ws_ptr"]))
    return launch_spec(_rnn_cell_backward_kernel, dtype,
                       backward_launch(mode, dtype, has_grad_cy=lstm), absent=absent)
