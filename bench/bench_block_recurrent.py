"""The Block-Recurrent Transformer layer: fastseq's (the token side of a segment in one fused
launch, the states' update one fused launch per block) against the original's block-by-block
formulation in eager PyTorch (fastseq.reference.block_recurrent.layer_original: every window's
scores in memory, separate attention calls) and against a sliding-window layer without
recurrence on torch's SDPA (the same layer with num_states=0 on the torch backend: the price
of the recurrence).

GPU: the paper's shape (W = 512, S = 512, d_model = 1024, 8 heads of 128, MLP 4096, bf16), a
segment of 4 blocks (T = 2048) at batch 2. CPU: a small case in float32. FLOPs: every GEMM of
the layer (projections, attention over the visible keys, feed-forward, the states' side per
block), counted by `layer_flops`; backward 2x the forward (3x in all).
"""
import copy

import pytest
import torch

from fastseq.nn.block_recurrent import BlockRecurrentTransformerLayer
from fastseq.reference.block_recurrent import layer_original

from .conftest import DEVICE, GPU_CASES, pass_step, record_error, run_timed

if GPU_CASES:
    BATCH, D_MODEL, HEADS, HEAD_DIM, MLP, WINDOW, STATES, BLOCKS = 2, 1024, 8, 128, 4096, 512, 512, 4
    DTYPE = torch.bfloat16
else:  # a 2-core CPU
    BATCH, D_MODEL, HEADS, HEAD_DIM, MLP, WINDOW, STATES, BLOCKS = 2, 64, 2, 32, 128, 32, 16, 4
    DTYPE = torch.float32
TOKENS = WINDOW * BLOCKS
PROVIDERS = ["fastseq", "original", "sliding-window-sdpa"]


def layer_flops(T: int, blocks: int, d: int, heads: int, head_dim: int, mlp: int, window: int,
                states: int) -> float:
    """Forward FLOPs of one recurrent layer over T tokens (2 per multiply-add)."""
    width = heads * head_dim
    tokens = (2 * T * d * 4 * width              # queries, keys, values, queries2
              + 4 * T * window * width           # window attention (q.k and p.v)
              + 4 * T * states * width           # cross-attention to the states
              + 2 * T * 2 * width * d            # projection of both attentions
              + 4 * T * d * mlp)                 # feed-forward
    per_block = (2 * states * d * 4 * width + 4 * states * states * width
                 + 4 * states * 2 * window * width + 2 * states * 2 * width * d
                 + 4 * states * d * mlp)
    return tokens + blocks * per_block


def make_layer(num_states: int, backend):
    return BlockRecurrentTransformerLayer(D_MODEL, HEADS, HEAD_DIM, MLP, WINDOW, num_states,
                                          backend=backend, device=DEVICE, dtype=DTYPE).eval()


def provider_call(provider):
    if provider == "fastseq":
        layer = make_layer(STATES, None)
        return layer, lambda x: layer(x)[0]
    if provider == "original":
        layer = make_layer(STATES, None)
        return layer, lambda x: layer_original(layer, x)[0]
    layer = make_layer(0, "torch")
    return layer, lambda x: layer(x)[0]


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_block_recurrent(benchmark, provider, passes):
    layer, run_layer = provider_call(provider)
    x = torch.randn(BATCH, TOKENS, D_MODEL, device=DEVICE, dtype=DTYPE,
                    requires_grad=passes != "fwd")
    flop = layer_flops(TOKENS, BLOCKS, D_MODEL, HEADS, HEAD_DIM, MLP, WINDOW,
                       STATES if provider != "sliding-window-sdpa" else 0)
    if provider != "sliding-window-sdpa":
        # The check: batch row 0 against the original's formulation in float64.
        with torch.no_grad():
            got = run_layer(x[:1])
            expected, _ = layer_original(copy.deepcopy(layer).double(), x[:1].detach().double())
        record_error(benchmark, got, expected)
    step = pass_step(passes, lambda: run_layer(x))
    step()  # a provider that cannot run the case fails here, before timing
    run_timed(benchmark, step, calls_per_round=3, op="block_recurrent_layer", provider=provider,
              passes=passes, gflop=(flop if passes == "fwd" else 3 * flop) / 1e9,
              shape=f"B={BATCH} T={TOKENS} W={WINDOW} S={STATES} d={D_MODEL} H={HEADS}x{HEAD_DIM}",
              dtype=str(DTYPE).split(".")[1], length=TOKENS)


def gpu_smoke(out) -> bool:
    """This family's case in bench/gpu_smoke.py (the GPU run's stage 1): the fused attention
    step of both directions against plain PyTorch and float64 truth under the tolerance rule;
    True when every quantity keeps it."""
    import fastseq
    from .smoke_checks import ATTENTION, DTYPES, check, rand
    B, H, L, W, D = ATTENTION
    D = min(D, 128)
    W = max(W, 2)
    pending = W // 3
    S = W + pending + L
    G = (pending + L - 1) // W + 1
    states = 2 * W + 1
    tokens = [rand(B, H, L, D), rand(B, H, S, D), rand(B, H, S, D), rand(H, W + 1),
              rand(B, H, L, D), rand(B, H, G, states, D), rand(B, H, G, states, D)]

    def token_call(backend, t):
        q, k, v, bias, q2, k2, v2 = t
        return list(fastseq.ops.block_recurrent_attention(
            q, k, v, q2, k2, v2, window=W, bias=bias, group_size=W, group_offset=pending,
            scale=D ** -0.5, scale2=D ** -0.5, backend=backend))
    state_leaves = [rand(B, H, states, D), rand(B, H, states, D), rand(B, H, states, D),
                    rand(B, H, states, D), rand(B, H, 1, 2 * W, D), rand(B, H, 1, 2 * W, D)]

    def state_call(backend, t):
        return list(fastseq.ops.block_recurrent_attention(*t, scale=D ** -0.5,
                                                          scale2=D ** -0.5, backend=backend))
    ok = True
    for dtype in DTYPES:
        ok &= check(out, "block_recurrent", f"tokens B={B} H={H} L={L} W={W} pending={pending} "
                    f"S={states} D={D}", "triton", dtype, token_call, tokens,
                    ["out", "out2", "dq", "dk", "dv", "dbias", "dq2", "dk2", "dv2"], S + states)
        ok &= check(out, "block_recurrent", f"states B={B} H={H} S={states} window={2 * W} "
                    f"D={D}", "triton", dtype, state_call, state_leaves,
                    ["out", "out2", "dq", "dk", "dv", "dq2", "dk2", "dv2"], 2 * W + states)
    return ok
