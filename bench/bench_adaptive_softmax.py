"""The Transformer-XL language model's head, fastseq.nn.ProjectedAdaptiveLogSoftmax (the loss
in chunks of tokens: one log-sum-exp a row saved, logits recomputed in the backward) against
the original formulation (every cluster's whole logits, fastseq.reference's
adaptive_nll_original) and a plain softmax head over the whole vocabulary (one Linear and
cross_entropy: tokens x vocabulary logits), at WikiText-103's vocabulary (267,735 words,
cutoffs 20k/40k/200k). GPU: the paper's base (d 410, div_val 1) and large (d 1024, div_val 4)
heads at tgt_len 150 x batch 60 = 9,000 tokens, bf16; CPU: 256 tokens, d 256, fp32. The
peak memory of a call is recorded on the GPU."""
import pytest
import torch
import torch.nn.functional as F

import fastseq
from fastseq.reference.transformer_xl_lm import adaptive_nll_original

from .conftest import DEVICE, GPU_CASES, HEADLINE, PRESET, pass_step, record_error, run_timed

VOCAB, CUTOFFS = 267_735, [20_000, 40_000, 200_000]
# (tokens, d_model, div_val, dtype). On a CPU 256 tokens (the plain head's forward and
# backward there take ~2 s a call at 2 cores; bench/NOTES.md has the 1,024- and 9,000-token
# peaks measured apart), 64 in the quick smoke run.
CASES = ([(9000, 410, 1, torch.bfloat16), (9000, 1024, 4, torch.bfloat16)] if GPU_CASES
         else [(64 if PRESET == "quick" else 256, 256, 4, torch.float32)])
if HEADLINE:  # not a headline case
    CASES = []
PROVIDERS = ["fastseq-chunked", "original", "plain-softmax"]


def head_and_inputs(tokens, d_model, div_val, dtype):
    torch.manual_seed(0)
    crit = fastseq.nn.ProjectedAdaptiveLogSoftmax(VOCAB, d_model, d_model, CUTOFFS,
                                                  div_val=div_val, keep_order=True,
                                                  device=DEVICE, dtype=dtype)
    hidden = torch.randn(tokens, d_model, device=DEVICE, dtype=dtype)
    # Zipf-like targets: most tokens in the head, as in text.
    ranks = torch.distributions.Pareto(1.0, 1.2).sample((tokens,)).long() - 1
    target = ranks.clamp(max=VOCAB - 1).to(DEVICE)
    return crit, hidden, target


def provider_call(provider, crit, d_model, dtype):
    if provider == "fastseq-chunked":
        return lambda h, t: crit(h, t)
    if provider == "original":
        return lambda h, t: adaptive_nll_original(crit, h, t)
    plain = torch.nn.Linear(d_model, VOCAB, device=DEVICE, dtype=dtype)
    return lambda h, t: F.cross_entropy(plain(h).float(), t, reduction="none")


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}_d{}_div{}_{}".format(
    c[0], c[1], c[2], str(c[3]).split(".")[1]))
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_adaptive_softmax(benchmark, provider, case, passes):
    tokens, d_model, div_val, dtype = case
    crit, hidden, target = head_and_inputs(*case)
    fn = provider_call(provider, crit, d_model, dtype)
    leaf = hidden.requires_grad_(passes != "fwd")
    if provider != "plain-softmax":  # (another function: its own weights)
        with torch.no_grad():
            record_error(benchmark, fn(leaf, target)[:256],
                         adaptive_nll_original(crit.double(), hidden[:256].double(),
                                               target[:256]))
        crit.to(dtype)
    step = pass_step(passes, lambda: fn(leaf, target))
    # A head's GEMMs: every token against the head, the tail tokens against their tails
    # (plain: against the whole vocabulary), 3x for forward + backward.
    flop = 2 * tokens * d_model * (VOCAB if provider == "plain-softmax" else CUTOFFS[0] + 3)
    run_timed(benchmark, step, calls_per_round=3, op="adaptive_softmax", provider=provider,
              shape=f"N={tokens} d={d_model} V={VOCAB} div_val={div_val}",
              dtype=str(dtype).split(".")[1], passes=passes, length=tokens,
              gflop=flop * (3 if passes != "fwd" else 1) / 1e9)
