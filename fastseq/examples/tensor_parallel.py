"""A Transformer block under tensor parallelism: torch's parallelize_module shards the q/k/v
projections by columns and the output projection by rows, and fastseq's attention runs on the
DTensors in between, each rank on its own heads, with no communication of its own (the only
collective is the row-parallel projection's all-reduce, torch's).

    python -m fastseq.examples.tensor_parallel [--ranks 2]

Spawns --ranks CPU processes (gloo) and checks that the block's output and every gradient equal
one process running the same block unsharded (float64). On GPUs the same code runs under
torchrun with the "nccl" backend and a "cuda" mesh.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn

import fastseq


class AttentionBlock(nn.Module):
    """Pre-norm self-attention with separate q/k/v projections (what tensor parallelism
    splits by columns) and a residual."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d_model)
        self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        h = self.norm(x)
        # Under tensor parallelism the projections return DTensors (global shapes) sharded on
        # the features; the view splits them into heads, sharded on the heads.
        q, k, v = (proj(h).view(batch, length, self.heads, -1).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        a = fastseq.ops.attention(q, k, v, is_causal=True)
        return x + self.out(a.transpose(1, 2).reshape(batch, length, -1))


def parallelize(block: AttentionBlock, mesh) -> AttentionBlock:
    """q/k/v column-parallel with DTensor outputs (sharded on the features, so on the heads
    after the view), out row-parallel: the Megatron-LM split torch's tensor parallelism runs."""
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    plan = {name: ColwiseParallel(use_local_output=False) for name in ("q", "k", "v")}
    plan["out"] = RowwiseParallel()
    return parallelize_module(block, mesh, plan)


def _block_and_input(d_model: int = 24, heads: int = 6):
    torch.manual_seed(0)
    block = AttentionBlock(d_model, heads).double()
    return block, torch.randn(3, 5, d_model, dtype=torch.float64)


def check_tensor_parallel_block(mesh) -> float:
    """The parallelized block's output and gradients equal one process's (raises if not);
    returns the largest difference."""
    from torch.distributed.tensor import DTensor

    block, x = _block_and_input()
    want = block(x)
    want.square().sum().backward()
    want_grads = {name: p.grad for name, p in block.named_parameters()}
    sharded, _ = _block_and_input()
    parallelize(sharded, mesh)
    got = sharded(x)
    got.square().sum().backward()
    worst = (got - want).abs().max().item()
    torch.testing.assert_close(got, want)
    for name, p in sharded.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(grad, want_grads[name], msg=lambda m: f"{name}.grad: {m}")
        worst = max(worst, (grad - want_grads[name]).abs().max().item())
    return worst


def _worker(rank: int, ranks: int, init_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=ranks)
    try:
        worst = check_tensor_parallel_block(init_device_mesh("cpu", (ranks,)))
        if rank == 0:
            print(f"{ranks} ranks: output and every gradient equal one process "
                  f"(largest difference {worst:.1e})")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="a divisor of the 6 heads")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU processes: Triton runs interpreted
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.spawn(_worker, args=(args.ranks, os.path.join(folder, "init")),
                                    nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
