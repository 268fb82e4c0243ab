"""torch.jit.script refuses every fastseq layer by name and points to torch.compile /
torch.export (fastseq/nn/scripting.py says why), directly, inside a model, after
fastseq.patch and for a user's subclass; fastseq.unpatch gives back scriptable torch layers."""
import pytest
import torch

import fastseq

LAYERS = {
    "LSTM": lambda: fastseq.nn.LSTM(3, 4),
    "GRU": lambda: fastseq.nn.GRU(3, 4),
    "RNN": lambda: fastseq.nn.RNN(3, 4),
    "LSTMCell": lambda: fastseq.nn.LSTMCell(3, 4),
    "GRUCell": lambda: fastseq.nn.GRUCell(3, 4),
    "RNNCell": lambda: fastseq.nn.RNNCell(3, 4),
    "LayerNormLSTM": lambda: fastseq.nn.LayerNormLSTM(3, 4),
    "LayerNormGRU": lambda: fastseq.nn.LayerNormGRU(3, 4),
    "MultiheadAttention": lambda: fastseq.nn.MultiheadAttention(8, 2),
    "TransformerEncoderLayer": lambda: fastseq.nn.TransformerEncoderLayer(8, 2, 16),
    "TransformerDecoderLayer": lambda: fastseq.nn.TransformerDecoderLayer(8, 2, 16),
    "RelPartialLearnableMultiHeadAttn": lambda: fastseq.nn.RelPartialLearnableMultiHeadAttn(
        2, 8, 4, 0.0),
    "TransformerXLLayer": lambda: fastseq.nn.TransformerXLLayer(2, 8, 4, 16, 0.0),
    "TransformerXL": lambda: fastseq.nn.TransformerXL(11, 1, 2, 8, 4, 16, mem_len=4),
    "TransformerXLLM": lambda: fastseq.nn.TransformerXLLM(11, 1, 2, 8, 4, 16, 0.0, 0.0,
                                                          cutoffs=[5], mem_len=4),
    "AdaptiveEmbedding": lambda: fastseq.nn.AdaptiveEmbedding(11, 8, 8, [5]),
    "ProjectedAdaptiveLogSoftmax": lambda: fastseq.nn.ProjectedAdaptiveLogSoftmax(11, 8, 8, [5]),
    "KVCache": lambda: fastseq.nn.KVCache(2, 1, 6, 4),
    "GlobalAttention": lambda: fastseq.nn.GlobalAttention(6, attn_type="general"),
    "AttentionDecoder": lambda: fastseq.nn.AttentionDecoder("GRU", 5, 6, input_feed=False),
    "AttentionalRNNDecoder": lambda: fastseq.nn.AttentionalRNNDecoder("gru", "content", 6, 5, 1, 4, 3),
    "BlockRecurrentTransformerLayer": lambda: fastseq.nn.BlockRecurrentTransformerLayer(
        8, 2, 4, 16, 3, 2),
    "BlockRecurrentTransformerLM": lambda: fastseq.nn.BlockRecurrentTransformerLM(
        13, 3, 8, 2, 4, 16, 3, 2),
}


def test_every_public_layer_is_covered():
    exported = {name for name in fastseq.nn.__all__
                if isinstance(getattr(fastseq.nn, name), type)
                and issubclass(getattr(fastseq.nn, name), torch.nn.Module)}
    # PositionwiseFF runs plain torch layers only, and scripts.
    assert exported - {"PositionwiseFF"} == set(LAYERS)
    torch.jit.script(fastseq.nn.PositionwiseFF(8, 16, 0.0))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_script_refuses_by_name_and_points_to_compile(name):
    with pytest.raises(fastseq.TorchScriptError,
                       match=rf"{name} cannot be compiled by torch.jit.script.*torch.compile"):
        torch.jit.script(LAYERS[name]())


def test_a_model_holding_a_layer_and_a_subclass_are_refused():
    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = fastseq.nn.GRU(3, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    class MyLayer(fastseq.nn.TransformerEncoderLayer):
        pass

    with pytest.raises(fastseq.TorchScriptError, match="GRU cannot"):
        torch.jit.script(Tagger())
    with pytest.raises(RuntimeError, match="MyLayer cannot"):
        torch.jit.script(MyLayer(8, 2, 16))


def test_patched_model_refuses_and_unpatched_scripts():
    model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16),
                                        num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(5, 2, 8)
    want = model(x)
    fastseq.patch(model)
    with pytest.raises(fastseq.TorchScriptError, match="fastseq.unpatch"):
        torch.jit.script(model)
    fastseq.unpatch(model)
    torch.testing.assert_close(torch.jit.script(model)(x), want)
