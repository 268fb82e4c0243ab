"""Timing ring attention across processes from one benchmark process: this process is rank 0 of
a gloo group and drives helper processes (ranks 1 .. n - 1) that run the same ring call each
time it does, so pytest-benchmark times rank 0's calls, which wait on every rank: the wall
time of the whole ring. bench/bench_context_parallel.py uses it."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RUN, CONFIGURE, STOP = 1, 2, 0


@dataclasses.dataclass(frozen=True)
class RingCase:
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    layout: str
    is_causal: bool
    passes: str  # "fwd" or "fwd+bwd"
    backend: str
    threads: int  # per rank

    def inputs(self, rank: int, ranks: int):
        from ..distributed import split_sequence
        generator = torch.Generator().manual_seed(0)
        shape = (self.batch, self.heads, self.seq_len, self.head_dim)
        whole = [torch.randn(shape, generator=generator) for _ in range(3)]
        if ranks == 1:
            return whole
        return [split_sequence(t, 2, layout=self.layout) for t in whole]


def ring_call(case: RingCase, tensors: list, ring: bool):
    """One timed call: the ring (every rank calls it), or attention over the whole sequence
    in this process alone (ring=False)."""
    from .. import ops
    from ..distributed import ring_attention
    grad = case.passes != "fwd"
    q, k, v = (t.detach().requires_grad_(grad) for t in tensors)
    with torch.set_grad_enabled(grad):
        if ring:
            out = ring_attention(q, k, v, is_causal=case.is_causal, layout=case.layout,
                                 seq_len=case.seq_len, backend=case.backend)
        else:
            out = ops.attention(q, k, v, is_causal=case.is_causal, backend=case.backend)
        if grad:
            out.sum().backward()
    return out


def _helper(rank: int, ranks: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=ranks)
    case, tensors = None, None
    command = torch.zeros(1, dtype=torch.int64)
    try:
        while True:
            dist.broadcast(command, 0)
            if command.item() == STOP:
                break
            if command.item() == CONFIGURE:
                box = [None]
                dist.broadcast_object_list(box, 0)
                case = box[0]
                torch.set_num_threads(case.threads)
                tensors = case.inputs(rank, ranks)
            else:
                ring_call(case, tensors, ring=True)
    finally:
        dist.destroy_process_group()


class RingDriver:
    """Rank 0 here, helpers in spawned processes; configure(case) then run() per timed call."""

    def __init__(self, ranks: int) -> None:
        self.ranks = ranks
        self._folder = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._folder.name, "init")
        context = mp.get_context("spawn")
        self._helpers = [context.Process(target=_helper, args=(r, ranks, init_file))
                         for r in range(1, ranks)]
        for helper in self._helpers:
            helper.start()
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0,
                                world_size=ranks)
        self.case: Optional[RingCase] = None
        self._threads = torch.get_num_threads()

    def _command(self, value: int) -> None:
        dist.broadcast(torch.tensor([value], dtype=torch.int64), 0)

    def configure(self, case: RingCase) -> None:
        self._command(CONFIGURE)
        dist.broadcast_object_list([case], 0)
        torch.set_num_threads(case.threads)
        self.case, self.tensors = case, case.inputs(0, self.ranks)

    def run(self):
        self._command(RUN)
        return ring_call(self.case, self.tensors, ring=True)

    def close(self) -> None:
        self._command(STOP)
        dist.destroy_process_group()
        for helper in self._helpers:
            helper.join()
        self._folder.cleanup()
        torch.set_num_threads(self._threads)
