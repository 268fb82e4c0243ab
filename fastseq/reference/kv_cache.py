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


def rotate(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
           interleaved: bool = False) -> Tensor:
    """FlashAttention's rotary embedding of x [..., L, E] at positions [L] (tables [P, R/2]):
    the first R dims pair up (half-split: d and d + R/2, GPT-NeoX; interleaved: 2k and 2k+1,
    GPT-J) and each pair (a, b) becomes (a cos - b sin, b cos + a sin); the rest is unchanged.
    Computed in fp32 (fp64 for fp64 x) and rounded once."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    R = 2 * cos.shape[1]
    c = cos[positions.long()].to(work)
    s = sin[positions.long()].to(work)
    head, rest = x[..., :R].to(work), x[..., R:]
    if interleaved:
        a, b = head[..., 0::2], head[..., 1::2]
        rotated = torch.stack([a * c - b * s, b * c + a * s], -1).flatten(-2)
    else:
        a, b = head[..., :R // 2], head[..., R // 2:]
        rotated = torch.cat([a * c - b * s, b * c + a * s], -1)
    return torch.cat([rotated.to(x.dtype), rest], -1)


def row_view(cache: Tensor, row: int, block_table: Optional[Tensor]) -> Tensor:
    """Cache row `row` as [Hk, positions, E]: a view of a contiguous cache, or the pages its
    block table lists gathered from a paged pool [pages, Hk, page_size, E] (a copy)."""
    if block_table is None:
        return cache[row]
    pages = cache[block_table[row].long()]  # [pages per row, Hk, page_size, E]
    return pages.transpose(0, 1).reshape(cache.shape[1], -1, cache.shape[3])


def attention_with_kv_cache(query: Tensor, k_cache: Tensor, v_cache: Tensor,
                            cache_seqlens: Tensor, key: Optional[Tensor] = None,
                            value: Optional[Tensor] = None, *, is_causal: bool = True,
                            window: int = 0, scale: Optional[float] = None,
                            cache_leftpad: Optional[Tensor] = None,
                            cache_batch_idx: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None,
                            rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None,
                            rotary_interleaved: bool = False, softcap: Optional[float] = None,
                            alibi_slopes: Optional[Tensor] = None,
                            sinks: Optional[Tensor] = None, upcast: bool = True
                            ) -> tuple[Tensor, Tensor]:
    """query [B, Hq, Lq, E]; caches [B, Hk, S_max, E|EV] (paged: a pool [pages, Hk, page_size,
    E|EV] with block_table [rows, pages per row]); cache_seqlens [B] integers; key/value
    [B, Hk, Lnew, E|EV] or None. cache_batch_idx[b]: the cache (or block table) row batch row b
    uses; cache_leftpad[b]: its keys before that position are padding. rotary_cos/sin: the new
    keys (before they are written) are rotated at positions cache_seqlens[b] + i, the query
    rows there too when causal or windowed, else all at cache_seqlens[b]. softcap, alibi_slopes ([Hq] or [B, Hq]; the query row's position in
    the cache is the diagonal) and sinks as fastseq.reference.scaled_dot_product_attention
    (upcast=False: half inputs computed in their own dtype, the tests' plain baseline).
    Returns (out [B, Hq, Lq, EV], lse [B, Hq, Lq])."""
    rows = [int(r) for r in cache_batch_idx.tolist()] if cache_batch_idx is not None \
        else list(range(query.shape[0]))
    lengths = [int(n) for n in cache_seqlens.tolist()]
    if rotary_cos is not None:
        # FlashAttention's rule: causal or windowed query rows sit at cache_seqlens + i, others
        # all at cache_seqlens.
        steps = torch.arange(query.shape[2], device=query.device) * (is_causal or window > 0)
        query = torch.stack([rotate(query[b], rotary_cos, rotary_sin, n + steps,
                                    rotary_interleaved) for b, n in enumerate(lengths)])
        if key is not None:
            new_steps = torch.arange(key.shape[2], device=key.device)
            key = torch.stack([rotate(key[b], rotary_cos, rotary_sin, n + new_steps,
                                      rotary_interleaved) for b, n in enumerate(lengths)])
    if key is not None:
        append(k_cache, v_cache, key, value, cache_seqlens, rows, block_table)
    if query.numel() == 0 or v_cache.shape[3] == 0:
        return empty_result(query, v_cache)
    new = 0 if key is None else key.shape[2]
    outs, lses = [], []
    for b, n in enumerate(lengths):
        k_row = row_view(k_cache, rows[b], block_table)
        v_row = row_view(v_cache, rows[b], block_table)
        kv_len = n + new
        seen = visible_keys(kv_len, query.shape[2], k_row.shape[1], is_causal, window,
                            query.device)
        if cache_leftpad is not None:
            seen = seen & (torch.arange(k_row.shape[1], device=query.device)
                           >= int(cache_leftpad[b]))
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = scaled_dot_product_attention(
            query[b], k_row, v_row, seen, scale=scale,
            enable_gqa=query.shape[1] != k_cache.shape[1], return_lse=True, softcap=softcap,
            alibi_slopes=slopes, sinks=sinks, causal_shift=kv_len - query.shape[2],
            upcast=upcast)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def append(k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor,
           cache_seqlens: Tensor, rows=None, block_table: Optional[Tensor] = None) -> None:
    """Writes key/value [B, Hk, Lnew, *] into the caches at cache_seqlens[b] onwards, in place
    (of cache row rows[b]; paged: into the pages the row's block table lists)."""
    new = key.shape[2]
    for b, n in enumerate(int(n) for n in cache_seqlens.tolist()):
        row = b if rows is None else rows[b]
        if block_table is None:
            k_cache[row, :, n:n + new] = key[b]
            v_cache[row, :, n:n + new] = value[b]
            continue
        page_size = k_cache.shape[2]
        for i in range(new):
            page = int(block_table[row, (n + i) // page_size])
            k_cache[page, :, (n + i) % page_size] = key[b, :, i]
            v_cache[page, :, (n + i) % page_size] = value[b, :, i]


def empty_result(query: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor]:
    """(zeros [B, Hq, Lq, EV], -inf lse [B, Hq, Lq]) for a call with nothing to attend."""
    B, H, L, _ = query.shape
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return (query.new_zeros(B, H, L, v_cache.shape[3]),
            torch.full((B, H, L), float("-inf"), dtype=lse_dtype, device=query.device))
