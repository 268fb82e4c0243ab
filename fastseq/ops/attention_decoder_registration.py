"""The registered global-attention ops (torch.ops.fastseq.global_attention_{forward,backward}_triton):
custom ops around kernels/attention_decoder/launch.py, their fakes, and autograd on the
forward op. Tensors are the public op's (fastseq/ops/attention_decoder.py validates them):
query [B, T, A], keys [B, S, A], values [B, S, Dv], vec [A] or None (the additive score's v),
extra [B, T, S, A] or None, lengths int64 [B] or None. The forward returns (context,
alignments, lse), the alignments and lse in the accumulator dtype (fp32 for half inputs; the
public op casts the alignments), the lse in base 2 (what the backward reads).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._registration import register_fakes_and_autograd, triton_custom_op
from ..kernels.limits import accumulator_dtype

FORWARD = "fastseq::global_attention_forward_triton"
BACKWARD = "fastseq::global_attention_backward_triton"


@triton_custom_op(FORWARD)
def global_attention_forward_triton(query: Tensor, keys: Tensor, values: Tensor,
                                    vec: Optional[Tensor], extra: Optional[Tensor],
                                    lengths: Optional[Tensor], scale: float
                                    ) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.attention_decoder import launch  # Triton is imported with the first launch

    return launch.global_attention_forward(query, keys, values, vec, extra, lengths, scale)


@triton_custom_op(BACKWARD)
def global_attention_backward_triton(dout: Tensor, dalign: Optional[Tensor], query: Tensor,
                                     keys: Tensor, values: Tensor, vec: Optional[Tensor],
                                     extra: Optional[Tensor], lengths: Optional[Tensor],
                                     align: Tensor, scale: float
                                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.attention_decoder import launch  # Triton is imported with the first launch

    return launch.global_attention_backward(
        dout.contiguous(), dalign.contiguous() if dalign is not None else None, query, keys,
        values, vec, extra, lengths, align.contiguous(), scale)


def _forward_fake(query, keys, values, vec, extra, lengths, scale):
    B, T, _ = query.shape
    acc = accumulator_dtype(query.dtype)
    return (query.new_empty(B, T, values.shape[2]), query.new_empty(B, T, keys.shape[1], dtype=acc),
            query.new_empty(B, T, dtype=acc))


def _backward_fake(dout, dalign, query, keys, values, vec, extra, lengths, align, scale):
    return (query.new_empty(query.shape), keys.new_empty(keys.shape),
            values.new_empty(values.shape),
            vec.new_empty(vec.shape) if vec is not None else query.new_empty(0),
            extra.new_empty(extra.shape) if extra is not None else query.new_empty(0))


def _setup_context(ctx, inputs, output):
    query, keys, values, vec, extra, lengths, scale = inputs
    _, align, _ = output
    ctx.save_for_backward(query, keys, values, vec, extra, lengths, align)
    ctx.scale = scale


def _make_backward(backward_op):
    def backward(ctx, dout, dalign, dlse):
        query, keys, values, vec, extra, lengths, align = ctx.saved_tensors
        if dout is None:
            dout = query.new_zeros(query.shape[0], query.shape[1], values.shape[2])
        # The lse is the kernels' own (never returned by the public op): no gradient reaches it.
        if dalign is not None:
            dalign = dalign.to(align.dtype)
        dq, dk, dv, dvec, dextra = backward_op(dout, dalign, query, keys, values, vec, extra,
                                               lengths, align, ctx.scale)
        return (dq, dk, dv, dvec if vec is not None else None,
                dextra if extra is not None else None, None, None)

    return backward


register_fakes_and_autograd(FORWARD, BACKWARD, forward_fake=_forward_fake,
                            backward_fake=_backward_fake, setup_context=_setup_context,
                            make_backward=_make_backward)
