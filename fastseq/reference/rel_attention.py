"""Reference Transformer-XL relative-position attention (Dai et al. 2019), two ways.

`rel_attention` is the definition fastseq's kernels implement. With M = Lk - Lq memory keys,
distance d(i, j) = M + i - j and row(i, j) = clamp(d(i, j) + pos_offset, 0, P - 1):

    score[i, j] = ((q_i + content_bias) . k_j + (q_i + position_bias) . pos[row(i, j)]) * scale

key j is visible to query i iff d >= 0 (when is_causal), d < window (when a window is given:
the original's same_length is window = mem_len) and the extra mask allows it; softmax over the
visible keys (a row with none gives zeros); dropout on the probabilities; out = probs @ value.
pos_offset = 0 is Transformer-XL (pos row = distance, clamp_len = P - 1); pos_offset > 0 admits
negative distances (bidirectional, XLNet-style, with is_causal=False).

`rel_attention_original` is the original code's formulation, which materialises the position
term BD for every (i, r) pair and aligns it with the `_rel_shift` pad-and-reshape trick; the
tests check that the two agree.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .attention import apply_dropout, masked_softmax


def relative_rows(q_len: int, k_len: int, num_pos: int, pos_offset: int = 0,
                  device=None) -> tuple[Tensor, Tensor]:
    """(distance d(i, j) [Lq, Lk], pos row(i, j) [Lq, Lk]) for the definition above."""
    memory = k_len - q_len
    i = torch.arange(q_len, device=device).unsqueeze(1)
    j = torch.arange(k_len, device=device).unsqueeze(0)
    distance = memory + i - j
    row = (distance + pos_offset).clamp(0, num_pos - 1)
    return distance, row


def rel_attention(
    query: Tensor, key: Tensor, value: Tensor, pos: Tensor, content_bias: Tensor,
    position_bias: Tensor, *, attn_mask: Optional[Tensor] = None, is_causal: bool = True,
    window: Optional[int] = None, pos_offset: int = 0, dropout_p: float = 0.0,
    scale: Optional[float] = None, return_lse: bool = False,
    dropout_mask: Optional[Tensor] = None,
):
    """query [B, H, Lq, D]; key, value [B, H, Lk, D] with Lk >= Lq (the first Lk - Lq keys are
    the memory); pos [P, H, D]; content_bias, position_bias [H, D]. attn_mask: bool (True =
    visible) or float (added), broadcastable to [B, H, Lq, Lk]."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    if k_len < q_len:
        raise ValueError(f"key length {k_len} must be >= query length {q_len} (memory first)")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    distance, row = relative_rows(q_len, k_len, pos.shape[0], pos_offset, query.device)

    content = (query + content_bias[:, None, :]) @ key.transpose(-2, -1)        # AC [B,H,Lq,Lk]
    # Every query against every pos row, then each (i, j) picks its row: [B, H, Lq, P] and an
    # index, not a [H, Lq, Lk, D] copy of pos (6x and 22x slower forward and fwd+bwd on CPU).
    every_row = (query + position_bias[:, None, :]) @ pos.permute(1, 2, 0)     # [B,H,Lq,P]
    position = every_row.gather(-1, row.expand(*every_row.shape[:-1], k_len))   # [B,H,Lq,Lk]
    scores = (content + position) * scale

    visible = torch.ones_like(distance, dtype=torch.bool)
    if is_causal:
        visible &= distance >= 0
    if window is not None:
        visible &= distance < window
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)
            visible = visible & (attn_mask != float("-inf"))
    probs, lse = masked_softmax(scores, visible)
    out = apply_dropout(probs, dropout_p, dropout_mask) @ value
    return (out, lse) if return_lse else out


def rel_shift(x: Tensor) -> Tensor:
    """The original's shift of BD [..., Lq, R] (R = Lk positions ordered by distance Lk-1 ... 0):
    pad a zero column in front, view as [R + 1, Lq], drop the first row, view back. Afterwards
    column j of row i holds distance M + i - j (entries for negative distances are garbage,
    hidden by the causal mask)."""
    *lead, q_len, r_len = x.shape
    padded = torch.nn.functional.pad(x, (1, 0))
    return padded.reshape(*lead, r_len + 1, q_len)[..., 1:, :].reshape(*lead, q_len, r_len)


def rel_attention_original(query: Tensor, key: Tensor, value: Tensor, r: Tensor, r_w_bias: Tensor,
                           r_r_bias: Tensor, *, same_length: bool = False, mem_len: int = 0,
                           scale: Optional[float] = None) -> Tensor:
    """The original RelPartialLearnableMultiHeadAttn score computation, in [B, H, L, D] layout.

    r [Lk, H, D]: projected embeddings of the distances Lk-1, Lk-2, ..., 0 (the original's
    pos_seq = arange(klen - 1, -1, -1), clamped at clamp_len before embedding). The mask is the
    original's dec_attn_mask, same_length included.
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    memory = k_len - q_len
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    ac = (query + r_w_bias[:, None, :]) @ key.transpose(-2, -1)
    bd = torch.einsum("bhid,rhd->bhir", query + r_r_bias[:, None, :], r)
    scores = (ac + rel_shift(bd)) * scale

    ones = torch.ones(q_len, k_len, device=query.device)
    masked = torch.triu(ones, diagonal=1 + memory)
    if same_length:
        mask_len = k_len - mem_len
        shift = q_len - mask_len if mask_len > 0 else q_len
        masked = masked + torch.tril(ones, diagonal=-shift)
    scores = scores.masked_fill(masked.bool(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ value
