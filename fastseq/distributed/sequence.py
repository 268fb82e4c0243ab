"""How a sequence is split over the ranks of a process group for context parallelism, and the
helpers that split and gather it.

Two layouts of a sequence of T positions over n ranks:
- "contiguous": n pieces in order (torch.tensor_split's sizes: the first T % n pieces one
  longer); rank r holds piece r. Under a causal mask rank r attends to r + 1 pieces' keys, so
  the last rank works n times as long as the first.
- "zigzag": 2n pieces (the same rule); rank r holds pieces r and 2n - 1 - r, one from each end,
  so every rank has the same causal work (the load balancing of Megatron-LM's context
  parallelism and ring-flash-attention's zigzag variant).
A rank's local tensor holds its pieces concatenated in sequence order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops._checks import InputError

LAYOUTS = ("contiguous", "zigzag")


def _even_sizes(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def piece_sizes(seq_len: int, ranks: int, layout: str = "contiguous") -> list[list[int]]:
    """Per rank, the lengths of the pieces it holds (one contiguous, two zigzag), in order."""
    check_layout(layout)
    if layout == "contiguous":
        return [[size] for size in _even_sizes(seq_len, ranks)]
    sizes = _even_sizes(seq_len, 2 * ranks)
    return [[sizes[r], sizes[2 * ranks - 1 - r]] for r in range(ranks)]


def piece_starts(seq_len: int, ranks: int, layout: str = "contiguous") -> list[list[int]]:
    """Per rank, the global position where each of its pieces starts."""
    if layout == "contiguous":
        sizes = [s for (s,) in piece_sizes(seq_len, ranks, layout)]
        return [[sum(sizes[:r])] for r in range(ranks)]
    sizes = _even_sizes(seq_len, 2 * ranks)
    return [[sum(sizes[:r]), sum(sizes[:2 * ranks - 1 - r])] for r in range(ranks)]


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"fastseq.distributed: layout must be one of {LAYOUTS}, got "
                         f"{layout!r}")


def rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if not dist.is_initialized():
        raise InputError("fastseq.distributed: no process group: call "
                         "torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def split_sequence(x: Tensor, dim: int, *, group: Optional[dist.ProcessGroup] = None,
                   layout: str = "contiguous") -> Tensor:
    """This rank's part of the whole sequence x along `dim` (every rank passes the same x)."""
    rank, ranks = rank_and_size(group)
    dim %= x.dim()
    seq_len = x.shape[dim]
    pieces = [x.narrow(dim, start, size) for start, size in
              zip(piece_starts(seq_len, ranks, layout)[rank],
                  piece_sizes(seq_len, ranks, layout)[rank])]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def gather_sequence(x: Tensor, dim: int, seq_len: int, *,
                    group: Optional[dist.ProcessGroup] = None,
                    layout: str = "contiguous") -> Tensor:
    """The whole sequence from every rank's part (split_sequence's inverse), on every rank.
    Not differentiable: for checks and outputs."""
    rank, ranks = rank_and_size(group)
    dim %= x.dim()
    sizes = piece_sizes(seq_len, ranks, layout)
    if x.shape[dim] != sum(sizes[rank]):
        raise InputError(f"fastseq.distributed.gather_sequence: x has {x.shape[dim]} positions "
                         f"along dim {dim}; rank {rank}'s part of {seq_len} ({layout}) has "
                         f"{sum(sizes[rank])}")
    longest = max(sum(s) for s in sizes)
    padded = torch.zeros(*x.shape[:dim], longest, *x.shape[dim + 1:], dtype=x.dtype,
                         device=x.device)
    padded.narrow(dim, 0, x.shape[dim]).copy_(x)
    parts = [torch.empty_like(padded) for _ in range(ranks)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    whole = torch.empty(*x.shape[:dim], seq_len, *x.shape[dim + 1:], dtype=x.dtype,
                        device=x.device)
    for r in range(ranks):
        offset = 0
        for start, size in zip(piece_starts(seq_len, ranks, layout)[r], sizes[r]):
            whole.narrow(dim, start, size).copy_(parts[r].narrow(dim, offset, size))
            offset += size
    return whole
