"""Registered ops of one recurrent layer in one direction over a sequence, their fakes and
their autograd. Two implementations share one schema (csrc/ops.cpp):

  torch.ops.fastseq.rnn_layer_forward / rnn_layer_backward                C++ (CPU) and CUDA
      the GEMM-per-step loop
  torch.ops.fastseq.rnn_layer_forward_persistent / ..._backward_persistent
      the persistent kernel (CUDA; raises where its plan does not fit) and its CPU twin
      (the native forward and backward each run one of the two, as rnn_native decides:
      a native forward's gradient runs whichever backward fits, since both share the workspace)
  torch.ops.fastseq.rnn_layer_forward_triton / rnn_layer_backward_triton  Triton (kernels/)
  torch.ops.fastseq.rnn_bidirectional_layer_forward_triton / ..._backward_triton
      both directions of a layer in one launch each way: every tensor but lengths stacked on a
      leading dimension of 2 (direction 1 runs against direction 0, which `reverse` describes)

  forward(mode, gates_x, h0, c0, w_hh, b_hh, lengths, zoneout_h, zoneout_c, reverse,
          save_workspace) -> (y, h_n, c_n, workspace)
  backward(mode, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, y, workspace, lengths, zoneout_h,
           zoneout_c, reverse) -> (dgates_x, dgates_h, dh0, dc0)

gates_x [T, B, G*H] is the input projection of every step (x W_ih^T + b_ih, one GEMM done by
the caller, whose autograd gives dx and dW_ih as one GEMM each). The backward op runs the
recurrence backwards; the autograd formula below then forms dW_hh as one GEMM over all steps
(dgates_h^T @ h_prev) and db_hh as a column sum, as cuDNN does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from ..kernels.recurrent_layout import GATES, LAYER_WORKSPACE
from . import rnn_native
from ._registration import (contiguous_or_none, register_fakes_and_autograd,
                            triton_custom_op)

NATIVE_FORWARD = "fastseq::rnn_layer_forward"
NATIVE_BACKWARD = "fastseq::rnn_layer_backward"
PERSISTENT_FORWARD = "fastseq::rnn_layer_forward_persistent"
PERSISTENT_BACKWARD = "fastseq::rnn_layer_backward_persistent"
TRITON_FORWARD = "fastseq::rnn_layer_forward_triton"
TRITON_BACKWARD = "fastseq::rnn_layer_backward_triton"
BIDIRECTIONAL_FORWARD = "fastseq::rnn_bidirectional_layer_forward_triton"
BIDIRECTIONAL_BACKWARD = "fastseq::rnn_bidirectional_layer_backward_triton"


def _triton_forward(
    mode: str, gates_x: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor,
    b_hh: Optional[Tensor], lengths: Optional[Tensor], zoneout_h: Optional[Tensor],
    zoneout_c: Optional[Tensor], reverse: bool, save_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.rnn import launch as rnn_layer

    gates_x, h0, c0, w_hh, b_hh, lengths, zoneout_h, zoneout_c = contiguous_or_none(
        gates_x, h0, c0, w_hh, b_hh, lengths, zoneout_h, zoneout_c)
    return rnn_layer.rnn_layer_forward(mode, gates_x, h0, c0 if mode == "lstm" else None, w_hh,
                                       b_hh, lengths, zoneout_h, zoneout_c, reverse, save_workspace)


def _triton_backward(
    mode: str, grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Optional[Tensor], h0: Tensor,
    c0: Optional[Tensor], w_hh: Tensor, y: Tensor, workspace: Tensor, lengths: Optional[Tensor],
    zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor], reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.rnn import launch as rnn_layer

    if LAYER_WORKSPACE[mode] and workspace.numel() == 0 and y.numel() > 0:
        raise RuntimeError("fastseq: the workspace is empty: the forward ran with "
                           "save_workspace=False, so it cannot be differentiated")
    lstm = mode == "lstm"
    args = contiguous_or_none(grad_y, grad_h_n, grad_c_n if lstm else None, h0, c0 if lstm else None,
                              w_hh, y, workspace, lengths, zoneout_h, zoneout_c)
    return rnn_layer.rnn_layer_backward(mode, *args, reverse)


# One direction, and both stacked [2, ...]: the same implementation under two ops, so that a
# shape is never ambiguous between "steps" and "directions".
rnn_layer_forward_triton = triton_custom_op(TRITON_FORWARD)(_triton_forward)
rnn_layer_backward_triton = triton_custom_op(TRITON_BACKWARD)(_triton_backward)
rnn_bidirectional_layer_forward_triton = triton_custom_op(BIDIRECTIONAL_FORWARD)(_triton_forward)
rnn_bidirectional_layer_backward_triton = triton_custom_op(BIDIRECTIONAL_BACKWARD)(_triton_backward)


def _forward_fake(mode, gates_x, h0, c0, w_hh, b_hh, lengths, zoneout_h, zoneout_c, reverse,
                  save_workspace):
    *directions, steps, batch, _ = gates_x.shape  # directions: [] or [2] (stacked)
    hidden = h0.shape[-1]
    ws_columns = LAYER_WORKSPACE[mode] * hidden if save_workspace else 0
    return (gates_x.new_empty(*directions, steps, batch, hidden),
            gates_x.new_empty(*directions, batch, hidden),
            gates_x.new_empty(*directions, batch if mode == "lstm" else 0, hidden),
            gates_x.new_empty(*directions, steps if ws_columns else 0, batch, ws_columns))


def _backward_fake(mode, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, y, workspace, lengths, zoneout_h,
                   zoneout_c, reverse):
    *directions, steps, batch, hidden = y.shape
    gates = GATES[mode]
    gru, lstm = mode == "gru", mode == "lstm"
    return (y.new_empty(*directions, steps, batch, gates * hidden),
            y.new_empty(*directions, steps if gru else 0, batch, gates * hidden),
            y.new_empty(*directions, batch, hidden),
            y.new_empty(*directions, batch if lstm else 0, hidden))


def previous_states(y: Tensor, h0: Tensor, lengths: Optional[Tensor], reverse: bool) -> Tensor:
    """h_{t-1} of every step t, [T, B, H]: the state each step started from. Forward: h0 then
    y[:-1]. Reverse: y[t+1] while t+1 is inside the row's sequence, else h0. (Steps past a
    row's end get zero gate gradients, so what stands there does not matter.)"""
    if not reverse:  # [:T]: with T = 0 the cat holds h0 alone and no step started from it
        return torch.cat([h0.unsqueeze(0), y[:-1]])[:y.shape[0]]
    steps = y.shape[0]
    shifted = torch.cat([y[1:], torch.zeros_like(y[:1])])
    t = torch.arange(steps, device=y.device).unsqueeze(1)
    ends = lengths.unsqueeze(0) if lengths is not None else steps
    return torch.where((t + 1 < ends).unsqueeze(-1), shifted, h0.unsqueeze(0))


def _setup_context(ctx, inputs, output) -> None:
    mode, gates_x, h0, c0, w_hh, b_hh, lengths, zoneout_h, zoneout_c, reverse, _save = inputs
    y, _h_n, _c_n, workspace = output
    ctx.mode, ctx.reverse = mode, reverse
    ctx.save_for_backward(h0, c0, w_hh, lengths, zoneout_h, zoneout_c, y, workspace)


def _autograd_backward(backward_op):
    def backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_workspace):
        h0, c0, w_hh, lengths, zoneout_h, zoneout_c, y, workspace = ctx.saved_tensors
        mode = ctx.mode
        lstm, gru = mode == "lstm", mode == "gru"
        grad_y = grad_y if grad_y is not None else torch.zeros_like(y)
        grad_h_n = grad_h_n if grad_h_n is not None else torch.zeros_like(h0)
        dgx, dgh, dh0, dc0 = backward_op(mode, grad_y, grad_h_n, grad_c_n if lstm else None, h0,
                                         c0 if lstm else None, w_hh, y, workspace, lengths,
                                         zoneout_h, zoneout_c, ctx.reverse)
        if not gru:  # LSTM and plain RNN: the recurrent gates get the input gates' gradient
            dgh = dgx
        need = ctx.needs_input_grad
        d_w_hh = d_b_hh = None
        stacked = y.dim() == 4  # both directions, direction 1 against direction 0
        if need[4]:  # one GEMM over all steps (a batched one for stacked directions)
            if stacked:
                h_prev = torch.stack([previous_states(y[d], h0[d], lengths, ctx.reverse != (d == 1))
                                      for d in range(y.shape[0])])
                d_w_hh = (dgh.reshape(2, -1, dgh.shape[-1]).transpose(1, 2)
                          @ h_prev.reshape(2, -1, h_prev.shape[-1]))
            else:
                h_prev = previous_states(y, h0, lengths, ctx.reverse)
                # reshape, not flatten: torch.autograd.functional.jacobian(vectorize=True)'s
                # vmap has no batching rule for flatten.
                d_w_hh = dgh.reshape(-1, dgh.shape[-1]).t() @ h_prev.reshape(-1, h_prev.shape[-1])
        if need[5]:
            d_b_hh = dgh.sum((-3, -2))
        return (None, dgx if need[1] else None, dh0 if need[2] else None,
                dc0 if lstm and need[3] else None, d_w_hh, d_b_hh, None, None, None, None, None)

    return backward


def _native_backward(mode, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, y, *_rest) -> str:
    """The backward op of a native forward, loop or persistent alike: decided for this pass."""
    batch, hidden = y.shape[-2], y.shape[-1]
    if rnn_native.runs_persistent(mode, True, batch, hidden, y.dtype, y.device):
        return PERSISTENT_BACKWARD
    return NATIVE_BACKWARD


def _register(forward_name: str, backward_name, pick_backward=None) -> None:
    register_fakes_and_autograd(forward_name, backward_name, forward_fake=_forward_fake,
                                backward_fake=_backward_fake, setup_context=_setup_context,
                                make_backward=_autograd_backward, pick_backward=pick_backward)


_register(TRITON_FORWARD, TRITON_BACKWARD)
_register(BIDIRECTIONAL_FORWARD, BIDIRECTIONAL_BACKWARD)
if _extension.is_built():
    for _forward in (NATIVE_FORWARD, PERSISTENT_FORWARD):
        _register(_forward, (NATIVE_BACKWARD, PERSISTENT_BACKWARD), _native_backward)
