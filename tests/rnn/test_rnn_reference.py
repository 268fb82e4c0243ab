"""fastseq.reference.recurrent against torch.nn.LSTM/GRU/RNN in float64: the ground truth must
itself be right. Layers, directions, batch_first, proj_size, initial states, variable lengths."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastseq import reference

KINDS = {
    "lstm": (torch.nn.LSTM, {}),
    "gru": (torch.nn.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, {"nonlinearity": "relu"}),
}
CONFIGS = list(itertools.product([1, 2, 3], [False, True], [False, True]))  # layers, bidir, batch_first


def build(mode, num_layers, bidirectional, batch_first, proj_size=0, bias=True):
    cls, kwargs = KINDS[mode]
    if proj_size:
        kwargs = dict(kwargs, proj_size=proj_size)
    return cls(5, 7, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
               bias=bias, dtype=torch.float64, **kwargs)


def initial_state(mode, module, batch):
    d = 2 if module.bidirectional else 1
    h_size = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    h0 = torch.randn(module.num_layers * d, batch, h_size, dtype=torch.float64)
    if mode == "lstm":
        return h0, torch.randn(module.num_layers * d, batch, module.hidden_size, dtype=torch.float64)
    return h0


def assert_same(ours, theirs):
    for a, b in zip(ours if isinstance(ours, tuple) else (ours,),
                    theirs if isinstance(theirs, tuple) else (theirs,)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", list(KINDS))
@pytest.mark.parametrize("num_layers,bidirectional,batch_first", CONFIGS)
def test_padded_full_length(mode, num_layers, bidirectional, batch_first):
    module = build(mode, num_layers, bidirectional, batch_first)
    x = torch.randn(13, 7, 5, dtype=torch.float64)  # T=7, B=13 (or the reverse)
    x = x if batch_first else x.transpose(0, 1)
    hx = initial_state(mode, module, 13)
    out, state = module(x, hx)
    ref_out, ref_state = reference.rnn(mode, x, hx, reference.weights_of(module),
                                       num_layers=num_layers, bidirectional=bidirectional,
                                       batch_first=batch_first)
    torch.testing.assert_close(ref_out, out, rtol=1e-10, atol=1e-12)
    assert_same(ref_state, state)


@pytest.mark.parametrize("mode", list(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_variable_lengths_match_packed_sequences(mode, bidirectional):
    module = build(mode, 2, bidirectional, batch_first=False)
    lengths = torch.tensor([7, 1, 4, 7, 2])
    x = torch.randn(7, 5, 5, dtype=torch.float64)
    hx = initial_state(mode, module, 5)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out_packed, state = module(packed, hx)
    out, _ = pad_packed_sequence(out_packed, total_length=7)
    ref_out, ref_state = reference.rnn(mode, x, hx, reference.weights_of(module), num_layers=2,
                                       bidirectional=bidirectional, lengths=lengths)
    torch.testing.assert_close(ref_out, out, rtol=1e-10, atol=1e-12)
    assert_same(ref_state, state)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_projection(bidirectional):
    module = build("lstm", 2, bidirectional, batch_first=True, proj_size=3)
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    hx = initial_state("lstm", module, 4)
    out, state = module(x, hx)
    ref_out, ref_state = reference.rnn("lstm", x, hx, reference.weights_of(module), num_layers=2,
                                       bidirectional=bidirectional, batch_first=True)
    assert ref_out.shape[-1] == 3 * (2 if bidirectional else 1)
    torch.testing.assert_close(ref_out, out, rtol=1e-10, atol=1e-12)
    assert_same(ref_state, state)


@pytest.mark.parametrize("mode", list(KINDS))
def test_unbatched_default_state_and_no_bias(mode):
    module = build(mode, 2, True, batch_first=False, bias=False)
    x = torch.randn(6, 5, dtype=torch.float64)
    out, state = module(x)
    ref_out, ref_state = reference.rnn(mode, x, None, reference.weights_of(module), num_layers=2,
                                       bidirectional=True)
    torch.testing.assert_close(ref_out, out, rtol=1e-10, atol=1e-12)
    assert_same(ref_state, state)


def test_dropout_between_layers_only_in_training():
    module = build("gru", 3, False, batch_first=False)
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    weights = reference.weights_of(module)
    kwargs = dict(num_layers=3, dropout=0.5)
    eval_out, _ = reference.rnn("gru", x, None, weights, training=False, **kwargs)
    torch.testing.assert_close(eval_out, module(x)[0])
    torch.manual_seed(1)
    a, _ = reference.rnn("gru", x, None, weights, training=True, **kwargs)
    torch.manual_seed(2)
    b, _ = reference.rnn("gru", x, None, weights, training=True, **kwargs)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("mode", list(KINDS))
def test_cells_match_torch_cells(mode):
    cls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}.get(mode, torch.nn.RNNCell)
    kwargs = {"nonlinearity": mode.split("_")[1]} if cls is torch.nn.RNNCell else {}
    cell = cls(5, 7, dtype=torch.float64, **kwargs)
    x = torch.randn(3, 5, dtype=torch.float64)
    state = (torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)) \
        if mode == "lstm" else torch.randn(3, 7, dtype=torch.float64)
    ours = reference.rnn_cell.CELLS[mode](x, state, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                           cell.bias_hh)
    assert_same(ours, cell(x, state))
