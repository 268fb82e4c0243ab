"""Registered ops of one layer-normalized LSTM/GRU layer in one direction (kernels/
layer_norm_rnn_layer.py), their fakes and their autograd:

  torch.ops.fastseq.layer_norm_rnn_layer_forward_triton(mode, gates_x, h0, c0, w_hh, b_hh,
      ln_hh_weight, ln_c_weight, ln_c_bias, lengths, eps, reverse, save_workspace)
      -> (y, h_n, c_n, workspace, stats)
  torch.ops.fastseq.layer_norm_rnn_layer_backward_triton(mode, grad_y, grad_h_n, grad_c_n, h0,
      c0, w_hh, ln_hh_weight, ln_c_weight, ln_c_bias, y, workspace, stats, lengths, reverse)
      -> (dgates_x, dq, dp, da, dh0, dc0)

gates_x [T, B, G*H] is the input's share of the gates, LN(x W_ih^T; a_ih) + b_ih, computed by
the caller for all steps at once. The backward op runs the recurrence backwards; the autograd
formula below then forms the parameters' gradients as sums over all steps (one GEMM for W_hh):
dW_hh = dp^T h_prev, db_hh = sum dq, da_hh = sum dq * LN(p), and the LSTM's da_c = sum da *
LN(c_t), db_c = sum da.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.recurrent_layout import GATES, LN_PROJECTION_COLUMN, LN_STATS, LN_WORKSPACE
from ._registration import (contiguous_or_none, register_fakes_and_autograd,
                            triton_custom_op)
from .rnn_registration import previous_states

FORWARD = "fastseq::layer_norm_rnn_layer_forward_triton"
BACKWARD = "fastseq::layer_norm_rnn_layer_backward_triton"


@triton_custom_op(FORWARD)
def layer_norm_rnn_layer_forward_triton(
    mode: str, gates_x: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor,
    b_hh: Optional[Tensor], ln_hh_weight: Tensor, ln_c_weight: Optional[Tensor],
    ln_c_bias: Optional[Tensor], lengths: Optional[Tensor], eps: float, reverse: bool,
    save_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.layer_norm_rnn import launch as layer_norm_rnn_layer

    lstm = mode == "lstm"
    args = contiguous_or_none(gates_x, h0, c0 if lstm else None, w_hh, b_hh, ln_hh_weight,
                              ln_c_weight if lstm else None, ln_c_bias if lstm else None, lengths)
    return layer_norm_rnn_layer.layer_norm_rnn_forward(mode, *args, eps, reverse, save_workspace)


@triton_custom_op(BACKWARD)
def layer_norm_rnn_layer_backward_triton(
    mode: str, grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Optional[Tensor], h0: Tensor,
    c0: Optional[Tensor], w_hh: Tensor, ln_hh_weight: Tensor, ln_c_weight: Optional[Tensor],
    ln_c_bias: Optional[Tensor], y: Tensor, workspace: Tensor, stats: Tensor,
    lengths: Optional[Tensor], reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.layer_norm_rnn import launch as layer_norm_rnn_layer

    if workspace.numel() == 0 and y.shape[0] > 0 and y.shape[1] > 0:
        raise RuntimeError("fastseq: the workspace is empty: the forward ran with "
                           "save_workspace=False, so it cannot be differentiated")
    lstm = mode == "lstm"
    args = contiguous_or_none(grad_y, grad_h_n, grad_c_n if lstm else None, h0, c0 if lstm else None,
                              w_hh, ln_hh_weight, ln_c_weight if lstm else None,
                              ln_c_bias if lstm else None, y, workspace, stats, lengths)
    return layer_norm_rnn_layer.layer_norm_rnn_backward(mode, *args, reverse)


def _forward_fake(mode, gates_x, h0, c0, w_hh, b_hh, ln_hh_weight, ln_c_weight, ln_c_bias, lengths,
                  eps, reverse, save_workspace):
    steps, batch, _ = gates_x.shape
    hidden = h0.shape[1]
    kept = steps if save_workspace else 0
    stats_dtype = torch.float64 if gates_x.dtype == torch.float64 else torch.float32
    return (gates_x.new_empty(steps, batch, hidden), gates_x.new_empty(batch, hidden),
            gates_x.new_empty(batch if mode == "lstm" else 0, hidden),
            gates_x.new_empty(kept, batch, LN_WORKSPACE[mode] * hidden),
            gates_x.new_empty(kept, batch, LN_STATS[mode], dtype=stats_dtype))


def _backward_fake(mode, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, ln_hh_weight, ln_c_weight,
                   ln_c_bias, y, workspace, stats, lengths, reverse):
    steps, batch, hidden = y.shape
    columns = GATES[mode] * hidden
    gru, lstm = mode == "gru", mode == "lstm"
    return (y.new_empty(steps, batch, columns), y.new_empty(steps if gru else 0, batch, columns),
            y.new_empty(steps, batch, columns), y.new_empty(steps if lstm else 0, batch, hidden),
            y.new_empty(batch, hidden), y.new_empty(batch if lstm else 0, hidden))


def _setup_context(ctx, inputs, output) -> None:
    (mode, _gates_x, h0, c0, w_hh, _b_hh, ln_hh_weight, ln_c_weight, ln_c_bias, lengths, _eps,
     reverse, _save) = inputs
    y, _h_n, _c_n, workspace, stats = output
    ctx.mode, ctx.reverse = mode, reverse
    ctx.save_for_backward(h0, c0, w_hh, ln_hh_weight, ln_c_weight, ln_c_bias, lengths, y,
                          workspace, stats)


def _make_backward(backward_op):
    """The autograd formula, calling the backward op through `backward_op`."""
    def backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_workspace, _grad_stats):
        (h0, c0, w_hh, ln_hh_weight, ln_c_weight, ln_c_bias, lengths, y, workspace,
         stats) = ctx.saved_tensors
        mode = ctx.mode
        lstm = mode == "lstm"
        grad_y = grad_y if grad_y is not None else torch.zeros_like(y)
        grad_h_n = grad_h_n if grad_h_n is not None else torch.zeros_like(h0)
        dgx, dq, dp, da, dh0, dc0 = backward_op(
            mode, grad_y, grad_h_n, grad_c_n if lstm else None, h0, c0 if lstm else None, w_hh,
            ln_hh_weight, ln_c_weight if lstm else None, ln_c_bias if lstm else None, y, workspace,
            stats, lengths, ctx.reverse)
        if lstm:  # the LSTM's recurrent gates get the input gates' gradient
            dq = dgx
        need = ctx.needs_input_grad
        steps, batch, hidden = y.shape
        rows = steps * batch
        columns = GATES[mode] * hidden
        projection = LN_PROJECTION_COLUMN[mode] * hidden
        # Sums over every step and row, in fp32 (fp64 for fp64) whatever the input's dtype.
        acc = stats.dtype
        d_w_hh = d_b_hh = d_ln_hh = d_ln_c = d_b_c = None
        if need[4]:  # one GEMM over all steps
            h_prev = previous_states(y, h0, lengths, ctx.reverse)
            d_w_hh = dp.reshape(rows, columns).t() @ h_prev.reshape(rows, hidden)
        if need[5]:
            d_b_hh = dq.reshape(rows, columns).to(acc).sum(0).to(y.dtype)
        if need[6]:
            normalized = workspace[..., projection:projection + columns]
            d_ln_hh = (dq.to(acc) * normalized.to(acc)).reshape(rows, columns).sum(0).to(y.dtype)
        if lstm and (need[7] or need[8]):
            c_hat = workspace[..., 5 * hidden:6 * hidden].to(acc)  # LN(c_t), saved by the forward
            if need[7]:
                d_ln_c = (da.to(acc) * c_hat).reshape(rows, hidden).sum(0).to(y.dtype)
            if need[8]:
                d_b_c = da.reshape(rows, hidden).to(acc).sum(0).to(y.dtype)
        return (None, dgx if need[1] else None, dh0 if need[2] else None,
                dc0 if lstm and need[3] else None, d_w_hh, d_b_hh, d_ln_hh, d_ln_c, d_b_c, None,
                None, None, None)

    return backward


register_fakes_and_autograd(FORWARD, BACKWARD, forward_fake=_forward_fake,
                            backward_fake=_backward_fake, setup_context=_setup_context, make_backward=_make_backward)
