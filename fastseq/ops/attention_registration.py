"""The registered attention ops (torch.ops.fastseq.attention_{forward,backward}_triton): custom
ops around kernels/attention/launch.py, their fakes, and autograd on the forward op.

Tensors here are already in the kernels' layout: q [B, H, L, E], k [B, Hk, S, E],
v [B, Hk, S, EV] (packed sequences: B = 1, the rows of every sequence one after another, with
cu_seqlens_q/k int32 [N + 1]), mask a [B, H, L, S] view (broadcast strides allowed) or None,
seed int64 [1] or None, key_start/key_end int32 [B] or None, alibi_slopes fp32 [H] or [B, H],
sinks [H] in any float dtype. window_left/right: -1 is unbounded (causal: window_right 0);
softcap 0 is off. The public functions (fastseq/ops/attention.py) validate and reshape.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.limits import accumulator_dtype
from ._registration import register_fakes_and_autograd, triton_custom_op

FORWARD = "fastseq::attention_forward_triton"
BACKWARD = "fastseq::attention_backward_triton"


def _extras(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_start, key_end,
            bottom_right, window_left, window_right, softcap, alibi_slopes, sinks):
    from ..kernels.attention.launch import Extras  # Triton is imported with the first launch

    return Extras(cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                  max_seqlen_k=max_seqlen_k, key_start=key_start, key_end=key_end,
                  bottom_right=bottom_right, window_left=window_left,
                  window_right=window_right, softcap=softcap, alibi=alibi_slopes, sinks=sinks)


@triton_custom_op(FORWARD)
def attention_forward_triton(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                             seed: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                             cu_seqlens_k: Optional[Tensor], key_start: Optional[Tensor],
                             key_end: Optional[Tensor], alibi_slopes: Optional[Tensor],
                             sinks: Optional[Tensor], dropout_p: float, bottom_right: bool,
                             window_left: int, window_right: int, softcap: float,
                             max_seqlen_q: int, max_seqlen_k: int, scale: float
                             ) -> tuple[Tensor, Tensor]:
    from ..kernels.attention import launch

    return launch.attention_forward(
        q, k, v, mask, seed, dropout_p, scale,
        _extras(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_start, key_end,
                bottom_right, window_left, window_right, softcap, alibi_slopes, sinks))


@triton_custom_op(BACKWARD)
def attention_backward_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor,
                              delta: Tensor, mask: Optional[Tensor], mask_grad: bool,
                              seed: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                              cu_seqlens_k: Optional[Tensor], key_start: Optional[Tensor],
                              key_end: Optional[Tensor], alibi_slopes: Optional[Tensor],
                              dropout_p: float, bottom_right: bool, window_left: int,
                              window_right: int, softcap: float, max_seqlen_q: int,
                              max_seqlen_k: int, scale: float
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.attention import launch

    return launch.attention_backward(
        dout, q, k, v, lse.contiguous(), delta.contiguous(), mask, mask_grad, seed, dropout_p,
        scale, _extras(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_start,
                       key_end, bottom_right, window_left, window_right, softcap, alibi_slopes,
                       None))


def _forward_fake(q, k, v, mask, seed, cu_seqlens_q, cu_seqlens_k, key_start, key_end,
                  alibi_slopes, sinks, *options):
    B, H, L, _ = q.shape
    return (q.new_empty(B, H, L, v.shape[3]),
            q.new_empty(B, H, L, dtype=accumulator_dtype(q.dtype)))


def _backward_fake(dout, q, k, v, lse, delta, mask, mask_grad, *options):
    dmask = (q.new_empty(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=mask.dtype)
             if mask_grad else q.new_empty(0))
    # Contiguous like the kernels' outputs (empty_like would copy a strided input's layout).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output):
    (q, k, v, mask, seed, cu_q, cu_k, key_start, key_end, alibi, sinks, *options) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed, cu_q, cu_k, key_start, key_end, alibi,
                          sinks)
    ctx.options = tuple(options)


def sink_gradient(sinks: Tensor, lse: Tensor, delta: Tensor) -> Tensor:
    """d loss / d sinks[h] = -sum over rows of P(sink) * delta, P(sink) = exp(sink - lse): the
    sink's logit has no value, so its score gradient is P * (0 - delta) (rows [B, H, L])."""
    p_sink = torch.exp(sinks.to(lse.dtype)[None, :, None] - lse)
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)


def _make_backward(backward_op):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask, seed, cu_q, cu_k, key_start, key_end, alibi, sinks = \
            ctx.saved_tensors
        (dropout_p, bottom_right, window_left, window_right, softcap, max_q, max_k,
         scale) = ctx.options
        acc = accumulator_dtype(q.dtype)
        # delta_i = sum_j P_ij dP_ij = dout_i . out_i (dropout included in out); a gradient
        # reaching the log-sum-exp adds dlse_i * P_ij to dS_ij, i.e. subtracts it from delta.
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(acc)
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dmask = backward_op(dout, q, k, v, lse, delta, mask, mask_grad, seed, cu_q,
                                        cu_k, key_start, key_end, alibi, dropout_p,
                                        bottom_right, window_left, window_right, softcap,
                                        max_q, max_k, scale)
        dsinks = (sink_gradient(sinks, lse, delta)
                  if sinks is not None and ctx.needs_input_grad[10] else None)
        return (dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None, None,
                dsinks) + (None,) * 8

    return backward


register_fakes_and_autograd(FORWARD, BACKWARD, forward_fake=_forward_fake,
                            backward_fake=_backward_fake, setup_context=_setup_context,
                            make_backward=_make_backward)
