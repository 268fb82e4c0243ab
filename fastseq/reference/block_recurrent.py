"""Reference Block-Recurrent Transformer attention (Hutchins et al. 2022, as the original code
google-research/meliad computes it): the definition fastseq's kernels implement, in plain
PyTorch (every score in memory), the tests' float64 truth and the benchmarks' baseline.

`block_recurrent_attention` is two attentions sharing a launch in the fused kernel, each with
its own softmax (the original concatenates the two outputs; it never mixes their scores):

- part 1: query row i of L against keys 0..S-1, the row sitting at key position i + S - L (the
  last L keys line up with the queries). With a window, key j is visible iff
  1 <= d <= window for d = i + S - L - j: exactly the `window` keys before the row and never
  the row itself (meliad's position.causal_mask); bias[h, d] is added to visible scores.
- part 2: row i against every key of its group g(i) = (i + group_offset) // group_size (the
  recurrent state of the row's block), keys2 [B, H, G, S2, D].

score = scale * q.k (+ bias); a row with no visible key gives zeros. Probabilities are
softmax(score) exactly: meliad's safe_softmax adds exp(-1000 - max) to each denominator, which
is 0 in float32 and float64 unless every visible score of a row is below -255.

`relative_bucket` and `distance_bias` are the T5 relative-position bias meliad uses (32
buckets, max distance 128, unidirectional), read per distance.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .attention import masked_softmax


def relative_bucket(distance: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5's bucket of each distance (how far back the key is, >= 0), unidirectional: exact below
    num_buckets / 2, then logarithmic up to max_distance, the last bucket beyond. float32 as
    the original computes it (its bucket edges are float32's)."""
    n = distance.clamp(min=0)
    exact = num_buckets // 2
    small = n < exact
    large = exact + (torch.log(n.to(torch.float32) / exact + torch.finfo(torch.float32).eps)
                     / math.log(max_distance / exact) * (num_buckets - exact)).to(torch.int64)
    large = large.clamp(max=num_buckets - 1)
    return torch.where(small, n, large)


def distance_bias(table: Tensor, window: int, max_distance: int = 128) -> Tensor:
    """The bias of each distance 0..window: table [H, num_buckets] read at relative_bucket(d),
    [H, window + 1] (distance 0, the row itself, is never visible; it keeps the indexing
    plain)."""
    distance = torch.arange(window + 1, device=table.device)
    return table[:, relative_bucket(distance, table.shape[1], max_distance)]


def group_of_rows(rows: int, group_size: int, group_offset: int, device=None) -> Tensor:
    """Each query row's key group: (i + group_offset) // group_size."""
    return (torch.arange(rows, device=device) + group_offset) // group_size


def block_recurrent_attention(query: Tensor, key: Tensor, value: Tensor,
                              query2: Optional[Tensor] = None, key2: Optional[Tensor] = None,
                              value2: Optional[Tensor] = None, *,
                              window: Optional[int] = None, bias: Optional[Tensor] = None,
                              group_size: Optional[int] = None, group_offset: int = 0,
                              scale: float = 1.0, scale2: float = 1.0):
    """query [B, H, L, D], key [B, H, S, D], value [B, H, S, Dv] (S >= L); bias [H, window + 1];
    query2 [B, H, L, D], key2 [B, H, G, S2, D], value2 [B, H, G, S2, Dv]. Returns (out, out2)
    [B, H, L, Dv] each (out2 None without part 2)."""
    L, S = query.shape[-2], key.shape[-2]
    scores = scale * (query @ key.transpose(-2, -1))
    distance = (torch.arange(L, device=query.device)[:, None] + (S - L)
                - torch.arange(S, device=query.device)[None, :])
    visible = torch.ones_like(distance, dtype=torch.bool)
    if window is not None:
        visible = (distance >= 1) & (distance <= window)
        if bias is not None:
            scores = scores + bias[:, distance.clamp(0, window)].to(scores.dtype)
    probs, _ = masked_softmax(scores, visible)
    out = probs @ value
    if query2 is None:
        return out, None
    group_size = L if group_size is None else group_size
    groups = group_of_rows(L, group_size, group_offset, query.device)
    keys2 = key2[:, :, groups]        # [B, H, L, S2, D]: each row's group, a copy per row
    values2 = value2[:, :, groups]
    scores2 = scale2 * (query2.unsqueeze(-2) @ keys2.transpose(-2, -1)).squeeze(-2)
    out2 = (torch.softmax(scores2, dim=-1).unsqueeze(-2) @ values2).squeeze(-2)
    return out, out2


# The original's layer, block by block (meliad's TransformerLayer.__call__ with its sequential
# window loop), written from its code with plain tensors: the float64 truth the tests compare
# fastseq.nn.BlockRecurrentTransformerLayer with, and the benchmarks' baseline formulation. It
# reads the layer's parameters only; nothing of fastseq.nn's forward runs.

def _rms_norm(norm, x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _unit(x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def _kvq(kvq, x: Tensor):
    """[B, N, H, D] keys, values, queries, queries2 (keys and queries normalised)."""
    x = _rms_norm(kvq.norm, x)
    if kvq.positions is not None:
        x = x + kvq.positions
    split = lambda t: t.unflatten(-1, (kvq.heads, kvq.head_dim))  # noqa: E731
    return (_unit(split(x @ kvq.key.weight.T)), split(x @ kvq.value.weight.T),
            _unit(split(x @ kvq.query.weight.T)), _unit(split(x @ kvq.query2.weight.T)))


def _simple_attention(keys, values, queries, scale, bias=None, visible=None):
    """meliad's attention.simple_attention: (q.k + bias) * scale, masked, softmax, @ values;
    [B, N, H, D] in and out, every score in memory."""
    scores = torch.einsum("bqhd,bkhd->bhqk", queries, keys)
    if bias is not None:
        scores = scores + bias
    scores = scores * scale[None, :, None, None]
    if visible is None:
        visible = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device)
    probs, _ = masked_softmax(scores, visible)
    return torch.einsum("bhqk,bkhd->bqhd", probs, values)


def _gate(gate, hidden: Tensor, state: Tensor, y: Tensor) -> Tensor:
    if gate.kind == "bias":
        g = torch.sigmoid(gate.gate_bias)
        return state * g + y * (1 - g)
    forget = torch.sigmoid(hidden @ gate.forget_gate.weight.T + gate.forget_gate.bias + 1)
    remember = torch.sigmoid(hidden @ gate.input_gate.weight.T + gate.input_gate.bias - 1)
    return state * forget + y * remember


def _state_update(rec, state: Tensor, attended: Tensor) -> Tensor:
    """meliad's TransformerBase.post_attn_ffn with the recurrent gates."""
    relu = torch.relu
    if rec.configuration == "single":
        hidden = relu(attended @ rec.ffn_hidden.weight.T)
        return _gate(rec.ffn_gate, hidden, state, torch.tanh(hidden @ rec.ffn_output.weight.T))
    state = _gate(rec.projection_gate, attended, state, attended @ rec.projection.weight.T)
    if rec.configuration == "skip":
        return state
    hidden = relu(_rms_norm(rec.ffn_norm, state) @ rec.ffn_hidden.weight.T)
    return _gate(rec.ffn_gate, hidden, state, hidden @ rec.ffn_output.weight.T)


def layer_original(layer, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """A document x [B, N, d] from its start through `layer` (a
    fastseq.nn.BlockRecurrentTransformerLayer, in eval mode) as the original computes it: blocks
    of W tokens (the last may be shorter; it leaves the state as it is), each window the
    previous block's keys and values (zeros before the first) concatenated with the block's.
    Returns (y [B, N, d], the final state or None)."""
    B, N, _ = x.shape
    W, H, D = layer.window, layer.heads, layer.head_dim
    keys, values, queries, queries2 = _kvq(layer.kvq, x)
    prev_keys = keys.new_zeros(B, W, H, D)
    prev_values = values.new_zeros(B, W, H, D)
    rec = layer.recurrence
    state = rec.initial_state.expand(B, -1, -1) if rec is not None else None
    table = layer.relative_bias
    outputs = []
    for start in range(0, N, W):
        stop = min(start + W, N)
        n = stop - start
        window_keys = torch.cat([prev_keys, keys[:, start:stop]], 1)
        window_values = torch.cat([prev_values, values[:, start:stop]], 1)
        # meliad's relative_positions (k - (q + offset)) and causal_mask (-W <= pos < 0).
        position = (torch.arange(W + n, device=x.device)[None, :]
                    - (torch.arange(n, device=x.device)[:, None] + W))
        visible = (position < 0) & (position >= -W)
        bias = table[:, relative_bucket(-position, table.shape[1])]        # [H, n, W + n]
        attended = [_simple_attention(window_keys, window_values, queries[:, start:stop],
                                      layer.kvq.attention_scale, bias, visible)]
        if rec is not None:
            r_keys, r_values, r_queries, r_queries2 = _kvq(rec.kvq, state)
            attended.append(_simple_attention(r_keys, r_values, queries2[:, start:stop],
                                              layer.kvq.attention_scale2))
            if n == W:  # a complete block updates the state
                own = _simple_attention(r_keys, r_values, r_queries, rec.kvq.attention_scale)
                cross = _simple_attention(window_keys, window_values, r_queries2,
                                          rec.kvq.attention_scale2)
                state = _state_update(rec, state, torch.cat([own, cross], 2).flatten(2))
        outputs.append(torch.cat(attended, 2).flatten(2))
        prev_keys, prev_values = window_keys[:, -W:], window_values[:, -W:]
    y = x + torch.cat(outputs, 1) @ layer.projection.weight.T
    hidden = torch.relu(_rms_norm(layer.ffn_norm, y) @ layer.ffn_hidden.weight.T)
    return y + hidden @ layer.ffn_output.weight.T, state


def block_recurrent_gate(state: Tensor, y: Tensor, gate_bias: Optional[Tensor] = None,
                         forget: Optional[Tensor] = None,
                         remember: Optional[Tensor] = None) -> Tensor:
    """The recurrent state's gate (meliad's MLP._gate): with gate_bias [d] (the paper's fixed
    gate) g = sigmoid(gate_bias), next = state g + y (1 - g); with the LSTM gate's
    pre-activations forget, remember [..., d] (W_f h + b_f, W_i h + b_i),
    next = state sigmoid(forget + 1) + y sigmoid(remember - 1)."""
    if gate_bias is not None:
        g = torch.sigmoid(gate_bias)
        return state * g + y * (1 - g)
    return state * torch.sigmoid(forget + 1) + y * torch.sigmoid(remember - 1)
