"""Registered ops of the recurrent cell step: their fakes and their autograd.

Two implementations share one schema (see csrc/ops.cpp):
  torch.ops.fastseq.rnn_cell_forward / rnn_cell_backward                 C++ (CPU) and CUDA
  torch.ops.fastseq.rnn_cell_forward_triton / rnn_cell_backward_triton   Triton (kernels/)

The forward returns (hy, cy, workspace); the backward op turns (dh', dc') into the gradients of
the gate pre-activations, and the autograd formula below finishes with GEMMs over those: the
input and state gradients (dgates @ W) and the weight gradients (dgates^T @ x), issued as
ATen matmuls so cuBLAS/MKL run them, plus bias gradients as column sums.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from ..kernels.recurrent_layout import GATES, WORKSPACE
from ._registration import (contiguous_or_none, register_fakes_and_autograd,
                            triton_custom_op)

NATIVE_FORWARD = "fastseq::rnn_cell_forward"
NATIVE_BACKWARD = "fastseq::rnn_cell_backward"
TRITON_FORWARD = "fastseq::rnn_cell_forward_triton"
TRITON_BACKWARD = "fastseq::rnn_cell_backward_triton"


@triton_custom_op(TRITON_FORWARD)
def rnn_cell_forward_triton(
    mode: str, input: Tensor, hx: Tensor, cx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor], save_workspace: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.rnn_cell import launch as rnn_cell

    return rnn_cell.rnn_cell_forward(
        mode, *contiguous_or_none(input, hx, cx, w_ih, w_hh, b_ih, b_hh), save_workspace)


@triton_custom_op(TRITON_BACKWARD)
def rnn_cell_backward_triton(
    mode: str, grad_hy: Tensor, grad_cy: Optional[Tensor], hx: Tensor, cx: Optional[Tensor],
    hy: Tensor, cy: Optional[Tensor], workspace: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.rnn_cell import launch as rnn_cell

    if WORKSPACE[mode] and workspace.numel() == 0 and hy.shape[0] > 0:
        raise RuntimeError("fastseq: the workspace is empty: the forward ran with "
                           "save_workspace=False, so it cannot be differentiated")
    lstm = mode == "lstm"
    return rnn_cell.rnn_cell_backward(mode, *contiguous_or_none(
        grad_hy, grad_cy if lstm else None, hx, cx if lstm else None, hy, cy if lstm else None,
        workspace))


def _forward_fake(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, save_workspace):
    batch, hidden = hx.shape
    ws_columns = WORKSPACE[mode] * hidden if save_workspace else 0
    return (
        input.new_empty(batch, hidden),
        input.new_empty(batch if mode == "lstm" else 0, hidden),
        input.new_empty(batch if ws_columns else 0, ws_columns),
    )


def _backward_fake(mode, grad_hy, grad_cy, hx, cx, hy, cy, workspace):
    batch, hidden = hy.shape
    gates = GATES[mode]
    gru, lstm = mode == "gru", mode == "lstm"
    return (
        hy.new_empty(batch, gates * hidden),
        hy.new_empty(batch if gru else 0, gates * hidden),
        hy.new_empty(batch if gru else 0, hidden),
        hy.new_empty(batch if lstm else 0, hidden),
    )


def _setup_context(ctx, inputs, output) -> None:
    mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, _save_workspace = inputs
    hy, cy, workspace = output
    ctx.mode = mode
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, hy, cy, workspace)


def _autograd_backward(backward_op):
    def backward(ctx, grad_hy, grad_cy, _grad_workspace):
        input, hx, cx, w_ih, w_hh, hy, cy, workspace = ctx.saved_tensors
        mode = ctx.mode
        lstm, gru = mode == "lstm", mode == "gru"
        if grad_hy is None:
            grad_hy = torch.zeros_like(hy)
        dg_ih, dg_hh, dh_direct, dcx = backward_op(
            mode, grad_hy, grad_cy if lstm else None, hx, cx if lstm else None, hy,
            cy if lstm else None, workspace,
        )
        if not gru:  # the LSTM's and plain RNN's recurrent gates get the same gradient
            dg_hh = dg_ih
        need = ctx.needs_input_grad
        d_input = dg_ih @ w_ih if need[1] else None
        d_hx = None
        if need[2]:
            # Not addmm: on CPU, fp32 addmm with a 2-row product was measured 10x less accurate
            # than mm + add (error 9.3e-6 vs 9.7e-7 against fp64, K=3000).
            d_hx = dg_hh @ w_hh
            if gru:
                d_hx = d_hx + dh_direct
        d_cx = dcx if lstm and need[3] else None
        d_w_ih = dg_ih.t() @ input if need[4] else None
        d_w_hh = dg_hh.t() @ hx if need[5] else None
        d_b_ih = dg_ih.sum(0) if need[6] else None
        d_b_hh = dg_hh.sum(0) if need[7] else None
        return None, d_input, d_hx, d_cx, d_w_ih, d_w_hh, d_b_ih, d_b_hh, None

    return backward


def _register(forward_name: str, backward_name: str) -> None:
    register_fakes_and_autograd(forward_name, backward_name, forward_fake=_forward_fake,
                                backward_fake=_backward_fake, setup_context=_setup_context,
                                make_backward=_autograd_backward)


_register(TRITON_FORWARD, TRITON_BACKWARD)
if _extension.is_built():
    _register(NATIVE_FORWARD, NATIVE_BACKWARD)
