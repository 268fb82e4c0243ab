"""Triton building blocks shared by the recurrent kernels (one cell step, whole sequences):
the gate projections and the per-unit math of a step, forward and backward.

Gate order and formulas are PyTorch's: LSTM i, f, g, o; GRU r, z, n with
n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); RNN h' = tanh or relu. MODE: 0 LSTM, 1 GRU,
2 RNN-tanh, 3 RNN-relu. Gate slots acc0..acc3 hold gates 0..G-1 (input and recurrent parts
summed), except that the GRU keeps W_hn h + b_hn in acc3, since the reset gate multiplies it
alone. The four saved values w0..w3 per unit are LSTM i, f, g, o and GRU r, z, n, hn.
"""
import triton
import triton.language as tl

from .common import dot_acc, sigmoid, tanh


@triton.jit
def weight_tile_t(w_ptr, gate, H, K, offs_h, offs_k, mask_h):
    """[BLOCK_K, BLOCK_H] tile of W[gate*H + offs_h, offs_k]^T, W row-major [G*H, K]."""
    rows = (gate * H + offs_h).to(tl.int64)
    ptrs = w_ptr + rows[None, :] * K + offs_k[:, None]
    return tl.load(ptrs, mask=mask_h[None, :] & (offs_k[:, None] < K), other=0.0)


@triton.jit
def accumulate_projection(acc0, acc1, acc2, acc3, a_ptr, w_ptr, rows_b, mask_b, offs_h, mask_h,
                          K, H, G: tl.constexpr, GATE2_SLOT: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc_g += A[rows_b, :] @ W[g*H + offs_h, :]^T for gates g < G, K-tile by K-tile, with A
    [B, K] and W [G*H, K] row-major. A is cast to W's dtype (a sequence keeps its state in fp32
    and feeds the tensor cores in the weights' dtype). Gate 2 goes to slot GATE2_SLOT: 2, or 3
    for the GRU's recurrent projection."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows_b[:, None] * K + offs_k[None, :],
                    mask=mask_b[:, None] & (offs_k[None, :] < K), other=0.0)
        a = a.to(w_ptr.dtype.element_ty)
        acc0 = dot_acc(a, weight_tile_t(w_ptr, 0, H, K, offs_h, offs_k, mask_h), acc0, PRECISION, UPCAST)
        if G >= 3:
            acc1 = dot_acc(a, weight_tile_t(w_ptr, 1, H, K, offs_h, offs_k, mask_h), acc1, PRECISION, UPCAST)
            w2 = weight_tile_t(w_ptr, 2, H, K, offs_h, offs_k, mask_h)
            if GATE2_SLOT == 2:
                acc2 = dot_acc(a, w2, acc2, PRECISION, UPCAST)
            else:
                acc3 = dot_acc(a, w2, acc3, PRECISION, UPCAST)
        if G == 4:
            acc3 = dot_acc(a, weight_tile_t(w_ptr, 3, H, K, offs_h, offs_k, mask_h), acc3, PRECISION, UPCAST)
    return acc0, acc1, acc2, acc3


@triton.jit
def cell_forward_math(MODE: tl.constexpr, acc0, acc1, acc2, acc3, h_prev, c_prev):
    """One step's state update from the gate pre-activations (biases included).
    Returns (h_new, c_new, w0, w1, w2, w3); c_new is c_prev for cells without a cell state."""
    if MODE == 0:
        w0 = sigmoid(acc0)
        w1 = sigmoid(acc1)
        w2 = tanh(acc2)
        w3 = sigmoid(acc3)
        c_new = w1 * c_prev + w0 * w2
        h_new = w3 * tanh(c_new)
    elif MODE == 1:
        w0 = sigmoid(acc0)
        w1 = sigmoid(acc1)
        w2 = tanh(acc2 + w0 * acc3)
        w3 = acc3
        c_new = c_prev
        h_new = (1.0 - w1) * w2 + w1 * h_prev
    else:
        if MODE == 2:
            h_new = tanh(acc0)
        else:
            h_new = tl.maximum(acc0, 0.0)
        c_new = c_prev
        w0 = h_new
        w1 = h_new
        w2 = h_new
        w3 = h_new
    return h_new, c_new, w0, w1, w2, w3


@triton.jit
def cell_backward_math(MODE: tl.constexpr, dh, dc, w0, w1, w2, w3, h_prev, c_prev, h_new, c_new):
    """Gradients of one step from dh (into h_new) and dc (into c_new). Returns
    (d0, d1, d2, d3, dn_hh, dh_direct, dc_prev): d0..d3 the gate pre-activation gradients
    (LSTM i, f, g, o; GRU r, z, n; RNN d0), dn_hh the GRU's gradient of W_hn h + b_hn (its other
    recurrent gates share d0, d1), dh_direct the GRU's z*dh path to h_prev that skips W_hh,
    dc_prev the LSTM's gradient into c_prev. Unused entries are zeros."""
    zero = tl.zeros_like(dh)
    if MODE == 0:
        tanh_c = tanh(c_new)
        dc_total = dc + dh * w3 * (1.0 - tanh_c * tanh_c)
        d0 = dc_total * w2 * w0 * (1.0 - w0)
        d1 = dc_total * c_prev * w1 * (1.0 - w1)
        d2 = dc_total * w0 * (1.0 - w2 * w2)
        d3 = dh * tanh_c * w3 * (1.0 - w3)
        dn_hh = zero
        dh_direct = zero
        dc_prev = dc_total * w1
    elif MODE == 1:
        d2 = dh * (1.0 - w1) * (1.0 - w2 * w2)
        d1 = dh * (h_prev - w2) * w1 * (1.0 - w1)
        d0 = d2 * w3 * w0 * (1.0 - w0)
        d3 = zero
        dn_hh = d2 * w0
        dh_direct = dh * w1
        dc_prev = zero
    else:
        if MODE == 2:
            d0 = dh * (1.0 - h_new * h_new)
        else:
            d0 = tl.where(h_new > 0, dh, 0.0)
        d1 = zero
        d2 = zero
        d3 = zero
        dn_hh = zero
        dh_direct = zero
        dc_prev = zero
    return d0, d1, d2, d3, dn_hh, dh_direct, dc_prev


@triton.jit
def load_saved(ws, H, mask, MODE: tl.constexpr, ACC_DTYPE: tl.constexpr, like):
    """The four values a forward saved per unit (LSTM i, f, g, o; GRU r, z, n, hn) from the
    workspace columns ws, ws+H, ws+2H, ws+3H; zeros (shaped like `like`) for plain RNNs."""
    if MODE <= 1:
        w0 = tl.load(ws, mask=mask, other=0.0).to(ACC_DTYPE)
        w1 = tl.load(ws + H, mask=mask, other=0.0).to(ACC_DTYPE)
        w2 = tl.load(ws + 2 * H, mask=mask, other=0.0).to(ACC_DTYPE)
        w3 = tl.load(ws + 3 * H, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        w0 = tl.zeros_like(like)
        w1 = tl.zeros_like(like)
        w2 = tl.zeros_like(like)
        w3 = tl.zeros_like(like)
    return w0, w1, w2, w3
