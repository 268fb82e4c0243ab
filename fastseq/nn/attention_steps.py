"""The step protocol (fastseq.nn.state) of fastseq.nn.MultiheadAttention and
TransformerDecoderLayer: decoding a few tokens at a time.

Self-attention keeps the keys and values of every token so far in a fastseq.nn.KVCache (made by
init_state(batch_size, capacity)); a step projects only the new tokens (one GEMM for q, k and
v), appends their keys and values and attends through fastseq.ops.attention_with_kv_cache
(causal among the new rows), then the module's own output projection. Cross-attention
(init_state(batch_size, memory=...)) projects the memory's keys and values once; a step
projects its queries and attends them with fastseq.ops.attention. Equal to the module's
forward over the whole sequence with a causal mask (tests). Inference only: the layer must be
in eval mode (dropout would differ from the forward's), and the cache step has no backward.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..ops._checks import InputError, check_features, check_like_parameters
from .kv_cache import KVCache


@dataclasses.dataclass
class CrossAttentionState:
    """The memory's projected keys and values [N, H, S, D] and its mask (None, or visible
    [N, 1, 1, S]), made once by MultiheadAttention.init_state(memory=...)."""
    keys: Tensor
    values: Tensor
    mask: Optional[Tensor]


AttentionState = Union[KVCache, CrossAttentionState]


class AttentionSteps:
    """init_state and step for fastseq.nn.MultiheadAttention."""

    def _refuse_steps(self, name: str) -> None:
        if self.bias_k is not None or self.add_zero_attn:
            raise InputError(f"{name}: steps do not support add_bias_kv or add_zero_attn (extra "
                             f"keys every query sees); run the module's forward instead")
        if self.training and self.dropout > 0:
            raise InputError(f"{name}: the layer is in training mode with dropout; call eval() "
                             f"first (steps are for inference)")

    def _projection_weights(self):
        """((w_q, b_q), (w_k, b_k), (w_v, b_v)), the module's own parameters (views)."""
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.split(E)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.split(E) if self.in_proj_bias is not None else (None,) * 3
        return tuple(zip(weights, biases))

    def init_state(self, batch_size: int, capacity: Optional[int] = None, *,
                   memory: Optional[Tensor] = None,
                   key_padding_mask: Optional[Tensor] = None) -> AttentionState:
        """Self-attention (memory None): a KVCache of `capacity` positions. Cross-attention: the
        projected keys and values of `memory` ([N, S, kdim] batch-first, else [S, N, kdim]) with
        its key_padding_mask ([N, S], True or -inf hides, as torch's)."""
        name = "fastseq.nn.MultiheadAttention.init_state"
        self._refuse_steps(name)
        param = self.out_proj.weight
        if memory is None:
            if not self._qkv_same_embed_dim:
                raise InputError(f"{name}: self-attention steps need kdim == vdim == embed_dim; "
                                 f"pass memory= for cross-attention")
            if capacity is None or key_padding_mask is not None:
                raise InputError(f"{name}: self-attention needs a capacity (and takes no "
                                 f"key_padding_mask: a ragged batch sets its rows' lengths "
                                 f"with state.reset(lengths))")
            return KVCache(batch_size, self.num_heads, capacity, self.head_dim,
                           dtype=param.dtype, device=param.device)
        memory_b = memory if self.batch_first else memory.transpose(0, 1)
        if memory_b.dim() != 3 or memory_b.shape[0] != batch_size:
            raise InputError(f"{name}: memory must be [batch={batch_size}, S, kdim] (batch first) "
                             f"or [S, batch, kdim], got {list(memory.shape)}")
        if self.kdim != self.vdim:
            raise InputError(f"{name}: memory serves as key and value, so kdim ({self.kdim}) "
                             f"must equal vdim ({self.vdim})")
        check_features(name, "memory", memory_b, "kdim", self.kdim)
        check_like_parameters(name, "memory", memory_b, param)
        keys, values = (F.linear(memory_b, w, b) for w, b in self._projection_weights()[1:])
        N, S = memory_b.shape[:2]
        keys, values = (t.view(N, S, self.num_heads, self.head_dim).transpose(1, 2)
                        for t in (keys, values))
        mask = self._merged_mask(None, key_padding_mask, N, 1, S, 0, memory_b)
        return CrossAttentionState(keys, values, mask)

    def step(self, x: Tensor, state: AttentionState) -> tuple[Tensor, AttentionState]:
        """New tokens x ([N, L, E] batch-first, else [L, N, E]) -> (their outputs, the state):
        self-attention appends their keys and values to the cache and attends causally;
        cross-attention attends the memory."""
        self._refuse_steps("fastseq.nn.MultiheadAttention.step")
        x_b = x if self.batch_first else x.transpose(0, 1)
        N, L, E = x_b.shape
        extras = self._score_extras() if hasattr(self, "_score_extras") else {}
        window = extras.pop("window", None)
        if isinstance(state, KVCache):
            q, k, v = (t.view(N, L, self.num_heads, self.head_dim).transpose(1, 2)
                       for t in self._project(x_b, x_b, x_b))
            out = state(q, k, v, window=_step_window(window), **extras)
        else:
            if window is not None or extras.get("alibi_slopes") is not None:
                raise InputError("fastseq.nn.MultiheadAttention.step: cross-attention steps "
                                 "take no window or ALiBi (both are measured from the query's "
                                 "position, which a step over the memory does not have)")
            q = F.linear(x_b, *self._projection_weights()[0])
            q = q.view(N, L, self.num_heads, self.head_dim).transpose(1, 2)
            out = ops.attention(q, state.keys, state.values, state.mask, **extras)
        out = self._out_projection(out)
        return (out if self.batch_first else out.transpose(0, 1)), state


def _step_window(window) -> Optional[int]:
    """The decode step's window (the positions a row sees, itself included) of a module's
    (left, right) window: a causal step sees left + 1; a right side past the diagonal has no
    meaning against a cache (the future is not there yet) and is refused."""
    if window is None:
        return None
    left, right = window
    if right is not None and right > 0:
        raise InputError(f"fastseq.nn.MultiheadAttention.step: the window {window} reaches "
                         f"right of the diagonal; a decoding step sees no future keys")
    return None if left is None or left < 0 else left + 1


@dataclasses.dataclass
class DecoderLayerState:
    """TransformerDecoderLayer's: its self-attention's cache and its cross-attention's memory."""
    self_attention: KVCache
    cross_attention: CrossAttentionState


class DecoderLayerSteps:
    """init_state and step for fastseq.nn.TransformerDecoderLayer."""

    def init_state(self, batch_size: int, capacity: int, memory: Tensor,
                   memory_key_padding_mask: Optional[Tensor] = None) -> DecoderLayerState:
        """A cache of `capacity` target positions and the projected `memory` (the encoder's
        output, in the layer's layout)."""
        return DecoderLayerState(
            self.self_attn.init_state(batch_size, capacity),
            self.multihead_attn.init_state(batch_size, memory=memory,
                                           key_padding_mask=memory_key_padding_mask))

    @torch.no_grad()
    def step(self, x: Tensor, state: DecoderLayerState) -> tuple[Tensor, DecoderLayerState]:
        """forward for new target tokens x against everything before them (causal) and the
        memory: the layer's own blocks (norms, dropouts, feed-forward) in its order."""
        def self_block(t):
            return self.dropout1(self.self_attn.step(t, state.self_attention)[0])

        def cross_block(t):
            return self.dropout2(self.multihead_attn.step(t, state.cross_attention)[0])

        if self.norm_first:
            x = x + self_block(self.norm1(x))
            x = x + cross_block(self.norm2(x))
            return x + self._ff_block(self.norm3(x)), state
        x = self.norm1(x + self_block(x))
        x = self.norm2(x + cross_block(x))
        return self.norm3(x + self._ff_block(x)), state
