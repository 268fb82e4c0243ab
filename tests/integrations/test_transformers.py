"""attn_implementation="fastseq" in Hugging Face transformers (fastseq/integrations/transformers.py):
tiny random configs of GPT-2, BERT, ViT, Llama (GQA) and Mistral (sliding window) give sdpa's
logits, greedy tokens and gradients on every fastseq backend that runs attention; the mask
descriptions equal transformers' own masks; a decode step takes the split-KV kernels on a GPU.

float64 throughout (sdpa is then exact to rounding, so any masking slip shows), with weights drawn
wider than the configs' default (initializer_range 0.3: at 0.02 the attention output is too
small to move the logits, and a wrong mask would pass).
"""
import dataclasses
import inspect

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install fastseq[transformers])")

import fastseq  # noqa: E402
import fastseq.integrations.transformers as glue  # noqa: E402
from fastseq.integrations.transformers_masks import FULL, describe, fastseq_mask  # noqa: E402
from fastseq.ops.attention_mask import materialized, normalize  # noqa: E402
from transformers import masking_utils as hf_masks  # noqa: E402

VOCAB = 97
BACKENDS = ("torch", "reference", "triton")  # native has no attention kernel
TIGHT = dict(rtol=1e-9, atol=1e-9)


def _config(kind: str):
    common = dict(initializer_range=0.3)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                       n_positions=64, **common)
    if kind == "bert":
        return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64,
                                       max_position_embeddings=64, **common)
    if kind == "vit":
        return transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3,
                                      hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, num_labels=5, **common)
    llama_like = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, **common)
    if kind == "llama":
        return transformers.LlamaConfig(**llama_like)
    if kind == "mistral":
        return transformers.MistralConfig(sliding_window=4, **llama_like)
    raise ValueError(kind)


_CLASSES = {"gpt2": "GPT2LMHeadModel", "bert": "BertModel", "vit": "ViTForImageClassification",
            "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
CAUSAL_LMS = ("gpt2", "llama", "mistral")


def _model(kind: str, implementation: str = "sdpa"):
    torch.manual_seed(0)
    cls = getattr(transformers, _CLASSES[kind])
    return cls._from_config(_config(kind), attn_implementation=implementation).double().eval()


def _inputs(kind: str, padded: bool):
    """The model's inputs and which output rows are real tokens (padding: left for the causal
    LMs, as generation pads, right for BERT)."""
    torch.manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(3, 3, 16, 16, dtype=torch.float64)}, None
    ids = torch.randint(1, VOCAB, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    if padded:
        if kind == "bert":
            mask[0, 8:] = 0
            mask[2, 5:] = 0
        else:
            mask[0, :3] = 0
            mask[1, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}, mask.bool()


def _output(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _switch(model, implementation: str):
    model.set_attn_implementation(implementation)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,padded", [(kind, padded) for kind in _CLASSES
                                         for padded in (False, True)
                                         if not (kind == "vit" and padded)])  # ViT: no padding
def test_outputs_equal_sdpa(kind, padded, backend):
    model = _model(kind)
    inputs, real = _inputs(kind, padded)
    expected = _output(model, inputs)
    _switch(model, "fastseq")
    with fastseq.use_backend(backend):
        report = fastseq.explain(_output, model, inputs)
    got = report.result
    assert report.decisions and all(d.chosen == backend for d in report.decisions), str(report)
    if real is not None:
        expected, got = expected[real], got[real]
    torch.testing.assert_close(got, expected, **TIGHT)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", CAUSAL_LMS)
def test_greedy_generate_gives_sdpa_tokens_with_left_padding(kind, backend):
    model = _model(kind)
    inputs, _ = _inputs(kind, padded=True)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(**inputs, **settings)
    _switch(model, "fastseq")
    with fastseq.use_backend(backend):
        got = model.generate(**inputs, **settings)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_training_step_gradients_equal_sdpa(kind, backend):
    model = _model(kind).train()
    for module in model.modules():  # dropout off: the two runs draw different masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    inputs, real = _inputs(kind, padded=True)

    def gradients():
        model.zero_grad()
        out = _output(model, inputs)
        (out[real] ** 2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = gradients()
    _switch(model, "fastseq")
    with fastseq.use_backend(backend):
        got = gradients()
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TIGHT, msg=name)


def test_float32_meets_the_tolerance_rule():
    """fastseq in float32 is at most 2x as far from the float64 truth as sdpa in float32."""
    model = _model("llama")
    inputs, real = _inputs("llama", padded=True)
    truth = _output(model, inputs)[real]
    model.float()
    plain_error = (_output(model, inputs)[real].double() - truth).abs().max()
    _switch(model, "fastseq")
    for backend in BACKENDS:
        with fastseq.use_backend(backend):
            error = (_output(model, inputs)[real].double() - truth).abs().max()
        assert error <= 2 * plain_error + 1e-6, (backend, error, plain_error)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_output_attentions_are_eager_weights(padded):
    model = _model("llama", "eager")
    inputs, real = _inputs("llama", padded)
    expected = model(**inputs, output_attentions=True).attentions
    _switch(model, "fastseq")
    report = fastseq.explain(lambda: model(**inputs, output_attentions=True))
    got = report.result.attentions
    assert len(got) == len(expected) and all(g is not None for g in got)
    assert "output_attentions" in str(report)
    if padded:
        # eager's fully masked (left-padded) rows are NaN, and from the second layer on their
        # NaN values reach every row through NaN * 0: compare the first layer's real rows.
        got, expected = got[:1], [e[:1] for e in expected[:1]]
        got = [g[:1].transpose(1, 2)[real[:1]] for g in got]
        expected = [e.transpose(1, 2)[real[:1]] for e in expected]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TIGHT)


def test_from_config_by_name_and_compiled_forward():
    """The name works where users give it (from_config), and the model compiles whole."""
    config = _config("llama")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="fastseq").double().eval()
    assert model.config._attn_implementation == "fastseq"
    ids = torch.randint(1, VOCAB, (2, 9))
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[0, :3] = 0  # under compile the padded mask is materialized (transformers_masks.py)
    expected = model(ids, attention_mask=padding, use_cache=False).logits
    compiled = torch.compile(
        lambda x, mask: model(x, attention_mask=mask, use_cache=False).logits, fullgraph=True,
        backend="eager")
    real = padding.bool()
    torch.testing.assert_close(compiled(ids, padding)[real], expected[real], **TIGHT)


# The mask descriptions against transformers' own masks (sdpa_mask on the same arguments).

def _patterns():
    return {"causal": hf_masks.causal_mask_function,
            "bidirectional": hf_masks.bidirectional_mask_function,
            "sliding": hf_masks.sliding_window_causal_mask_function(3),
            "sliding_bidirectional": hf_masks.sliding_window_bidirectional_mask_function(2)}


def _padding(kind: str, batch: int, keys: int):
    if kind == "none":
        return None
    mask = torch.ones(batch, keys, dtype=torch.bool)
    if kind == "left":
        mask[0, :3] = False
        mask[1, :keys] = False  # a row with nothing kept
    elif kind == "right":
        mask[0, keys - 2:] = False
    elif kind == "holes":
        mask[0, 2] = False
    return mask


@pytest.mark.parametrize("padding", ["none", "left", "right", "holes"])
@pytest.mark.parametrize("offsets", [(0, 0, 7, 7), (5, 0, 1, 6), (5, 0, 2, 7), (6, 3, 1, 4),
                                     (4, 0, 3, 10)], ids=str)
@pytest.mark.parametrize("pattern", list(_patterns()))
def test_description_equals_transformers_mask(pattern, offsets, padding):
    """Wherever fastseq_mask describes instead of materializing, the description keeps exactly
    the keys sdpa_mask keeps (offsets: q_offset, kv_offset, q_length, kv_length)."""
    q_offset, kv_offset, q_length, kv_length = offsets
    batch = 3
    padding_mask = _padding(padding, batch, kv_offset + kv_length)
    args = dict(batch_size=batch, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=_patterns()[pattern],
                attention_mask=padding_mask)
    expected = hf_masks.sdpa_mask(**args, allow_is_causal_skip=False)
    got = fastseq_mask(**args)
    if expected is None:
        expected = torch.ones(batch, 1, q_length, kv_length, dtype=torch.bool)
    if got is None:
        assert describe(**args) is FULL
        got = torch.ones(batch, 1, q_length, kv_length, dtype=torch.bool)
    elif not isinstance(got, torch.Tensor):
        query = torch.zeros(batch, 1, q_length, 4)
        key = torch.zeros(batch, 1, kv_length, 4)
        vis = normalize("test", got, False, None, query, key)
        got = materialized(vis, q_length, kv_length, "cpu")[0].expand(batch, 1, -1, -1)
    expected = expected.expand(batch, 1, q_length, kv_length)
    assert torch.equal(got, expected), (got.int(), expected.int())


def test_what_is_described_and_what_is_materialized():
    causal = hf_masks.causal_mask_function
    left = _padding("left", 2, 8)
    assert describe(2, 8, 8, mask_function=causal, attention_mask=left) is not None
    assert describe(2, 1, 8, 7, 0, causal, left).align == "bottom_right"  # a decode step
    holes = _padding("holes", 2, 8)
    assert describe(2, 8, 8, mask_function=causal, attention_mask=holes) is None
    overlay = hf_masks.and_masks(causal, lambda b, h, q, kv: kv % 2 == 0)
    assert describe(2, 8, 8, mask_function=overlay) is None


def test_a_decode_step_with_left_padding_takes_split_kv_on_a_gpu():
    """The description keeps a generate step with a padded batch on the split-KV kernels."""
    batch, heads, kv_heads, cached = 2, 4, 2, 300
    padding = torch.ones(batch, cached + 1, dtype=torch.bool)
    padding[0, :5] = False
    description = fastseq_mask(batch, 1, cached + 1, cached, 0,
                               hf_masks.causal_mask_function, padding)
    module = torch.nn.Module()
    module.is_causal = True
    query = torch.randn(batch, heads, 1, 64, dtype=torch.float16)
    key = torch.randn(batch, kv_heads, cached + 1, 64, dtype=torch.float16)
    value = torch.randn_like(key)

    def step(query, key, value, key_start, key_end):  # the ranges travel as fake CUDA tensors
        mask = dataclasses.replace(description, key_start=key_start, key_end=key_end)
        return glue.fastseq_attention(module, query, key, value, mask)

    report = fastseq.explain_on_gpu(step, query, key, value, description.key_start,
                                    description.key_end)
    assert report.error is None, str(report)
    assert "split-KV decode" in str(report), str(report)


def test_a_generate_step_with_left_padding_runs_split_kv_and_matches_sdpa():
    """fastseq.explain on one cached decode step of a left-padded batch (301 keys): both layers
    take the split-KV kernels (Triton through the interpreter here), and the step's logits are
    sdpa's."""
    config = _config("llama")
    config.max_position_embeddings = 512
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(
        config, attn_implementation="fastseq").double().eval()
    ids = torch.randint(1, VOCAB, (2, 300))
    padding = torch.ones(2, 300, dtype=torch.long)
    padding[0, :7] = 0
    step_padding = torch.cat([padding, torch.ones(2, 1, dtype=torch.long)], 1)

    # transformers 5.2x renamed past_key_values to cache (the old name warns until 5.40)
    cache_name = ("cache" if "cache" in inspect.signature(model.forward).parameters
                  else "past_key_values")

    def step(implementation, backend):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            cache = {cache_name: transformers.DynamicCache(config=config)}
            with fastseq.use_backend("torch"):  # the prompt: not what this test is about
                prompt = model(ids, attention_mask=padding, use_cache=True, **cache)
            token = prompt.logits[:, -1:].argmax(-1)
            with fastseq.use_backend(backend):
                return fastseq.explain(model, token, attention_mask=step_padding,
                                       use_cache=True, **cache)

    expected = step("sdpa", "torch").result.logits
    report = step("fastseq", "triton")
    decode = [d for d in report.decisions if d.op == "fastseq.ops.attention"]
    assert len(decode) == config.num_hidden_layers, str(report)
    assert all("split-KV decode" in d.variant for d in decode), str(report)
    torch.testing.assert_close(report.result.logits, expected, **TIGHT)


def test_dropout_reaches_the_kernel_in_training():
    """The model's attention_dropout is applied in training (fastseq's own draw: the same torch
    seed gives the same output; a different seed or eval mode another) and not in eval."""
    config = _config("llama")
    config.attention_dropout = 0.4
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(
        config, attn_implementation="fastseq").double()
    inputs, _ = _inputs("llama", padded=False)

    def logits(seed, training):
        model.train(training)
        torch.manual_seed(seed)
        return model(**inputs).logits

    assert torch.equal(logits(3, True), logits(3, True))
    assert not torch.allclose(logits(3, True), logits(4, True))
    assert not torch.allclose(logits(3, True), logits(3, False))
    assert torch.equal(logits(3, False), logits(4, False))


def _modifier_model(kind: str):
    """Gemma 2 (soft-capping, sliding windows, GQA) and gpt-oss (sinks, sliding windows): both
    are compared with transformers' eager attention, as sdpa serves neither (transformers' sdpa
    refuses softcap and ignores s_aux)."""
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  sliding_window=4, initializer_range=0.3)
    torch.manual_seed(0)
    if kind == "gemma2":
        config = transformers.Gemma2Config(intermediate_size=64, attn_logit_softcapping=5.0,
                                           **common)
        model = transformers.Gemma2ForCausalLM._from_config(config, attn_implementation="eager")
    else:
        config = transformers.GptOssConfig(intermediate_size=32, num_local_experts=2,
                                           num_experts_per_tok=1,
                                           experts_implementation="eager", **common)
        model = transformers.GptOssForCausalLM._from_config(config, attn_implementation="eager")
        for layer in model.model.layers:  # sinks start at zero: make them matter
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    return model.double().eval()


@pytest.mark.parametrize("kind,modifier", [("gemma2", "soft-capping"), ("gpt_oss", "sinks")])
def test_softcap_and_sinks_equal_eager(kind, modifier):
    model = _modifier_model(kind)
    # unpadded: eager's fully masked (left-padded) rows are NaN, and through NaN * 0 in the
    # next layer so is every row of a padded sequence
    inputs, _ = _inputs("llama", padded=False)
    expected = model(**inputs).logits
    _switch(model, "fastseq")
    for backend in ("reference", "triton"):
        with fastseq.use_backend(backend):
            got = model(**inputs).logits
        # eager's softmax runs in float32 for Gemma 2: its own error is ~1e-7
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=backend)
    with fastseq.use_backend("torch"), pytest.raises(fastseq.BackendError, match=modifier):
        model(**inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_t5_encoder_decoder_with_position_bias_and_padding_equals_sdpa(backend):
    """T5: relative position biases (added as transformers' sdpa path adds them), cross-
    attention over a padded encoder output, the decoder's causal self-attention."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, initializer_factor=1.0)
    model = transformers.T5ForConditionalGeneration._from_config(
        config, attn_implementation="sdpa").double().eval()
    inputs, _ = _inputs("bert", padded=True)  # right padding, as an encoder batch has
    inputs["decoder_input_ids"] = torch.randint(1, VOCAB, (3, 5))
    expected = model(**inputs).logits
    _switch(model, "fastseq")
    with fastseq.use_backend(backend):
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, **TIGHT)


def test_output_attentions_with_sinks_are_eager_weights():
    model = _modifier_model("gpt_oss")
    inputs, _ = _inputs("llama", padded=False)
    expected = model(**inputs, output_attentions=True).attentions
    _switch(model, "fastseq")
    got = model(**inputs, output_attentions=True).attentions
    for g, e in zip(got, expected):
        # gpt-oss's eager softmax runs in the scores' dtype (float64 here); fastseq's weights
        # take the fp32 softmax most eager attentions use: ~1e-7 apart
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
