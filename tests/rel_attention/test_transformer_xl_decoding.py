"""Incremental Transformer-XL (fastseq.nn.TransformerXLDecodingState) and TransformerXLLM.generate
in float64 on every backend of the relative attention: stepping one token at a time equals the
model's own forward run one token a segment with its memory (past the buffer's wrap-around),
a prompt chunk then steps equal forward(prompt) then forward(token, mems), and with a memory
as long as the context both equal the teacher-forced forward; greedy generation is the argmax
of the teacher-forced log-probs, sampling follows its torch.Generator."""
import pytest
import torch

import fastseq

BACKENDS = [b for b in ("triton", "torch", "reference")
            if b != "triton" or fastseq.backend.triton_unavailable(torch.device("cpu")) is None]
N_TOKEN, D_MODEL = 13, 8
# (name, pre_lnorm, same_length, clamp_len, untie_r)
VARIANTS = [("plain", False, False, -1, False), ("pre-ln-clamped", True, False, 3, True),
            ("same-length", False, True, -1, False)]


def backbone(variant, mem_len=4):
    _, pre_lnorm, same_length, clamp_len, untie_r = variant
    torch.manual_seed(0)
    model = fastseq.nn.TransformerXL(N_TOKEN, 2, 2, D_MODEL, 4, 16, mem_len=mem_len,
                                     clamp_len=clamp_len, same_length=same_length,
                                     untie_r=untie_r, pre_lnorm=pre_lnorm).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def embed(model, tokens):
    return model.word_emb(tokens) * model.emb_scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_steps_equal_the_forward_one_token_a_segment(variant, backend):
    """13 one-token steps against a memory of 4 (the buffer of 2 x 4 + 1 positions wraps
    twice) on `backend` equal forward(token, mems) called 13 times on the reference (the
    float64 ground truth; the forward on Triton as well doubled the interpreter's time)."""
    model = backbone(variant)
    tokens = torch.randint(0, N_TOKEN, (13, 3))
    state = model.decoding_state(3)
    mems = None
    with torch.no_grad():
        for t in range(13):
            with fastseq.use_backend("reference"):
                expected, mems = model(tokens[t:t + 1], mems)
            with fastseq.use_backend(backend):
                got = state.step(embed(model, tokens[t:t + 1]))
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prompt_chunk_then_steps_equal_segments_with_memory(backend):
    model = backbone(VARIANTS[1])
    tokens = torch.randint(0, N_TOKEN, (11, 2))
    state = model.decoding_state(2, max_step=6)
    with fastseq.use_backend(backend), torch.no_grad():
        expected, mems = model(tokens[:6])
        torch.testing.assert_close(state.step(embed(model, tokens[:6])), expected,
                                   atol=1e-12, rtol=1e-12)
        for t in range(6, 11):
            expected, mems = model(tokens[t:t + 1], mems)
            torch.testing.assert_close(state.step(embed(model, tokens[t:t + 1])), expected,
                                       atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS[:2], ids=[v[0] for v in VARIANTS[:2]])
def test_a_memory_as_long_as_the_context_equals_the_teacher_forced_forward(variant):
    model = backbone(variant, mem_len=0)
    tokens = torch.randint(0, N_TOKEN, (9, 2))
    with torch.no_grad():
        expected, _ = model(tokens)
        state = model.decoding_state(2, mem_len=9)
        got = torch.cat([state.step(embed(model, tokens[t:t + 1])) for t in range(9)])
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def language_model(mem_len=20):
    torch.manual_seed(0)
    model = fastseq.nn.TransformerXLLM(N_TOKEN, 2, 2, D_MODEL, 4, 16, 0.0, 0.0, d_embed=6,
                                       div_val=2, cutoffs=[5, 9], mem_len=mem_len,
                                       tie_projs=[False, True, True], clamp_len=6
                                       ).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_is_the_argmax_of_the_teacher_forced_forward(backend):
    model = language_model()
    prompt = torch.randint(0, N_TOKEN, (4, 3))
    with fastseq.use_backend(backend):
        tokens = model.generate(prompt, 8)
        log_probs, _ = model(tokens[:-1])
    assert tokens.shape == (12, 3) and torch.equal(tokens[:4], prompt)
    assert torch.equal(tokens[4:], log_probs[3:].argmax(-1))


def test_sampling_follows_the_generator_and_top_k():
    """Sampled tokens are the draws of a manual loop over the teacher-forced distributions
    with the same generator; top_k=1 is greedy."""
    model = language_model()
    prompt = torch.randint(0, N_TOKEN, (3, 2))
    tokens = model.generate(prompt, 6, do_sample=True, temperature=0.7, top_k=4,
                            generator=torch.Generator().manual_seed(5))
    log_probs, _ = model(tokens[:-1])
    g = torch.Generator().manual_seed(5)
    for t in range(3, 9):
        scores = log_probs[t - 1].float() / 0.7
        kth = scores.topk(4, -1).values[:, -1:]
        probs = scores.masked_fill(scores < kth, float("-inf")).softmax(-1)
        assert torch.equal(tokens[t], torch.multinomial(probs, 1, generator=g).squeeze(-1))
    greedy = model.generate(prompt, 6)
    assert torch.equal(model.generate(prompt, 6, do_sample=True, top_k=1), greedy)


def test_generation_refuses_bad_arguments_and_training_mode():
    model = language_model()
    prompt = torch.randint(0, N_TOKEN, (3, 2))
    for kwargs, message in ((dict(prompt=prompt.float(), max_new_tokens=2), "integer token"),
                            (dict(prompt=prompt[:0], max_new_tokens=2), r"P >= 1"),
                            (dict(prompt=prompt, max_new_tokens=-1), "max_new_tokens"),
                            (dict(prompt=prompt, max_new_tokens=2, do_sample=True,
                                  temperature=0.0), "temperature")):
        with pytest.raises(fastseq.InputError, match=message):
            model.generate(**kwargs)
    state = model.decoding_state(2)
    with pytest.raises(fastseq.InputError, match=r"embedded must be \[1..max_step=1"):
        state.step(model.word_emb(prompt))
    with pytest.raises(fastseq.InputError, match="training mode"):
        model.train().generate(prompt, 2)


def test_steps_on_a_long_memory_run_the_decode_kernel_and_equal_the_reference():
    """A memory of 260 positions: each one-token step is a split-KV decode launch on Triton
    (Lq = 1 against 261 keys) and equals the reference backend's forward with its memory."""
    if "triton" not in BACKENDS:
        pytest.skip("the Triton interpreter is off")
    model = backbone(VARIANTS[1], mem_len=260)
    tokens = torch.randint(0, N_TOKEN, (263, 2))
    state = model.decoding_state(2, max_step=260)
    with torch.no_grad():
        # The prompt on the reference (the steps after it are the subject; a 260-row Triton
        # prompt took 40 of the test's 50 s in the interpreter).
        with fastseq.use_backend("reference"):
            _, mems = model(tokens[:260])
            state.step(embed(model, tokens[:260]))
        for t in range(260, 263):
            with fastseq.use_backend("reference"):
                expected, mems = model(tokens[t:t + 1], mems)
            with fastseq.use_backend("triton"):
                report = fastseq.explain(state.step, embed(model, tokens[t:t + 1]))
            assert all("split-KV decode" in d.variant for d in report.decisions)
            torch.testing.assert_close(report.result, expected, atol=1e-12, rtol=1e-12)
