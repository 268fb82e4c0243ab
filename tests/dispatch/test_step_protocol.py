"""The step protocol (fastseq.nn.state): every stateful layer creates its state with
init_state and runs new positions with step(x, state) -> (y, state), equal to its forward over
the whole sequence (float64, on every backend that serves the layer here). The RNN layers'
frame-by-frame cases are in test_streaming.py and Transformer-XL generation's in
test_transformer_xl_decoding.py; this file holds the protocol itself, the layer-normalized
recurrences, attention decoding (MultiheadAttention, TransformerDecoderLayer) and the
Transformer-XL layer, and a check that no stateful layer is left out."""
import inspect

import pytest
import torch

import fastseq
from fastseq.nn.state import SlidingKV

from conftest import backends_for

# Every fastseq.nn class with a step, and how its test below builds it. A new stateful layer
# fails test_every_stateful_layer_is_tested until it is named here with a test.
STATEFUL = {
    "LSTM": "test_streaming.py", "GRU": "test_streaming.py", "RNN": "test_streaming.py",
    "LayerNormLSTM": "test_layer_norm_steps_equal_the_sequence",
    "LayerNormGRU": "test_layer_norm_steps_equal_the_sequence",
    "MultiheadAttention": "test_self_attention_steps_equal_causal_attention",
    "TransformerDecoderLayer": "test_decoder_layer_steps_equal_its_causal_forward",
    "TransformerXLLayer": "test_transformer_xl_layer_steps_equal_forward_with_mems",
    "RelPartialLearnableMultiHeadAttn": "test_transformer_xl_layer_steps_equal_forward_with_mems",
    "TransformerXL": "test_transformer_xl_decoding.py",
    "TransformerXLLM": "test_transformer_xl_decoding.py",
    "BlockRecurrentTransformerLayer": "test_block_recurrent_layer.py",
    "BlockRecurrentTransformerLM": "test_block_recurrent_layer.py",
    "AttentionDecoder": "test_attention_decoder_layer.py",
    "AttentionalRNNDecoder": "test_speechbrain_decoder.py",
}


def test_every_stateful_layer_is_tested():
    stateful = {name for name in fastseq.nn.__all__
                if inspect.isclass(getattr(fastseq.nn, name))
                and callable(getattr(getattr(fastseq.nn, name), "step", None))
                and issubclass(getattr(fastseq.nn, name), torch.nn.Module)}
    assert stateful == set(STATEFUL), "name each stateful layer's test in STATEFUL"
    for name in stateful:
        assert callable(getattr(getattr(fastseq.nn, name), "init_state", None)), name
        test = STATEFUL[name]
        assert test.endswith(".py") or callable(globals().get(test)), (name, test)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("backend", [b for b in ("triton", "reference")
                                     if b in backends_for("cpu")])
def test_layer_norm_steps_equal_the_sequence(mode, backend):
    torch.manual_seed(0)
    layer = getattr(fastseq.nn, f"LayerNorm{mode}")(3, 5, num_layers=2, backend=backend)
    layer = layer.double().eval()
    frames = torch.randn(5, 2, 3, dtype=torch.float64)
    expected, expected_state = layer(frames)
    state = layer.init_state(2)
    outputs = []
    for frame in frames:
        out, state = layer.step(frame, state)
        outputs.append(out)
    torch.testing.assert_close(torch.stack(outputs), expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(state if mode == "LSTM" else (state,),
                         expected_state if mode == "LSTM" else (expected_state,)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_init_state_is_the_zeros_hx_means():
    lstm = fastseq.nn.LSTM(3, 4, num_layers=2, proj_size=2).double()
    h, c = lstm.init_state(5)
    assert h.shape == (2, 5, 2) and c.shape == (2, 5, 4) and h.dtype == torch.float64
    assert not h.any() and not c.any()
    frame = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(lstm.step(frame, (h, c))[0], lstm.step(frame)[0])
    assert fastseq.nn.GRU(3, 4).init_state().shape == (1, 4)  # unbatched


def _causal_forward(module, x):
    L = x.shape[1 if module.batch_first else 0]
    mask = torch.ones(L, L, dtype=torch.bool).triu(1)
    return module(x, x, x, attn_mask=mask, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("backend", [b for b in backends_for("cpu") if b != "native"])
def test_self_attention_steps_equal_causal_attention(batch_first, backend):
    """A prompt of 3 tokens, then 1 and 2 at a time, equal the forward over all 6 with a
    causal mask."""
    torch.manual_seed(0)
    mha = fastseq.nn.MultiheadAttention(8, 2, batch_first=batch_first).double().eval()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    time = 1 if batch_first else 0
    with fastseq.use_backend(backend), torch.no_grad():
        expected = _causal_forward(mha, x)
        state = mha.init_state(2, capacity=8)
        pieces = []
        for begin, end in ((0, 3), (3, 4), (4, 6)):
            out, state = mha.step(x.narrow(time, begin, end - begin), state)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, time), expected, rtol=1e-12, atol=1e-12)


def test_cross_attention_steps_attend_the_memory_with_its_padding():
    torch.manual_seed(1)
    mha = fastseq.nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True).double().eval()
    memory = torch.randn(2, 5, 6, dtype=torch.float64)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    expected = mha(x, memory, memory, key_padding_mask=padding, need_weights=False)[0]
    state = mha.init_state(2, memory=memory, key_padding_mask=padding)
    got = torch.cat([mha.step(x[:, t:t + 1], state)[0] for t in range(3)], 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_attention_steps_refuse_what_they_cannot_do():
    mha = fastseq.nn.MultiheadAttention(8, 2, dropout=0.1)
    with pytest.raises(ValueError, match="training mode with dropout; call eval"):
        mha.init_state(2, capacity=4)
    mha.eval()
    with pytest.raises(ValueError, match="needs a capacity"):
        mha.init_state(2)
    biased = fastseq.nn.MultiheadAttention(8, 2, add_bias_kv=True).eval()
    with pytest.raises(ValueError, match="add_bias_kv or add_zero_attn"):
        biased.init_state(2, capacity=4)
    with pytest.raises(ValueError, match="kdim .* must equal vdim"):
        fastseq.nn.MultiheadAttention(8, 2, kdim=4, vdim=6).eval().init_state(
            2, memory=torch.randn(3, 2, 4))


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_steps_equal_its_causal_forward(norm_first):
    torch.manual_seed(2)
    layer = fastseq.nn.TransformerDecoderLayer(8, 2, 16, batch_first=True,
                                               norm_first=norm_first).double().eval()
    memory = torch.randn(2, 4, 8, dtype=torch.float64)
    tgt = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    expected = layer(tgt, memory, tgt_mask=mask)
    state = layer.init_state(2, capacity=5, memory=memory)
    got = torch.cat([layer.step(tgt[:, t:t + 1], state)[0] for t in range(5)], 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in backends_for("cpu") if b != "native"])
def test_transformer_xl_layer_steps_equal_forward_with_mems(backend):
    """One layer stepped a token at a time against its SlidingKV (memory 3, so the buffer of
    2 x 3 + 1 wraps) equals its forward over each token with the last 3 inputs as mems."""
    torch.manual_seed(3)
    layer = fastseq.nn.TransformerXLLayer(2, 8, 4, 16, 0.0, own_biases=True).double().eval()
    x = torch.randn(9, 2, 8, dtype=torch.float64)
    mem_len = 3
    pos_emb = fastseq.nn.transformer_xl.PositionalEmbedding(8).double()
    embedded = pos_emb(torch.arange(mem_len + 1, dtype=torch.float64))  # distances 0 .. 3
    pos = layer.dec_attn.position_rows(embedded)
    state = layer.init_state(2, mem_len=mem_len)
    assert isinstance(state, SlidingKV)
    with fastseq.use_backend(backend), torch.no_grad():
        for t in range(9):
            mems = x[max(0, t - mem_len):t]
            r = embedded[:mems.shape[0] + 1].flip(0)  # the forward's r: distances klen-1 ... 0
            expected = layer(x[t:t + 1], r, mems=mems, is_causal=True)
            got, state = layer.step(x[t:t + 1], state, pos)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
