"""fastseq.patch and fastseq.unpatch on a model holding every swappable torch layer: classes
swapped in place with the very same parameters (device, dtype, state_dict keys), outputs and
gradients unchanged, subclasses left and reported, TransformerEncoder's nested-tensor path off
and restored, the round trip back to torch's classes."""
import torch
from torch import nn

import fastseq


class MyLSTM(nn.LSTM):
    """A user's subclass: its own code may rely on torch's forward, so patch leaves it."""


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(12, 5)
        self.rnn = nn.RNN(5, 4, nonlinearity="relu")
        self.cell = nn.GRUCell(4, 4)
        self.lstm_cell = nn.LSTMCell(4, 3)
        self.rnn_cell = nn.RNNCell(3, 3, nonlinearity="tanh")
        self.attn = nn.MultiheadAttention(12, 2, batch_first=True)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(12, 2, 16, dropout=0.0, batch_first=True), 2,
            enable_nested_tensor=True)
        self.decoder = nn.TransformerDecoderLayer(12, 2, 16, dropout=0.0, batch_first=True)
        self.mine = MyLSTM(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h, _ = self.lstm(x)                                   # [B, T, 12]
        a, _ = self.attn(h, h, h, need_weights=False)
        e = self.encoder(a, src_key_padding_mask=torch.zeros(x.shape[:2], dtype=torch.bool))
        d = self.decoder(e, a)
        g, _ = self.gru(d.transpose(0, 1))                    # [T, B, 5]
        r, _ = self.rnn(g)
        c = self.cell(r[-1])
        hc = self.lstm_cell(c)[0]
        s = self.rnn_cell(hc)
        m, _ = self.mine(s.unsqueeze(0))
        return self.head(m[0])


SWAPPED = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN", "cell": "GRUCell",
           "lstm_cell": "LSTMCell", "rnn_cell": "RNNCell", "attn": "MultiheadAttention",
           "encoder.layers.0": "TransformerEncoderLayer",
           "encoder.layers.0.self_attn": "MultiheadAttention",
           "encoder.layers.1": "TransformerEncoderLayer",
           "encoder.layers.1.self_attn": "MultiheadAttention", "decoder": "TransformerDecoderLayer",
           "decoder.self_attn": "MultiheadAttention", "decoder.multihead_attn": "MultiheadAttention"}


def outputs_and_grads(model, x):
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    return out, grads


def test_patch_swaps_in_place_and_keeps_results():
    torch.manual_seed(0)
    model = Tagger().double().eval()
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    before, before_grads = outputs_and_grads(model, x)
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())

    report = fastseq.patch(model)

    replaced = {name: new.rsplit(".", 1)[1] for name, _, new in report.replaced}
    assert replaced == SWAPPED
    assert all(new.startswith("fastseq.nn.") for _, _, new in report.replaced)
    assert [(name, why.split(":")[0]) for name, _, why in report.left] == \
        [("mine", "a subclass of a torch layer")]
    assert type(model.lstm) is fastseq.nn.LSTM and type(model.mine) is MyLSTM
    assert type(model.encoder.layers[0].self_attn) is fastseq.nn.MultiheadAttention
    assert not model.encoder.use_nested_tensor and not model.encoder.enable_nested_tensor
    for name, p in model.named_parameters():
        assert p is params[name] and p.dtype == torch.float64
    assert list(model.state_dict()) == keys
    after, after_grads = outputs_and_grads(model, x)
    torch.testing.assert_close(after, before)
    for a, b in zip(after_grads, before_grads):
        torch.testing.assert_close(a, b)
    with fastseq.use_backend("reference"):  # the swapped modules run fastseq's code paths
        torch.testing.assert_close(model(x), before, atol=1e-10, rtol=1e-10)
    assert "replaced 14 module(s)" in str(report) and "mine: " in str(report)

    again = fastseq.patch(model)
    assert not again.replaced and len(again.left) == len(SWAPPED) + 1

    back = fastseq.unpatch(model)
    assert {name for name, _, _ in back.replaced} == set(SWAPPED)
    assert type(model.lstm) is nn.LSTM and type(model.decoder.multihead_attn) is \
        nn.MultiheadAttention and not hasattr(model.lstm, "backend")
    assert model.encoder.enable_nested_tensor  # restored (use_nested_tensor as torch set it)
    torch.testing.assert_close(model(x), before)


def test_patch_pins_a_backend_and_unpatch_leaves_zoneout():
    model = nn.Sequential(nn.LSTM(4, 4), )
    fastseq.patch(model, backend="reference")
    assert model[0].backend == "reference"
    model.append(fastseq.nn.GRU(4, 4, zoneout=0.1))
    report = fastseq.unpatch(model)
    assert [name for name, _, _ in report.replaced] == ["0"]
    assert report.left == [("1", "fastseq.nn.rnn.GRU",
                            "uses zoneout, which torch's module does not have")]
def test_report_names_what_ran_plain_pytorch_as_called():
    """A swapped MultiheadAttention called with torch's default need_weights=True (SigLIP's
    pooling head) computes its weights in plain PyTorch: the report says so from that call on;
    need_weights=False is fused and adds nothing."""
    model = torch.nn.ModuleDict({"pool": torch.nn.MultiheadAttention(8, 2, batch_first=True),
                                 "fused": torch.nn.MultiheadAttention(8, 2, batch_first=True)})
    report = fastseq.patch(model)
    assert report.plain == {} and "plain PyTorch" not in str(report)
    x = torch.randn(2, 5, 8)
    model["fused"](x, x, x, need_weights=False)
    model["pool"](x, x, x)
    model["pool"](x, x, x)
    assert list(report.plain) == ["pool"]
    assert "need_weights=True" in report.plain["pool"]
    assert "ran plain PyTorch as called: 1 module(s)" in str(report)
    fastseq.unpatch(model)
    model["pool"](x, x, x)
    assert list(report.plain) == ["pool"]  # unpatched modules no longer report to it
