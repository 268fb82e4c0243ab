"""Incremental Transformer-XL: the decoding state of a Transformer-XL stack (the step protocol's
state, fastseq.nn.state), for generation and long-context evaluation.

The model's forward keeps, per layer, the last mem_len layer inputs and projects them again at
every segment (memory + segment through qkv_net). Projection is position-wise, so the state
keeps each layer's projected keys and values instead (a SlidingKV per layer, made by the
layer's own init_state): a step runs each layer's own step (TransformerXLLayer.step: its
projection of the new rows, fastseq.ops.rel_attention against the kept positions, the block
after the attention and the feed-forward, the same code as its forward), with the position
rows r_net(R) of the distances it needs computed once here (the model's clamp_len,
same_length and biases apply as in its forward).

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

OP = "fastseq.nn.TransformerXLDecodingState"


def position_rows(distances: int, clamp_len: int) -> int:
    """How many distance embeddings distances 0 .. distances - 1 need: all of them, or
    clamp_len + 1 when clamp_len > 0 (the farther ones share clamp_len's, the last row)."""
    return distances if clamp_len <= 0 else min(distances, clamp_len + 1)


class TransformerXLDecodingState:
    """The decoding state of `model` (a fastseq.nn.TransformerXL or TransformerXLLM) for
    `batch_size` streams, made by model.init_state(batch_size, max_step=, mem_len=): each
    layer's SlidingKV of the last mem_len positions and its position rows. model.step(tokens,
    state) runs it; state.step(embedded [L <= max_step, B, d_model]) runs it from embeddings,
    returning the last layer's output. mem_len defaults to the model's (evaluation often uses a
    longer one: the original evaluates WikiText-103 with 1600)."""

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
        self.window = model.mem_len if model.same_length and model.mem_len > 0 else None
        self.layers = [layer.init_state(batch_size, mem_len=mem_len, max_step=max_step)
                       for layer in model.layers]
        self.pos = self._position_rows(mem_len + max_step)

    @torch.no_grad()
    def _position_rows(self, distances: int) -> list[Tensor]:
        """Per layer, its attention's rows for distances 0 .. distances - 1 ([P, H, D], the
        op's pos order), clamped at the model's clamp_len as its forward clamps them."""
        model = self.model
        rows = position_rows(distances, model.clamp_len)
        param = model.layers[0].dec_attn.qkv_net.weight
        embedded = model.pos_emb(torch.arange(rows, device=param.device, dtype=torch.float64)
                                 ).to(param.dtype)
        return [layer.dec_attn.position_rows(embedded) for layer in model.layers]

    def check(self, embedded: Tensor) -> None:
        rows = embedded.shape[0] if embedded.dim() == 3 else -1
        if embedded.dim() != 3 or not 1 <= rows <= self.max_step or \
                embedded.shape[1:] != (self.batch_size, self.model.d_model):
            raise InputError(f"{OP}.step: embedded must be [1..max_step={self.max_step}, "
                             f"B={self.batch_size}, d_model={self.model.d_model}], got "
                             f"{list(embedded.shape)}")

    @torch.no_grad()
    def step(self, embedded: Tensor) -> Tensor:
        """embedded [L, B, d_model] (the model's embedding of L new tokens, before dropout) ->
        the last layer's output at those positions [L, B, d_model] (after the model's final
        dropout, as its forward returns it)."""
        return decode_step(self.model, embedded, self)


def decode_step(model: nn.Module, embedded: Tensor, state: TransformerXLDecodingState) -> Tensor:
    """New positions through `model`'s layers, each its own step against its part of `state`."""
    state.check(embedded)
    untied = getattr(model, "untie_r", False)
    r_w_bias, r_r_bias = (None, None) if untied else (model.r_w_bias, model.r_r_bias)
    x = model.drop(embedded)
    for layer, layer_state, pos in zip(model.layers, state.layers, state.pos):
        x, _ = layer.step(x, layer_state, pos, r_w_bias, r_r_bias, window=state.window)
    return model.drop(x)
