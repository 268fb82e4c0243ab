"""transformers' masks as fastseq descriptions: the mask function registered beside fastseq's
attention in transformers' AttentionMaskInterface.

transformers builds each forward's mask once, from a mask function (a composition of its own
index functions: causal, sliding window, padding, ...), the 2D padding mask [batch, keys seen]
and the offsets of the query and key positions, and hands the result to every layer's
attention function. For "sdpa" that result is a [batch, 1, L, S] bool tensor that every layer
reads. fastseq's mask function instead returns a fastseq.ops.AttentionMask (causal, a window,
each batch row's key range, the diagonal's alignment), so the kernels compute visibility from
indices, nothing L x S is built or read, and a decode step with left padding stays on the split-KV
path. What it cannot describe exactly it materializes with transformers' own sdpa_mask, so the
answer never differs from "sdpa":
  * mask functions beyond causal, bidirectional and the two sliding windows (or_mask /
    and_mask_function overlays, packed sequences, chunked and blockwise attention);
  * a padding mask with holes (not one contiguous run of kept keys per row);
  * anything under torch.compile (recognizing a mask function reads its closure, and a
    padding mask's shape needs a host read);
  * offsets no alignment expresses (a diagonal shifted by neither 0 nor keys - queries).
"""
from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from transformers import masking_utils as _hf

from ..ops.attention_mask import AttentionMask


class Pattern(NamedTuple):
    """What a mask function keeps, as window sides over i - j in absolute positions
    (-1: unbounded): causal is right = 0."""
    left: int = -1
    right: int = -1


def _closure(fn: Callable) -> dict:
    try:
        return inspect.getclosurevars(fn).nonlocals
    except (TypeError, ValueError):
        return {}


def _bound(a: int, b: int) -> int:
    """The tighter of two window sides (-1: unbounded)."""
    return b if a < 0 else a if b < 0 else min(a, b)


def pattern_of(fn: Callable) -> Optional[Pattern]:
    """The window a transformers mask function keeps, or None when it is anything else (then
    the mask is materialized). Recognized: causal_mask_function, bidirectional_mask_function,
    sliding_window_overlay(w) (i - j < w: left = w - 1), sliding_window_bidirectional_overlay(w)
    (|i - j| <= w) and and_masks of these (their intersection)."""
    if fn is _hf.causal_mask_function:
        return Pattern(right=0)
    if fn is _hf.bidirectional_mask_function:
        return Pattern()
    name = getattr(fn, "__qualname__", "")
    free = _closure(fn)
    if name == "sliding_window_overlay.<locals>.inner_mask" and isinstance(
            free.get("sliding_window"), int):
        return Pattern(left=free["sliding_window"] - 1)
    if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask" and isinstance(
            free.get("sliding_window"), int):
        return Pattern(left=free["sliding_window"], right=free["sliding_window"])
    if name == "and_masks.<locals>.and_mask" and isinstance(free.get("mask_functions"), tuple):
        left = right = -1
        for part in free["mask_functions"]:
            found = pattern_of(part)
            if found is None:
                return None
            left, right = _bound(left, found.left), _bound(right, found.right)
        return Pattern(left, right)
    return None


_HOLES = "holes"


def _key_ranges(padding: Tensor):
    """(first kept key, one past the last) int32 per row of a [batch, keys] bool padding mask;
    None when every key is kept; _HOLES when some row's kept keys are not one contiguous run.
    One host read, as transformers' own sdpa path makes to skip an all-True mask."""
    keys = padding.shape[-1]
    positions = torch.arange(keys, device=padding.device)
    kept = padding.sum(-1)
    start = torch.where(padding, positions, keys).amin(-1)
    end = torch.where(padding, positions + 1, 0).amax(-1)
    empty = kept == 0
    # A row with nothing kept gets the empty range [keys, keys): it stays empty whatever end
    # the causal case below gives it.
    start, end = torch.where(empty, keys, start), torch.where(empty, keys, end)
    verdict = torch.stack([((end - start == kept) | empty).all(), (kept == keys).all()]).tolist()
    if not verdict[0]:
        return _HOLES
    if verdict[1]:
        return None
    return start.to(torch.int32), end.to(torch.int32)


def describe(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
             mask_function: Callable = _hf.causal_mask_function,
             attention_mask: Optional[Tensor] = None, device=None):
    """The AttentionMask equal to what sdpa_mask builds from the same arguments (FULL for full
    attention with nothing padded), or None when none is (module docstring: what is
    materialized then)."""
    if torch.compiler.is_compiling():
        return None  # recognizing a mask function reads its closure: left to eager mode
    found = pattern_of(mask_function)
    if found is None or not isinstance(q_offset, int) or not isinstance(kv_offset, int):
        return None
    shift = q_offset - kv_offset  # query row i sits at key column i + shift
    start = end = None
    if attention_mask is not None:
        padding = _hf.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        ranges = _key_ranges(padding[:, kv_offset:kv_offset + kv_length].bool())
        if ranges is _HOLES:
            return None
        if ranges is not None:
            start, end = ranges
    window = (found.left, found.right)
    if window == (-1, -1):
        return FULL if start is None else AttentionMask(key_start=start, key_end=end)
    if shift == 0:
        return AttentionMask(window=window, key_start=start, key_end=end)
    if found.right != 0:
        return None  # a two-sided window off the diagonal: no alignment says where it sits
    # Causal with the rows' diagonal at i + shift: keys past shift + L are hidden anyway, so each
    # row's key range may end there, and bottom-right alignment (shift = key_end - L) is exact,
    # provided no row's padding ends earlier.
    diagonal_end = shift + q_length
    if diagonal_end > kv_length:
        return None
    if end is not None:
        if not bool((end >= diagonal_end).all()):
            return None
    else:
        start = torch.zeros(batch_size, dtype=torch.int32, device=device)
    end = torch.full_like(start, diagonal_end)
    return AttentionMask(window=window, align="bottom_right", key_start=start, key_end=end)


# Full attention, nothing padded: the mask function returns None for it, as sdpa_mask does.
FULL = AttentionMask()


def fastseq_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                 mask_function: Callable = _hf.causal_mask_function,
                 attention_mask: Optional[Tensor] = None, **kwargs):
    """transformers' mask interface for attn_implementation="fastseq": an AttentionMask where
    one describes the mask exactly, None for full attention with nothing padded, else
    transformers' own [batch, 1, L, S] bool mask."""
    description = describe(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                           attention_mask, kwargs.get("device"))
    if description is FULL:
        return None
    if description is not None:
        return description
    kwargs.pop("allow_is_causal_skip", None)
    return _hf.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                         q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                         attention_mask=attention_mask, allow_is_causal_skip=False, **kwargs)
