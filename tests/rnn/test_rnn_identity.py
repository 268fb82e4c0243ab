"""fastseq's RNNs are torch's by isinstance (fastseq/nn/torch_identity.py) and still compile whole;
what third-party code hands them as hx is checked by name."""
import copy
import io
import pickle

import pytest
import torch

import fastseq

PAIRS = [(fastseq.nn.LSTM, torch.nn.LSTM), (fastseq.nn.GRU, torch.nn.GRU),
         (fastseq.nn.RNN, torch.nn.RNN)]


@pytest.mark.parametrize("fast,plain", PAIRS, ids=lambda c: c.__name__)
def test_isinstance_of_torch_class_and_only_that_one(fast, plain):
    module = fast(4, 5)
    assert isinstance(module, plain) and isinstance(module, fast)
    assert isinstance(module, torch.nn.RNNBase)
    others = [p for _, p in PAIRS if p is not plain]
    assert not any(isinstance(module, other) for other in others)
    assert type(module) is fast
    assert repr(module) == repr(plain(4, 5))


class _Model(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("fast,plain", PAIRS, ids=lambda c: c.__name__)
def test_a_model_holding_one_compiles_whole(fast, plain):
    model = _Model(fast(4, 5, num_layers=2))
    x = torch.randn(3, 2, 4)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), model(x))


def test_torch_own_rnn_still_refused_by_the_compiler():
    """The class trick is fastseq's only: torch's own LSTM keeps dynamo's refusal (so nothing
    process-wide was switched)."""
    model = _Model(torch.nn.LSTM(4, 5))
    with pytest.raises(Exception, match="RNN, GRU, or LSTM"):
        torch.compile(model, fullgraph=True, backend="eager")(torch.randn(3, 2, 4))


def test_whole_module_pickle_deepcopy_and_patch_keep_fastseq_class():
    model = _Model(fastseq.nn.LSTM(4, 5))
    x = torch.randn(3, 2, 4)
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (torch.load(buffer, weights_only=False), copy.deepcopy(model),
                   pickle.loads(pickle.dumps(model))):
        assert type(copied.rnn) is fastseq.nn.LSTM
        torch.testing.assert_close(copied(x), expected)
    fastseq.unpatch(model)
    assert type(model.rnn) is torch.nn.LSTM
    fastseq.patch(model)
    assert type(model.rnn) is fastseq.nn.LSTM


@pytest.mark.parametrize("hx", [("h",), "h", ("tensor", "c")], ids=str)
def test_non_tensor_hx_is_an_input_error(hx):
    x = torch.randn(3, 2, 4)
    h = torch.zeros(1, 2, 5)
    gru, lstm = fastseq.nn.GRU(4, 5), fastseq.nn.LSTM(4, 5)
    with pytest.raises(fastseq.InputError, match="hx"):
        gru(x, tuple(h for _ in hx) if isinstance(hx, tuple) else hx)
    with pytest.raises(fastseq.InputError, match="hx"):
        lstm(x, tuple(h if v == "tensor" else v for v in hx) if isinstance(hx, tuple) else hx)
