"""A Transformer-XL segment split across the ranks of a process group, its memory relayed from
each rank's left neighbour.

Transformer-XL runs a long text as consecutive segments, each attending to itself and to a
memory: every layer's input over the last mem_len positions before it, detached. Split a
segment into contiguous slices, one per rank, and each slice is such a segment: rank r's
memory at layer l is the last mem_len rows of rank r - 1's layer-l input (when every slice has
at least mem_len positions), which rank r - 1 has as soon as it reaches layer l. So each layer
begins with one ring shift: every rank sends the tail of its layer input to the next rank and
receives its memory from the previous; rank 0's comes from the previous segment (the memory it
holds) and what it receives from the last rank is the next segment's memory. The result is
exactly the one-process model run on the slices one after another with mem_len, gradients
included (the memory is detached there as here; the parameters' gradients are summed over the
ranks as DDP sums them).

Sent per layer and rank: one [mem_len, B, d_model] tail (the LM sends one more, its final
output's, for the memory format of the original, n_layer + 1 tensors).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops._checks import InputError
from .ring import _exchange, _global_rank, _wait
from .sequence import rank_and_size

OP = "fastseq.distributed.transformer_xl_segment"


class MemoryRelay:
    """decode_segment's relay: the memory of each layer of this rank's slice (module
    docstring); on rank 0 it also collects the next segment's memory in new_mems."""

    def __init__(self, mems, mem_len: int, group, rank: int, ranks: int) -> None:
        self.mems, self.mem_len, self.group = mems, mem_len, group
        self.rank, self.ranks = rank, ranks
        self.next_peer = _global_rank(group, (rank + 1) % ranks)
        self.prev_peer = _global_rank(group, (rank - 1) % ranks)
        self.new_mems: list[Tensor] = []

    @property
    def mlen(self) -> int:
        if self.rank == 0:
            return self.mems[0].shape[0] if self.mems else 0
        return self.mem_len

    def __call__(self, layer: int, layer_input: Tensor) -> Optional[Tensor]:
        if self.mem_len <= 0:
            return None
        tail = layer_input[-self.mem_len:].detach().contiguous()
        received = tail
        if self.ranks > 1:
            received = torch.empty_like(tail)
            _wait(_exchange(self, (tail,), (received,)))
        if self.rank == 0:
            self.new_mems.append(received)
            return self.mems[layer] if self.mems else None
        return received


def _is_lm(model) -> bool:
    from ..nn.transformer_xl_lm import TransformerXLLM
    return isinstance(model, TransformerXLLM)


def _check(model, tokens: Tensor, group) -> tuple[int, int]:
    from ..nn.transformer_xl import TransformerXL
    if not isinstance(model, TransformerXL) and not _is_lm(model):
        raise InputError(f"{OP}: model must be a fastseq.nn.TransformerXL or TransformerXLLM, "
                         f"got {type(model).__name__}")
    if model.ext_len:
        raise InputError(f"{OP}: ext_len must be 0 (the memory then ends at each slice's end), "
                         f"got {model.ext_len}")
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        got = list(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise InputError(f"{OP}: tokens must be this rank's slice, 2-D, got {got}")
    rank, ranks = rank_and_size(group)
    qlen = tokens.shape[1] if getattr(model, "batch_first", False) else tokens.shape[0]
    lengths = torch.zeros(ranks, dtype=torch.int64, device=tokens.device)
    lengths[rank] = qlen
    dist.all_reduce(lengths, group=group)  # every rank checks every slice, so all refuse alike
    short = [r for r, n in enumerate(lengths.tolist()) if n < model.mem_len]
    if short:
        raise InputError(f"{OP}: every rank's slice must hold at least mem_len = "
                         f"{model.mem_len} positions for its memory to come from its left "
                         f"neighbour; the slices hold {lengths.tolist()} (ranks {short} too "
                         f"few): give fewer ranks longer slices")
    return rank, ranks


def _decode(model, embedded: Tensor, relay: MemoryRelay, dtype):
    from ..nn.transformer_xl import decode_segment
    tied = _is_lm(model) or not model.untie_r
    r_w_bias = model.r_w_bias if tied else None
    r_r_bias = model.r_r_bias if tied else None
    return decode_segment(model, embedded, None, r_w_bias, r_r_bias, dtype, relay=relay)


def transformer_xl_segment(model, tokens: Tensor, mems: Optional[list[Tensor]] = None, *,
                           group: Optional[dist.ProcessGroup] = None):
    """This rank's slice of a segment through a fastseq.nn.TransformerXL (or the decoder of a
    TransformerXLLM) -> (hidden, new_mems), as model(tokens, mems) for that slice.

    tokens: this rank's contiguous slice ([L_r, B], or [B, L_r] batch first), slices in rank
    order, each of at least mem_len positions. mems: on rank 0 the memory from the previous
    segment (None at the start); other ranks' memory comes from their left neighbour (pass
    None). new_mems: on rank 0 the next segment's memory (the model's format), else None."""
    rank, ranks = _check(model, tokens, group)
    lm = _is_lm(model)
    batch_first = getattr(model, "batch_first", False)
    if batch_first:
        tokens = tokens.t()
        mems = None if mems is None else [m.transpose(0, 1) for m in mems]
    if rank == 0:
        mems = model._checked_mems(mems, tokens.shape[1]) if lm else mems
        if not lm:
            model._check_mems(mems, tokens.shape[1])
    relay = MemoryRelay(mems if rank == 0 else None, model.mem_len, group, rank, ranks)
    if lm:
        embedded, dtype = model.word_emb(tokens), model.r_w_bias.dtype
    else:
        embedded = model.word_emb(tokens) * model.emb_scale
        dtype = model.word_emb.weight.dtype
    hidden, hids = _decode(model, embedded, relay, dtype)
    if lm:
        relay(model.n_layer, hids[-1])  # the original's memory also keeps the last output
    new_mems = relay.new_mems if rank == 0 and model.mem_len > 0 else None
    if batch_first:
        hidden = hidden.transpose(0, 1)
        new_mems = None if new_mems is None else [m.transpose(0, 1) for m in new_mems]
    return hidden, new_mems


def transformer_xl_lm_loss(lm, data: Tensor, target: Tensor,
                           mems: Optional[list[Tensor]] = None, *,
                           group: Optional[dist.ProcessGroup] = None):
    """A TransformerXLLM's loss over this rank's slice -> (loss [tgt_len, B], new_mems), as
    lm(data, targets=target, mems=mems) for that slice (transformer_xl_segment says how the
    memory moves). Sum the loss over ranks (or let DDP average the gradients) for the
    segment's."""
    if not _is_lm(lm):
        raise InputError(f"fastseq.distributed.transformer_xl_lm_loss: lm must be a "
                         f"fastseq.nn.TransformerXLLM, got {type(lm).__name__}")
    if not isinstance(target, Tensor) or target.dim() != 2 or target.shape[1] != data.shape[1] \
            or target.shape[0] > data.shape[0]:
        got = list(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise InputError(f"fastseq.distributed.transformer_xl_lm_loss: target must be "
                         f"[tgt_len <= {data.shape[0]}, B={data.shape[1]}], got {got}")
    hidden, new_mems = transformer_xl_segment(lm, data, mems, group=group)
    tgt_len = target.shape[0]
    predicted = hidden[-tgt_len:].reshape(-1, lm.d_model)
    loss = lm.crit(predicted, target.reshape(-1), keep_order=True).view(tgt_len, -1)
    return loss, new_mems
