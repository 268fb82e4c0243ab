"""The gloo processes of tests/torch_api/test_multi_rank.py: every case of dtensor_cases and
context_parallel_cases on a mesh of 2 ranks (0 and 1) and of 3, each outcome saved per rank.
One spawn serves every case: a process costs seconds to start (torch, fastseq and the Triton
interpreter's first compilations), a case a fraction of one."""
from __future__ import annotations

import datetime
import traceback

import torch
import torch.distributed as dist

import context_parallel_cases
import dtensor_cases

CASES = {**dtensor_cases.CASES, **context_parallel_cases.CASES}
WORLD_SIZES = (2, 3)


def run_all(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    from torch.distributed.device_mesh import DeviceMesh
    # A case that fails on one rank only would leave the others waiting in a collective
    # (cases compare per-rank results after their collectives for that reason): the timeout
    # turns such a hang into an error. Every case takes seconds.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    outcomes = {}
    try:
        meshes = {size: DeviceMesh("cpu", list(range(size))) for size in WORLD_SIZES}
        dtensor_cases.GRIDS.update({size: DeviceMesh("cpu", [list(range(size))],
                                                     mesh_dim_names=("dp", "tp"))
                                    for size in WORLD_SIZES})
        for size, mesh in meshes.items():
            if rank >= size:
                continue
            for name, case in CASES.items():
                torch.manual_seed(0)
                try:
                    case(mesh)
                    outcomes[f"{name}-{size}"] = "ok"
                except Exception:  # noqa: BLE001 - reported by the test that reads the file
                    outcomes[f"{name}-{size}"] = traceback.format_exc()
        torch.save(outcomes, f"{out_file}.{rank}")
        dist.barrier()  # every collective done before gloo is torn down (test_distributed.py)
    finally:
        dist.destroy_process_group()
