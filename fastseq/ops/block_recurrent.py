"""The Block-Recurrent Transformer's ops: its attention step,
fastseq.ops.block_recurrent_attention, and the recurrent state's gate,
fastseq.ops.block_recurrent_gate (one elementwise launch on Triton, forward and backward).

Two attentions with separate softmaxes in one call (the math is
fastseq.reference.block_recurrent's): part 1, the rows against keys the last L of which line
up with them, optionally restricted to the `window` keys strictly before each row with a bias
per distance (the token direction: the sliding window over the previous and current block with
T5's bucket bias; the state direction: the states among themselves, unmasked); part 2, each row
against the keys of its group (the token direction: the state its block reads; the state
direction: the window's tokens, one group).

The Triton backend (auto's choice on CUDA) runs both parts in one launch and never holds an
L x S tensor in memory: scores live in registers a tile at a time, the bias is read per
distance, and its gradient is added per distance with atomics (fp32, or fp64 for fp64
inputs). On CPU, auto runs torch's SDPA per part with the window and bias as a materialised
mask (the "torch" backend); the reference is the readable definition.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backends
from ..kernels.limits import ATTENTION_MAX_HEAD_DIM
from ..reference import block_recurrent as _reference
from . import block_recurrent_registration as _registered_ops  # noqa: F401  (registers the ops)
from ._autocast import autocast_op
from ._checks import check_same_dtype_device, check_shape, check_tensor, fail, needs_grad
from ._registration import fused
from ._sharding import shards
from ._sharding_rules import block_recurrent_attention_axes, block_recurrent_gate_axes

OP = "fastseq.ops.block_recurrent_attention"


@shards(block_recurrent_attention_axes)
@autocast_op("block_recurrent_attention")
def block_recurrent_attention(query: Tensor, key: Tensor, value: Tensor,
                              query2: Optional[Tensor] = None, key2: Optional[Tensor] = None,
                              value2: Optional[Tensor] = None, *,
                              window: Optional[int] = None, bias: Optional[Tensor] = None,
                              group_size: Optional[int] = None, group_offset: int = 0,
                              scale: float = 1.0, scale2: float = 1.0,
                              backend: Optional[str] = None):
    """query [B, H, L, D], key [B, H, S, D], value [B, H, S, Dv] with S >= L (row i sits at key
    position i + S - L); window: None (every key visible) or the number of keys before each row
    it sees (never itself); bias [H, window + 1]: added at each visible key's distance (needs a
    window). Part 2 (optional, all three or none): query2 [B, H, L, D], key2 [B, H, G, S2, D],
    value2 [B, H, G, S2, Dv]; row i reads group (i + group_offset) // group_size (one group when
    group_size is None). score = scale * q.k (+ bias), scale2 for part 2. Returns (out, out2)
    [B, H, L, Dv] each, out2 None without part 2."""
    _validate(query, key, value, query2, key2, value2, window, bias, group_size, group_offset,
              scale, scale2)
    call = {"device": query.device, "query": query, "key": key, "value": value,
            "query2": query2, "key2": key2, "value2": value2, "window": window, "bias": bias,
            "group_size": group_size, "group_offset": int(group_offset),
            "scale": float(scale), "scale2": float(scale2),
            "needs_grad": needs_grad(query, key, value, query2, key2, value2, bias)}
    return BACKENDS.run(call, backend)


def _reference_attention(query, key, value, query2, key2, value2, window, bias, group_size,
                         group_offset, scale, scale2, **_):
    return _reference.block_recurrent_attention(
        query, key, value, query2, key2, value2, window=window, bias=bias,
        group_size=group_size, group_offset=group_offset, scale=scale, scale2=scale2)


def _empty(call: dict) -> bool:
    """Nothing to launch: no query row or no value column."""
    return call["query"].numel() == 0 or call["value"].shape[-1] == 0


def _triton_attention(query, key, value, query2, key2, value2, window, bias, group_size,
                      group_offset, scale, scale2, **_):
    group_size = query.shape[2] if group_size is None else int(group_size)
    out, _, out2, _ = fused("fastseq::block_recurrent_forward_triton")(
        query, key, value, bias, query2, key2, value2, window, group_size, group_offset, scale,
        scale2)
    return out, (out2 if query2 is not None else None)


def _torch_attention(query, key, value, query2, key2, value2, window, bias, group_size,
                     group_offset, scale, scale2, **_):
    """torch's SDPA per part: part 1 with the window and bias as an L x S additive mask (-inf
    outside the window), part 2 once per group over that group's rows. Rows with no visible key
    give zeros (fastseq's rule; SDPA gives NaN there)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    L, S = query.shape[2], key.shape[2]
    mask = None
    if window is not None:
        distance = (torch.arange(L, device=query.device)[:, None] + (S - L)
                    - torch.arange(S, device=query.device)[None, :])
        visible = (distance >= 1) & (distance <= window)
        mask = torch.zeros((), dtype=query.dtype, device=query.device)
        if bias is not None:
            mask = bias[:, distance.clamp(0, window)]  # [H, L, S]
        mask = torch.where(visible, mask, torch.full((), float("-inf"), dtype=query.dtype,
                                                     device=query.device))
    out = sdpa(query, key, value, attn_mask=mask, scale=scale)
    if window is not None:
        out = torch.where(visible.any(-1, keepdim=True), out, out.new_zeros(()))
    if query2 is None:
        return out, None
    group_size = L if group_size is None else group_size
    pieces = []
    for g in range(key2.shape[2]):
        r0, r1 = max(g * group_size - group_offset, 0), min((g + 1) * group_size - group_offset, L)
        pieces.append(sdpa(query2[:, :, r0:r1], key2[:, :, g], value2[:, :, g], scale=scale2))
    return out, torch.cat(pieces, dim=2)


# GPUs: both parts in one Triton launch. CPUs: torch's SDPA per part (the "torch" backend).
BACKENDS = _backends.attention_backends(
    OP, ATTENTION_MAX_HEAD_DIM,
    triton=(_backends.Variant("nothing to launch (an empty shape): the reference's empty "
                              "answer", _reference_attention, when=_empty),
            _backends.Variant("fused kernels: both attentions in one launch, the window and "
                              "bias per tile, no L x S tensor in memory", _triton_attention)),
    torch_backend=_backends.serves(_backends.serves_every_call, _torch_attention,
                                   "scaled_dot_product_attention per part, the window and bias "
                                   "as an additive L x S mask"),
    reference=(_backends.Variant("fastseq.reference.block_recurrent", _reference_attention),))


GATE_OP = "fastseq.ops.block_recurrent_gate"


@shards(block_recurrent_gate_axes)
@autocast_op("block_recurrent_gate")
def block_recurrent_gate(state: Tensor, y: Tensor, *, gate_bias: Optional[Tensor] = None,
                         forget: Optional[Tensor] = None, remember: Optional[Tensor] = None,
                         backend: Optional[str] = None) -> Tensor:
    """The recurrent state's gate, one elementwise pass on Triton. state, y [..., d]; either
    gate_bias [d] (the paper's fixed gate: g = sigmoid(gate_bias), next = state g + y (1 - g))
    or the LSTM gate's pre-activations forget, remember [..., d] (W_f h + b_f, W_i h + b_i:
    next = state sigmoid(forget + 1) + y sigmoid(remember - 1)). Returns the next state."""
    _validate_gate(state, y, gate_bias, forget, remember)
    call = {"device": state.device, "state": state, "y": y, "gate_bias": gate_bias,
            "forget": forget, "remember": remember,
            "needs_grad": needs_grad(state, y, gate_bias, forget, remember)}
    return GATE_BACKENDS.run(call, backend)


def _reference_gate(state, y, gate_bias, forget, remember, **_):
    return _reference.block_recurrent_gate(state, y, gate_bias, forget, remember)


def _triton_gate(state, y, gate_bias, forget, remember, **_):
    return fused("fastseq::block_recurrent_gate_triton")(
        state, y, gate_bias.contiguous() if gate_bias is not None else None, forget, remember)


GATE_BACKENDS = _backends.OpBackends(
    GATE_OP,
    backends={
        "triton": _backends.serves(_backends.triton_refuses, _triton_gate,
                                   "one elementwise launch (forward), one for the backward"),
        "torch": _backends.serves(_backends.serves_every_call, _reference_gate,
                                  "PyTorch's elementwise ops: 4 kernels (fixed gate), 7 (LSTM)"),
        "reference": _backends.serves(_backends.serves_every_call, _reference_gate,
                                      "fastseq.reference.block_recurrent.block_recurrent_gate")},
    preference={"cuda": ("triton", "torch", "reference"), "cpu": ("torch", "reference")})


def _validate_gate(state, y, gate_bias, forget, remember) -> None:
    check_tensor(GATE_OP, "state", state)
    check_tensor(GATE_OP, "y", y)
    if state.dim() < 1:
        fail(GATE_OP, f"state must have a feature dimension [..., d], got shape {list(state.shape)}")
    check_same_dtype_device(GATE_OP, ("state", state), (
        ("y", y), ("gate_bias", gate_bias), ("forget", forget), ("remember", remember)))
    check_shape(GATE_OP, "y", y, tuple(state.shape), "state's shape [..., d]")
    lstm = forget is not None or remember is not None
    if (gate_bias is None) == (not lstm) or (lstm and (forget is None or remember is None)):
        fail(GATE_OP, "give gate_bias (the fixed gate) or both forget and remember (the LSTM "
                      "gate), not both and not neither")
    if gate_bias is not None:
        check_tensor(GATE_OP, "gate_bias", gate_bias, ndims=(1,))
        check_shape(GATE_OP, "gate_bias", gate_bias, (state.shape[-1],), "[d]")
    else:
        check_shape(GATE_OP, "forget", forget, tuple(state.shape), "state's shape [..., d]")
        check_shape(GATE_OP, "remember", remember, tuple(state.shape), "state's shape [..., d]")


def _validate(query, key, value, query2, key2, value2, window, bias, group_size, group_offset,
              scale, scale2) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(OP, name, t, ndims=(4,))
    B, H, L, D = query.shape
    S = key.shape[2]
    check_same_dtype_device(OP, ("query", query), (
        ("key", key), ("value", value), ("query2", query2), ("key2", key2),
        ("value2", value2), ("bias", bias)))
    check_shape(OP, "key", key, (B, H, S, D), "[B, H, S, D]")
    check_shape(OP, "value", value, (B, H, S, value.shape[3]), "[B, H, S, Dv]")
    if S < L:
        fail(OP, f"key length {S} must be >= query length {L} (the last L keys line up with the "
                 f"queries), got key {list(key.shape)}, query {list(query.shape)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        fail(OP, f"window must be None or an int >= 1 (the keys before each row it sees), got "
                 f"{window!r}")
    if bias is not None:
        check_tensor(OP, "bias", bias, ndims=(2,))
        if window is None:
            fail(OP, "bias is read per distance inside the window: give a window with it")
        check_shape(OP, "bias", bias, (H, window + 1), "[H, window + 1]")
    parts = [t is None for t in (query2, key2, value2)]
    if any(parts) and not all(parts):
        fail(OP, "query2, key2 and value2 go together: give all three (part 2) or none")
    for name, number in (("scale", scale), ("scale2", scale2)):
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            fail(OP, f"{name} must be a number, got {type(number).__name__}")
    if query2 is None:
        return
    check_tensor(OP, "query2", query2, ndims=(4,))
    check_tensor(OP, "key2", key2, ndims=(5,))
    check_tensor(OP, "value2", value2, ndims=(5,))
    check_shape(OP, "query2", query2, (B, H, L, D), "[B, H, L, D]")
    G, S2 = key2.shape[2], key2.shape[3]
    check_shape(OP, "key2", key2, (B, H, G, S2, D), "[B, H, G, S2, D]")
    check_shape(OP, "value2", value2, (B, H, G, S2, value.shape[3]), "[B, H, G, S2, Dv]")
    if S2 < 1 and L > 0:
        fail(OP, f"key2 must have at least one key per group, got {list(key2.shape)}")
    if group_size is None:
        if G != 1:
            fail(OP, f"key2 holds {G} groups: give group_size (rows per group) to say which "
                     f"rows read which")
        if group_offset != 0:
            fail(OP, f"group_offset needs a group_size, got group_offset={group_offset!r}")
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        fail(OP, f"group_size must be an int >= 1, got {group_size!r}")
    if (isinstance(group_offset, bool) or not isinstance(group_offset, int)
            or not 0 <= group_offset < group_size):
        fail(OP, f"group_offset must be an int in [0, group_size={group_size}), got "
                 f"{group_offset!r}")
    groups = (group_offset + L - 1) // group_size + 1 if L > 0 else G
    if G != groups:
        fail(OP, f"key2 must hold one group per {group_size} rows: {groups} groups for {L} rows "
                 f"from offset {group_offset}, got {G} ([B, H, G, S2, D] = {list(key2.shape)})")
