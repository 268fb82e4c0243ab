"""Whole fastseq layers through torch.save / torch.load(weights_only=True), PyTorch's default
loader since 2.6: with fastseq.nn.safe_globals() allowed, every layer comes back with its
class, backend, parameters and outputs; without it, the loader refuses as it does for torch's
own layers (torch allowlists none of its nn.Module classes either)."""
import io

import pytest
import torch

import fastseq

LAYERS = {
    "LSTM": lambda: fastseq.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2),
    "GRU": lambda: fastseq.nn.GRU(3, 4, batch_first=True, backend="reference"),
    "RNN": lambda: fastseq.nn.RNN(3, 4, nonlinearity="relu"),
    "LSTMCell": lambda: fastseq.nn.LSTMCell(3, 4),
    "GRUCell": lambda: fastseq.nn.GRUCell(3, 4, backend="reference"),
    "RNNCell": lambda: fastseq.nn.RNNCell(3, 4),
    "LayerNormLSTM": lambda: fastseq.nn.LayerNormLSTM(3, 4),
    "LayerNormGRU": lambda: fastseq.nn.LayerNormGRU(3, 4),
    "MultiheadAttention": lambda: fastseq.nn.MultiheadAttention(8, 2, batch_first=True),
    "TransformerEncoderLayer": lambda: fastseq.nn.TransformerEncoderLayer(8, 2, 16),
    "TransformerDecoderLayer": lambda: fastseq.nn.TransformerDecoderLayer(8, 2, 16,
                                                                          activation="gelu"),
    "RelPartialLearnableMultiHeadAttn": lambda: fastseq.nn.RelPartialLearnableMultiHeadAttn(
        2, 8, 4, 0.0),
    "PositionwiseFF": lambda: fastseq.nn.PositionwiseFF(8, 16, 0.0),
    "TransformerXLLayer": lambda: fastseq.nn.TransformerXLLayer(2, 8, 4, 16, 0.0),
    "TransformerXL": lambda: fastseq.nn.TransformerXL(10, 2, 2, 8, 4, 16, mem_len=3),
    "TransformerXLLM": lambda: fastseq.nn.TransformerXLLM(
        13, 2, 2, 8, 4, 16, 0.0, 0.0, d_embed=8, div_val=2, cutoffs=[5, 9],
        tie_projs=[False, True, True], mem_len=3),
    "AdaptiveEmbedding": lambda: fastseq.nn.AdaptiveEmbedding(13, 8, 6, [5], div_val=2),
    "ProjectedAdaptiveLogSoftmax": lambda: fastseq.nn.ProjectedAdaptiveLogSoftmax(
        13, 6, 6, [5, 9]),
    "KVCache": lambda: fastseq.nn.KVCache(2, 1, 6, 4),
    "GlobalAttention": lambda: fastseq.nn.GlobalAttention(6, coverage=True, attn_type="mlp"),
    "AttentionDecoder": lambda: fastseq.nn.AttentionDecoder("LSTM", 5, 6, 2, attn_type="general"),
    "AttentionalRNNDecoder": lambda: fastseq.nn.AttentionalRNNDecoder(
        "lstm", "location", 6, 5, 2, 4, 3, channels=2, kernel_size=3),
    "BlockRecurrentTransformerLayer": lambda: fastseq.nn.BlockRecurrentTransformerLayer(
        8, 2, 4, 16, 3, 2, gate="lstm", configuration="single"),
    "BlockRecurrentTransformerLM": lambda: fastseq.nn.BlockRecurrentTransformerLM(
        13, 3, 8, 2, 4, 16, 3, 2),
}


def test_every_layer_is_covered():
    """Every nn.Module class fastseq.nn exports (TransformerXLDecodingState is a generation
    loop's state, not a module: nothing to save)."""
    classes = [n for n in fastseq.nn.__all__ if isinstance(getattr(fastseq.nn, n), type)
               and issubclass(getattr(fastseq.nn, n), torch.nn.Module)]
    assert sorted(LAYERS) == sorted(classes)


def saved(module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("name", list(LAYERS))
def test_whole_layer_round_trip_with_weights_only(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    with torch.serialization.safe_globals(fastseq.nn.safe_globals()):
        loaded = torch.load(saved(layer), weights_only=True)
    assert type(loaded) is type(layer)
    assert getattr(loaded, "backend", None) == getattr(layer, "backend", None)
    original, copy = layer.state_dict(), loaded.state_dict()
    assert list(original) == list(copy)
    for key in original:
        torch.testing.assert_close(copy[key], original[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["LSTM", "MultiheadAttention", "TransformerXL",
                                  "TransformerXLLM"])
def test_the_loaded_layer_computes_the_same(name):
    torch.manual_seed(0)
    layer = LAYERS[name]().eval()
    with torch.serialization.safe_globals(fastseq.nn.safe_globals()):
        loaded = torch.load(saved(layer), weights_only=True).eval()
    if name == "LSTM":
        x = torch.randn(5, 2, 3)
        torch.testing.assert_close(loaded(x)[0], layer(x)[0])
    elif name == "MultiheadAttention":
        x = torch.randn(2, 5, 8)
        torch.testing.assert_close(loaded(x, x, x, need_weights=False)[0],
                                   layer(x, x, x, need_weights=False)[0])
    else:
        tokens = torch.randint(0, 10, (4, 2))
        torch.testing.assert_close(loaded(tokens)[0], layer(tokens)[0])
        if name == "TransformerXLLM":  # the tied weights load tied
            assert loaded.crit.out_layers[1].weight is loaded.word_emb.emb_layers[1].weight
            assert loaded.crit.out_projs[2] is loaded.word_emb.emb_projs[2]


def test_without_the_allowlist_the_loader_refuses_as_for_torchs_layers():
    for module in (torch.nn.LSTM(3, 4), fastseq.nn.LSTM(3, 4)):
        with pytest.raises(Exception, match="weights_only|Unsupported global"):
            torch.load(saved(module), weights_only=True)
