"""Incremental Transformer-XL: a decoding state that runs a Transformer-XL stack a few positions
at a time against a preallocated memory, for generation and long-context evaluation.

The model's forward keeps, per layer, the last mem_len layer inputs and projects them again at
every segment (memory + segment through qkv_net). Projection is position-wise, so the state
keeps each layer's projected keys and values instead: a step projects only its own rows, writes
them into the layer's buffers in place, and attends the last mem_len positions plus itself
through fastseq.ops.rel_attention (the position term from the precomputed rows r_net(R) of the
distances it needs: the model's clamp_len, same_length and biases apply as in its forward).

Buffers: [B, H, 2 mem_len + max_step, d_head] per layer for keys and values. When a step would
run past the end, the last mem_len positions are copied to the front (one in-place copy every
mem_len + max_step positions, so O(1) a step amortised; the doubled capacity keeps source and
destination apart). Relative attention depends on distances only, so moving the window changes
nothing. No torch.cat, no allocation that grows with the context.

Equal to the model's own forward run segment by segment with its memory (the memory after
each step is the last mem_len positions, as updated_mems keeps them with ext_len = 0) and, with
a memory at least as long as the context, to the teacher-forced forward over the whole context.
Forward only, and in eval mode (dropout would draw new masks at every step).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops._checks import InputError
from ..ops.rel_attention import rel_attention
from .transformer_xl import position_rows

OP = "fastseq.nn.TransformerXLDecodingState"


class TransformerXLDecodingState:
    """The decoding state of `model` (a fastseq.nn.TransformerXL or TransformerXLLM) for
    `batch_size` streams: step(embedded [L <= max_step, B, d_model]) -> the last layer's output
    [L, B, d_model], the positions appended to the memory. mem_len defaults to the model's
    (evaluation often uses a longer one: the original evaluates WikiText-103 with 1600)."""

    def __init__(self, model: nn.Module, batch_size: int, *, max_step: int = 1,
                 mem_len: Optional[int] = None) -> None:
        if model.training:
            raise InputError(f"{OP}: the model is in training mode; call model.eval() first "
                             f"(dropout would draw new masks at every step)")
        mem_len = model.mem_len if mem_len is None else mem_len
        for name, value, least in (("batch_size", batch_size, 1), ("max_step", max_step, 1),
                                   ("mem_len", mem_len, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{OP}: {name} must be an int >= {least}, got {value!r}")
        self.model, self.batch_size = model, batch_size
        self.mem_len, self.max_step = mem_len, max_step
        self.capacity = 2 * mem_len + max_step
        self.length = 0  # positions written into the buffers (host-side: no sync)
        self.window = model.mem_len if model.same_length and model.mem_len > 0 else None
        attn = model.layers[0].dec_attn
        param = attn.qkv_net.weight
        shape = (batch_size, attn.n_head, self.capacity, attn.d_head)
        self.keys = [param.new_empty(shape) for _ in model.layers]
        self.values = [param.new_empty(shape) for _ in model.layers]
        self.pos = self._position_rows(mem_len + max_step)

    @torch.no_grad()
    def _position_rows(self, distances: int) -> list[Tensor]:
        """Per layer, r_net of the embeddings of distances 0 .. distances - 1 ([P, H, D], the
        op's pos order), clamped at the model's clamp_len as its forward clamps them."""
        model = self.model
        rows = position_rows(distances, model.clamp_len)
        param = model.layers[0].dec_attn.qkv_net.weight
        embedded = model.pos_emb(torch.arange(rows, device=param.device, dtype=torch.float64)
                                 ).to(param.dtype)
        return [layer.dec_attn.r_net(embedded).view(rows, layer.dec_attn.n_head,
                                                    layer.dec_attn.d_head)
                for layer in model.layers]

    def _biases(self, attn) -> tuple[Tensor, Tensor]:
        model = self.model
        if getattr(model, "untie_r", False):
            return attn.r_w_bias, attn.r_r_bias
        return model.r_w_bias, model.r_r_bias

    def _make_room(self, rows: int) -> None:
        """Move the last mem_len positions to the front when `rows` more would not fit."""
        if self.length + rows <= self.capacity:
            return
        keep = min(self.length, self.mem_len)
        start = self.length - keep
        for buffer in self.keys + self.values:
            # start >= mem_len + max_step - rows >= keep: the ranges never overlap.
            buffer[:, :, :keep].copy_(buffer[:, :, start:self.length])
        self.length = keep

    @torch.no_grad()
    def step(self, embedded: Tensor) -> Tensor:
        """embedded [L, B, d_model] (the model's embedding of L new tokens, before dropout) ->
        the last layer's output at those positions [L, B, d_model] (after the model's final
        dropout, as its forward returns it)."""
        model = self.model
        rows = embedded.shape[0] if embedded.dim() == 3 else -1
        if embedded.dim() != 3 or not 1 <= rows <= self.max_step or \
                embedded.shape[1:] != (self.batch_size, model.d_model):
            raise InputError(f"{OP}.step: embedded must be [1..max_step={self.max_step}, "
                             f"B={self.batch_size}, d_model={model.d_model}], got "
                             f"{list(embedded.shape)}")
        self._make_room(rows)
        first = self.length - min(self.length, self.mem_len)
        end = self.length + rows
        keys_seen = end - first
        x = model.drop(embedded)
        for layer, keys, values, pos in zip(model.layers, self.keys, self.values, self.pos):
            attn = layer.dec_attn
            heads = attn.qkv_net(attn.layer_norm(x) if attn.pre_lnorm else x)
            heads = heads.view(rows, self.batch_size, 3, attn.n_head, attn.d_head)
            keys[:, :, self.length:end] = heads[:, :, 1].permute(1, 2, 0, 3)
            values[:, :, self.length:end] = heads[:, :, 2].permute(1, 2, 0, 3)
            r_w_bias, r_r_bias = self._biases(attn)
            attn_vec = rel_attention(
                heads[:, :, 0].permute(1, 2, 0, 3), keys[:, :, first:end],
                values[:, :, first:end], pos[:keys_seen], r_w_bias, r_r_bias,
                is_causal=True, window=self.window, scale=attn.scale)
            attn_vec = attn_vec.permute(2, 0, 1, 3).reshape(rows, self.batch_size, -1)
            attn_out = attn.drop(attn.o_net(attn_vec))
            x = x + attn_out if attn.pre_lnorm else attn.layer_norm(x + attn_out)
            x = layer.pos_ff(x)
        self.length = end
        return model.drop(x)
