"""Benchmark set-up: device choice, preset, GPU-correct timing, peak memory and the correctness
check every case records.

Every case records op, mode (cell), shape, dtype, provider, pass (fwd / fwd+bwd), device name,
GFLOP, the length its plots use, and max_error (its forward output against the float64
reference) in extra_info; the fastseq-bench command (fastseq/benchmark/) turns the JSON into
tables and plots.

Presets (FASTSEQ_BENCH_PRESET, set by fastseq-bench): "quick" runs each suite's small CPU
cases on any device (a smoke run; on a 2-core CPU the whole quick run takes about a minute),
"default" the device's own cases (the GPU grids on a GPU), "full" those plus the cases the
default leaves out to save time, "headline" only the issues' compass cases of the recurrent,
attention and relative-attention suites (the GPU script's stage 2, sized for a few minutes of
a lent GPU; on a CPU those suites' small cases).
"""
import copy
import os

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DEVICE_NAME = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
PRESET = os.environ.get("FASTSEQ_BENCH_PRESET", "default")
if PRESET not in ("quick", "headline", "default", "full"):
    raise ValueError(f"FASTSEQ_BENCH_PRESET must be quick, headline, default or full, got {PRESET!r}")
# fastseq-bench --dtype, for the suites whose dtype is not a test parameter (comma-separated
# torch dtype names; empty: every dtype).
DTYPES = [d for d in os.environ.get("FASTSEQ_BENCH_DTYPES", "").split(",") if d]
# The GPU grids, unless a quick (smoke) run was asked for.
GPU_CASES = DEVICE.type == "cuda" and PRESET != "quick"
HEADLINE = PRESET == "headline"
# Calls per timed round on the GPU: launches are asynchronous, so one synchronize closes a
# round of many calls (a cell step is ~10 us; one sync would cost as much as the step).
GPU_CALLS_PER_ROUND = 50


def run_timed(benchmark, fn, calls_per_round=GPU_CALLS_PER_ROUND, **info):
    """Time fn. On a GPU: the median of CUDA-event timings of single calls with the L2 cache
    flushed before each (triton.testing.do_bench: 256 MB written between calls), recorded as
    extra_info median_us, and the peak memory one call allocates above what was live before
    (peak_mib); pytest-benchmark's own rounds of `calls_per_round` calls closed by one
    synchronize are kept in the JSON too. On a CPU: pytest-benchmark's rounds, one call each."""
    if DTYPES and info.get("dtype") not in DTYPES:
        pytest.skip(f"dtype {info.get('dtype')} not asked for (--dtype)")
    benchmark.extra_info.update(info, device=DEVICE_NAME, preset=PRESET)
    if DEVICE.type == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        benchmark.extra_info["median_us"] = 1e3 * triton.testing.do_bench(
            fn, warmup=25, rep=100, return_mode="median")

        def round_of_calls():
            for _ in range(calls_per_round):
                fn()
            torch.cuda.synchronize()

        benchmark.extra_info["calls_per_round"] = calls_per_round
        benchmark.pedantic(round_of_calls, rounds=5, warmup_rounds=1)
    else:
        benchmark.extra_info["calls_per_round"] = 1
        torch.set_num_threads(int(os.environ.get("FASTSEQ_BENCH_THREADS", torch.get_num_threads())))
        benchmark.pedantic(fn, rounds=15, warmup_rounds=2, iterations=1)


def max_error(got, expected) -> float:
    """Largest absolute difference of two tensors (or sequences of tensors), in float64."""
    if isinstance(got, (tuple, list)):
        return max((max_error(g, e) for g, e in zip(got, expected)), default=0.0)
    if got.numel() == 0:
        return 0.0
    return (got.detach().double() - expected.detach().double()).abs().max().item()


def pass_step(passes: str, run, loss=lambda out: out):
    """The timed call of a "fwd" or "fwd+bwd" case: run() under no_grad, or a backward from the
    sum of loss(run()) (loss picks the output a layer's tuple is timed on)."""
    if passes == "fwd":
        def step():
            with torch.no_grad():
                return run()
    else:
        def step():
            loss(run()).sum().backward()
    return step


def record_error(benchmark, got, expected) -> None:
    """The case's correctness check: its forward output against the float64 reference."""
    benchmark.extra_info["max_error"] = max_error(got, expected)


def in_float64(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a module (the reference twin of a benchmarked layer)."""
    return copy.deepcopy(module).double()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
