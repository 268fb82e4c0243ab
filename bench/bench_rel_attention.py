"""Transformer-XL relative-position attention: fastseq's fused Triton kernel against the
original formulation in eager PyTorch (AC + _rel_shift(BD), fastseq.reference's
rel_attention_original), a FlexAttention formulation (score_mod adding a precomputed
(q+v) . pos^T gathered by distance) where torch has flex_attention, and fastseq's own plain
attention on the same shape (the issue's "half of plain attention's TFLOP/s" target).

FLOPs: the visible (query, key) pairs of the causal band with memory, Lq * M + Lq (Lq + 1) / 2,
times 6 D (content q.k, position q.pos, p.v: two FLOPs per multiply-add each); backward 2.5x.
The plain-attention peer runs unmasked over all Lk keys and counts 4 B H Lq Lk D, so the two
TFLOP/s columns compare kernel efficiency, not time.
Peak memory (GPU): the largest allocation above the inputs during one call (peak_mib, measured
by conftest.run_timed).
"""
import pytest
import torch

import fastseq
from fastseq import reference

from .conftest import DEVICE, GPU_CASES, HEADLINE, record_error, run_timed

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    flex_attention = None

if GPU_CASES:
    BATCH, HEADS, DIM, DTYPE = 16, 16, 64, torch.bfloat16
    LENGTHS = [256, 512, 1024, 2048]
    PROVIDERS = ["fastseq-triton", "original", "fastseq-attention"] + \
        (["flex"] if flex_attention is not None else [])
    if HEADLINE:  # the target lengths; flex compiles per shape (tens of seconds): full runs only
        LENGTHS, PROVIDERS = [512, 2048], PROVIDERS[:3]
else:
    # A 2-core CPU: fastseq's CPU path (the reference's gather formulation, plain PyTorch)
    # against the original's, one small case.
    BATCH, HEADS, DIM, DTYPE = 2, 2, 32, torch.float32
    LENGTHS = [64]
    PROVIDERS = ["fastseq", "original"]


def inputs(length):
    """Lq = M = length: query [B, H, Lq, D], key/value [B, H, 2 Lq, D], pos by distance."""
    r = lambda *s: torch.randn(*s, device=DEVICE, dtype=DTYPE)  # noqa: E731
    return (r(BATCH, HEADS, length, DIM), r(BATCH, HEADS, 2 * length, DIM),
            r(BATCH, HEADS, 2 * length, DIM), r(2 * length, HEADS, DIM), r(HEADS, DIM),
            r(HEADS, DIM))


def flex_call(length):
    """FlexAttention: BD = (q + v) . pos^T [B, H, Lq, P] precomputed, gathered by distance in
    score_mod; causal-with-memory as a block mask. Compiled (flex's only fast path)."""
    memory = length
    block_mask = create_block_mask(lambda b, h, q, k: k <= q + memory, None, None, length,
                                   2 * length, device=DEVICE)
    compiled = torch.compile(flex_attention)

    def call(q, k, v, pos, u, w):
        scale = DIM ** -0.5
        bd = torch.einsum("bhid,phd->bhip", q + w[:, None], pos)

        def score_mod(score, b, h, q_idx, kv_idx):
            # Clamped: score_mod also runs on the masked entries of partly visible blocks.
            return score + bd[b, h, q_idx, (memory + q_idx - kv_idx).clamp(min=0)] * scale

        return compiled(q + u[:, None], k, v, score_mod=score_mod, block_mask=block_mask,
                        scale=scale)
    return call


def provider_call(provider, length):
    if provider in ("fastseq-triton", "fastseq"):
        backend = "triton" if provider == "fastseq-triton" else None
        return lambda *t: fastseq.ops.rel_attention(*t, backend=backend)
    if provider == "original":
        # r ordered by distance Lk-1 ... 0 as the original code builds it.
        return lambda q, k, v, pos, u, w: reference.rel_attention_original(
            q, k, v, pos.flip(0), u, w)
    if provider == "flex":
        return flex_call(length)
    # fastseq's plain attention on the same tensors, unmasked (its FLOPs counted as such).
    return lambda q, k, v, pos, u, w: fastseq.ops.attention(q, k, v, backend="triton")


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_rel_attention(benchmark, provider, length, passes):
    if provider == "original" and DEVICE.type == "cuda" and length > 1024 and passes != "fwd":
        # B H Lq Lk fp32 score tensors: 16 x 16 x 2k x 4k x 4 B = 8.6 GB each, several live.
        pytest.skip("the original formulation's backward at Lq = 2k needs > 60 GB")
    leaves = [t.requires_grad_(passes != "fwd") for t in inputs(length)]
    fn = provider_call(provider, length)
    if provider == "fastseq-attention":  # plain attention over all 2 Lq keys: 4 B H Lq Lk D
        flop_fwd = 4 * BATCH * HEADS * length * 2 * length * DIM
    else:
        pairs = length * length + length * (length + 1) // 2
        flop_fwd = 6 * BATCH * HEADS * pairs * DIM
    if passes == "fwd":
        def step():
            with torch.no_grad():
                return fn(*leaves)
        flop = flop_fwd
    else:
        grad = torch.randn(BATCH, HEADS, length, DIM, device=DEVICE, dtype=DTYPE)

        def step():
            torch.autograd.grad(fn(*leaves), leaves, grad)
        flop = 3.5 * flop_fwd
    # The check: batch 0, head 0 against the float64 reference (the plain-attention peer
    # computes another function and records none).
    if provider != "fastseq-attention":
        with torch.no_grad():
            got = fn(*leaves)[:1, :1]
        q, k, v, pos, u, w = (t.detach() for t in leaves)
        expected = reference.relative_attention(
            q[:1, :1].double(), k[:1, :1].double(), v[:1, :1].double(), pos[:, :1].double(),
            u[:1].double(), w[:1].double())
        record_error(benchmark, got, expected)
    step()  # a provider that cannot run the case fails here, before timing
    run_timed(benchmark, step, calls_per_round=5, op="rel_attention", provider=provider,
              passes=passes, gflop=flop / 1e9,
              shape=f"B={BATCH} H={HEADS} Lq={length} M={length} D={DIM} causal",
              dtype=str(DTYPE).split(".")[1], length=length)


def gpu_smoke(out) -> bool:
    """This family's case in bench/gpu_smoke.py (the GPU run's stage 1): fastseq against
    plain PyTorch and float64 truth under the tolerance rule; True when every quantity keeps it."""
    from .smoke_checks import DTYPES, ATTENTION, rand, check
    B, H, L, M, D = ATTENTION
    D = min(D, 128)
    S = L + M
    leaves = [rand(B, H, L, D), rand(B, H, S, D), rand(B, H, S, D), rand(S, H, D),
              rand(H, D), rand(H, D)]

    def call(backend, t):
        return [fastseq.ops.rel_attention(*t, is_causal=True, backend=backend)]
    ok = True
    for dtype in DTYPES:
        ok &= check(out, "rel_attention", f"B={B} H={H} Lq={L} M={M} D={D} causal", "triton",
                    dtype, call, leaves, ["out", "dq", "dk", "dv", "dpos", "dcontent_bias",
                     "dposition_bias"], S)
    return ok
