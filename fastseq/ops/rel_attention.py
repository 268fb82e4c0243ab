"""Transformer-XL relative-position attention: fastseq.ops.rel_attention.

The math is fastseq.reference.rel_attention's (Dai et al. 2019, with memory, clamped positions,
a window and a bidirectional offset):

    score[i, j] = ((q_i + content_bias) . k_j + (q_i + position_bias) . pos[row(i, j)]) * scale

with M = Lk - Lq memory keys first, distance d = M + i - j, row = clamp(d + pos_offset, 0,
P - 1); key j is visible to query i iff d >= 0 (is_causal), d < window (when given; the
original's same_length is window = mem_len) and attn_mask allows it (bool: True = visible;
float: added to the scores). A row with nothing visible gives zeros. Dropout acts on the
probabilities (one seed drawn from torch's generator per call, as fastseq.ops.attention).

The Triton backend (auto's choice on CUDA) computes the position term inside each tile: one
GEMM against the band of pos rows the tile's distances need, then a gather along the diagonals,
so neither the Lq x Lk position term nor the original's padded shift ever exists in memory. Its
backward is deterministic (no atomics; d(pos) summed per block diagonal, then folded onto the
rows in torch). On CPU, auto uses plain PyTorch at the original code's cost (the torch
backend); the reference backend is the readable definition.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backends
from ..kernels.limits import REL_ATTENTION_MAX_HEAD_DIM
from ..reference import rel_attention as _reference
from . import rel_attention_registration as _registered_ops  # noqa: F401  (registers the ops)
from ._autocast import autocast_op
from ._registration import fused
from .attention import NO_LSE, split_kv_decode
from ._checks import (check_mask, check_same_dtype_device, check_shape, check_tensor, fail,
                      needs_grad)
from ._sharding import shards
from ._sharding_rules import rel_attention_axes

OP = "fastseq.ops.rel_attention"


@shards(rel_attention_axes)
@autocast_op("rel_attention")
def rel_attention(query: Tensor, key: Tensor, value: Tensor, pos: Tensor, content_bias: Tensor,
                  position_bias: Tensor, *, attn_mask: Optional[Tensor] = None,
                  is_causal: bool = True, window: Optional[int] = None, pos_offset: int = 0,
                  dropout_p: float = 0.0, scale: Optional[float] = None,
                  return_lse: bool = False, backend: Optional[str] = None):
    """query [B, H, Lq, D]; key [B, H, Lk, D] and value [B, H, Lk, Dv] with Lk >= Lq (the first
    Lk - Lq positions are the memory); pos [P, H, D] (row r: the projected embedding of
    distance r - pos_offset); content_bias and position_bias [H, D]. Returns out
    [B, H, Lq, Dv], or (out, lse [B, H, Lq]) with return_lse."""
    _validate(query, key, value, pos, content_bias, position_bias, attn_mask, is_causal, window,
              pos_offset, dropout_p, scale)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    call = {"device": query.device, "query": query, "key": key, "value": value, "pos": pos,
            "content_bias": content_bias, "position_bias": position_bias,
            "attn_mask": attn_mask, "is_causal": is_causal, "window": window,
            "pos_offset": pos_offset, "dropout_p": dropout_p, "scale": scale,
            "return_lse": return_lse, "keys": key.shape[-2],
            "needs_grad": needs_grad(query, key, value, pos, content_bias, position_bias)}
    return BACKENDS.run(call, backend)


def _reference_rel_attention(query, key, value, pos, content_bias, position_bias, attn_mask,
                             is_causal, window, pos_offset, dropout_p, scale, return_lse, **_):
    return _reference.rel_attention(
        query, key, value, pos, content_bias, position_bias, attn_mask=attn_mask,
        is_causal=is_causal, window=window, pos_offset=pos_offset, dropout_p=dropout_p,
        scale=scale, return_lse=return_lse)


def _empty(call: dict) -> bool:
    """Nothing to launch: no query row or no value column."""
    return call["query"].numel() == 0 or call["value"].shape[-1] == 0


def _triton_decode(query, key, value, pos, content_bias, position_bias, is_causal, window,
                   pos_offset, scale, return_lse, **_):
    """The split-KV decode kernel (attention's rule: a few rows against many keys, forward
    only)."""
    out, lse = torch.ops.fastseq.rel_attention_decode_triton(
        query + content_bias[:, None, :], query + position_bias[:, None, :], key, value, pos,
        bool(is_causal), None if window is None else int(window), int(pos_offset), scale)
    return (out, lse) if return_lse else out


def _triton_rel_attention(query, key, value, pos, content_bias, position_bias, attn_mask,
                          is_causal, window, pos_offset, dropout_p, scale, return_lse, **_):
    B, H, L, _ = query.shape
    mask = None
    if attn_mask is not None:
        # A view: broadcast dimensions keep stride 0 (a [B, 1, 1, Lk] padding mask is read as
        # one row of keys).
        mask = attn_mask.expand(B, H, L, key.shape[-2])
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=query.device)
    out, lse = fused("fastseq::rel_attention_forward_triton")(
        query + content_bias[:, None, :], query + position_bias[:, None, :], key, value, pos,
        mask, seed, float(dropout_p), bool(is_causal), None if window is None else int(window),
        int(pos_offset), scale)
    return (out, lse) if return_lse else out


def _torch_rel_attention(query, key, value, pos, content_bias, position_bias, attn_mask,
                         is_causal, window, pos_offset, dropout_p, scale, **_):
    """torch's own attention kernel (F.scaled_dot_product_attention on q + u) with the position
    term as its additive mask: (q_i + v) . pos[row(i, j)] * scale from one GEMM against every
    pos row and a gather (an Lq x Lk tensor in memory, as the original code's BD is), the
    causal rule, window and attn_mask folded in as -inf. Rows with no visible key give zeros
    (fastseq's rule; SDPA gives NaN there)."""
    L, S, P = query.shape[-2], key.shape[-2], pos.shape[0]
    distance, row = _reference.relative_rows(L, S, P, pos_offset, query.device)
    every_row = (query + position_bias[:, None, :]) @ pos.permute(1, 2, 0)  # [B, H, Lq, P]
    bias = every_row.gather(-1, row.expand(*every_row.shape[:-1], S)) * scale
    hidden = torch.zeros_like(distance, dtype=torch.bool)
    if is_causal:
        hidden |= distance < 0
    if window is not None:
        hidden |= distance >= window
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            hidden = hidden | ~attn_mask
        else:
            bias = bias + attn_mask.to(bias.dtype)
    bias = bias.masked_fill(hidden, float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(
        query + content_bias[:, None, :], key, value, attn_mask=bias, dropout_p=dropout_p,
        scale=scale)
    visible = (bias != float("-inf")).any(-1, keepdim=True)
    return torch.where(visible, out, out.new_zeros(()))


# GPUs: the fused Triton kernels (the position term inside each tile). CPUs: torch's SDPA with
# the position term as its mask (the "torch" backend, as the original code's cost: Lq x Lk).
BACKENDS = _backends.attention_backends(
    OP, REL_ATTENTION_MAX_HEAD_DIM,
    triton=(_backends.Variant("nothing to launch (an empty shape): the reference's empty "
                              "answer", _reference_rel_attention, when=_empty),
            _backends.Variant("split-KV decode kernel: key ranges across programs, the position "
                              "term from each key block's band of pos rows", _triton_decode,
                              when=split_kv_decode),
            _backends.Variant("fused kernels: content and position terms per tile, no Lq x Lk "
                              "tensor in memory", _triton_rel_attention)),
    torch_backend=_backends.serves(lambda call: NO_LSE if call["return_lse"] else None,
                                   _torch_rel_attention, "scaled_dot_product_attention, the "
                                   "position term as its additive mask"),
    reference=(_backends.Variant("fastseq.reference.rel_attention",
                                 _reference_rel_attention),))


def _validate(query, key, value, pos, content_bias, position_bias, attn_mask, is_causal,
              window, pos_offset, dropout_p, scale) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(OP, name, t, ndims=(4,))
    check_tensor(OP, "pos", pos, ndims=(3,))
    check_tensor(OP, "content_bias", content_bias, ndims=(2,))
    check_tensor(OP, "position_bias", position_bias, ndims=(2,))
    check_same_dtype_device(OP, ("query", query), (
        ("key", key), ("value", value), ("pos", pos), ("content_bias", content_bias),
        ("position_bias", position_bias)))
    B, H, L, D = query.shape
    S = key.shape[2]
    check_shape(OP, "key", key, (B, H, S, D), "[B, H, Lk, D]")
    check_shape(OP, "value", value, (B, H, S, value.shape[3]), "[B, H, Lk, Dv]")
    if S < L:
        fail(OP, f"key length {S} must be >= query length {L} (the memory comes first: "
                 f"Lk = memory + Lq), got key {list(key.shape)}, query {list(query.shape)}")
    if pos.shape[0] < 1:
        fail(OP, f"pos must have at least one row [P >= 1, H, D], got {list(pos.shape)}")
    check_shape(OP, "pos", pos, (pos.shape[0], H, D), "[P, H, D]")
    check_shape(OP, "content_bias", content_bias, (H, D), "[H, D]")
    check_shape(OP, "position_bias", position_bias, (H, D), "[H, D]")
    if attn_mask is not None:
        check_mask(OP, attn_mask, query, (B, H, L, S), "[B, H, Lq, Lk]")
    if not isinstance(is_causal, bool):
        fail(OP, f"is_causal must be a bool, got {is_causal!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        fail(OP, f"window must be None or an int >= 1 (keys at distance < window are visible), "
                 f"got {window!r}")
    if isinstance(pos_offset, bool) or not isinstance(pos_offset, int) or pos_offset < 0:
        fail(OP, f"pos_offset must be an int >= 0, got {pos_offset!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        fail(OP, f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        fail(OP, f"scale must be a number or None, got {type(scale).__name__}")
