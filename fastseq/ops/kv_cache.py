"""Attention against a preallocated key/value cache: fastseq.ops.attention_with_kv_cache, the
decode step of a generating decoder (in the spirit of flash-attention's with-KV-cache call).

    out = attention_with_kv_cache(query, k_cache, v_cache, cache_seqlens, key, value)

query [B, Hq, Lq, E]; k_cache [B, Hk, S_max, E] and v_cache [B, Hk, S_max, EV], preallocated
(any strides: a slice of a bigger buffer works); cache_seqlens [B] integer tensor on the caches'
device (or one int for every row): how many positions of each row's cache are filled before
this call (ragged batches: rows differ). key/value [B, Hk, Lnew, E|EV] (optional): written into
the caches in place at positions cache_seqlens[b] .. + Lnew - 1, then attended with the rest.
cache_seqlens itself is not changed (fastseq.nn.KVCache keeps it for you).

Each query row attends its row's first kv_len = cache_seqlens[b] + Lnew keys. is_causal (the
default): the query rows are the last Lq positions of that sequence, query i sees keys
j <= kv_len - Lq + i (a one-token step sees everything; several new rows are causal among
themselves). window=w > 0: each query row sees only its last w positions (sliding-window
attention; w counts the row itself). GQA/MQA: Hq a multiple of Hk. A row with nothing visible
gives zeros. return_lse=True also returns each row's log-sum-exp [B, Hq, Lq] (fp32).

FlashAttention's flash_attn_with_kvcache extras, all on the split-KV kernels (the new rows'
rotation in the append kernel and the query's as it is loaded, nothing materialized):

| argument | meaning |
|---|---|
| `cache_leftpad` [B] | row b's keys before cache_leftpad[b] are padding (left-padded prompts) |
| `cache_batch_idx` [B] | batch row b uses cache row cache_batch_idx[b] of a larger cache |
| `block_table` [rows, pages per row] | paged cache: k_cache/v_cache are a pool [pages, Hk, page_size, E], any page size, pages in any order; position j of a row lives in page block_table[row, j // page_size] |
| `rotary_cos`, `rotary_sin` [positions, R / 2], `rotary_interleaved` | the new keys are rotated at cache_seqlens[b] + i before they are written; query rows there too when causal or windowed, else all at cache_seqlens[b]; half-split (GPT-NeoX) or interleaved (GPT-J) pairs of the first R dims |
| `softcap`, `alibi_slopes` [Hq] or [B, Hq], `sinks` [Hq] | as fastseq.ops.attention (the query row's position in the cache is ALiBi's diagonal) |

Out-of-range indices (batch index, pages, left padding, rotary positions) are InputErrors on the
host where that costs no sync (CPU tensors), device-side asserts on CUDA; the kernels clamp, so
nothing is read or written outside the tensors either way. The torch backend serves left padding
(as a mask) and refuses the other extras by name.

Forward only: inputs that require grad are refused (train with fastseq.ops.attention). No host
synchronisation and no shape-dependent Python per step, so a step captures in a CUDA graph.
Cache overflow (cache_seqlens[b] + Lnew > S_max) is an InputError before anything is written
where it can be checked without a sync (CPU tensors, an int); for CUDA lengths it is a
device-side assert (torch._assert_async, the mechanism torch's own index checks use), and the
kernels never write or read outside the cache either way. fastseq.nn.KVCache tracks an upper
bound of its lengths on the host and refuses an overflowing step with an InputError first.

Under torch.autocast the step runs in the caches' dtype (query and new rows are cast to it; the
caches cannot be, being written in place).

Backends: triton (split-KV "flash-decoding": the keys are split into ranges across programs
and their partial softmaxes combined; kernels/kv_cache/kernel.py), torch (scatter_ and
torch's scaled_dot_product_attention with the visibility as a mask), reference (row by row,
float64-checkable).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import backend as _backends
from ..kernels.limits import ATTENTION_MAX_HEAD_DIM, accumulator_dtype
from ..reference import kv_cache as _reference
from . import kv_cache_registration as _registered_ops  # noqa: F401  (registers the ops)
from ._autocast import _AUTOCAST_DEVICES
from ._checks import check_same_dtype_device, check_tensor, fail
from .attention import NO_LSE
from ._sharding import shards
from ._sharding_rules import kv_cache_axes

OP = "fastseq.ops.attention_with_kv_cache"


@shards(kv_cache_axes)
def attention_with_kv_cache(query: Tensor, k_cache: Tensor, v_cache: Tensor,
                            cache_seqlens: Union[Tensor, int], key: Optional[Tensor] = None,
                            value: Optional[Tensor] = None, *, is_causal: bool = True,
                            window: Optional[int] = None, scale: Optional[float] = None,
                            cache_leftpad: Optional[Tensor] = None,
                            cache_batch_idx: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None,
                            rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None,
                            rotary_interleaved: bool = False, softcap: Optional[float] = None,
                            alibi_slopes: Optional[Tensor] = None,
                            sinks: Optional[Tensor] = None, return_lse: bool = False,
                            backend: Optional[str] = None):
    """softmax(query k^T * scale) v over each row's filled cache (after appending key/value).
    Returns out [B, Hq, Lq, EV], or (out, lse) with return_lse."""
    query, key, value = _in_the_caches_dtype(query, key, value, k_cache)
    step = _validate_step_extras(query, k_cache, v_cache, key, cache_leftpad, cache_batch_idx,
                                 block_table, rotary_cos, rotary_sin, rotary_interleaved,
                                 softcap, alibi_slopes, sinks)
    _validate(query, k_cache, v_cache, key, value, window, step)
    new = 0 if key is None else key.shape[2]
    lengths = _lengths(cache_seqlens, query.shape[0], k_cache.device)
    _check_capacity(lengths, new, step["capacity"])
    _check_step_indices(lengths, new, query.shape[2], step)
    window = int(window or 0)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    # "value" is what the attention families' head-dim refusal reads (here the cache's); the
    # step's new value rows are "new_value".
    call = {"device": query.device, "query": query, "k_cache": k_cache, "v_cache": v_cache,
            "value": v_cache, "lengths": lengths, "key": key, "new_value": value,
            "is_causal": is_causal, "window": window, "scale": scale, "return_lse": return_lse,
            "step": step}
    out, lse = BACKENDS.run(call, backend)
    return (out, lse) if return_lse else out


# The step's extras (FlashAttention's flash_attn_with_kvcache names) that torch's kernels have no
# way to express beside a plain contiguous cache.
STEP_EXTRAS = ("cache_batch_idx", "block_table", "rotary_cos", "softcap", "alibi_slopes",
               "sinks")


def _int_vector(name: str, value, batch: int, device) -> Optional[Tensor]:
    if value is None:
        return None
    check_tensor(OP, name, value)
    if value.dtype not in (torch.int32, torch.int64) or tuple(value.shape) != (batch,):
        fail(OP, f"{name} must be an int32 or int64 tensor of shape [{batch}] (one entry per "
                 f"batch row), got {value.dtype} of shape {list(value.shape)}")
    if value.device != device:
        fail(OP, f"{name} must be on the caches' device {device}, got {value.device}")
    return value.to(torch.int32)


def _validate_step_extras(query, k_cache, v_cache, key, cache_leftpad, cache_batch_idx,
                          block_table, rotary_cos, rotary_sin, rotary_interleaved, softcap,
                          alibi_slopes, sinks) -> dict:
    """Checks the step's extras; returns them normalized (int32 indices, fp32 tables) with the
    cache's rows and per-row capacity."""
    for name, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(OP, name, t, ndims=(4,))
    B, HQ = query.shape[0], query.shape[1]
    device = k_cache.device
    step = {"key_start": _int_vector("cache_leftpad", cache_leftpad, B, device),
            "batch_index": _int_vector("cache_batch_idx", cache_batch_idx, B, device),
            "block_table": None, "rows": k_cache.shape[0], "capacity": k_cache.shape[2],
            "softcap": 0.0, "alibi": None, "sinks": None, "cos": None, "sin": None,
            "interleaved": bool(rotary_interleaved)}
    if block_table is not None:
        check_tensor(OP, "block_table", block_table, ndims=(2,))
        if block_table.dtype not in (torch.int32, torch.int64) or block_table.device != device:
            fail(OP, f"block_table must be an int32 or int64 tensor [rows, pages per row] on "
                     f"the caches' device {device}, got {block_table.dtype} on "
                     f"{block_table.device}")
        step.update(block_table=block_table.to(torch.int32), rows=block_table.shape[0],
                    capacity=block_table.shape[1] * k_cache.shape[2], pages=k_cache.shape[0])
    rows = step["rows"]
    if step["batch_index"] is None and rows != B:
        fail(OP, f"{'block_table' if block_table is not None else 'k_cache'} has {rows} rows "
                 f"but query has {B}: pass cache_batch_idx to say which row each batch row "
                 f"uses")
    if softcap is not None and (isinstance(softcap, bool)
                                or not isinstance(softcap, (int, float)) or softcap < 0):
        fail(OP, f"softcap must be a number >= 0 (0 or None: off), got {softcap!r}")
    step["softcap"] = float(softcap or 0.0)
    if alibi_slopes is not None:
        check_tensor(OP, "alibi_slopes", alibi_slopes)
        if list(alibi_slopes.shape) not in ([HQ], [B, HQ]) \
                or not alibi_slopes.dtype.is_floating_point or alibi_slopes.device != device:
            fail(OP, f"alibi_slopes must be a float tensor [{HQ}] or [{B}, {HQ}] on {device}, "
                     f"got {alibi_slopes.dtype} {list(alibi_slopes.shape)} on "
                     f"{alibi_slopes.device}")
        step["alibi"] = alibi_slopes.to(accumulator_dtype(query.dtype))
    if sinks is not None:
        check_tensor(OP, "sinks", sinks)
        if list(sinks.shape) != [HQ] or not sinks.dtype.is_floating_point \
                or sinks.device != device:
            fail(OP, f"sinks must be a float tensor [{HQ}] (one logit per query head) on "
                     f"{device}, got {sinks.dtype} {list(sinks.shape)} on {sinks.device}")
        step["sinks"] = sinks.to(accumulator_dtype(query.dtype))
    if (rotary_cos is None) != (rotary_sin is None):
        fail(OP, "rotary_cos and rotary_sin go together: pass both tables or neither")
    if rotary_cos is not None:
        E = query.shape[3]
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            check_tensor(OP, name, t, ndims=(2,))
            if not t.dtype.is_floating_point or t.device != device:
                fail(OP, f"{name} must be a float tensor on {device}, got {t.dtype} on "
                         f"{t.device}")
        if rotary_sin.shape != rotary_cos.shape or not 0 < 2 * rotary_cos.shape[1] <= E:
            fail(OP, f"rotary_cos and rotary_sin must both be [positions, rotary_dim / 2] with "
                     f"rotary_dim <= the head dim {E}, got {list(rotary_cos.shape)} and "
                     f"{list(rotary_sin.shape)}")
        if key is None:
            fail(OP, "rotary_cos/rotary_sin rotate the step's new rows: pass key and value "
                     "(as FlashAttention, rotary applies only when new rows are appended)")
        tables = accumulator_dtype(query.dtype)  # the kernels' dtype: fp64 checks stay exact
        step.update(cos=rotary_cos.to(tables), sin=rotary_sin.to(tables))
    return step


def _check_step_indices(lengths: Tensor, new: int, queries: int, step: dict) -> None:
    """Batch indices, pages, left padding and rotary positions in range: on the host where
    that costs no sync, else as a device-side assert (the kernels clamp either way, so nothing
    is read or written outside the tensors)."""
    checks = []
    if step["batch_index"] is not None:
        index = step["batch_index"]
        checks.append((((index >= 0) & (index < step["rows"])).all(),
                       f"cache_batch_idx must lie in [0, {step['rows']}) (the cache's rows)"))
    if step["block_table"] is not None:
        table = step["block_table"]
        checks.append((((table >= 0) & (table < step["pages"])).all(),
                       f"block_table entries must lie in [0, {step['pages']}) (the pool's "
                       f"pages)"))
    if step["key_start"] is not None:
        start = step["key_start"]
        checks.append((((start >= 0) & (start <= lengths)).all(),
                       "cache_leftpad must lie in [0, cache_seqlens[b]] for every row"))
    if step["cos"] is not None:
        last = lengths + max(new, queries) - 1
        checks.append(((last < step["cos"].shape[0]).all(),
                       f"rotary positions (cache_seqlens[b] + the new rows) must be below the "
                       f"tables' {step['cos'].shape[0]} rows"))
    for ok, message in checks:
        if lengths.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(ok):
                fail(OP, message)
        else:
            torch._assert_async(ok, f"{OP}: {message}")


def _empty_step(query, k_cache, v_cache, lengths, key, new_value, **_):
    """Nothing to attend with or to return (an empty batch, no query rows, EV = 0): the new
    rows still go into the caches."""
    if key is not None and key.numel():
        _reference.append(k_cache, v_cache, key, new_value, lengths)
    return _reference.empty_result(query, v_cache)


def _empty(call: dict) -> bool:
    return call["query"].numel() == 0 or call["v_cache"].shape[3] == 0


_EMPTY = _backends.Variant("nothing to attend (an empty shape): the new rows appended, an empty "
                           "result", _empty_step, when=_empty)


def _reference_step(query, k_cache, v_cache, lengths, key, new_value, is_causal, window, scale,
                    step, **_):
    return _reference.attention_with_kv_cache(
        query, k_cache, v_cache, lengths, key, new_value, is_causal=is_causal, window=window,
        scale=scale, cache_leftpad=step["key_start"], cache_batch_idx=step["batch_index"],
        block_table=step["block_table"], rotary_cos=step["cos"], rotary_sin=step["sin"],
        rotary_interleaved=step["interleaved"], softcap=step["softcap"] or None,
        alibi_slopes=step["alibi"], sinks=step["sinks"])


def _triton_step(query, k_cache, v_cache, lengths, key, new_value, is_causal, window, scale,
                 step, **_):
    new = 0 if key is None else key.shape[2]
    if key is not None:
        torch.ops.fastseq.kv_cache_append_triton(
            k_cache, v_cache, key, new_value, lengths, step["batch_index"], step["block_table"],
            step["cos"], step["sin"], step["interleaved"])
    return torch.ops.fastseq.attention_decode_triton(
        query, k_cache, v_cache, lengths + new if new else lengths, is_causal, -query.shape[2],
        window, scale, step["key_start"], step["batch_index"], step["block_table"],
        step["alibi"], step["sinks"], lengths if step["cos"] is not None else None,
        step["cos"], step["sin"], step["softcap"], step["interleaved"])


def _in_the_caches_dtype(query, key, value, k_cache):
    """Under torch.autocast the step runs in the caches' dtype: they are written in place, so
    they cannot be cast (a cast would write a copy), and a model under autocast allocates its
    caches in the autocast dtype. Outside autocast the dtypes must match (checked)."""
    device = getattr(k_cache, "device", None)
    if (device is None or device.type not in _AUTOCAST_DEVICES
            or not torch.is_autocast_enabled(device.type)):
        return query, key, value
    return [t.to(k_cache.dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
            for t in (query, key, value)]


def _lengths(cache_seqlens, batch: int, device: torch.device) -> Tensor:
    """cache_seqlens as the kernels take it: int32 [B] on the caches' device (a copy only when
    it is on another device or of another integer dtype)."""
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, Tensor)):
        fail(OP, f"cache_seqlens must be an integer tensor [B] or an int, got "
                 f"{type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, int):
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or cache_seqlens.shape != (batch,):
        fail(OP, f"cache_seqlens must be an int32 or int64 tensor of shape [{batch}] (one "
                 f"length per batch row), got {cache_seqlens.dtype} of shape "
                 f"{list(cache_seqlens.shape)}")
    return cache_seqlens.to(device=device, dtype=torch.int32)


def _check_capacity(lengths: Tensor, new: int, capacity: int) -> None:
    """0 <= cache_seqlens and cache_seqlens + Lnew <= S_max: checked on the host where that
    costs no sync, else as a device-side assert (also under torch.compile, where a host check
    would be a data-dependent branch)."""
    fits = ((lengths >= 0) & (lengths + new <= capacity)).all()
    message = (f"{OP}: cache overflow: every cache_seqlens[b] must be >= 0 and leave room for "
               f"the {new} new positions in the caches' {capacity}")
    if lengths.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(fits):
            fail(OP, message.removeprefix(f"{OP}: ") + f" (cache_seqlens = {lengths.tolist()})")
    else:
        torch._assert_async(fits, message)


def _torch_refuses(call: dict) -> Optional[str]:
    if call["return_lse"]:
        return NO_LSE
    step = call["step"]
    named = {"cache_batch_idx": step["batch_index"] is not None,
             "block_table": step["block_table"] is not None, "rotary_cos": step["cos"] is not None,
             "softcap": step["softcap"] > 0, "alibi_slopes": step["alibi"] is not None,
             "sinks": step["sinks"] is not None}
    wanted = [name for name, given in named.items() if given]
    if wanted:
        return (f"torch's step (scatter_ and SDPA over a contiguous cache) has no "
                f"{', '.join(wanted)}")
    return None


def _torch_step(query, k_cache, v_cache, lengths, key, new_value, is_causal, window, scale,
                step, **_):
    return _torch_decode(query, k_cache, v_cache, lengths, key, new_value, is_causal, window,
                         scale, step["key_start"]), None


def _torch_decode(query, k_cache, v_cache, lengths, key, value, is_causal, window, scale,
                  key_start=None):
    """torch's own kernels: scatter_ writes the new rows in place, SDPA attends the whole
    capacity with the visibility as a [B, 1, Lq, S_max] bool mask."""
    new = 0 if key is None else key.shape[2]
    if new:
        positions = (lengths.long()[:, None] + torch.arange(new, device=key.device))
        for cache, rows in ((k_cache, key), (v_cache, value)):
            index = positions[:, None, :, None].expand(-1, rows.shape[1], -1, rows.shape[3])
            cache.scatter_(2, index, rows)
    kv_len = lengths + new
    gqa = query.shape[1] != k_cache.shape[1]
    if kv_len.device.type == "cpu" and not torch.compiler.is_compiling():
        # On a CPU the lengths are host values already: attend only the filled prefix, and
        # with no mask at all where every row is full and one query row needs none (measured
        # at B=2, S=2048, D=64 fp32: the whole-capacity masked call took 1.58x SDPA's time).
        filled = int(kv_len.max()) if kv_len.numel() else 0
        k_cache, v_cache = k_cache[:, :, :filled], v_cache[:, :, :filled]
        if query.shape[2] == 1 and window == 0 and key_start is None \
                and bool((kv_len == filled).all()):
            return torch.nn.functional.scaled_dot_product_attention(
                query, k_cache, v_cache, scale=scale, enable_gqa=gqa)
    seen = _reference.visible_keys(kv_len[:, None, None, None], query.shape[2], k_cache.shape[2],
                                   is_causal, window, query.device)
    if key_start is not None:  # left padding
        seen = seen & (torch.arange(k_cache.shape[2], device=query.device)
                       >= key_start.long()[:, None, None, None])
    out = torch.nn.functional.scaled_dot_product_attention(
        query, k_cache, v_cache, seen, scale=scale, enable_gqa=gqa)
    return torch.where(seen.any(-1, keepdim=True), out, out.new_zeros(()))


def _validate(query, k_cache, v_cache, key, value, window, step) -> None:
    names = (("query", query), ("k_cache", k_cache), ("v_cache", v_cache))
    for name, t in names + (("key", key), ("value", value)):
        if t is None:
            continue
        check_tensor(OP, name, t, ndims=(4,))
        if t.requires_grad and torch.is_grad_enabled():
            fail(OP, f"{name} requires grad: attention_with_kv_cache is forward only (a "
                     f"decode step); train with fastseq.ops.attention, or run the step under "
                     f"torch.no_grad()")
    check_same_dtype_device(OP, ("query", query), (("k_cache", k_cache), ("v_cache", v_cache),
                                                   ("key", key), ("value", value)))
    B, HQ, _, E = query.shape
    rows, HK, capacity, _ = k_cache.shape
    EV = v_cache.shape[3]
    if k_cache.shape[3] != E:
        fail(OP, f"k_cache must be [B={B}, Hk, S_max, E={E}] (query is {list(query.shape)}; "
                 f"paged: [pages, Hk, page_size, E]), got {list(k_cache.shape)}")
    if tuple(v_cache.shape[:3]) != (rows, HK, capacity):
        fail(OP, f"v_cache must be [{rows}, {HK}, {capacity}, EV] like k_cache "
                 f"{list(k_cache.shape)}, got {list(v_cache.shape)}")
    if HK == 0 or HQ % HK:
        fail(OP, f"query's heads ({HQ}) must be a multiple of the caches' ({HK}) (GQA/MQA), "
                 f"query {list(query.shape)}, k_cache {list(k_cache.shape)}")
    if (key is None) != (value is None):
        fail(OP, "key and value go together: pass both new rows or neither")
    if key is not None:
        new = key.shape[2]
        if tuple(key.shape) != (B, HK, new, E):
            fail(OP, f"key must be [B={B}, Hk={HK}, Lnew, E={E}], got {list(key.shape)}")
        if tuple(value.shape) != (B, HK, new, EV):
            fail(OP, f"value must be [{B}, {HK}, {new}, EV={EV}] like key, got "
                     f"{list(value.shape)}")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if cache.stride(2) == 0 and capacity > 1:
                fail(OP, f"{name} is a broadcast view (stride 0 over positions): new rows "
                         f"cannot be written into it")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 0):
        fail(OP, f"window must be None or a non-negative int (0: no window), got {window!r}")


# GPUs: the split-KV Triton kernels. CPUs: torch's kernels (the interpreter is never chosen
# automatically there), then the reference. Each returns (out, lse); torch's has no lse.
BACKENDS = _backends.attention_backends(
    OP, ATTENTION_MAX_HEAD_DIM,
    triton=(_EMPTY, _backends.Variant("split-KV decode: key ranges across programs, partial "
                                      "softmaxes combined by a second kernel", _triton_step)),
    torch_backend=_backends.Backend(
        _torch_refuses,
        (_EMPTY, _backends.Variant("scatter_ into the caches, then scaled_dot_product_attention "
                                   "with the visibility mask", _torch_step))),
    reference=(_EMPTY, _backends.Variant("fastseq.reference.attention_with_kv_cache",
                                         _reference_step)))
