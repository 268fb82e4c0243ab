"""Reference scaled dot-product attention: the semantics of
torch.nn.functional.scaled_dot_product_attention, written out, plus the score modifiers and
visibility rules fastseq.ops.attention adds (FlashAttention's: a local window, soft-capping,
ALiBi, per-head sinks, per-row key ranges) and the packed variable-length form.

Two deliberate differences from torch, shared by fastseq's kernels:
  * a query row with no visible key returns zeros (torch returns NaN);
  * `is_causal` may be combined with `attn_mask` (both apply; torch refuses the pair).
Extras for testing: `return_lse` (log-sum-exp of each row's scaled, masked scores, sinks
included; -inf for a row with nothing visible and no sink) and `dropout_mask` (an explicit
keep-mask instead of random dropout).

Precision: half inputs (fp16, bf16) are computed in fp32 and the output rounded once at the end,
as FlashAttention's own `attention_ref` does (computing in the input dtype made this reference
3.4-3.9x FlashAttention's error on 3 of its 1440 fp16 kvcache cases); lse is fp32 (fp64 for
fp64 inputs), as the op's is.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: fp32 for half inputs, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _batch_shaped(values: Optional[Tensor]) -> Optional[Tensor]:
    """Per-batch-row integers [batch dims] shaped to broadcast against scores [..., H, L, S]."""
    if values is None:
        return None
    return values.reshape(*values.shape, 1, 1, 1)


def diagonal_shift(L: int, S: int, causal_shift: int = 0, bottom_right: bool = False,
                   key_end: Optional[Tensor] = None):
    """Where query i's diagonal is: key i + shift. Top-left (torch's): 0 (+ causal_shift);
    bottom-right (FlashAttention's): the last query row meets the last visible key, S - L, or
    key_end[b] - L per batch row when key ranges are given."""
    if not bottom_right:
        return causal_shift
    if key_end is None:
        return causal_shift + S - L
    return causal_shift + _batch_shaped(key_end) - L


def visible_and_bias(scores: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                     causal_shift=0, window=None, key_start: Optional[Tensor] = None,
                     key_end: Optional[Tensor] = None):
    """(visible, additive bias) for scores [..., L, S]: which entries take part, and what to add.

    Bool masks: True takes part. Float masks are added (-inf hides an entry). Causal: query i
    sees keys j <= i + causal_shift (an int, or a tensor broadcasting against the scores);
    0 is torch's top-left alignment (also when L != S), S - L the bottom-right one
    (torch.nn.attention.bias.causal_lower_right). window (left, right): query i sees keys
    i + shift - left <= j <= i + shift + right (a negative or None side is unbounded).
    key_start / key_end [batch dims]: each batch row sees keys key_start <= j < key_end.
    """
    L, S = scores.shape[-2:]
    rows = torch.arange(L, device=scores.device)[:, None]
    cols = torch.arange(S, device=scores.device)[None, :]
    diagonal = rows + causal_shift
    visible = torch.ones(L, S, dtype=torch.bool, device=scores.device)
    if is_causal:
        visible = visible & (cols <= diagonal)
    left, right = window if window is not None else (None, None)
    if left is not None and left >= 0:
        visible = visible & (cols >= diagonal - left)
    if right is not None and right >= 0:
        visible = visible & (cols <= diagonal + right)
    if key_start is not None:
        visible = visible & (cols >= _batch_shaped(key_start))
    if key_end is not None:
        visible = visible & (cols < _batch_shaped(key_end))
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            bias = attn_mask.to(scores.dtype)
            visible = visible & (bias != float("-inf"))
    return visible, bias


def alibi_bias(slopes: Tensor, L: int, S: int, shift, dtype: torch.dtype) -> Tensor:
    """ALiBi's bias -slope * |i + shift - j| (FlashAttention's sign and alignment) for slopes
    [H] or [B, H]: [H, L, S] or [B, H, L, S]."""
    rows = torch.arange(L, device=slopes.device)[:, None]
    cols = torch.arange(S, device=slopes.device)[None, :]
    distance = (rows + shift - cols).abs().to(dtype)
    return -slopes.to(dtype)[..., None, None] * distance


def soft_cap(scores: Tensor, softcap: Optional[float]) -> Tensor:
    """Gemma 2's logit soft-capping: softcap * tanh(scores / softcap) (0 or None: off)."""
    if not softcap:
        return scores
    return softcap * torch.tanh(scores / softcap)


def masked_softmax(scores: Tensor, visible: Tensor, sinks: Optional[Tensor] = None):
    """Softmax over the last dim of `scores` where `visible`; rows with nothing visible give
    zeros (and a -inf log-sum-exp). No NaN reaches the output or the gradient. sinks [H]: a
    logit per head that joins every row's softmax with no value (gpt-oss's attention sinks),
    so a row's probabilities sum to less than one."""
    visible = visible.expand_as(scores)
    if sinks is not None:
        sink_column = sinks.to(scores.dtype)[:, None, None].expand(*scores.shape[:-1], 1)
        probs, lse = masked_softmax(torch.cat([scores, sink_column], -1),
                                    torch.cat([visible, visible.new_ones(sink_column.shape)], -1))
        return probs[..., :-1], lse
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
    causal_shift: int = 0, bottom_right: bool = False, window=None,
    softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None, key_start: Optional[Tensor] = None,
    key_end: Optional[Tensor] = None, upcast: bool = True,
):
    """query [..., Hq, L, E], key [..., Hk, S, E], value [..., Hk, S, Ev] -> [..., Hq, L, Ev].

    With enable_gqa, Hq must be a multiple of Hk and each key/value head serves Hq/Hk
    consecutive query heads (torch's repeat_interleave convention). The scores are
    q k^T * scale, soft-capped (softcap * tanh(s / softcap)), then the float mask and ALiBi's
    -slope * |i + shift - j| are added. The diagonal (causal, window, ALiBi): query i's is key
    i + shift, shift = causal_shift (0: top-left) or, with bottom_right, the row's key end
    (key_end[b] or S) - L. See visible_and_bias for the visibility rules. upcast=False computes
    half inputs in their own dtype (the tests' "plain PyTorch in the same dtype" baseline).
    """
    out_dtype = query.dtype
    work = compute_dtype(query.dtype) if upcast else query.dtype
    query, key, value = query.to(work), key.to(work), value.to(work)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(work)
    if enable_gqa and query.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = soft_cap((query @ key.transpose(-2, -1)) * scale, softcap)
    shift = diagonal_shift(L, S, causal_shift, bottom_right, key_end)
    visible, bias = visible_and_bias(scores, attn_mask, is_causal, shift, window, key_start,
                                     key_end)
    if bias is not None:
        scores = scores + bias
    if alibi_slopes is not None:  # [H] or [B, H] against scores [(B,) H, L, S]
        scores = scores + alibi_bias(alibi_slopes, L, S, shift, work)
    probs, lse = masked_softmax(scores, visible, sinks)
    out = (apply_dropout(probs, dropout_p, dropout_mask) @ value).to(out_dtype)
    return (out, lse) if return_lse else out


def packed_attention(query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, *, return_lse: bool = False, **options):
    """Packed variable-length attention, one sequence at a time: query [Tq, Hq, E], key
    [Tk, Hk, E], value [Tk, Hk, Ev]; sequence b's rows are cu_seqlens_q[b]:cu_seqlens_q[b+1]
    (keys likewise). Each sequence is scaled_dot_product_attention(**options) on its own (GQA
    implied by Hq != Hk). Returns out [Tq, Hq, Ev] (and lse [Hq, Tq], FlashAttention's layout)."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    alibi = options.pop("alibi_slopes", None)
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        q = query[starts_q[b]:starts_q[b + 1]].transpose(0, 1)
        k = key[starts_k[b]:starts_k[b + 1]].transpose(0, 1)
        v = value[starts_k[b]:starts_k[b + 1]].transpose(0, 1)
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        out, lse = scaled_dot_product_attention(
            q, k, v, enable_gqa=q.shape[0] != k.shape[0], return_lse=True, alibi_slopes=slopes,
            **options)
        outs.append(out.transpose(0, 1))
        lses.append(lse)
    out = torch.cat(outs) if outs else query.new_zeros(0, query.shape[1], value.shape[-1])
    lse = (torch.cat(lses, -1) if lses
           else torch.zeros(query.shape[1], 0, dtype=compute_dtype(query.dtype)))
    return (out, lse) if return_lse else out
