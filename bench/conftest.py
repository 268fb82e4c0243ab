"""Benchmark set-up: device choice and GPU-correct timing for pytest-benchmark.

Every case records op, mode (cell), shape, dtype, provider, pass (fwd / fwd+bwd), device name
and GFLOP in extra_info; bench/report.py turns the JSON into a comparison table.
"""
import os

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DEVICE_NAME = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
# Calls per timed round on the GPU: launches are asynchronous, so one synchronize closes a
# round of many calls (a cell step is ~10 us; one sync would cost as much as the step).
GPU_CALLS_PER_ROUND = 50


def run_timed(benchmark, fn, calls_per_round=GPU_CALLS_PER_ROUND, **info):
    """Time fn: on a GPU, rounds of `calls_per_round` calls closed by one synchronize (medians
    per call in bench/report.py); on a CPU, one call per round."""
    benchmark.extra_info.update(info, device=DEVICE_NAME)
    if DEVICE.type == "cuda":
        def round_of_calls():
            for _ in range(calls_per_round):
                fn()
            torch.cuda.synchronize()

        benchmark.extra_info["calls_per_round"] = calls_per_round
        benchmark.pedantic(round_of_calls, rounds=20, warmup_rounds=3)
    else:
        benchmark.extra_info["calls_per_round"] = 1
        torch.set_num_threads(int(os.environ.get("FASTSEQ_BENCH_THREADS", torch.get_num_threads())))
        benchmark.pedantic(fn, rounds=15, warmup_rounds=2, iterations=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
