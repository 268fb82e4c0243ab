"""torch.export of an inference model built from fastseq layers: the exported program holds
fastseq's registered ops (not a trace through their Python) and gives eager's outputs."""
import pytest
import torch
from torch import nn

import fastseq

from conftest import TRITON_TEST_DEVICE

pytestmark = pytest.mark.usefixtures("on_triton_test_device")


class Tagger(nn.Module):
    """An LSTM encoder, self-attention and a Transformer-XL layer over its states."""

    def __init__(self):
        super().__init__()
        self.lstm = fastseq.nn.LSTM(6, 16, backend="triton")
        self.attn = fastseq.nn.MultiheadAttention(16, 2)
        self.xl = fastseq.nn.TransformerXLLayer(2, 16, 8, 32, dropout=0.0, own_biases=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x, r):
        h, _ = self.lstm(x)                               # [T, B, 16]
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.xl(a, r, is_causal=True))


def test_export_inference_model():
    if fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("Triton unavailable here")
    torch.manual_seed(0)
    model = Tagger().eval()
    x, r = torch.randn(7, 2, 6), torch.randn(7, 1, 16)
    with fastseq.use_backend("triton"):
        expected = model(x, r)
        program = torch.export.export(model, (x, r))
        got = program.module()(x, r)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"fastseq.attention_forward_triton.default",
            "fastseq.rel_attention_forward_triton.default"} <= targets, targets
    assert any(t.startswith("fastseq.rnn_layer") for t in targets), targets
    torch.testing.assert_close(got, expected)
