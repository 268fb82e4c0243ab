"""The registered relative-position attention ops
(torch.ops.fastseq.rel_attention_{forward,backward}_triton): custom ops around
kernels/rel_attention/launch.py, their fakes, and autograd on the forward op; and the
forward-only split-KV decode op (rel_attention_decode_triton, kernels/rel_attention/
decode_launch.py) that a generation step takes.

Tensors here are in the kernels' layout: qu = query + content_bias and qv = query +
position_bias [B, H, L, E], k [B, H, S, E], v [B, H, S, EV], pos [P, H, E], mask a
[B, H, L, S] view (broadcast strides allowed) or None, seed int64 [1] or None. The public
function (fastseq/ops/rel_attention.py) validates, adds the biases and reshapes; autograd of
those additions gives the biases' gradients (sums of d(qu) and d(qv)).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.limits import accumulator_dtype
from ._registration import register_fakes_and_autograd, triton_custom_op, vmap_by_slices

FORWARD = "fastseq::rel_attention_forward_triton"
BACKWARD = "fastseq::rel_attention_backward_triton"
DECODE = "fastseq::rel_attention_decode_triton"  # forward only: a generation step


def _same_strides(qu: Tensor, qv: Tensor) -> tuple[Tensor, Tensor]:
    """The kernels read qu and qv through one set of strides."""
    if qu.stride() != qv.stride():
        return qu.contiguous(), qv.contiguous()
    return qu, qv


@triton_custom_op(FORWARD)
def rel_attention_forward_triton(qu: Tensor, qv: Tensor, k: Tensor, v: Tensor, pos: Tensor,
                                 mask: Optional[Tensor], seed: Optional[Tensor],
                                 dropout_p: float, is_causal: bool, window: Optional[int],
                                 pos_offset: int, scale: float) -> tuple[Tensor, Tensor]:
    from ..kernels.rel_attention import launch  # Triton is imported with the first launch

    qu, qv = _same_strides(qu, qv)
    return launch.rel_attention_forward(qu, qv, k, v, pos, mask, seed, dropout_p, is_causal,
                                        window, pos_offset, scale)


@triton_custom_op(BACKWARD)
def rel_attention_backward_triton(
        dout: Tensor, qu: Tensor, qv: Tensor, k: Tensor, v: Tensor, pos: Tensor, lse: Tensor,
        delta: Tensor, mask: Optional[Tensor], mask_grad: bool, seed: Optional[Tensor],
        dropout_p: float, is_causal: bool, window: Optional[int], pos_offset: int,
        scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.rel_attention import launch  # Triton is imported with the first launch

    qu, qv = _same_strides(qu, qv)
    return launch.rel_attention_backward(dout, qu, qv, k, v, pos, lse.contiguous(),
                                         delta.contiguous(), mask, mask_grad, seed, dropout_p,
                                         is_causal, window, pos_offset, scale)


def _forward_fake(qu, qv, k, v, pos, mask, seed, dropout_p, is_causal, window, pos_offset,
                  scale):
    B, H, L, _ = qu.shape
    return (qu.new_empty(B, H, L, v.shape[3]),
            qu.new_empty(B, H, L, dtype=accumulator_dtype(qu.dtype)))


def _backward_fake(dout, qu, qv, k, v, pos, lse, delta, mask, mask_grad, seed, dropout_p,
                   is_causal, window, pos_offset, scale):
    dmask = (qu.new_empty(qu.shape[0], qu.shape[1], qu.shape[2], k.shape[2], dtype=mask.dtype)
             if mask_grad else qu.new_empty(0))
    # Contiguous like the kernels' outputs.
    return (qu.new_empty(qu.shape), qu.new_empty(qu.shape), k.new_empty(k.shape),
            v.new_empty(v.shape), pos.new_empty(pos.shape), dmask)


def _setup_context(ctx, inputs, output):
    qu, qv, k, v, pos, mask, seed, dropout_p, is_causal, window, pos_offset, scale = inputs
    out, lse = output
    ctx.save_for_backward(qu, qv, k, v, pos, out, lse, mask, seed)
    ctx.options = (dropout_p, is_causal, window, pos_offset, scale)


def _make_backward(backward_op):
    def backward(ctx, dout, dlse):
        qu, qv, k, v, pos, out, lse, mask, seed = ctx.saved_tensors
        dropout_p, is_causal, window, pos_offset, scale = ctx.options
        acc = accumulator_dtype(qu.dtype)
        # As for attention: delta_i = dout_i . out_i, minus a gradient reaching the lse.
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(acc)
        mask_grad = mask is not None and ctx.needs_input_grad[5]
        dqu, dqv, dk, dv, dpos, dmask = backward_op(
            dout, qu, qv, k, v, pos, lse, delta, mask, mask_grad, seed, dropout_p, is_causal,
            window, pos_offset, scale)
        return (dqu, dqv, dk, dv, dpos, (dmask if mask_grad else None), None, None, None, None,
                None, None)

    return backward


register_fakes_and_autograd(FORWARD, BACKWARD, forward_fake=_forward_fake,
                            backward_fake=_backward_fake, setup_context=_setup_context,
                            make_backward=_make_backward)


@triton_custom_op(DECODE)
def rel_attention_decode_triton(qu: Tensor, qv: Tensor, k: Tensor, v: Tensor, pos: Tensor,
                                is_causal: bool, window: Optional[int], pos_offset: int,
                                scale: float) -> tuple[Tensor, Tensor]:
    from ..kernels.rel_attention import decode_launch  # Triton is imported with the first launch

    qu, qv = _same_strides(qu, qv)
    return decode_launch.rel_attention_decode(qu, qv, k, v, pos, is_causal, window, pos_offset,
                                              scale)


@torch.library.register_fake(DECODE)
def _decode_fake(qu, qv, k, v, pos, is_causal, window, pos_offset, scale):
    return _forward_fake(qu, qv, k, v, pos, None, None, 0.0, is_causal, window, pos_offset,
                         scale)


torch.library.register_vmap(DECODE, vmap_by_slices(DECODE))
