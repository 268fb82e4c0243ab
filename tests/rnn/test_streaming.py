"""fastseq.nn.LSTM/GRU/RNN.step: frames one at a time with the state carried equal the layer
over the whole sequence (multi-layer, every mode, the projected LSTM, zoneout in evaluation,
unbatched), on every backend the cells have; the refusals name what to do instead."""
import pytest
import torch

import fastseq

from conftest import backends_for

LAYERS = {
    "lstm": lambda **kw: fastseq.nn.LSTM(3, 5, num_layers=3, **kw),
    "gru": lambda **kw: fastseq.nn.GRU(3, 5, num_layers=2, **kw),
    "rnn_relu": lambda **kw: fastseq.nn.RNN(3, 5, num_layers=2, nonlinearity="relu", **kw),
    "lstm_proj": lambda **kw: fastseq.nn.LSTM(3, 5, num_layers=2, proj_size=2, **kw),
    "lstm_zoneout": lambda **kw: fastseq.nn.LSTM(3, 5, num_layers=2, zoneout=(0.3, 0.2), **kw),
}


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_frames_one_by_one_equal_the_sequence(name, backend):
    torch.manual_seed(0)
    layer = LAYERS[name](backend=backend).double().eval()
    frames = torch.randn(6, 2, 3, dtype=torch.float64)
    layer.backend = "reference"  # the sequence path's ground truth
    expected, expected_state = layer(frames)
    layer.backend = backend
    state, outputs = None, []
    for frame in frames:
        out, state = layer.step(frame, state)
        outputs.append(out)
    torch.testing.assert_close(torch.stack(outputs), expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(state if isinstance(state, tuple) else (state,),
                         expected_state if isinstance(expected_state, tuple)
                         else (expected_state,)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_unbatched_frames_and_a_given_state():
    torch.manual_seed(1)
    layer = fastseq.nn.GRU(3, 4, num_layers=2).double()
    frames, h0 = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    expected, h_n = layer(frames, h0)
    state = h0
    for t, frame in enumerate(frames):
        out, state = layer.step(frame, state)
        torch.testing.assert_close(out, expected[t])
    torch.testing.assert_close(state, h_n)


def test_gradients_flow_through_the_steps():
    torch.manual_seed(2)
    layer = fastseq.nn.LSTM(3, 4, num_layers=2).double()
    frames = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    state, total = None, 0
    for frame in frames:
        out, state = layer.step(frame, state)
        total = total + out.pow(2).sum()
    grads = torch.autograd.grad(total, [frames, *layer.parameters()])
    out, _ = layer(frames)
    expected = torch.autograd.grad(out.pow(2).sum(), [frames, *layer.parameters()])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_refusals_name_the_alternative():
    with pytest.raises(ValueError, match="bidirectional layer needs the whole sequence"):
        fastseq.nn.LSTM(3, 4, bidirectional=True).step(torch.randn(2, 3))
    with pytest.raises(ValueError, match="input must have input_size 3 features"):
        fastseq.nn.GRU(3, 4).step(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"h0 must have shape \[num_layers\*num_directions, "
                                         r"batch, hidden_size\] = \[2, 2, 4\]"):
        fastseq.nn.GRU(3, 4, num_layers=2).step(torch.randn(2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="bidirectional layer needs the whole sequence"):
        fastseq.nn.LayerNormLSTM(3, 4, bidirectional=True).step(torch.randn(2, 3))
