"""Reference scaled dot-product attention: the semantics of
torch.nn.functional.scaled_dot_product_attention, written out.

Two deliberate differences from torch, shared by fastseq's kernels:
  * a query row with no visible key returns zeros (torch returns NaN);
  * `is_causal` may be combined with `attn_mask` (both apply; torch refuses the pair).
Extras for testing: `return_lse` (log-sum-exp of each row's scaled, masked scores; -inf for a
row with nothing visible) and `dropout_mask` (an explicit keep-mask instead of random dropout).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def visible_and_bias(scores: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                     causal_shift: int = 0):
    """(visible, additive bias) for scores [..., L, S]: which entries take part, and what to add.

    Bool masks: True takes part. Float masks are added (-inf hides an entry). Causal: query i
    sees keys j <= i + causal_shift; 0 is torch's top-left alignment (also when L != S), S - L
    the bottom-right one (torch.nn.attention.bias.causal_lower_right).
    """
    L, S = scores.shape[-2:]
    visible = torch.ones(L, S, dtype=torch.bool, device=scores.device)
    if is_causal:
        visible = visible.tril(causal_shift)
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            bias = attn_mask.to(scores.dtype)
            visible = visible & (bias != float("-inf"))
    return visible, bias


def masked_softmax(scores: Tensor, visible: Tensor):
    """Softmax over the last dim of `scores` where `visible`; rows with nothing visible give
    zeros (and a -inf log-sum-exp). No NaN reaches the output or the gradient."""
    visible = visible.expand_as(scores)
    row_visible = visible.any(dim=-1, keepdim=True)
    # Empty rows get harmless finite scores so neither softmax nor its gradient sees -inf - -inf.
    safe = torch.where(visible, scores, torch.full_like(scores, float("-inf")))
    safe = torch.where(row_visible, safe, torch.zeros_like(scores))
    probs = torch.softmax(safe, dim=-1) * row_visible
    lse = torch.logsumexp(safe, dim=-1)
    lse = torch.where(row_visible.squeeze(-1), lse, torch.full_like(lse, float("-inf")))
    return probs, lse


def apply_dropout(probs: Tensor, dropout_p: float, dropout_mask: Optional[Tensor]) -> Tensor:
    if dropout_mask is not None:
        return probs * dropout_mask / (1.0 - dropout_p)
    if dropout_p > 0.0:
        return torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    return probs


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
    enable_gqa: bool = False, *, return_lse: bool = False, dropout_mask: Optional[Tensor] = None,
    causal_shift: int = 0,
):
    """query [..., Hq, L, E], key [..., Hk, S, E], value [..., Hk, S, Ev] -> [..., Hq, L, Ev].

    With enable_gqa, Hq must be a multiple of Hk and each key/value head serves Hq/Hk
    consecutive query heads (torch's repeat_interleave convention). causal_shift: see
    visible_and_bias.
    """
    if enable_gqa and query.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    visible, bias = visible_and_bias(scores, attn_mask, is_causal, causal_shift)
    if bias is not None:
        scores = scores + bias
    probs, lse = masked_softmax(scores, visible)
    out = apply_dropout(probs, dropout_p, dropout_mask) @ value
    return (out, lse) if return_lse else out
