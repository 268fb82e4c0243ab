"""DDP and FSDP2 (fully_shard) over fastseq layers: two processes on the gloo backend (CPU),
each with half of the batch, give the gradients of one process over the whole batch. The
fastseq ops run on their Triton kernels (through the interpreter here), so the wrappers'
gradient hooks and FSDP2's parameter all-gathers meet fastseq's registered ops."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastseq

from conftest import TRITON_TEST_DEVICE


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fastseq.nn.LSTM(6, 8, batch_first=True, backend="triton")
        self.attn = fastseq.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.lstm(x)
        a, _ = self.attn(h, h, h, need_weights=False, is_causal=False)
        return self.head(a).square().mean()


def make_model_and_data():
    torch.manual_seed(0)
    return Model(), torch.randn(4, 5, 6)


def gradients(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def worker(rank, world_size, init_file, out_file, wrapper):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        model, x = make_model_and_data()
        if wrapper == "ddp":
            run = nn.parallel.DistributedDataParallel(model)
        else:  # FSDP2: parameters sharded as DTensors, gathered around each forward/backward
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            run = fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
        half = x.shape[0] // world_size
        with fastseq.use_backend("triton"):
            run(x[rank * half:(rank + 1) * half]).backward()
        grads = [p.grad.full_tensor() if wrapper == "fsdp2" else p.grad
                 for p in model.parameters()]
        if rank == 0:
            torch.save([g.detach().clone() for g in grads], out_file)
        # Both ranks done with every collective before either tears gloo down. Without it a
        # rank aborted at interpreter shutdown ("terminate called without an active
        # exception", no Python frame) in 3 of 8 FSDP2 runs on torch 2.11 once issue 27's
        # attention kernels landed (0 of 8 before; the larger kernels take longer under the
        # interpreter, which is our guess at why); with it, 0 of 12 (2026-12-06).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, wrapper):
    if fastseq.backend.triton_unavailable(torch.device("cpu")) is not None or \
            TRITON_TEST_DEVICE.type != "cpu":
        pytest.skip("runs the CPU (gloo) processes through the Triton interpreter")
    out_file = tmp_path / "grads.pt"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(out_file), wrapper), nprocs=2,
             join=True)
    wrapped_grads = torch.load(out_file)
    model, x = make_model_and_data()
    with fastseq.use_backend("triton"):
        model(x).backward()
    for got, expected in zip(wrapped_grads, gradients(model)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
