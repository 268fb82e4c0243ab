"""fastseq.nn.TransformerEncoderLayer and TransformerDecoderLayer: torch's layers with their
attention on fastseq.nn.MultiheadAttention (the fused kernel; need_weights=False as torch's
layers call it).

Same constructor (d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
batch_first, norm_first, bias, device, dtype), parameters and state_dict keys, forward arguments
and outputs; the same seed gives the same initial weights as torch's layer. The encoder layer
never takes torch's inference fast path (torch._transformer_encoder_layer_fwd, which would
bypass the fused kernel). Inside torch.nn.TransformerEncoder pass enable_nested_tensor=False:
its nested-tensor conversion is torch's own kernel path, not fastseq's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .attention import MultiheadAttention
from .attention_steps import DecoderLayerSteps
from .scripting import RefusesTorchScript


def _use_fastseq_attention(*modules: torch.nn.MultiheadAttention) -> None:
    # fastseq's class only overrides forward, so switching the class keeps torch's parameters
    # exactly as torch initialised them.
    for module in modules:
        module.__class__ = MultiheadAttention


class TransformerEncoderLayer(RefusesTorchScript, torch.nn.TransformerEncoderLayer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _use_fastseq_attention(self.self_attn)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))


class TransformerDecoderLayer(RefusesTorchScript, DecoderLayerSteps,
                              torch.nn.TransformerDecoderLayer):
    """torch's forward (self-attention, cross-attention over `memory`, feed-forward) runs as is:
    it has no fast path, and both attentions are fastseq's."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _use_fastseq_attention(self.self_attn, self.multihead_attn)
