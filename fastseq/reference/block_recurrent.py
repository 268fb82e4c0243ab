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
