"""The registered attention ops (torch.ops.fastseq.attention_{forward,backward}_triton): custom
ops around kernels/attention/launch.py, their fakes, and autograd on the forward op.

Tensors here are already in the kernels' layout: q [B, H, L, E], k [B, Hk, S, E],
v [B, Hk, S, EV], mask a [B, H, L, S] view (broadcast strides allowed) or None, seed int64 [1]
or None. The public function (fastseq/ops/attention.py) validates and reshapes.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..kernels.limits import accumulator_dtype
from ._registration import register_fakes_and_autograd, triton_custom_op

FORWARD = "fastseq::attention_forward_triton"
BACKWARD = "fastseq::attention_backward_triton"


@triton_custom_op(FORWARD)
def attention_forward_triton(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                             seed: Optional[Tensor], dropout_p: float, is_causal: bool,
                             causal_shift: int, scale: float) -> tuple[Tensor, Tensor]:
    from ..kernels.attention import launch  # Triton is imported with the first launch

    return launch.attention_forward(q, k, v, mask, seed, dropout_p, is_causal, causal_shift,
                                    scale)


@triton_custom_op(BACKWARD)
def attention_backward_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor,
                              delta: Tensor, mask: Optional[Tensor], mask_grad: bool,
                              seed: Optional[Tensor], dropout_p: float, is_causal: bool,
                              causal_shift: int, scale: float
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.attention import launch  # Triton is imported with the first launch

    return launch.attention_backward(dout, q, k, v, lse.contiguous(), delta.contiguous(), mask,
                                     mask_grad, seed, dropout_p, is_causal, causal_shift, scale)


def _forward_fake(q, k, v, mask, seed, dropout_p, is_causal, causal_shift, scale):
    B, H, L, _ = q.shape
    return (q.new_empty(B, H, L, v.shape[3]),
            q.new_empty(B, H, L, dtype=accumulator_dtype(q.dtype)))


def _backward_fake(dout, q, k, v, lse, delta, mask, mask_grad, seed, dropout_p, is_causal,
                   causal_shift, scale):
    dmask = (q.new_empty(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=mask.dtype)
             if mask_grad else q.new_empty(0))
    # Contiguous like the kernels' outputs (empty_like would copy a strided input's layout).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, seed, dropout_p, is_causal, causal_shift, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.options = (dropout_p, is_causal, causal_shift, scale)


def _make_backward(backward_op):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask, seed = ctx.saved_tensors
        dropout_p, is_causal, causal_shift, scale = ctx.options
        acc = accumulator_dtype(q.dtype)
        # delta_i = sum_j P_ij dP_ij = dout_i . out_i (dropout included in out); a gradient
        # reaching the log-sum-exp adds dlse_i * P_ij to dS_ij, i.e. subtracts it from delta.
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(acc)
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dmask = backward_op(dout, q, k, v, lse, delta, mask, mask_grad, seed,
                                        dropout_p, is_causal, causal_shift, scale)
        return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None

    return backward


register_fakes_and_autograd(FORWARD, BACKWARD, forward_fake=_forward_fake,
                            backward_fake=_backward_fake, setup_context=_setup_context,
                            make_backward=_make_backward)
