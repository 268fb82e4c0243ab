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

from .common import INTERPRETED, accumulator_dtype, dot_acc, dot_precision, new_output, sigmoid, tanh

from .rnn_cell_layout import GATES, WORKSPACE

# The kernels' MODE constexpr.
MODE_IDS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}


@triton.jit
def _weight_tile_t(w_ptr, gate, H, K, offs_h, offs_k, mask_h):
    """[BLOCK_K, BLOCK_H] tile of W[gate*H + offs_h, offs_k]^T, W row-major [G*H, K]."""
    rows = (gate * H + offs_h).to(tl.int64)
    ptrs = w_ptr + rows[None, :] * K + offs_k[:, None]
    return tl.load(ptrs, mask=mask_h[None, :] & (offs_k[:, None] < K), other=0.0)


@triton.jit
def _bias(b_ptr, gate, H, offs_h, mask_h, ACC_DTYPE: tl.constexpr):
    return tl.load(b_ptr + gate * H + offs_h, mask=mask_h, other=0.0).to(ACC_DTYPE)[None, :]


@triton.jit
def _accumulate_projection(acc0, acc1, acc2, acc3, a_ptr, w_ptr, rows_b, mask_b, offs_h, mask_h,
                           K, H, G: tl.constexpr, GATE2_SLOT: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc_g += A[rows_b, :] @ W[g*H + offs_h, :]^T for gates g < G, K-tile by K-tile, with A
    [B, K] and W [G*H, K] row-major. Gate 2 goes to slot GATE2_SLOT: 2, or 3 for the GRU's
    recurrent projection, which the reset gate multiplies on its own."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows_b[:, None] * K + offs_k[None, :],
                    mask=mask_b[:, None] & (offs_k[None, :] < K), other=0.0)
        acc0 = dot_acc(a, _weight_tile_t(w_ptr, 0, H, K, offs_h, offs_k, mask_h), acc0, PRECISION, UPCAST)
        if G >= 3:
            acc1 = dot_acc(a, _weight_tile_t(w_ptr, 1, H, K, offs_h, offs_k, mask_h), acc1, PRECISION, UPCAST)
            w2 = _weight_tile_t(w_ptr, 2, H, K, offs_h, offs_k, mask_h)
            if GATE2_SLOT == 2:
                acc2 = dot_acc(a, w2, acc2, PRECISION, UPCAST)
            else:
                acc3 = dot_acc(a, w2, acc3, PRECISION, UPCAST)
        if G == 4:
            acc3 = dot_acc(a, _weight_tile_t(w_ptr, 3, H, K, offs_h, offs_k, mask_h), acc3, PRECISION, UPCAST)
    return acc0, acc1, acc2, acc3


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

    acc0, acc1, acc2, acc3 = _accumulate_projection(
        acc0, acc1, acc2, acc3, x_ptr, w_ih_ptr, rows_b, mask_b, offs_h, mask_h, I, H,
        G, 2, BLOCK_K, PRECISION, UPCAST)
    if MODE == 1:
        acc0, acc1, acc2, acc3 = _accumulate_projection(
            acc0, acc1, acc2, acc3, hx_ptr, w_hh_ptr, rows_b, mask_b, offs_h, mask_h, H, H,
            G, 3, BLOCK_K, PRECISION, UPCAST)
    else:
        acc0, acc1, acc2, acc3 = _accumulate_projection(
            acc0, acc1, acc2, acc3, hx_ptr, w_hh_ptr, rows_b, mask_b, offs_h, mask_h, H, H,
            G, 2, BLOCK_K, PRECISION, UPCAST)

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
    ws = ws_ptr + rows_b[:, None] * (4 * H) + offs_h[None, :]
    out_ty = hy_ptr.dtype.element_ty
    if MODE == 0:
        i = sigmoid(acc0)
        f = sigmoid(acc1)
        g = tanh(acc2)
        o = sigmoid(acc3)
        c_prev = tl.load(cx_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
        c = f * c_prev + i * g
        tl.store(cy_ptr + state, c.to(out_ty), mask=mask)
        tl.store(hy_ptr + state, (o * tanh(c)).to(out_ty), mask=mask)
        if SAVE_WS:
            tl.store(ws, i.to(out_ty), mask=mask)
            tl.store(ws + H, f.to(out_ty), mask=mask)
            tl.store(ws + 2 * H, g.to(out_ty), mask=mask)
            tl.store(ws + 3 * H, o.to(out_ty), mask=mask)
    elif MODE == 1:
        h_prev = tl.load(hx_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
        r = sigmoid(acc0)
        z = sigmoid(acc1)
        n = tanh(acc2 + r * acc3)
        tl.store(hy_ptr + state, ((1.0 - z) * n + z * h_prev).to(out_ty), mask=mask)
        if SAVE_WS:
            tl.store(ws, r.to(out_ty), mask=mask)
            tl.store(ws + H, z.to(out_ty), mask=mask)
            tl.store(ws + 2 * H, n.to(out_ty), mask=mask)
            tl.store(ws + 3 * H, acc3.to(out_ty), mask=mask)
    elif MODE == 2:
        tl.store(hy_ptr + state, tanh(acc0).to(out_ty), mask=mask)
    else:
        tl.store(hy_ptr + state, tl.maximum(acc0, 0.0).to(out_ty), mask=mask)


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
    ws = ws_ptr + rows_b[:, None] * (4 * H) + offs_h[None, :]
    dg = dg_ih_ptr + rows_b[:, None] * (G * H) + offs_h[None, :]
    out_ty = dg_ih_ptr.dtype.element_ty
    dh = tl.load(grad_hy_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
    if MODE == 0:
        i = tl.load(ws, mask=mask, other=0.0).to(ACC_DTYPE)
        f = tl.load(ws + H, mask=mask, other=0.0).to(ACC_DTYPE)
        g = tl.load(ws + 2 * H, mask=mask, other=0.0).to(ACC_DTYPE)
        o = tl.load(ws + 3 * H, mask=mask, other=0.0).to(ACC_DTYPE)
        c_prev = tl.load(cx_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
        tanh_c = tanh(tl.load(cy_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE))
        dc = dh * o * (1.0 - tanh_c * tanh_c)
        if HAS_GRAD_CY:
            dc += tl.load(grad_cy_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(dg, (dc * g * i * (1.0 - i)).to(out_ty), mask=mask)
        tl.store(dg + H, (dc * c_prev * f * (1.0 - f)).to(out_ty), mask=mask)
        tl.store(dg + 2 * H, (dc * i * (1.0 - g * g)).to(out_ty), mask=mask)
        tl.store(dg + 3 * H, (dh * tanh_c * o * (1.0 - o)).to(out_ty), mask=mask)
        tl.store(dcx_ptr + state, (dc * f).to(out_ty), mask=mask)
    elif MODE == 1:
        r = tl.load(ws, mask=mask, other=0.0).to(ACC_DTYPE)
        z = tl.load(ws + H, mask=mask, other=0.0).to(ACC_DTYPE)
        n = tl.load(ws + 2 * H, mask=mask, other=0.0).to(ACC_DTYPE)
        hn = tl.load(ws + 3 * H, mask=mask, other=0.0).to(ACC_DTYPE)
        h_prev = tl.load(hx_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
        dn_pre = dh * (1.0 - z) * (1.0 - n * n)
        dz_pre = dh * (h_prev - n) * z * (1.0 - z)
        dr_pre = dn_pre * hn * r * (1.0 - r)
        dg_hh = dg_hh_ptr + rows_b[:, None] * (G * H) + offs_h[None, :]
        tl.store(dg, dr_pre.to(out_ty), mask=mask)
        tl.store(dg + H, dz_pre.to(out_ty), mask=mask)
        tl.store(dg + 2 * H, dn_pre.to(out_ty), mask=mask)
        tl.store(dg_hh, dr_pre.to(out_ty), mask=mask)
        tl.store(dg_hh + H, dz_pre.to(out_ty), mask=mask)
        tl.store(dg_hh + 2 * H, (dn_pre * r).to(out_ty), mask=mask)
        tl.store(dh_direct_ptr + state, (dh * z).to(out_ty), mask=mask)
    else:
        h_new = tl.load(hy_ptr + state, mask=mask, other=0.0).to(ACC_DTYPE)
        if MODE == 2:
            tl.store(dg, (dh * (1.0 - h_new * h_new)).to(out_ty), mask=mask)
        else:
            tl.store(dg, tl.where(h_new > 0, dh, 0.0).to(out_ty), mask=mask)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def forward_config(batch: int, dtype: torch.dtype) -> dict:
    """Launch configuration of the forward kernel: block sizes and warps.

    tl.dot needs every block dim >= 16. Small batches (decoding) get a 16-row tile; larger ones
    32 or 64 rows, so that each weight tile loaded feeds more rows. Register budget, read off
    the sm_90 SASS (tests/test_triton_gpu_compile.py compiles exactly these configurations):
    4 gate accumulators of BLOCK_B x 32 spill at 4 warps from BLOCK_B=32 up, so those get 8;
    fp32/fp64 dots run on FMA/DMMA units, which hold K-slices of all 4 weight tiles in
    registers, and spilled at BLOCK_K=32 (LSTM, 4 warps): they take BLOCK_K=16. Tile sizes are
    still first guesses for speed, to be tuned on an H100.
    """
    block_b = min(64, max(16, triton.next_power_of_2(batch)))
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
    config = forward_config(B, input.dtype)
    grid = (triton.cdiv(H, config["BLOCK_H"]), triton.cdiv(B, config["BLOCK_B"]))
    _rnn_cell_forward_kernel[grid](
        input, hx, cx if cx is not None else hy, w_ih, w_hh,
        b_ih if b_ih is not None else hy, b_hh if b_hh is not None else hy,
        hy, cy if cy.numel() else hy, ws if ws.numel() else hy,
        B, I, H,
        MODE=MODE_IDS[mode], G=GATES[mode],
        HAS_B_IH=b_ih is not None, HAS_B_HH=b_hh is not None, SAVE_WS=ws.numel() > 0,
        PRECISION=dot_precision(input.dtype), UPCAST=INTERPRETED,
        ACC_DTYPE=_tl_dtype(accumulator_dtype(input.dtype)),
        **config,
    )
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
    grid = (triton.cdiv(H, BACKWARD_CONFIG["BLOCK_H"]), triton.cdiv(B, BACKWARD_CONFIG["BLOCK_B"]))
    _rnn_cell_backward_kernel[grid](
        grad_hy, grad_cy if grad_cy is not None else grad_hy, hx,
        cx if cx is not None else hy, hy, cy if cy is not None else hy,
        workspace if workspace.numel() else hy,
        dg_ih, dg_hh if gru else dg_ih, dh_direct if gru else dg_ih, dcx if lstm else dg_ih,
        B, H,
        MODE=MODE_IDS[mode], G=G, HAS_GRAD_CY=grad_cy is not None,
        ACC_DTYPE=_tl_dtype(accumulator_dtype(hy.dtype)), **BACKWARD_CONFIG,
    )
    return dg_ih, dg_hh, dh_direct, dcx
