"""Ring attention: attention over a sequence split across the ranks of a process group
(context parallelism), forward and backward.

Each rank holds its part of the queries, keys and values (fastseq.distributed.sequence's
layouts). The key/value blocks travel the ring: at step s rank r holds the block of rank
r - s, sends it on to r + 1 and receives the next from r - 1 while its kernel runs on the block
it has (batch_isend_irecv, so the transfer overlaps the kernel). Each block's partial result is
merged into the running one through its log-sum-exp (fastseq.ops.attention(return_lse=True)):
    lse = logaddexp(lse, lse_b);  out = out exp(lse_old - lse) + out_b exp(lse_b - lse).
Causal: a block of keys wholly before the queries is attended in full, the rank's own block
causally, a block wholly after is skipped; the zigzag layout gives every rank the same work.

Backward: the blocks travel the ring again, and with each its gradient accumulators (dk, dv),
which every rank adds its queries' share to before passing them on; after n steps they are
home. A block's share is the gradient of its partial attention, recomputed with fastseq's
attention, weighted by the block's part of the final softmax: with w = exp(lse_b - lse), the
block's output receives w dout and its log-sum-exp w (dout . (out_b - out)) - the exact
gradient of the merge. On the Triton backend that is one launch of the fused backward kernel
per block, given the final log-sum-exp and delta = rowsum(dout out) in place of the block's
own (its probabilities exp(s - lse) are then the block's part of the final softmax, so dS =
P (dP - delta) is the block's share exactly: what ring-flash-attention does with
FlashAttention's kernels). Other backends that return the log-sum-exp (reference) recompute
the block's attention under autograd and take its gradient with the weights above.

Sent per step and rank: one key block and one value block forward ([B, Hk, L/n, E] each);
backward the same plus their gradients (twice the bytes).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import ops
from ..ops._checks import InputError
from .sequence import check_layout, piece_sizes, rank_and_size

OP = "fastseq.distributed.ring_attention"


@dataclasses.dataclass(frozen=True)
class Ring:
    """One call's ring: this rank, its neighbours (global ranks, as P2P ops take them), the
    pieces every rank holds, and the attention's options."""
    group: Optional[dist.ProcessGroup]
    rank: int
    ranks: int
    next_peer: int
    prev_peer: int
    sizes: tuple
    layout: str
    is_causal: bool
    scale: float
    enable_gqa: bool
    backend: Optional[str]

    def length(self, rank: int) -> int:
        return sum(self.sizes[rank])

    def blocks(self, source: int) -> list:
        """The (query rows, key rows, causal) ranges of this rank's queries against the key
        block of rank `source` that any query sees; rows as (start, length)."""
        queries, keys = (0, self.length(self.rank)), (0, self.length(source))
        if not self.is_causal:
            found = [(queries, keys, False)]
        elif source == self.rank:  # the same positions, in order: causal top-left
            found = [(queries, keys, True)]
        elif self.layout == "contiguous":
            found = [(queries, keys, False)] if source < self.rank else []
        elif source < self.rank:  # zigzag: every query sees the source's first piece only
            found = [(queries, (0, self.sizes[source][0]), False)]
        else:  # zigzag: only this rank's second piece sees the source, all of it
            found = [((self.sizes[self.rank][0], self.sizes[self.rank][1]), keys, False)]
        return [block for block in found if block[0][1] > 0 and block[1][1] > 0]


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _exchange(ring: Ring, send: tuple, receive: tuple) -> list:
    """Start sending `send` to the next rank and receiving `receive` from the previous one;
    the requests to wait on. Empty tensors are skipped on both sides alike (sizes are known)."""
    p2p = [dist.P2POp(dist.isend, t, ring.next_peer, ring.group) for t in send if t.numel()]
    p2p += [dist.P2POp(dist.irecv, t, ring.prev_peer, ring.group) for t in receive
            if t.numel()]
    return dist.batch_isend_irecv(p2p) if p2p else []


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


def _rows(t: Tensor, span: tuple) -> Tensor:
    return t.narrow(2, span[0], span[1])


def _block_like(t: Tensor, length: int, dtype=None) -> Tensor:
    return t.new_zeros(*t.shape[:2], length, t.shape[3], dtype=dtype or t.dtype)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _attend(ring: Ring, q: Tensor, k: Tensor, v: Tensor, causal: bool):
    return ops.attention(q, k, v, is_causal=causal, scale=ring.scale,
                         enable_gqa=ring.enable_gqa, return_lse=True, backend=ring.backend)


def _forward(ring: Ring, query: Tensor, key: Tensor, value: Tensor):
    acc = _accumulator_dtype(query.dtype)
    out = query.new_zeros(*query.shape[:3], value.shape[3], dtype=acc)
    lse = out.new_full(out.shape[:3], -math.inf)
    current = (key.contiguous(), value.contiguous())
    for step in range(ring.ranks):
        source = (ring.rank - step) % ring.ranks
        requests, incoming = [], None
        if step < ring.ranks - 1:  # the next block travels while this one is attended
            length = ring.length((source - 1) % ring.ranks)
            incoming = (_block_like(key, length), _block_like(value, length))
            requests = _exchange(ring, current, incoming)
        for q_rows, k_rows, causal in ring.blocks(source):
            block_out, block_lse = _attend(ring, _rows(query, q_rows), _rows(current[0], k_rows),
                                           _rows(current[1], k_rows), causal)
            old = _rows(lse, q_rows)
            new = torch.logaddexp(old, block_lse.to(acc))
            finite = torch.where(torch.isfinite(new), new, 0)  # -inf: nothing seen, weights 0
            merged = (_rows(out, q_rows) * torch.exp(old - finite)[..., None]
                      + block_out.to(acc) * torch.exp(block_lse.to(acc) - finite)[..., None])
            _rows(out, q_rows).copy_(merged)
            old.copy_(new)
        _wait(requests)
        if incoming is not None:
            current = incoming
    return out.to(query.dtype), lse


def _backward(ring: Ring, dout: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
              lse: Tensor):
    acc = _accumulator_dtype(query.dtype)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # the final softmax's, for every block
    dq = torch.zeros_like(query, dtype=acc)
    current = (key.contiguous(), value.contiguous())
    grads = (torch.zeros_like(key, dtype=acc), torch.zeros_like(value, dtype=acc))
    for step in range(ring.ranks):
        source = (ring.rank - step) % ring.ranks
        requests, incoming = [], None
        length = ring.length((source - 1) % ring.ranks)
        if step < ring.ranks - 1:
            incoming = (_block_like(key, length), _block_like(value, length))
            requests = _exchange(ring, current, incoming)
        for q_rows, k_rows, causal in ring.blocks(source):
            block = (_rows(query, q_rows), _rows(current[0], k_rows), _rows(current[1], k_rows))
            if ring.backend == "triton":
                dq_b, dk_b, dv_b = _kernel_block_backward(
                    ring, _rows(dout, q_rows), block, _rows(lse, q_rows), _rows(delta, q_rows),
                    causal)
            else:
                dq_b, dk_b, dv_b = _recomputed_block_backward(
                    ring, _rows(dout, q_rows), block, _rows(lse, q_rows), _rows(out, q_rows),
                    causal)
            _rows(dq, q_rows).add_(dq_b)
            _rows(grads[0], k_rows).add_(dk_b)
            _rows(grads[1], k_rows).add_(dv_b)
        if ring.ranks > 1:  # the accumulators go on with their block; the last hop is home
            arriving = (_block_like(key, length, acc), _block_like(value, length, acc))
            _wait(_exchange(ring, grads, arriving))
            grads = arriving
        _wait(requests)
        if incoming is not None:
            current = incoming
    return dq.to(query.dtype), grads[0].to(key.dtype), grads[1].to(value.dtype)


def _kernel_block_backward(ring: Ring, dout: Tensor, block: tuple, lse: Tensor, delta: Tensor,
                           causal: bool) -> tuple:
    """One launch of the Triton backward kernel on a block, with the final lse and delta."""
    q, k, v = (t.contiguous() for t in block)
    dq, dk, dv, _ = torch.ops.fastseq.attention_backward_triton(
        dout.contiguous(), q, k, v, lse.contiguous(), delta.contiguous(), None, False, None,
        None, None, None, None, None, 0.0, False, -1, 0 if causal else -1, 0.0, 0, 0,
        ring.scale)
    return dq, dk, dv


def _recomputed_block_backward(ring: Ring, dout: Tensor, block: tuple, lse: Tensor,
                               out: Tensor, causal: bool) -> tuple:
    """A block's share recomputed under autograd: its output's gradient w dout, its
    log-sum-exp's w (dout . (out_b - out)), w = exp(lse_b - lse) (module docstring)."""
    acc = lse.dtype
    q, k, v = (t.detach().requires_grad_() for t in block)
    with torch.enable_grad():
        block_out, block_lse = _attend(ring, q, k, v, causal)
    weight = torch.where(torch.isfinite(lse), torch.exp(block_lse.detach().to(acc) - lse), 0)
    d_rows = dout.to(acc)
    d_out = d_rows * weight[..., None]
    d_lse = weight * (d_rows * (block_out.detach().to(acc) - out.to(acc))).sum(-1)
    return torch.autograd.grad((block_out, block_lse), (q, k, v),
                               (d_out.to(block_out.dtype), d_lse.to(block_lse.dtype)))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, ring: Ring):
        out, lse = _forward(ring, query, key, value)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.ring = ring
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        dq, dk, dv = _backward(ctx.ring, dout, *ctx.saved_tensors)
        return dq, dk, dv, None


def _check(query: Tensor, key: Tensor, value: Tensor, is_causal) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise InputError(f"{OP}: {name} must be a 4-D tensor [B, H, L_local, E], got {got}")
        if t.dtype != query.dtype or t.device != query.device:
            raise InputError(f"{OP}: {name} must match query's dtype and device ({query.dtype},"
                             f" {query.device}), got {t.dtype}, {t.device}")
    if key.shape[2] != query.shape[2] or value.shape[2] != query.shape[2]:
        raise InputError(f"{OP}: query, key and value hold this rank's part of one sequence, "
                         f"so the same number of positions; got query {list(query.shape)}, key "
                         f"{list(key.shape)}, value {list(value.shape)}")
    if key.shape[:2] != value.shape[:2] or query.shape[0] != key.shape[0] or \
            query.shape[1] % key.shape[1]:
        raise InputError(f"{OP}: key and value must be [B, Hk, L_local, *] with Hk dividing "
                         f"query's heads; got query {list(query.shape)}, key "
                         f"{list(key.shape)}, value {list(value.shape)}")
    if not isinstance(is_causal, bool):
        raise InputError(f"{OP}: is_causal must be a bool, got {is_causal!r}")


def _sequence_length(query: Tensor, group, seq_len: Optional[int]) -> int:
    if seq_len is not None:
        return int(seq_len)
    total = torch.tensor([query.shape[2]], dtype=torch.int64, device=query.device)
    dist.all_reduce(total, group=group)  # the one collective a call without seq_len adds
    return int(total.item())


RING_BACKENDS = ("triton", "reference")  # the attention backends that return the log-sum-exp


def _ring_backend(query: Tensor, value: Tensor, backend: Optional[str]) -> str:
    """backend, or auto's: Triton where it runs (CUDA), else the reference."""
    from ..backend import triton_unavailable
    from ..kernels.limits import ATTENTION_MAX_HEAD_DIM
    if backend is None:
        fits = max(query.shape[-1], value.shape[-1]) <= ATTENTION_MAX_HEAD_DIM
        return "triton" if query.is_cuda and fits and \
            triton_unavailable(query.device) is None else "reference"
    if backend not in RING_BACKENDS:
        raise InputError(f"{OP}: backend must be one of {RING_BACKENDS} (the attention "
                         f"backends that return the log-sum-exp a ring merges by) or None, got "
                         f"{backend!r}")
    return backend


def ring_attention(query: Tensor, key: Tensor, value: Tensor, *, is_causal: bool = False,
                   group: Optional[dist.ProcessGroup] = None, layout: str = "contiguous",
                   seq_len: Optional[int] = None, scale: Optional[float] = None,
                   backend: Optional[str] = None) -> Tensor:
    """softmax(q k^T scale) v over a sequence split across `group` (default: the world).

    query [B, Hq, L_r, E], key [B, Hk, L_r, E], value [B, Hk, L_r, Ev]: this rank's part of
    the sequence in `layout` ("contiguous" or "zigzag": fastseq.distributed.split_sequence
    makes them); Hq a multiple of Hk is GQA. is_causal: over global positions. seq_len: the
    whole sequence's length (else one all-reduce finds it). backend: each block's fastseq
    backend, "triton" or "reference" (those return the log-sum-exp); None: Triton on CUDA,
    else the reference.
    Returns this rank's part of the output, [B, Hq, L_r, Ev], differentiable (the gradients
    travel the ring back; double backward is refused)."""
    _check(query, key, value, is_causal)
    check_layout(layout)
    backend = _ring_backend(query, value, backend)
    rank, ranks = rank_and_size(group)
    seq_len = _sequence_length(query, group, seq_len)
    sizes = tuple(tuple(s) for s in piece_sizes(seq_len, ranks, layout))
    if query.shape[2] != sum(sizes[rank]):
        raise InputError(f"{OP}: rank {rank} holds {query.shape[2]} positions, but its "
                         f"{layout} part of a sequence of {seq_len} over {ranks} ranks has "
                         f"{sum(sizes[rank])} (fastseq.distributed.split_sequence splits it)")
    ring = Ring(group, rank, ranks, _global_rank(group, (rank + 1) % ranks),
                _global_rank(group, (rank - 1) % ranks), sizes, layout, is_causal,
                1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale),
                query.shape[1] != key.shape[1], backend)
    return _RingAttention.apply(query, key, value, ring)
