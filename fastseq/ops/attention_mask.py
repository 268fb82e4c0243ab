"""Attention masks as descriptions: what a caller means (causal, a window, each row's key range,
packed sequences) instead of an L x S tensor, so the kernels compute visibility from indices and
nothing of size L x S is built or read. fastseq.ops.attention takes one as attn_mask.

    AttentionMask(causal=True, window=(4096, 0))                  # Mistral's sliding window
    AttentionMask(causal=True, align="bottom_right")              # new rows against a cache
    AttentionMask(key_start=pad_left, key_end=lengths)            # padding given as lengths
    AttentionMask(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)  # packed: block diagonal

FlashAttention's names and conventions: window (left, right) lets query i see keys
i + shift - left <= j <= i + shift + right (-1 or None: unbounded on that side; causal is
right = 0); shift is 0 for align="top_left" (torch's is_causal) and, for "bottom_right"
(FlashAttention's), the row's key end minus its query count, so the last query row meets the
last visible key. key_start/key_end [batch]: batch row b sees keys key_start[b] <= j <
key_end[b] (left padding: FlashAttention's cache_leftpad; right padding: the lengths).
cu_seqlens_q/k int32 [N + 1]: the query and key rows (dim -2, batch 1) hold N sequences one after
another, sequence b's at cu[b]:cu[b+1] (xFormers' BlockDiagonalMask); max_seqlen_q/k bound their
lengths (computed from the offsets, with a host read, when not given).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._checks import check_tensor, fail

ALIGNMENTS = ("top_left", "bottom_right")


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query row sees, described (module docstring)."""
    causal: bool = False
    window: Optional[tuple] = None
    align: str = "top_left"
    key_start: Optional[Tensor] = None
    key_end: Optional[Tensor] = None
    cu_seqlens_q: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    max_seqlen_q: Optional[int] = None
    max_seqlen_k: Optional[int] = None


class Visibility(NamedTuple):
    """A description normalized for the backends: window sides as ints (-1: unbounded; causal
    folded into right <= 0), int32 key ranges and offsets (or None)."""
    left: int = -1
    right: int = -1
    bottom_right: bool = False
    key_start: Optional[Tensor] = None
    key_end: Optional[Tensor] = None
    cu_q: Optional[Tensor] = None
    cu_k: Optional[Tensor] = None
    max_q: int = 0
    max_k: int = 0

    @property
    def packed(self) -> bool:
        return self.cu_q is not None

    @property
    def unrestricted(self) -> bool:
        """Describes nothing: every key visible to every row (the diagonal matters to nothing)."""
        return (self.left < 0 and self.right < 0 and self.key_start is None
                and not self.packed)

    @property
    def plain(self) -> bool:
        """Nothing beyond top-left or bottom-right causal (what the split-KV decode path and
        torch's own is_causal express)."""
        return (self.left < 0 and self.right in (-1, 0) and self.key_start is None
                and not self.packed)


def window_sides(op: str, window, causal: bool) -> tuple[int, int]:
    """(left, right) of a window argument (None, or two ints >= -1; None entries unbounded)
    with causal folded into the right side."""
    left = right = -1
    if window is not None:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or not all(w is None or (isinstance(w, int) and not isinstance(w, bool))
                           for w in window)):
            fail(op, f"window must be (left, right): two ints (-1 or None: unbounded), got "
                     f"{window!r}")
        left, right = (-1 if w is None else w for w in window)
        if left < -1 or right < -1:
            fail(op, f"window sides must be >= 0 (or -1 / None: unbounded), got {window!r}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _offsets(op: str, name: str, cu: Tensor, rows: int, device) -> Tensor:
    """cu_seqlens checked (1-D integers from 0, non-decreasing, ending at `rows`: every row
    belongs to a sequence, so every output row is written) and made int32. CPU offsets are checked here; CUDA ones by a device-side assert (no host sync),
    and the kernels clamp them, so bad offsets never read out of bounds."""
    check_tensor(op, name, cu)
    if cu.dim() != 1 or cu.shape[0] < 1 or cu.dtype not in (torch.int32, torch.int64):
        fail(op, f"{name} must be a 1-D int32/int64 tensor of N + 1 offsets, got "
                 f"{cu.dtype} with shape {list(cu.shape)}")
    if cu.device != device:
        fail(op, f"{name} must be on the query's device {device}, got {cu.device}")
    ok = ((cu[0] == 0) & (cu[1:] >= cu[:-1]).all() & (cu[-1] == rows))
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            fail(op, f"{name} must start at 0, never decrease and end at {rows} (the rows it "
                     f"indexes), got {cu.tolist()}")
    else:
        torch._assert_async(ok, f"{op}: {name} must start at 0, never decrease and end at "
                                f"{rows}")
    return cu.to(torch.int32)


def _longest(cu: Tensor, given: Optional[int], op: str, name: str) -> int:
    """The longest sequence's length: `given` (checked to bound every length: a short bound
    would leave rows unwritten), or read from the offsets (a host sync)."""
    lengths = cu[1:] - cu[:-1]
    if given is None:
        return int(lengths.max()) if cu.shape[0] > 1 else 0
    if isinstance(given, bool) or not isinstance(given, int) or given < 0:
        fail(op, f"{name} must be a non-negative int, got {given!r}")
    ok = (lengths <= given).all()
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            fail(op, f"{name} = {given} is shorter than a sequence ({lengths.tolist()})")
    else:
        torch._assert_async(ok, f"{op}: {name} = {given} is shorter than a sequence")
    return given


def normalize(op: str, description: AttentionMask, is_causal: bool, window, query: Tensor,
              key: Tensor) -> Visibility:
    """The Visibility of a description (with the call's own is_causal and window keywords)."""
    if description.align not in ALIGNMENTS:
        fail(op, f"attn_mask.align must be one of {ALIGNMENTS}, got {description.align!r}")
    if description.window is not None and window is not None:
        fail(op, "window is given twice (as attn_mask.window and as window=): give one")
    left, right = window_sides(op, description.window if window is None else window,
                               is_causal or description.causal)
    batch = tuple(query.shape[:-3])
    start, end = description.key_start, description.key_end
    key_start = key_end = None
    if start is not None or end is not None:
        key_start, key_end = _checked_ranges(op, start, end, query, batch, key.shape[-2])
    cu_q = cu_k = None
    max_q = max_k = 0
    if description.cu_seqlens_q is not None or description.cu_seqlens_k is not None:
        if description.cu_seqlens_q is None or description.cu_seqlens_k is None:
            fail(op, "packed sequences need both attn_mask.cu_seqlens_q and cu_seqlens_k")
        if query.dim() != 4 or query.shape[0] != 1:
            fail(op, f"packed sequences (cu_seqlens) take query [1, H, T, E] (every sequence's "
                     f"rows along dim -2, batch 1), got shape {list(query.shape)}")
        if key_start is not None:
            fail(op, "attn_mask.key_start/key_end and cu_seqlens cannot be combined: each packed "
                     "sequence's keys are cu_seqlens_k[b]:cu_seqlens_k[b + 1]")
        cu_q = _offsets(op, "attn_mask.cu_seqlens_q", description.cu_seqlens_q,
                        query.shape[-2], query.device)
        cu_k = _offsets(op, "attn_mask.cu_seqlens_k", description.cu_seqlens_k,
                        key.shape[-2], query.device)
        if cu_q.shape != cu_k.shape:
            fail(op, f"attn_mask.cu_seqlens_q and cu_seqlens_k must have the same length (N + 1 "
                     f"for N sequences), got {cu_q.shape[0]} and {cu_k.shape[0]}")
        max_q = _longest(cu_q, description.max_seqlen_q, op, "attn_mask.max_seqlen_q")
        max_k = _longest(cu_k, description.max_seqlen_k, op, "attn_mask.max_seqlen_k")
    return Visibility(left, right, description.align == "bottom_right", key_start, key_end,
                      cu_q, cu_k, max_q, max_k)


def _checked_ranges(op, start, end, query, batch, keys):
    """(key_start, key_end) int32 [prod(batch)] from the description's (either may be None:
    0 and the key count)."""
    count = 1
    for d in batch:
        count *= d
    out = []
    for name, value, default in (("key_start", start, 0), ("key_end", end, keys)):
        if value is None:
            out.append(torch.full((count,), default, dtype=torch.int32, device=query.device))
            continue
        check_tensor(op, f"attn_mask.{name}", value)
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
            fail(op, f"attn_mask.{name} must be an integer tensor, got {value.dtype}")
        if tuple(value.shape) != batch:
            fail(op, f"attn_mask.{name} must have the batch dims' shape {list(batch)} (one "
                     f"entry per batch row), got {list(value.shape)}")
        if value.device != query.device:
            fail(op, f"attn_mask.{name} must be on the query's device {query.device}, got "
                     f"{value.device}")
        out.append(value.reshape(-1).to(torch.int32))
    start, end = out
    ok = ((start >= 0) & (end <= keys)).all()
    if query.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            fail(op, f"attn_mask.key_start must be >= 0 and attn_mask.key_end <= {keys} (the "
                     f"key count), got {start.tolist()} and {end.tolist()}")
    else:  # no host sync on CUDA; the kernels clamp, so nothing is read out of bounds
        torch._assert_async(ok, f"{op}: attn_mask.key_start must be >= 0 and key_end <= {keys}")
    return start, end


def materialized(vis: Visibility, L: int, S: int, device) -> tuple[Tensor, Tensor]:
    """(visible bool, signed distance i + shift - j) [B or 1, 1, L, S] of a description, for
    the backends that need them as tensors (torch's SDPA; ALiBi's bias is -slope * |distance|).
    Packed sequences: [1, 1, T, T], block-diagonal, in each sequence's own coordinates."""
    rows = torch.arange(L, device=device)[:, None]
    cols = torch.arange(S, device=device)[None, :]
    if vis.packed:
        seq_q = torch.searchsorted(vis.cu_q[1:].long(), rows[:, 0], right=True)
        seq_k = torch.searchsorted(vis.cu_k[1:].long(), cols[0], right=True)
        last = vis.cu_q.shape[0] - 2  # rows past the last offset belong to no sequence
        same = (seq_q[:, None] == seq_k[None, :]) & (seq_q[:, None] <= last)
        seq_q, seq_k = seq_q.clamp(max=max(last, 0)), seq_k.clamp(max=max(last, 0))
        rows = rows - vis.cu_q.long()[seq_q][:, None]
        cols = cols - vis.cu_k.long()[seq_k][None, :]
        shift = 0
        if vis.bottom_right:
            lengths = (vis.cu_k[1:] - vis.cu_k[:-1]) - (vis.cu_q[1:] - vis.cu_q[:-1])
            shift = lengths.long()[seq_q][:, None]
        distance = rows + shift - cols
        return (same & _window(distance, vis))[None, None], distance[None, None]
    end = vis.key_end.long()[:, None, None, None] if vis.key_end is not None else S
    shift = (end - L) if vis.bottom_right else 0
    distance = rows + shift - cols
    seen = _window(distance, vis)
    if vis.key_start is not None:
        seen = seen & (cols >= vis.key_start.long()[:, None, None, None]) & (cols < end)
    if seen.dim() == 2:
        seen, distance = seen[None, None], distance[None, None]
    return seen, distance.expand(seen.shape)


def _window(distance: Tensor, vis: Visibility) -> Tensor:
    """Inside the window: -right <= i + shift - j <= left (each side where bounded)."""
    seen = torch.ones_like(distance, dtype=torch.bool)
    if vis.right >= 0:
        seen = seen & (distance >= -vis.right)
    if vis.left >= 0:
        seen = seen & (distance <= vis.left)
    return seen
