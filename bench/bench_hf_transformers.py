"""A Hugging Face transformers model with attn_implementation="fastseq" against "sdpa": the
same weights, a prefill forward over a left-padded batch and a greedy generate() (one cached
decode step per token, transformers' DynamicCache). On a GPU a Llama-3.2-1B-sized config
(16 layers, d 2048, 32 query / 8 key-value heads, bf16) over 2k-token prompts; on a CPU a
small Llama. What fastseq changes is the attention call and its mask: a description (causal,
padding as key ranges) instead of transformers' [B, 1, L, S] bool mask per forward, the Triton
kernels on a GPU (split-KV for each decode step), torch's SDPA on a CPU. Each case records its
largest logit difference from sdpa's (its correctness check)."""
import pytest
import torch

from .conftest import DEVICE, GPU_CASES, record_error, run_timed

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
import fastseq.integrations.transformers  # noqa: E402,F401  (registers "fastseq")

if GPU_CASES:  # Llama-3.2-1B's widths
    LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 16, 2048, 32, 8, 8192, 32000
    BATCH, PROMPT, NEW_TOKENS, DTYPE = 4, 2048, 32, torch.bfloat16
else:
    LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 2, 128, 4, 2, 256, 1000
    BATCH, PROMPT, NEW_TOKENS, DTYPE = 2, 128, 8, torch.float32
SHAPE = f"llama layers={LAYERS} d={HIDDEN} H={HEADS}/{KV_HEADS} B={BATCH} prompt={PROMPT}"
PROVIDERS = ["fastseq", "sdpa"]


def model_and_prompt():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=PROMPT + NEW_TOKENS)
    with DEVICE:
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa",
                                                           dtype=DTYPE).eval()
    ids = torch.randint(1, VOCAB, (BATCH, PROMPT), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, : PROMPT // 8] = 0  # left padding, as a batch of prompts for generation has
    return model, ids, mask


def _flops_per_token() -> float:
    """Forward matmul FLOPs per token, weights only (attention's own FLOPs vary with length)."""
    head = HIDDEN // HEADS
    per_layer = 2 * HIDDEN * (HIDDEN + 2 * KV_HEADS * head + HIDDEN) + 2 * 3 * HIDDEN * FFN
    return LAYERS * per_layer + 2 * HIDDEN * VOCAB


@pytest.mark.parametrize("provider", PROVIDERS)
def bench_hf_transformers_prefill(benchmark, provider):
    model, ids, mask = model_and_prompt()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        model.set_attn_implementation(provider)

        def forward():
            return model(ids, attention_mask=mask).logits
        got = forward()
        real = mask.bool()
        record_error(benchmark, got[real], expected[real])
        run_timed(benchmark, forward, calls_per_round=1, op="hf_transformers", mode="prefill",
                  provider=provider, passes="fwd", shape=SHAPE, dtype=str(DTYPE).split(".")[1],
                  length=PROMPT, gflop=_flops_per_token() * BATCH * PROMPT / 1e9)


@pytest.mark.parametrize("provider", PROVIDERS)
def bench_hf_transformers_generate(benchmark, provider):
    model, ids, mask = model_and_prompt()
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                    pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **settings)
        model.set_attn_implementation(provider)

        def generate():
            return model.generate(ids, attention_mask=mask, **settings)
        got = generate()
        # greedy tokens: the share that differ from sdpa's (0 when the two agree)
        benchmark.extra_info["max_error"] = (got != expected).float().mean().item()
        run_timed(benchmark, generate, calls_per_round=1, op="hf_transformers", mode="generate",
                  provider=provider, passes="fwd", shape=SHAPE + f" new={NEW_TOKENS}",
                  dtype=str(DTYPE).split(".")[1], length=PROMPT,
                  tokens_per_call=BATCH * NEW_TOKENS)
