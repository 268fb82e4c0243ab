"""Reference attention against a key/value cache, written out one batch row at a time: the
semantics of fastseq.ops.attention_with_kv_cache.

Each batch row b holds cache_seqlens[b] filled positions of a [B, Hk, S_max, E] cache. The new
keys and values (if any) are written at positions cache_seqlens[b] .. + Lnew - 1 (in place, as
the op does), and the Lq query rows attend the row's first kv_len = cache_seqlens[b] + Lnew
keys. Causal: the query rows are the last Lq positions of that sequence (query i sees keys
j <= kv_len - Lq + i: bottom-right alignment). window w > 0: query i sees only its last w
positions (j > kv_len - Lq + i - w). A row with nothing visible gives zeros and lse -inf.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .attention import scaled_dot_product_attention


def visible_keys(kv_len, queries: int, capacity: int, is_causal: bool, window: int,
                 device) -> Tensor:
    """[queries, capacity] bool: which cache positions the query rows of a batch row with
    kv_len filled keys see (kv_len an int; or a tensor [B, 1, 1, 1] of every row's, giving
    [B, 1, queries, capacity])."""
    last = kv_len - queries + torch.arange(queries, device=device)[:, None]
    keys = torch.arange(capacity, device=device)[None, :]
    seen = keys < kv_len
    if is_causal:
        seen = seen & (keys <= last)
    if window > 0:
        seen = seen & (keys > last - window)
    return seen


def attention_with_kv_cache(query: Tensor, k_cache: Tensor, v_cache: Tensor,
                            cache_seqlens: Tensor, key: Optional[Tensor] = None,
                            value: Optional[Tensor] = None, *, is_causal: bool = True,
                            window: int = 0, scale: Optional[float] = None
                            ) -> tuple[Tensor, Tensor]:
    """query [B, Hq, Lq, E]; caches [B, Hk, S_max, E|EV]; cache_seqlens [B] integers; key/value
    [B, Hk, Lnew, E|EV] or None. Returns (out [B, Hq, Lq, EV], lse [B, Hq, Lq])."""
    if key is not None:
        append(k_cache, v_cache, key, value, cache_seqlens)
    if query.numel() == 0 or v_cache.shape[3] == 0:
        return empty_result(query, v_cache)
    lengths = [int(n) for n in cache_seqlens.tolist()]
    new = 0 if key is None else key.shape[2]
    outs, lses = [], []
    for b, n in enumerate(lengths):
        seen = visible_keys(n + new, query.shape[2], k_cache.shape[2], is_causal, window,
                            query.device)
        out, lse = scaled_dot_product_attention(
            query[b], k_cache[b], v_cache[b], seen, scale=scale,
            enable_gqa=query.shape[1] != k_cache.shape[1], return_lse=True)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def append(k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor,
           cache_seqlens: Tensor) -> None:
    """Writes key/value [B, Hk, Lnew, *] into the caches at cache_seqlens[b] onwards, in place."""
    new = key.shape[2]
    for b, n in enumerate(int(n) for n in cache_seqlens.tolist()):
        k_cache[b, :, n:n + new] = key[b]
        v_cache[b, :, n:n + new] = value[b]


def empty_result(query: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor]:
    """(zeros [B, Hq, Lq, EV], -inf lse [B, Hq, Lq]) for a call with nothing to attend."""
    B, H, L, _ = query.shape
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return (query.new_zeros(B, H, L, v_cache.shape[3]),
            torch.full((B, H, L), float("-inf"), dtype=lse_dtype, device=query.device))
