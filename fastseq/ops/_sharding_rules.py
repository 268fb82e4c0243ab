"""Where the batch and the heads sit in each public op's arguments and results: the rules
fastseq/ops/_sharding.py runs DTensor inputs by. Each rule reads the call's bound arguments
(DTensors show global shapes) and returns an Axes; an argument the rule does not list must be
replicated (weights, position tables, cu_seqlens), and a tensor it lists is split with the
axis or broadcast along it (size 1).

The batch splits every op (rows never meet); the heads split the attentions (heads never meet),
GQA only when query and key heads both split evenly, so that each rank's query heads read the
key heads it holds (query head h reads key head h // (Hq / Hk)).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ._sharding import BATCH, HEADS, Axes, refuse, right_aligned

_GQA_EVEN = "with Hq != Hk each rank's query heads must read key heads it holds, which needs " \
            "both head counts to split evenly"


def _tensor(arguments: dict, name: str) -> Optional[Tensor]:
    value = arguments.get(name)
    return value if isinstance(value, Tensor) else None


def _state_paths(hx, name: str = "hx") -> list:
    """hx as h0 or (h0, c0): the paths its tensors take."""
    if isinstance(hx, (tuple, list)):
        return [f"{name}[{i}]" for i in range(len(hx))]
    return [name] if isinstance(hx, Tensor) else []


# Recurrent ops: every tensor carries the batch; weights are replicated.

def cell_axes(outputs: int):
    """lstm_cell (2 outputs) and the one-state cells: input [B, I] or unbatched [I]."""
    def rule(arguments: dict) -> Axes:
        if arguments["input"].dim() < 2:
            return Axes({}, [{}] * outputs)
        inputs = {"input": {BATCH: 0}}
        inputs.update({path: {BATCH: 0} for path in _state_paths(arguments["hx"])})
        return Axes(inputs, [{BATCH: 0}] * outputs)
    return rule


def _lstm(arguments: dict) -> bool:
    return arguments["mode"] == "lstm"


def rnn_layer_axes(arguments: dict) -> Axes:
    """rnn_layer and layer_norm_rnn_layer: input [T, B, I], h0/c0 [B, H], lengths [B],
    zoneout [T, B, H]; output [T, B, H], h_n (c_n) [B, H]."""
    inputs = {"input": {BATCH: 1}, "lengths": {BATCH: 0}, "zoneout_h": {BATCH: 1},
              "zoneout_c": {BATCH: 1}}
    inputs.update({path: {BATCH: 0} for path in _state_paths(arguments["hx"])})
    return Axes(inputs, [{BATCH: 1}] + [{BATCH: 0}] * (2 if _lstm(arguments) else 1))


def rnn_bidirectional_layer_axes(arguments: dict) -> Axes:
    """input [T, B, I], h0/c0 [2, B, H], lengths [B], zoneout [2, T, B, H]; output
    [T, B, 2H], h_n (c_n) [2, B, H]."""
    inputs = {"input": {BATCH: 1}, "lengths": {BATCH: 0}, "zoneout_h": {BATCH: 2},
              "zoneout_c": {BATCH: 2}}
    inputs.update({path: {BATCH: 1} for path in _state_paths(arguments["hx"])})
    return Axes(inputs, [{BATCH: 1}] * (3 if _lstm(arguments) else 2))


def rnn_stack_axes(arguments: dict) -> Axes:
    """input [T, B, I] ([B, T, I] batch_first, [T, I] unbatched), h0/c0 [L*D, B, H], lengths
    [B]; output as the input, h_n (c_n) [L*D, B, H]."""
    states = 2 if _lstm(arguments) else 1
    if isinstance(arguments["input"], PackedSequence):
        refuse("rnn_stack", "a PackedSequence holds the batch interleaved in time order, so it "
                            "cannot be split by rank; pass padded input with lengths")
    if arguments["input"].dim() < 3:
        return Axes({}, [{}] * (1 + states))
    batch = 0 if arguments["batch_first"] else 1
    inputs = {"input": {BATCH: batch}, "lengths": {BATCH: 0}}
    inputs.update({path: {BATCH: 1} for path in _state_paths(arguments["hx"])})
    return Axes(inputs, [{BATCH: batch}] + [{BATCH: 1}] * states)


# Attentions: [..., H, L, E], the batch at dim 0 when there is one.

def _attention_dims(ndim: int) -> dict:
    dims = {HEADS: ndim - 3}
    if ndim >= 4:
        dims[BATCH] = 0
    return dims


def _per_head(value: Optional[Tensor], batched_dims: dict) -> dict:
    """alibi_slopes [H] or [B, H]."""
    if value is None:
        return {}
    return {HEADS: 0} if value.dim() == 1 else batched_dims


def _gqa(query: Tensor, key: Tensor, paths: tuple, head_dim: int) -> tuple:
    if query.shape[head_dim] != key.shape[head_dim]:
        return ((HEADS, paths, _GQA_EVEN),)
    return ()


def attention_axes(arguments: dict) -> Axes:
    query, key = arguments["query"], arguments["key"]
    dims = _attention_dims(query.dim())
    inputs = {"query": dims, "key": dims, "value": dims,
              "alibi_slopes": _per_head(_tensor(arguments, "alibi_slopes"),
                                        {BATCH: 0, HEADS: 1}),
              "sinks": {HEADS: 0}}
    mask = arguments["attn_mask"]
    if isinstance(mask, Tensor):
        inputs["attn_mask"] = right_aligned(dims, query.dim(), mask)
    elif mask is not None and hasattr(mask, "key_end"):  # an AttentionMask description
        inputs["attn_mask.key_start"] = inputs["attn_mask.key_end"] = {BATCH: 0}
    outputs = [dims, {axis: dim for axis, dim in dims.items()}]  # out, lse [..., H, L]
    return Axes(inputs, outputs[:2 if arguments["return_lse"] else 1],
                _gqa(query, key, ("query", "key", "value"), query.dim() - 3))


def attention_varlen_axes(arguments: dict) -> Axes:
    """query [Tq, Hq, E], key/value [Tk, Hk, E]: the heads only (the batch is packed along the
    tokens); out [Tq, Hq, Ev], lse [Hq, Tq]."""
    query, key = arguments["query"], arguments["key"]
    heads = {HEADS: 1}
    inputs = {"query": heads, "key": heads, "value": heads,
              "alibi_slopes": _per_head(_tensor(arguments, "alibi_slopes"), {HEADS: 1}),
              "sinks": {HEADS: 0}}
    outputs = [heads, {HEADS: 0}]
    return Axes(inputs, outputs[:2 if arguments["return_lse"] else 1],
                _gqa(query, key, ("query", "key", "value"), 1))


def kv_cache_axes(arguments: dict) -> Axes:
    """query [B, Hq, Lq, E], caches [B, Hk, S, E] (or a page pool [pages, Hk, page, E] with
    block_table [B, pages per row]), cache_seqlens/cache_leftpad [B], key/value
    [B, Hk, Lnew, E]; out and lse [B, Hq, Lq, ...]. The caches are written in place: each rank
    writes its own shard."""
    query, k_cache = arguments["query"], arguments["k_cache"]
    dims = {BATCH: 0, HEADS: 1}
    indexed = arguments["cache_batch_idx"] is not None or arguments["block_table"] is not None
    cache = {HEADS: 1} if indexed else dims
    inputs = {"query": dims, "k_cache": cache, "v_cache": cache, "key": dims, "value": dims,
              "cache_seqlens": {BATCH: 0}, "cache_leftpad": {BATCH: 0},
              "block_table": {BATCH: 0}, "cache_batch_idx": {BATCH: 0},
              "alibi_slopes": _per_head(_tensor(arguments, "alibi_slopes"), dims),
              "sinks": {HEADS: 0}}
    unsplittable = {}
    if indexed:
        unsplittable[BATCH] = ("cache_batch_idx / block_table index cache rows or pages shared "
                               "by the whole batch; split such a step along the heads")
    heads_k = k_cache.shape[1]
    even = ((HEADS, ("query", "k_cache", "v_cache", "key", "value"), _GQA_EVEN),) \
        if query.shape[1] != heads_k else ()
    return Axes(inputs, [dims, dims][:2 if arguments["return_lse"] else 1], even, unsplittable)


def rel_attention_axes(arguments: dict) -> Axes:
    """query/key/value [B, H, L, D], pos [P, H, D], content/position_bias [H, D], attn_mask
    broadcasting to [B, H, Lq, Lk]; out and lse [B, H, Lq, ...]."""
    dims = {BATCH: 0, HEADS: 1}
    inputs = {"query": dims, "key": dims, "value": dims, "pos": {HEADS: 1},
              "content_bias": {HEADS: 0}, "position_bias": {HEADS: 0}}
    mask = _tensor(arguments, "attn_mask")
    if mask is not None:
        inputs["attn_mask"] = right_aligned(dims, 4, mask)
    return Axes(inputs, [dims, dims][:2 if arguments["return_lse"] else 1])


def block_recurrent_attention_axes(arguments: dict) -> Axes:
    """query/key/value/query2 [B, H, L, D], key2/value2 [B, H, G, S2, D], bias [H, W + 1];
    out and out2 [B, H, L, Dv]."""
    dims = {BATCH: 0, HEADS: 1}
    inputs = {name: dims for name in ("query", "key", "value", "query2", "key2", "value2")}
    inputs["bias"] = {HEADS: 0}
    return Axes(inputs, [dims] * (1 if arguments["query2"] is None else 2))


def block_recurrent_gate_axes(arguments: dict) -> Axes:
    """state, y, forget, remember [B, ..., d] (the batch leading when there are >= 2 dims);
    gate_bias [d] replicated; the next state as the state."""
    if arguments["state"].dim() < 2:
        return Axes({}, [{}])
    batch = {BATCH: 0}
    return Axes({name: batch for name in ("state", "y", "forget", "remember")}, [batch])


def global_attention_axes(arguments: dict) -> Axes:
    """query [B, T, A], keys/values [B, S, *], lengths [B], extra [B, T, S, A]; v [A]
    replicated; context and alignments [B, T, *]."""
    batch = {BATCH: 0}
    return Axes({name: batch for name in ("query", "keys", "values", "lengths", "extra")},
                [batch, batch])
