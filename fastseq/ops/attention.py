"""Scaled dot-product attention: fastseq.ops.attention, a drop-in for
torch.nn.functional.scaled_dot_product_attention, and fastseq.ops.attention_varlen, FlashAttention's
packed variable-length call.

Same arguments and semantics as SDPA (query [..., Hq, L, E], key [..., Hk, S, E], value
[..., Hk, S, Ev]; a bool mask keeps True entries, a float mask is added to the scores; any mask
shape that broadcasts to [..., Hq, L, S]; causal is torch's top-left alignment; attn_mask may be
one of torch.nn.attention.bias's causal masks, causal_upper_left(L, S) or causal_lower_right(L, S),
the latter run by the same fused kernel with its diagonal shifted, never materialized; enable_gqa
lets Hq be a multiple of Hk), with deliberate differences:
  * a query row with no visible key gives zeros, and zero gradients (torch gives NaN);
  * is_causal and attn_mask may be given together (both apply; torch refuses the pair);
  * return_lse=True also returns the log-sum-exp of each row's scaled, masked scores
    ([..., Hq, L], fp32; fp64 for fp64 inputs; -inf for a row with nothing visible), and a
    gradient flowing into it is honoured.

What it adds, each computed inside the fused forward and backward kernels (nothing L x S in
memory), with FlashAttention's (flash_attn_func / flash_attn_varlen_func) name for it:

| fastseq | FlashAttention | meaning |
|---|---|---|
| `window=(left, right)` | `window_size` | query i sees keys i + shift - left .. i + shift + right (-1/None: unbounded) |
| `AttentionMask(align="bottom_right")` | its only alignment | shift = keys - queries: the last query row meets the last key |
| `softcap=c` | `softcap` | scores become c * tanh(scores / c) before masks and biases |
| `alibi_slopes` [H] or [B, H] | `alibi_slopes` | adds -slope * abs(i + shift - j); fixed (no gradient) |
| `sinks` [H] | (gpt-oss's sinks) | a learned logit per head joins each row's softmax with no value; its gradient flows |
| `AttentionMask(key_start=, key_end=)` | `cache_leftpad`, `seqused_k` | batch row b sees keys key_start[b] <= j < key_end[b] |
| `attention_varlen(..., cu_seqlens_q, cu_seqlens_k)` | `flash_attn_varlen_func` | packed sequences, [T, H, E] |
| `AttentionMask(cu_seqlens_q=, cu_seqlens_k=)` | xFormers' `BlockDiagonalMask` | the same on [1, H, T, E] |

The window, causal and ALiBi share one diagonal: top-left (shift 0, torch's is_causal) unless
the mask says bottom_right (FlashAttention's convention, and causal_lower_right's);
attention_varlen is always bottom-right, as flash_attn_varlen_func. A description
(fastseq.ops.AttentionMask, fastseq/ops/attention_mask.py) says which keys each row sees without
a tensor; tensor masks keep working beside window= and the modifiers. With sinks, lse includes the
sink (it is the log of the softmax's denominator), and a row with nothing visible gives zeros and
lse = its sink. ALiBi slopes are constants: a slope tensor that requires grad is refused.

The Triton backend (auto's choice on CUDA) runs one fused forward kernel and two fused backward
kernels (kernels/attention/kernel.py); its backward is deterministic (no atomics). fp32 inputs use
TF32 tensor-core dots exactly when torch.backends.cuda.matmul.allow_tf32 is set, else exact fp32.
Dropout is drawn from torch's generator (one seed per call), so torch.manual_seed fixes it. The
torch backend materializes what SDPA can express as a mask (a window, key ranges, bottom-right
causal, packed sequences, ALiBi as a float bias) and refuses soft-capping, sinks and return_lse
by name; the reference computes half inputs in fp32 and rounds once (FlashAttention's
attention_ref does the same).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant

from .. import backend as _backends
from ..kernels.limits import (ATTENTION_MAX_HEAD_DIM, DECODE_MAX_QUERY_ROWS, DECODE_MIN_KEYS,
                              accumulator_dtype)
from ..reference import attention as _reference
from . import attention_registration as _registered_ops  # noqa: F401  (registers the ops)
from . import kv_cache_registration as _decode_ops  # noqa: F401  (the split-KV decode op)
from ._autocast import autocast_op
from ._registration import fused
from ._checks import check_mask, check_same_dtype_device, check_tensor, fail, needs_grad
from .attention_mask import AttentionMask, Visibility, materialized, normalize, window_sides
from ._sharding import shards
from ._sharding_rules import attention_axes, attention_varlen_axes

OP = "fastseq.ops.attention"
OP_VARLEN = "fastseq.ops.attention_varlen"


@shards(attention_axes)
@autocast_op("attention")
def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask=None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False, *, window=None, softcap: Optional[float] = None,
              alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
              return_lse: bool = False, backend: Optional[str] = None):
    """softmax(query key^T * scale + mask) value, with dropout on the probabilities.
    Returns out [..., Hq, L, Ev], or (out, lse) with return_lse."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(OP, name, t)  # before a description reads their shapes
    attn_mask, vis = _visibility(attn_mask, is_causal, window, query, key)
    heads_q, heads_k = _validate(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    softcap = _check_extras(query, heads_q, vis, softcap, alibi_slopes, sinks)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    call = {"device": query.device, "query": query, "key": key, "value": value,
            "attn_mask": attn_mask, "dropout_p": dropout_p, "vis": vis, "scale": scale,
            "enable_gqa": enable_gqa, "softcap": softcap, "alibi_slopes": alibi_slopes,
            "sinks": sinks, "heads_q": heads_q, "heads_k": heads_k, "return_lse": return_lse,
            "keys": key.shape[-2], "needs_grad": needs_grad(query, key, value, sinks)}
    return BACKENDS.run(call, backend)


@shards(attention_varlen_axes)
def attention_varlen(query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, max_seqlen_q: Optional[int] = None,
                     max_seqlen_k: Optional[int] = None, *, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: Optional[float] = None, window=None,
                     softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
                     sinks: Optional[Tensor] = None, return_lse: bool = False,
                     backend: Optional[str] = None):
    """Packed variable-length attention, FlashAttention's flash_attn_varlen_func: query
    [Tq, Hq, E], key [Tk, Hk, E], value [Tk, Hk, Ev] hold N sequences one after another,
    sequence b's rows at cu_seqlens_q[b]:cu_seqlens_q[b+1] (keys: cu_seqlens_k), int32 or int64
    [N + 1]; each attends only its own keys. max_seqlen_q/k bound the lengths (a host read
    computes them when None). Hq a multiple of Hk is GQA. As in FlashAttention, causal and the
    window are aligned bottom-right in each sequence (its last query row meets its last key);
    alibi_slopes may be [Hq] or [N, Hq]. Returns out [Tq, Hq, Ev], or (out, lse [Hq, Tq]) with
    return_lse (FlashAttention's layouts). The same kernels as attention with an AttentionMask
    carrying cu_seqlens, on these tensors transposed to [1, H, T, E] (views, no copy)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(OP_VARLEN, name, t, ndims=(3,))
    description = AttentionMask(causal=is_causal, window=window, align="bottom_right",
                                cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    result = attention(query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                       value.transpose(0, 1)[None], description, dropout_p, False, scale,
                       query.shape[1] != key.shape[1], softcap=softcap,
                       alibi_slopes=alibi_slopes, sinks=sinks, return_lse=return_lse,
                       backend=backend)
    if return_lse:
        return result[0][0].transpose(0, 1), result[1][0]
    return result[0].transpose(0, 1)


def _visibility(attn_mask, is_causal, window, query, key):
    """(tensor mask or None, Visibility) of the call's attn_mask (a tensor, one of torch's
    CausalBias masks or an AttentionMask description), is_causal and window."""
    if isinstance(attn_mask, AttentionMask):
        return None, normalize(OP, attn_mask, is_causal, window, query, key)
    if isinstance(attn_mask, CausalBias):
        L, S = query.shape[-2], key.shape[-2]
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (L, S):
            fail(OP, f"attn_mask is a causal bias for {attn_mask.seq_len_q} queries and "
                     f"{attn_mask.seq_len_kv} keys, but query has {L} and key {S}")
        if is_causal:  # torch refuses the pair too
            fail(OP, "attn_mask is a CausalBias: leave is_causal False (the bias sets the "
                     "alignment)")
        left, right = window_sides(OP, window, True)
        return None, Visibility(left, right, attn_mask.variant == CausalVariant.LOWER_RIGHT)
    left, right = window_sides(OP, window, is_causal)
    return attn_mask, Visibility(left, right)


def _check_extras(query, heads_q, vis: Visibility, softcap, alibi_slopes, sinks) -> float:
    """Checks the score modifiers; returns softcap as a float (0: off)."""
    if softcap is not None and (isinstance(softcap, bool)
                                or not isinstance(softcap, (int, float)) or softcap < 0):
        fail(OP, f"softcap must be a number >= 0 (0 or None: off), got {softcap!r}")
    if alibi_slopes is not None:
        check_tensor(OP, "alibi_slopes", alibi_slopes)
        batch = (vis.cu_q.shape[0] - 1 if vis.packed
                 else query.shape[0] if query.dim() == 4 else None)
        shapes = [[heads_q]] + ([[batch, heads_q]] if batch is not None else [])
        if list(alibi_slopes.shape) not in shapes or not alibi_slopes.dtype.is_floating_point:
            fail(OP, f"alibi_slopes must be a float tensor of shape "
                     f"{' or '.join(map(str, shapes))} ([H] or [B, H]; packed: [N, H]), got "
                     f"{alibi_slopes.dtype} "
                     f"with shape {list(alibi_slopes.shape)}")
        if alibi_slopes.device != query.device:
            fail(OP, f"alibi_slopes must be on the query's device {query.device}, got "
                     f"{alibi_slopes.device}")
        if alibi_slopes.requires_grad:
            fail(OP, "alibi_slopes must not require grad: ALiBi's slopes are fixed (as in "
                     "FlashAttention, no gradient flows to them); pass alibi_slopes.detach()")
    if sinks is not None:
        check_tensor(OP, "sinks", sinks)
        if list(sinks.shape) != [heads_q] or not sinks.dtype.is_floating_point:
            fail(OP, f"sinks must be a float tensor of shape [{heads_q}] (one logit per query "
                     f"head), got {sinks.dtype} with shape {list(sinks.shape)}")
        if sinks.device != query.device:
            fail(OP, f"sinks must be on the query's device {query.device}, got {sinks.device}")
    return float(softcap or 0.0)


def _reference_attention(query, key, value, attn_mask, dropout_p, vis, scale, enable_gqa,
                         softcap, alibi_slopes, sinks, return_lse, **_):
    options = dict(dropout_p=dropout_p, scale=scale, window=(vis.left, vis.right),
                   bottom_right=vis.bottom_right, softcap=softcap or None,
                   alibi_slopes=alibi_slopes, sinks=sinks)
    if vis.packed:
        out, lse = _reference.packed_attention(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            vis.cu_q, vis.cu_k, return_lse=True, **options)
        return _with_lse(out.transpose(0, 1)[None], lse[None], return_lse)
    return _reference.scaled_dot_product_attention(
        query, key, value, attn_mask, is_causal=False, enable_gqa=enable_gqa,
        return_lse=return_lse, key_start=_batch_view(vis.key_start, query),
        key_end=_batch_view(vis.key_end, query), **options)


def _batch_view(rows: Optional[Tensor], query: Tensor) -> Optional[Tensor]:
    """Per-batch-row integers [prod(batch dims)] back in the batch dims' shape."""
    return None if rows is None else rows.reshape(query.shape[:-3])


def _empty(call: dict) -> bool:
    """Nothing to launch: no query row, no key or no value column."""
    return call["query"].numel() == 0 or call["keys"] == 0 or call["value"].shape[-1] == 0


def _triton_attention(query, key, value, attn_mask, dropout_p, vis, scale, heads_q, heads_k,
                      softcap, alibi_slopes, sinks, return_lse, **_):
    L, E = query.shape[-2:]
    S, EV = value.shape[-2:]
    q = query.reshape(-1, heads_q, L, E)
    k = key.reshape(-1, heads_k, S, E)
    v = value.reshape(-1, heads_k, S, EV)
    mask = None
    if attn_mask is not None:
        # A view: broadcast dimensions keep stride 0, so a [B, 1, 1, S] padding mask is read in
        # place (a reshape copies only when batch dimensions beyond one cannot be merged).
        mask = attn_mask.expand(*query.shape[:-1], S).reshape(q.shape[0], heads_q, L, S)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=query.device)
    # The kernels read the slopes in their accumulator dtype (fp64 inputs' checks are exact).
    alibi = None if alibi_slopes is None else alibi_slopes.to(accumulator_dtype(query.dtype))
    out, lse = fused("fastseq::attention_forward_triton")(
        q, k, v, mask, seed, vis.cu_q, vis.cu_k, vis.key_start, vis.key_end, alibi, sinks,
        float(dropout_p), vis.bottom_right, vis.left, vis.right, softcap, vis.max_q, vis.max_k,
        scale)
    return _with_lse(out.reshape(*query.shape[:-1], EV), lse.reshape(query.shape[:-1]),
                     return_lse)


def _with_lse(out, lse, return_lse: bool):
    return (out, lse) if return_lse else out


# The Triton backend's sub-choice: a few query rows against many keys (a decode step, or a
# short query in cross-attention) take the split-KV decode kernels (kernels/kv_cache/kernel.py)
# when nothing they lack is needed (a mask, dropout, a backward). The fused forward gives each
# program >= 16 query rows and all S keys, so at L <= 16 it runs B x H programs that each read
# the whole cache; split-KV spreads the keys over the GPU's SMs. Below 256 keys the forward's
# loop is at most 4 key blocks and splitting has nothing to win. Both numbers are predictions
# (no GPU has been lent yet): bench_kv_cache's L = 1/4/16/64 cases at 1k-64k keys measure the
# crossover (bench/NOTES.md). Relative attention follows the same rule.
def split_kv_decode(call: dict) -> bool:
    L = call["query"].shape[-2]
    return (L <= DECODE_MAX_QUERY_ROWS and call["keys"] >= DECODE_MIN_KEYS
            and call["attn_mask"] is None and call["dropout_p"] == 0.0
            and not call["needs_grad"])


def _split_kv_serves(call: dict) -> bool:
    """split_kv_decode, and nothing the decode kernels lack: they take the causal diagonal, a
    window's left side, key ranges aligned bottom-right, soft-capping, ALiBi and sinks, but no
    window reaching right of the diagonal and no packed sequences."""
    vis = call["vis"]
    ranges_ok = vis.key_start is None or vis.bottom_right
    return (split_kv_decode(call) and not vis.packed and vis.right in (-1, 0) and ranges_ok)


def _triton_decode(query, key, value, vis, scale, heads_q, heads_k, softcap, alibi_slopes,
                   sinks, return_lse, **_):
    """The decode kernels on the keys as a cache: row b's cache length is its key end (S, or
    key_end[b]), and query i's diagonal is key i + shift, i.e. i + kv_len + (shift - kv_len)
    (shift 0 top-left, kv_len - L bottom-right); the window's left side w sees keys
    j >= diagonal - w, the kernels' window of w + 1 positions."""
    L, E = query.shape[-2:]
    S, EV = value.shape[-2:]
    q = query.reshape(-1, heads_q, L, E)
    k = key.reshape(-1, heads_k, S, E)
    v = value.reshape(-1, heads_k, S, EV)
    kv_len = (vis.key_end if vis.key_end is not None
              else torch.full((q.shape[0],), S, dtype=torch.int32, device=query.device))
    causal_offset = -L if vis.bottom_right else -S
    acc = accumulator_dtype(query.dtype)
    alibi = None if alibi_slopes is None else alibi_slopes.to(acc)
    sink_logits = None if sinks is None else sinks.to(acc)
    out, lse = torch.ops.fastseq.attention_decode_triton(
        q, k, v, kv_len, vis.right == 0, causal_offset, vis.left + 1 if vis.left >= 0 else 0,
        scale, vis.key_start, None, None, alibi, sink_logits, None, None, None, softcap)
    return _with_lse(out.reshape(*query.shape[:-1], EV), lse.reshape(query.shape[:-1]),
                     return_lse)


def _torch_attention(query, key, value, attn_mask, dropout_p, vis, scale, enable_gqa,
                     alibi_slopes, **_):
    """torch's SDPA with what fastseq describes (a window, key ranges, bottom-right causal,
    packed sequences, ALiBi) materialized as the [.., L, S] mask torch's kernels need."""
    L, S = query.shape[-2], key.shape[-2]
    is_causal = False
    if vis.plain and vis.right == 0 and not vis.bottom_right and attn_mask is None \
            and alibi_slopes is None:
        is_causal = True  # torch's own causal kernels (top-left, as fastseq's default)
    elif not vis.unrestricted or alibi_slopes is not None:
        seen, distance = materialized(vis, L, S, query.device)
        seen = seen.reshape(*query.shape[:-3], 1, L, S) if seen.shape[0] > 1 else seen
        if alibi_slopes is not None:
            slopes = alibi_slopes.to(query.dtype)
            bias = -slopes[..., None, None] * distance.reshape(seen.shape).abs().to(query.dtype)
            bias = bias.masked_fill(~seen, float("-inf"))
            attn_mask = bias if attn_mask is None else _combine(attn_mask, bias)
        else:
            attn_mask = seen if attn_mask is None else _combine(attn_mask, seen)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if attn_mask is not None:
        # fastseq's rule for rows with no visible key (torch gives NaN on some backends).
        visible = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
        out = torch.where(visible.any(-1, keepdim=True), out, out.new_zeros(()))
    return out


def _combine(mask: Tensor, extra: Tensor) -> Tensor:
    """A caller's tensor mask and a materialized description (bool visible or float bias)."""
    if mask.dtype == torch.bool and extra.dtype == torch.bool:
        return mask & extra
    dtype = extra.dtype if extra.is_floating_point() else mask.dtype

    def as_bias(m: Tensor) -> Tensor:  # bool True (visible) -> 0, False -> -inf
        if m.is_floating_point():
            return m
        return torch.zeros((), dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    return as_bias(mask) + as_bias(extra)


# Why torch's backend cannot serve return_lse=True (relative attention's too).
NO_LSE = "torch's scaled_dot_product_attention does not return the log-sum-exp"


def _torch_unavailable(call: dict) -> Optional[str]:
    if call["return_lse"]:
        return NO_LSE
    if call["softcap"]:
        return "torch's scaled_dot_product_attention has no soft-capping (softcap)"
    if call["sinks"] is not None:
        return "torch's scaled_dot_product_attention has no attention sinks (sinks)"
    if call["vis"].packed and call["alibi_slopes"] is not None \
            and call["alibi_slopes"].dim() == 2:
        return "per-sequence ALiBi slopes [N, H] of packed sequences (fastseq's own kernels)"
    return None


# GPUs: the fused Triton kernels. CPUs: torch's SDPA (its CPU flash kernel); the Triton
# interpreter is never chosen automatically there.
BACKENDS = _backends.attention_backends(
    OP, ATTENTION_MAX_HEAD_DIM,
    triton=(_backends.Variant("nothing to launch (an empty shape): the reference's empty or "
                              "zero answer", _reference_attention, when=_empty),
            _backends.Variant(lambda call: (
                f"split-KV decode kernels ({call['query'].shape[-2]} query rows <= "
                f"{DECODE_MAX_QUERY_ROWS} against {call['keys']} keys >= {DECODE_MIN_KEYS}, "
                f"no mask tensor, dropout or backward)"), _triton_decode,
                when=_split_kv_serves),
            _backends.Variant("one fused forward kernel (online softmax), two fused backward "
                              "kernels (dK/dV, dQ)", _triton_attention)),
    torch_backend=_backends.serves(_torch_unavailable, _torch_attention,
                                   "torch.nn.functional.scaled_dot_product_attention"),
    reference=(_backends.Variant("fastseq.reference.scaled_dot_product_attention",
                                 _reference_attention),))


def _validate(query, key, value, attn_mask, dropout_p, scale, enable_gqa) -> tuple[int, int]:
    """Checks every argument; returns (query heads, key/value heads)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(OP, name, t)
        if t.dim() < 2:
            fail(OP, f"{name} must have at least 2 dims [..., length, head dim], "
                     f"got shape {list(t.shape)}")
    check_same_dtype_device(OP, ("query", query), (("key", key), ("value", value)))
    if not (query.dim() == key.dim() == value.dim()):
        fail(OP, f"query, key and value must have the same number of dims, got shapes "
                 f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
    if key.shape[-1] != query.shape[-1]:
        fail(OP, f"key must have the query's head dim {query.shape[-1]} in its last dim, "
                 f"got shape {list(key.shape)}")
    if value.shape[-2] != key.shape[-2]:
        fail(OP, f"value must have as many positions as key ({key.shape[-2]}) in dim -2, "
                 f"got shape {list(value.shape)}")
    heads_q = query.shape[-3] if query.dim() >= 3 else 1
    heads_k = key.shape[-3] if key.dim() >= 3 else 1
    if query.dim() >= 3:
        if value.shape[-3] != heads_k:
            fail(OP, f"value must have key's {heads_k} heads in dim -3, got shape "
                     f"{list(value.shape)}")
        if heads_q != heads_k and not (enable_gqa and heads_k > 0 and heads_q % heads_k == 0):
            want = ("a multiple of key's heads" if enable_gqa
                    else "key's heads (or pass enable_gqa=True)")
            fail(OP, f"query's heads (dim -3) must be {want}: query {list(query.shape)}, "
                     f"key {list(key.shape)}")
        lead = query.shape[:-3]
        if key.shape[:-3] != lead or value.shape[:-3] != lead:
            fail(OP, f"query, key and value must have the same batch dims before the heads, got "
                     f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
    if attn_mask is not None:
        check_mask(OP, attn_mask, query, (*query.shape[:-1], key.shape[-2]), "[..., Hq, L, S]")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        fail(OP, f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        fail(OP, f"scale must be a number or None, got {type(scale).__name__}")
    return heads_q, heads_k
