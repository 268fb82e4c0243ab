"""The Block-Recurrent Transformer layer (Hutchins, Schlag, Wu, Dyer, Neyshabur, NeurIPS 2022),
as the original code (google-research/meliad: transformer_layer.py, transformer_base.py,
nn_components.py) computes it, on fastseq.ops.block_recurrent_attention.

A segment of tokens [B, T, d] is read in blocks of `window` tokens. Vertically, every token
attends to the `window` tokens before it (the previous block carried across calls, as
Transformer-XL carries its memory; a token never attends to itself, as in the original) with
T5's relative bias, and, with a second query, to the S state vectors its block reads; the two
outputs are concatenated, projected and added back (residual), then the feed-forward block.
Horizontally (recurrent layers only), at each block's end the states attend to themselves and
to the block's window of tokens, and a gate ("bias": the paper's fixed gate; "lstm") mixes the
result into the next state: "dual" gates both the projection and the feed-forward, "single"
feeds the attention straight to a tanh feed-forward gated onto the state, "skip" has no
feed-forward.

What runs where: the token side of a whole segment is one fused launch (its sliding window over
[carried tokens; segment], and each row against the keys of the state its block reads); only
the states' update is a loop over blocks (per block: one fused launch for both attentions,
the projections and MLPs as GEMMs, each gate one elementwise launch), with no host
synchronisation inside it.

Carried across calls (`BlockRecurrentMemory`): the keys and values of the previous complete
block and of the tokens of a block not yet complete, and the state. Blocks are counted from the
start of the document, so any segment length works, and a long sequence equals the same tokens
fed in pieces (one token at a time included: the step protocol). The state updates only when a
block completes.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._checks import InputError
from ..ops.block_recurrent import block_recurrent_attention, block_recurrent_gate
from ..reference.block_recurrent import distance_bias
from .scripting import RefusesTorchScript

GATES = ("bias", "lstm")
CONFIGURATIONS = ("dual", "single", "skip")
NUM_BUCKETS, MAX_DISTANCE = 32, 128  # the original's T5 bias (hard-coded there too)


class BlockRecurrentMemory(NamedTuple):
    """What a layer carries to the next call: keys, values [B, H, window + pending, head_dim]
    (the previous complete block, then the `pending` tokens of the block under way) and the
    state [B, S, d_model] (None for a layer without recurrence)."""
    keys: Tensor
    values: Tensor
    state: Optional[Tensor]


class T5LayerNorm(nn.Module):
    """The original's LayerNorm (T5's): no mean, no bias, a learned scale, eps 1e-6; computed in
    float32 for half-precision inputs, as the original does."""

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        wide = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(normed.dtype)).to(x.dtype)


def _fan_in_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """The original's kernel init: truncated normal with variance scale / fan_in."""
    std = math.sqrt(scale / weight.shape[1]) / 0.87962566103423978  # flax's truncation factor
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _linear(fan_in: int, fan_out: int, factory: dict, bias: bool = False,
            scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, bias=bias, **factory)
    _fan_in_(layer.weight, scale)
    if bias:
        nn.init.normal_(layer.bias, std=0.1)
    return layer


class QueriesKeysValues(nn.Module):
    """The original's KVQLayer: LayerNorm (plus learned position embeddings for the states),
    bias-free projections to keys, values, queries and the cross-attention queries, keys and
    queries L2-normalised per head, and the learned per-head scales of both attentions."""

    def __init__(self, d_model: int, heads: int, head_dim: int, positions: int, factory: dict):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        self.norm = T5LayerNorm(d_model, **factory)
        self.positions = (nn.Parameter(torch.randn(positions, d_model, **factory))
                          if positions else None)
        self.query = _linear(d_model, width, factory)
        self.key = _linear(d_model, width, factory)
        self.value = _linear(d_model, width, factory)
        self.query2 = _linear(d_model, width, factory)
        self.attention_scale = nn.Parameter(torch.ones(heads, **factory))
        self.attention_scale2 = nn.Parameter(torch.ones(heads, **factory))

    def forward(self, x: Tensor, dropout: float = 0.0, training: bool = False):
        """x [B, N, d] -> queries, keys, values, queries2 [B, H, N, head_dim] (views), the
        queries already multiplied by their attention's scale."""
        x = self.norm(x)
        if self.positions is not None:
            x = x + self.positions
        x = F.dropout(x, dropout, training)
        q, k, v, q2 = (self._heads(proj(x)) for proj in
                       (self.query, self.key, self.value, self.query2))
        return (_normalized(q) * self.attention_scale[:, None, None], _normalized(k), v,
                _normalized(q2) * self.attention_scale2[:, None, None])

    def _heads(self, x: Tensor) -> Tensor:
        # view, not unflatten: torch 2.11's dynamo cannot trace Tensor.unflatten under a device
        # context (its __torch_function__ calls super().unflatten)
        return x.view(*x.shape[:-1], self.heads, self.head_dim).transpose(1, 2)


def _normalized(x: Tensor) -> Tensor:
    """x / sqrt(|x|^2 + 1e-6) per head vector (the original's _normalize_kq)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


class Gate(nn.Module):
    """The original's MLP._gate for the recurrent state: "bias", g = sigmoid(b) per feature,
    next = state g + y (1 - g); "lstm", next = state sigmoid(W_f h + b_f + 1) +
    y sigmoid(W_i h + b_i - 1), h the MLP's hidden input."""

    def __init__(self, kind: str, hidden: int, d_model: int, factory: dict) -> None:
        super().__init__()
        self.kind = kind
        if kind == "bias":
            self.gate_bias = nn.Parameter(torch.randn(d_model, **factory) * 0.1)
        else:
            self.input_gate = _linear(hidden, d_model, factory, bias=True, scale=0.1)
            self.forget_gate = _linear(hidden, d_model, factory, bias=True, scale=0.1)

    def forward(self, hidden: Tensor, state: Tensor, y: Tensor,
                backend: Optional[str] = None) -> Tensor:
        """The elementwise update is fastseq.ops.block_recurrent_gate (one launch on Triton);
        the LSTM gate's two projections stay GEMMs."""
        if self.kind == "bias":
            return block_recurrent_gate(state, y, gate_bias=self.gate_bias, backend=backend)
        return block_recurrent_gate(state, y, forget=self.forget_gate(hidden),
                                    remember=self.input_gate(hidden), backend=backend)


class StateUpdate(nn.Module):
    """The horizontal direction: the states' own projections, and what turns the two attention
    outputs into the next state (TransformerBase.post_attn_ffn with the layer's gate)."""

    def __init__(self, d_model: int, heads: int, head_dim: int, mlp_dim: int, num_states: int,
                 gate: str, configuration: str, factory: dict) -> None:
        super().__init__()
        self.configuration = configuration
        width = 2 * heads * head_dim  # both attentions' heads, concatenated
        self.kvq = QueriesKeysValues(d_model, heads, head_dim, num_states, factory)
        if configuration != "single":
            self.projection = _linear(width, d_model, factory)
            self.projection_gate = Gate(gate, width, d_model, factory)
        if configuration != "skip":
            ffn_in = width if configuration == "single" else d_model
            self.ffn_norm = T5LayerNorm(d_model, **factory) if configuration == "dual" else None
            self.ffn_hidden = _linear(ffn_in, mlp_dim, factory)
            self.ffn_output = _linear(mlp_dim, d_model, factory)
            self.ffn_gate = Gate(gate, mlp_dim, d_model, factory)
        self.initial_state = nn.Parameter(torch.randn(num_states, d_model, **factory) * 0.1)

    def forward(self, state: Tensor, attended: Tensor, backend: Optional[str] = None) -> Tensor:
        """state [B, S, d], attended [B, S, 2 H head_dim] -> the next state."""
        if self.configuration == "single":
            hidden = F.relu(self.ffn_hidden(attended))
            return self.ffn_gate(hidden, state, torch.tanh(self.ffn_output(hidden)), backend)
        state = self.projection_gate(attended, state, self.projection(attended), backend)
        if self.configuration == "skip":
            return state
        hidden = F.relu(self.ffn_hidden(self.ffn_norm(state)))
        return self.ffn_gate(hidden, state, self.ffn_output(hidden), backend)


class BlockRecurrentTransformerLayer(RefusesTorchScript, nn.Module):
    """One layer: `forward(x [B, T, d_model], memory=None) -> (y [B, T, d_model], memory)`.

    window: the block length W (tokens attend to the W tokens before them). num_states: S (0: a
    sliding-window layer without recurrence, the non-recurrent layers of the paper's stack).
    gate: "bias" or "lstm"; configuration: "dual", "single" or "skip" (the paper's). dropout:
    the original's places on the token side (after the pre-attention norm, on the feed-forward
    output); the recurrent side runs without dropout, as in the original. memory None starts a
    document: zero keys and values before it (the original's), the learned initial state.
    """

    def __init__(self, d_model: int, heads: int, head_dim: int, mlp_dim: int, window: int,
                 num_states: int = 0, *, gate: str = "bias", configuration: str = "dual",
                 dropout: float = 0.0, backend: Optional[str] = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        if window < 1 or num_states < 0 or heads < 1 or head_dim < 1:
            raise InputError(f"fastseq.nn.BlockRecurrentTransformerLayer: window >= 1, "
                             f"num_states >= 0, heads and head_dim >= 1 expected, got "
                             f"window={window}, num_states={num_states}, heads={heads}, "
                             f"head_dim={head_dim}")
        if gate not in GATES or configuration not in CONFIGURATIONS:
            raise InputError(f"fastseq.nn.BlockRecurrentTransformerLayer: gate must be one of "
                             f"{GATES} and configuration one of {CONFIGURATIONS}, got "
                             f"{gate!r}, {configuration!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.heads, self.head_dim = d_model, heads, head_dim
        self.window, self.num_states, self.dropout = window, num_states, dropout
        self.backend = backend
        self.kvq = QueriesKeysValues(d_model, heads, head_dim, 0, factory)
        self.relative_bias = nn.Parameter(
            torch.randn(heads, NUM_BUCKETS, **factory) / math.sqrt(NUM_BUCKETS))
        parts = 2 if num_states else 1
        self.projection = _linear(parts * heads * head_dim, d_model, factory)
        self.ffn_norm = T5LayerNorm(d_model, **factory)
        self.ffn_hidden = _linear(d_model, mlp_dim, factory)
        self.ffn_output = _linear(mlp_dim, d_model, factory)
        self.recurrence = (StateUpdate(d_model, heads, head_dim, mlp_dim, num_states, gate,
                                       configuration, factory) if num_states else None)

    def init_state(self, batch_size: int) -> BlockRecurrentMemory:
        """The memory at the start of a document (the step protocol's state)."""
        weight = self.kvq.key.weight
        zeros = weight.new_zeros(batch_size, self.heads, self.window, self.head_dim)
        state = (self.recurrence.initial_state.expand(batch_size, -1, -1)
                 if self.recurrence is not None else None)
        return BlockRecurrentMemory(zeros, zeros, state)

    def step(self, x: Tensor, memory: BlockRecurrentMemory) -> tuple[Tensor, BlockRecurrentMemory]:
        """The step protocol: new tokens [B, n, d] against the memory; equal to forward."""
        return self.forward(x, memory)

    def forward(self, x: Tensor, memory: Optional[BlockRecurrentMemory] = None
                ) -> tuple[Tensor, BlockRecurrentMemory]:
        B, T = self._check_input(x)
        memory = self.init_state(B) if memory is None else self._checked_memory(memory, B)
        W = self.window
        pending = memory.keys.shape[2] - W
        q, k, v, q2 = self.kvq(x, self.dropout, self.training)
        keys = torch.cat([memory.keys, k], dim=2)      # [B, H, W + pending + T, head_dim]
        values = torch.cat([memory.values, v], dim=2)
        blocks = (pending + T) // W  # blocks this call completes
        state = memory.state
        if self.recurrence is not None:
            states_kv, state = self._scan_states(state, keys, values, blocks, T, pending)
        bias = distance_bias(self.relative_bias, W, MAX_DISTANCE) * self.kvq.attention_scale[:, None]
        if self.recurrence is not None:
            state_keys, state_values = states_kv
            out, out2 = block_recurrent_attention(
                q, keys, values, q2, state_keys, state_values, window=W, bias=bias.to(q.dtype),
                group_size=W, group_offset=pending, backend=self.backend)
            attended = torch.cat([out, out2], dim=1)   # [B, 2H, T, head_dim]: self, then cross
        else:
            attended, _ = block_recurrent_attention(q, keys, values, window=W,
                                                    bias=bias.to(q.dtype), backend=self.backend)
        y = x + self.projection(attended.transpose(1, 2).flatten(2))
        hidden = F.relu(self.ffn_hidden(self.ffn_norm(y)))
        y = y + F.dropout(self.ffn_output(hidden), self.dropout, self.training)
        keep = blocks * W
        return y, BlockRecurrentMemory(keys[:, :, keep:], values[:, :, keep:], state)

    def _scan_states(self, state: Tensor, keys: Tensor, values: Tensor, blocks: int, T: int,
                     pending: int):
        """Update the state at each completed block; returns the keys and values of the state
        each row's block reads ([B, H, G, S, head_dim], G groups of `window` rows from
        `pending`) and the last state."""
        W = self.window
        groups = (pending + T - 1) // W + 1 if T > 0 else 0
        read_keys, read_values = [], []
        for block in range(max(blocks, groups)):
            sq, sk, sv, sq2 = self.recurrence.kvq(state)
            if block < groups:
                read_keys.append(sk)
                read_values.append(sv)
            if block == blocks:
                break  # the last group's block is not complete: its state stays
            window_keys = keys[:, :, block * W:block * W + 2 * W].unsqueeze(2)
            window_values = values[:, :, block * W:block * W + 2 * W].unsqueeze(2)
            own, cross = block_recurrent_attention(sq, sk, sv, sq2, window_keys, window_values,
                                                   backend=self.backend)
            attended = torch.cat([own, cross], dim=1).transpose(1, 2).flatten(2)
            state = self.recurrence(state, attended, self.backend)
        stack = lambda parts: (torch.stack(parts, dim=2) if parts else  # noqa: E731
                               keys.new_zeros(keys.shape[0], self.heads, 0, self.num_states,
                                              self.head_dim))
        return (stack(read_keys), stack(read_values)), state

    def _check_input(self, x) -> tuple[int, int]:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"fastseq.nn.BlockRecurrentTransformerLayer: x must be [batch, "
                             f"tokens, d_model={self.d_model}], got {got}")
        return x.shape[0], x.shape[1]

    def _checked_memory(self, memory, batch: int) -> BlockRecurrentMemory:
        name = "fastseq.nn.BlockRecurrentTransformerLayer: memory"
        if not isinstance(memory, BlockRecurrentMemory):
            raise InputError(f"{name} must be a BlockRecurrentMemory (from init_state or a "
                             f"previous call), got {type(memory).__name__}")
        keys, values, state = memory
        rows = keys.shape[2] if isinstance(keys, Tensor) else -1
        want = [batch, self.heads, "window + pending", self.head_dim]
        for part, t in (("keys", keys), ("values", values)):
            if (not isinstance(t, Tensor) or t.dim() != 4 or t.shape[0] != batch
                    or t.shape[1] != self.heads or t.shape[3] != self.head_dim
                    or not self.window <= t.shape[2] < 2 * self.window or t.shape[2] != rows):
                got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise InputError(f"{name}.{part} must be {want} with window={self.window} <= "
                                 f"rows < {2 * self.window} (a memory from another batch size or "
                                 f"layer?), got {got}")
        if self.recurrence is None and state is not None:
            raise InputError(f"{name}.state must be None (this layer has no recurrence), got "
                             f"{type(state).__name__}")
        if self.recurrence is not None and not isinstance(state, Tensor):
            raise InputError(f"{name}.state must be a tensor [batch, num_states, d_model], got "
                             f"{type(state).__name__}")
        if state is not None and (state.dim() != 3 or
                                  tuple(state.shape) != (batch, self.num_states, self.d_model)):
            raise InputError(f"{name}.state must be [batch={batch}, num_states="
                             f"{self.num_states}, d_model={self.d_model}], got "
                             f"{list(state.shape)}")
        return memory
