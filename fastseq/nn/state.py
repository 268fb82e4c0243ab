"""The step protocol: how every stateful fastseq layer runs a few positions at a time.

    state = layer.init_state(batch_size, ...)      # preallocated, on the layer's device/dtype
    y, state = layer.step(x, state)                # x: the new positions only

`step` is the layer's own forward math on the new positions, with what the earlier positions
left behind carried in `state`: equal to the layer's forward over the whole sequence (tests
check each layer). States are preallocated tensors updated in place with host-side counters
(no sync, no allocation that grows with the context), so a step of fixed shape captures in a
CUDA graph. The layers:

  fastseq.nn.LSTM / GRU / RNN, LayerNormLSTM / LayerNormGRU   x: one frame [B, I] (or [I]);
                                   state: torch's hx (h [layers, B, H], and c for the LSTM)
  fastseq.nn.MultiheadAttention    x: the new tokens; state: a KVCache of their keys and values
                                   (self-attention), or the projected memory (cross-attention)
  fastseq.nn.TransformerDecoderLayer   both of those and its feed-forward
  fastseq.nn.TransformerXLLayer, TransformerXL, TransformerXLLM   x: new positions/tokens;
                                   state: each layer's keys and values of the last mem_len
                                   positions (SlidingKV)
  fastseq.nn.BlockRecurrentTransformerLayer, BlockRecurrentTransformerLM   x: new tokens;
                                   state: BlockRecurrentMemory (the previous block's and the
                                   pending tokens' keys and values, the recurrent state), at
                                   most 2 window rows: bounded, though each step concatenates
  fastseq.nn.AttentionDecoder       x: one embedded target token per row [B, E];
                                   state: AttentionDecoderState (the encoder states and their
                                   attention keys, the cells' hidden, the input feed); beams
                                   share each sentence's encoder states (beam_search); decoding
                                   overwrites its tensors in place
  fastseq.nn.AttentionalRNNDecoder  SpeechBrain's decoder: x [B, input_size], the same state

A new stateful family implements init_state and step on its layer and reuses its forward's
pieces (the projection, the attention call, the block after it) rather than a copy of them.
"""
from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor


class Stateful(Protocol):
    def init_state(self, batch_size: int, *args: Any, **kwargs: Any) -> Any: ...

    def step(self, x: Tensor, state: Any) -> tuple[Tensor, Any]: ...


class SlidingKV:
    """One attention layer's projected keys [B, H, capacity, D] and values [B, H, capacity, Dv]
    of the last `keep` positions, in a buffer of capacity 2 keep + max_step: when a step would
    run past the end, the last `keep` positions move to the front (one in-place copy every
    keep + max_step positions, O(1) a step amortised; the doubled capacity keeps source and
    destination apart). For attention that depends on distances only (Transformer-XL's), moving
    the window changes nothing."""

    def __init__(self, like: Tensor, batch_size: int, heads: int, head_dim: int, value_dim: int,
                 keep: int, max_step: int) -> None:
        self.keep, self.max_step = keep, max_step
        capacity = 2 * keep + max_step
        self.keys = like.new_empty(batch_size, heads, capacity, head_dim)
        self.values = like.new_empty(batch_size, heads, capacity, value_dim)
        self.length = 0  # positions written (host-side: no sync)

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Write keys/values [B, H, rows <= max_step, *] after the last position; returns the
        keys and values a step attends: the kept positions and the new ones (views)."""
        rows = keys.shape[2]
        if self.length + rows > self.keys.shape[2]:
            kept = min(self.length, self.keep)
            start = self.length - kept
            for buffer in (self.keys, self.values):
                # start >= keep + max_step - rows >= kept: the ranges never overlap.
                buffer[:, :, :kept].copy_(buffer[:, :, start:self.length])
            self.length = kept
        first = self.length - min(self.length, self.keep)
        end = self.length + rows
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, first:end], self.values[:, :, first:end]
