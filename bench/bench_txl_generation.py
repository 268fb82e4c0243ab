"""Transformer-XL generation: one new token through a whole model per call, three ways:
  * fastseq-state: fastseq.nn.TransformerXLDecodingState.step (the layers' keys and values
    of the last mem_len positions kept, one token projected; on a GPU the relative-attention
    split-KV decode kernel at >= 256 keys);
  * fastseq-memory: the model's own forward on a one-token segment with its memory of layer
    inputs (the original's evaluation mode, tgt_len = 1: the memory projected again each step,
    and torch.cat of memory and segment per layer);
  * recompute: the forward over the whole context window (mem_len + 1 tokens) with no memory,
    keeping the last position: what a model without Transformer-XL's memory does per token.
The paper's claim (evaluation up to 1,800x faster than recomputing) is about the last; the
first against the second is what keeping keys and values instead of layer inputs buys.
"""
import pytest
import torch

import fastseq

from .conftest import DEVICE, GPU_CASES, record_error, run_timed

if GPU_CASES:  # WikiText-103's base model's widths, a 1.6k evaluation memory
    N_LAYER, D_MODEL, N_HEAD, D_HEAD, D_INNER, MEM_LEN, BATCH = 16, 410, 10, 41, 2100, 1600, 8
    DTYPE = torch.bfloat16
else:
    N_LAYER, D_MODEL, N_HEAD, D_HEAD, D_INNER, MEM_LEN, BATCH = 2, 128, 4, 32, 256, 128, 2
    DTYPE = torch.float32
VOCAB = 1000


def model_and_context():
    torch.manual_seed(0)
    model = fastseq.nn.TransformerXL(VOCAB, N_LAYER, N_HEAD, D_MODEL, D_HEAD, D_INNER,
                                     mem_len=MEM_LEN, device=DEVICE, dtype=DTYPE).eval()
    context = torch.randint(0, VOCAB, (MEM_LEN + 1, BATCH), device=DEVICE)
    return model, context


@pytest.mark.parametrize("provider", ["fastseq-state", "fastseq-memory", "recompute"])
def bench_txl_generation_step(benchmark, provider):
    model, context = model_and_context()
    history, token = context[:-1], context[-1:]
    with torch.no_grad():
        expected = model(context)[0][-1:]
        if provider == "fastseq-state":
            state = model.decoding_state(BATCH, max_step=MEM_LEN)
            state.step(model.word_emb(history) * model.emb_scale)
            embedded = model.word_emb(token) * model.emb_scale

            def step():
                state.length = MEM_LEN  # the same position every call: the history as memory
                return state.step(embedded)
        elif provider == "fastseq-memory":
            _, mems = model(history)

            def step():
                return model(token, mems)[0]
        else:
            def step():
                return model(context)[0][-1:]
        record_error(benchmark, step(), expected)
        run_timed(benchmark, step, calls_per_round=10, op="txl_generation", provider=provider,
                  passes="fwd", tokens_per_call=BATCH,
                  shape=f"layers={N_LAYER} d={D_MODEL} H={N_HEAD} mem={MEM_LEN} B={BATCH}",
                  dtype=str(DTYPE).split(".")[1], length=MEM_LEN)
