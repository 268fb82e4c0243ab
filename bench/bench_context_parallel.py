"""Context parallelism: fastseq.distributed.ring_attention over RANKS processes (gloo, one
thread each) against one process with RANKS threads attending the whole sequence, causal.

Providers: ring-contiguous and ring-zigzag (the layouts; zigzag balances the causal work),
one-process (the same block kernel, the reference backend, over the whole sequence) and
one-process-sdpa (torch's SDPA: the fastest single-process CPU attention, which returns no
log-sum-exp and so cannot be a ring block). tokens/s = batch x seq_len / median.

The ring's blocks need the log-sum-exp, which on a CPU only the reference backend returns (the
Triton kernels run interpreted there): on a CPU this suite measures the ring's scaling and
overhead, not attention speed. The lent GPU machine has one GPU and a ring needs two or more,
so the suite skips on CUDA; bench/NOTES.md has the GPU communication floor per step.
"""
import pytest
import torch

from fastseq import ops
from fastseq.benchmark.ring import RingCase, RingDriver, ring_call

from .conftest import DEVICE, record_error, run_timed

RANKS = 2
BATCH, HEADS, SEQ_LEN, HEAD_DIM = 1, 4, 1024, 32
PROVIDERS = ["ring-contiguous", "ring-zigzag", "one-process", "one-process-sdpa"]


@pytest.fixture(scope="module")
def driver():
    if DEVICE.type == "cuda":
        pytest.skip("a ring needs two or more GPUs; the lent machine has one (bench/NOTES.md: "
                    "the communication floor)")
    ring = RingDriver(RANKS)
    yield ring
    ring.close()


def _expected(case: RingCase):
    whole = case.inputs(0, 1)
    return ops.attention(*(t.double() for t in whole), is_causal=True, backend="reference")


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_ring_attention(benchmark, driver, provider, passes):
    ring = provider.startswith("ring")
    case = RingCase(BATCH, HEADS, SEQ_LEN, HEAD_DIM,
                    provider.removeprefix("ring-") if ring else "contiguous", True, passes,
                    "torch" if provider.endswith("sdpa") else "reference",
                    1 if ring else RANKS)
    expected = _expected(case)
    if ring:
        driver.configure(case)
        out = driver.run()
        from fastseq.distributed import split_sequence
        record_error(benchmark, out, split_sequence(expected, 2, layout=case.layout))
        step = driver.run
    else:
        torch.set_num_threads(case.threads)
        tensors = case.inputs(0, 1)
        record_error(benchmark, ring_call(case, tensors, ring=False), expected)

        def step():
            return ring_call(case, tensors, ring=False)
    # Causal: half of the 4 B H T^2 E multiply-adds' FLOPs forward, 2.5x that forward+backward.
    flop = 2 * BATCH * HEADS * SEQ_LEN ** 2 * HEAD_DIM * (1 if passes == "fwd" else 3.5)
    run_timed(benchmark, step, op="ring_attention", provider=provider, passes=passes,
              gflop=flop / 1e9, dtype="float32", length=SEQ_LEN, tokens=BATCH * SEQ_LEN,
              shape=f"B={BATCH} H={HEADS} T={SEQ_LEN} E={HEAD_DIM} causal ranks={RANKS}")
