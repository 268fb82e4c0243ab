"""The registered Block-Recurrent Transformer attention ops
(torch.ops.fastseq.block_recurrent_{forward,backward}_triton): custom ops around
kernels/block_recurrent/launch.py, their fakes, and autograd on the forward op.

Tensors here are the public op's (fastseq/ops/block_recurrent.py validates them): query, key,
value [B, H, L|S, D|Dv] in any strides, bias [H, window + 1] or None, and part 2's query2
[B, H, L, D], key2/value2 [B, H, G, S2, D|Dv] or None. The forward returns (out, lse, out2,
lse2), part 2's empty without it; the lse are the rows' log-sum-exp in base 2 (log2 of the sum
of exp2(score log2(e))), what the backward kernels read.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.limits import accumulator_dtype
from ._registration import register_fakes_and_autograd, triton_custom_op

LOG2E = 1.4426950408889634
FORWARD = "fastseq::block_recurrent_forward_triton"
BACKWARD = "fastseq::block_recurrent_backward_triton"


@triton_custom_op(FORWARD)
def block_recurrent_forward_triton(
        query: Tensor, key: Tensor, value: Tensor, bias: Optional[Tensor],
        query2: Optional[Tensor], key2: Optional[Tensor], value2: Optional[Tensor],
        window: Optional[int], group_size: int, group_offset: int, scale: float,
        scale2: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.block_recurrent import launch  # Triton is imported with the first launch

    return launch.block_recurrent_forward(query, key, value, bias, query2, key2, value2, window,
                                          group_size, group_offset, scale, scale2)


@triton_custom_op(BACKWARD)
def block_recurrent_backward_triton(
        dout: Tensor, dout2: Tensor, query: Tensor, key: Tensor, value: Tensor,
        bias: Optional[Tensor], query2: Optional[Tensor], key2: Optional[Tensor],
        value2: Optional[Tensor], lse: Tensor, lse2: Tensor, delta: Tensor, delta2: Tensor,
        window: Optional[int], group_size: int, group_offset: int, scale: float,
        scale2: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.block_recurrent import launch  # Triton is imported with the first launch

    return launch.block_recurrent_backward(
        dout.contiguous(), dout2.contiguous(), query, key, value, bias, query2, key2, value2,
        lse.contiguous(), lse2.contiguous(), delta.contiguous(), delta2.contiguous(), window,
        group_size, group_offset, scale, scale2)


def _forward_fake(query, key, value, bias, query2, key2, value2, window, group_size,
                  group_offset, scale, scale2):
    B, H, L, _ = query.shape
    rows = query.new_empty(B, H, L, dtype=accumulator_dtype(query.dtype))
    out = query.new_empty(B, H, L, value.shape[3])
    if query2 is None:
        return out, rows, query.new_empty(0), rows.new_empty(0)
    return out, rows, query.new_empty(B, H, L, value.shape[3]), torch.empty_like(rows)


def _backward_fake(dout, dout2, query, key, value, bias, query2, key2, value2, lse, lse2, delta,
                   delta2, window, group_size, group_offset, scale, scale2):
    part2 = ((query2.new_empty(query2.shape), key2.new_empty(key2.shape),
              value2.new_empty(value2.shape)) if query2 is not None
             else tuple(query.new_empty(0) for _ in range(3)))
    # Contiguous like the kernels' outputs.
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            bias.new_empty(bias.shape) if bias is not None else query.new_empty(0), *part2)


def _setup_context(ctx, inputs, output):
    query, key, value, bias, query2, key2, value2, window, group_size, group_offset, scale, \
        scale2 = inputs
    out, lse, out2, lse2 = output
    ctx.save_for_backward(query, key, value, bias, query2, key2, value2, out, lse, out2, lse2)
    ctx.options = (window, group_size, group_offset, scale, scale2)


def _make_backward(backward_op):
    def backward(ctx, dout, dlse, dout2, dlse2):
        query, key, value, bias, query2, key2, value2, out, lse, out2, lse2 = ctx.saved_tensors
        window, group_size, group_offset, scale, scale2 = ctx.options
        acc = accumulator_dtype(query.dtype)
        # delta_i = dout_i . out_i (the softmax's backward), minus any gradient reaching the lse
        # (kept in base 2 by the kernels: d lse2 / d score = p log2(e)). An output nothing reads
        # gets a zero gradient.
        dout = torch.zeros_like(out) if dout is None else dout
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(acc) * LOG2E
        if query2 is not None:
            dout2 = torch.zeros_like(out2) if dout2 is None else dout2
            delta2 = (dout2.to(acc) * out2.to(acc)).sum(-1)
            if dlse2 is not None:
                delta2 = delta2 - dlse2.to(acc) * LOG2E
        else:
            dout2, delta2 = out2, lse2  # empty stand-ins
        dq, dk, dv, dbias, dq2, dk2, dv2 = backward_op(
            dout, dout2, query, key, value, bias, query2, key2, value2, lse, lse2, delta, delta2,
            window, group_size, group_offset, scale, scale2)
        part2 = (dq2, dk2, dv2) if query2 is not None else (None, None, None)
        return (dq, dk, dv, dbias if bias is not None else None, *part2, None, None, None, None,
                None)

    return backward


register_fakes_and_autograd(FORWARD, BACKWARD, forward_fake=_forward_fake,
                            backward_fake=_backward_fake, setup_context=_setup_context,
                            make_backward=_make_backward)


# The recurrent state's gate (kernels/block_recurrent/gate.py): state, y [..., d]; either
# gate_bias [d] (the fixed gate) or the LSTM gate's pre-activations forget, remember [..., d].
GATE = "fastseq::block_recurrent_gate_triton"
GATE_BACKWARD = "fastseq::block_recurrent_gate_backward_triton"


@triton_custom_op(GATE)
def block_recurrent_gate_triton(state: Tensor, y: Tensor, gate_bias: Optional[Tensor],
                                forget: Optional[Tensor], remember: Optional[Tensor]) -> Tensor:
    from ..kernels.block_recurrent import gate  # Triton is imported with the first launch

    return gate.gate_forward(state, y, gate_bias, forget, remember)


@triton_custom_op(GATE_BACKWARD)
def block_recurrent_gate_backward_triton(
        grad: Tensor, state: Tensor, y: Tensor, gate_bias: Optional[Tensor],
        forget: Optional[Tensor], remember: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.block_recurrent import gate  # Triton is imported with the first launch

    return gate.gate_backward(grad, state, y, gate_bias, forget, remember)


def _gate_fake(state, y, gate_bias, forget, remember):
    return state.new_empty(state.shape)


def _gate_backward_fake(grad, state, y, gate_bias, forget, remember):
    lstm = gate_bias is None
    return (state.new_empty(state.shape), y.new_empty(y.shape),
            gate_bias.new_empty(gate_bias.shape) if not lstm else state.new_empty(0),
            state.new_empty(state.shape) if lstm else state.new_empty(0),
            state.new_empty(state.shape) if lstm else state.new_empty(0))


def _gate_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _make_gate_backward(backward_op):
    def backward(ctx, grad):
        state, y, gate_bias, forget, remember = ctx.saved_tensors
        dstate, dy, dbias, dforget, dremember = backward_op(grad, state, y, gate_bias, forget,
                                                            remember)
        lstm = gate_bias is None
        return (dstate, dy, None if lstm else dbias, dforget if lstm else None,
                dremember if lstm else None)

    return backward


register_fakes_and_autograd(GATE, GATE_BACKWARD, forward_fake=_gate_fake,
                            backward_fake=_gate_backward_fake,
                            setup_context=_gate_setup_context,
                            make_backward=_make_gate_backward)
