"""fastseq.nn cells as drop-ins for torch's: constructor, parameters, state_dict both ways,
same results; bad inputs raise clear errors."""
import pytest
import torch

import fastseq

from conftest import DEVICES, backends_for

PAIRS = [
    (torch.nn.LSTMCell, fastseq.nn.LSTMCell, {}),
    (torch.nn.GRUCell, fastseq.nn.GRUCell, {}),
    (torch.nn.RNNCell, fastseq.nn.RNNCell, {"nonlinearity": "tanh"}),
    (torch.nn.RNNCell, fastseq.nn.RNNCell, {"nonlinearity": "relu"}),
]
IDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("torch_cls,fast_cls,kwargs", PAIRS, ids=IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip_and_same_output(device, torch_cls, fast_cls, kwargs, bias):
    theirs = torch_cls(7, 11, bias=bias, device=device, **kwargs)
    ours = fast_cls(7, 11, bias=bias, device=device, **kwargs)
    assert isinstance(ours, torch_cls)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    back = torch_cls(7, 11, bias=bias, device=device, **kwargs)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(13, 7, device=device)
    lstm = torch_cls is torch.nn.LSTMCell
    state = (torch.randn(13, 11, device=device), torch.randn(13, 11, device=device)) if lstm \
        else torch.randn(13, 11, device=device)
    for backend in backends_for(device):
        ours.backend = backend
        for args in ((x,), (x, state), (x[0], tuple(s[0] for s in state) if lstm else state[0])):
            got, want = ours(*args), back(*args)
            for g, w in zip(got if lstm else (got,), want if lstm else (want,)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"{backend} {args[0].shape}")


def test_dtype_argument_and_half_precision():
    cell = fastseq.nn.LSTMCell(5, 6, dtype=torch.bfloat16)
    assert cell.weight_ih.dtype == torch.bfloat16
    h, c = cell(torch.randn(2, 5, dtype=torch.bfloat16))
    assert h.dtype == c.dtype == torch.bfloat16 and h.shape == (2, 6)


def bad_calls():
    x = torch.randn(3, 4)
    lstm = fastseq.nn.LSTMCell(4, 5)
    w_ih, w_hh = lstm.weight_ih.detach(), lstm.weight_hh.detach()
    h = torch.zeros(3, 5)
    op = fastseq.ops.lstm_cell
    return [
        ("input must be 1-D or 2-D", lambda: op(torch.randn(2, 3, 4), None, w_ih, w_hh)),
        (r"w_ih must have shape \[4\*hidden_size, input_size\] = \[20, 7\], got \[20, 4\]",
         lambda: op(torch.randn(3, 7), None, w_ih, w_hh)),
        (r"hx\[0\] must have shape \[batch, hidden_size\] = \[3, 5\], got \[3, 6\]",
         lambda: op(x, (torch.zeros(3, 6), h), w_ih, w_hh)),
        (r"hx\[1\] must have shape \[batch, hidden_size\] = \[3, 5\], got \[2, 5\]",
         lambda: op(x, (h, torch.zeros(2, 5)), w_ih, w_hh)),
        (r"w_hh must have shape \[4\*hidden_size, hidden_size\] = \[24, 6\], got \[20, 6\]",
         lambda: op(x, None, w_ih, torch.randn(20, 6))),
        ("w_hh must have dtype torch.float32 .*got torch.float64",
         lambda: op(x, None, w_ih, w_hh.double())),
        ("input must be a floating-point tensor",
         lambda: op(x.long(), None, w_ih.long(), w_hh.long())),
        ("w_ih must be on device cpu .*got meta",
         lambda: op(x, None, w_ih.to("meta"), w_hh)),
        (r"b_ih must have shape \[4\*hidden_size\] = \[20\], got \[19\]",
         lambda: op(x, None, w_ih, w_hh, torch.zeros(19))),
        (r"hx must be a tuple \(h, c\) or None",
         lambda: op(x, h, w_ih, w_hh)),
        (r"fastseq.ops.gru_cell: hx must be 1-D like input \(\[hidden_size\]: input is unbatched\), got 2-D",
         lambda: fastseq.ops.gru_cell(torch.randn(4), torch.zeros(1, 5), torch.randn(15, 4),
                                      torch.randn(15, 5))),
        (r"input must be 1-D or 2-D, got 3-D", lambda: lstm(torch.randn(1, 3, 4))),
    ]


@pytest.mark.parametrize("message,call", bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_clear_error(message, call):
    with pytest.raises(fastseq.InputError, match=message):
        call()


def test_native_op_checks_its_own_arguments():
    """A direct torch.ops call with a bad shape gets an error, not a crash in the kernel."""
    x, h, c = torch.randn(3, 4), torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match=r"w_hh must have shape \[20, 5\], got \[20, 4\]"):
        torch.ops.fastseq.rnn_cell_forward("lstm", x, h, c, torch.randn(20, 4), torch.randn(20, 4),
                                           None, None, False)
    with pytest.raises(RuntimeError, match="mode must be one of"):
        torch.ops.fastseq.rnn_cell_forward("lstmx", x, h, c, torch.randn(20, 4),
                                           torch.randn(20, 5), None, None, False)


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_input_errors_name_the_layer(cls):
    """Width, dims, dtype checked by the cell before its op (which would blame weight_ih)."""
    cell = getattr(fastseq.nn, cls)(4, 5)
    name = f"fastseq.nn.{cls}"
    with pytest.raises(fastseq.InputError, match=name + r": input must have input_size 4 "
                                                        r"features in its last dim, got shape \[2, 6\]"):
        cell(torch.randn(2, 6))
    with pytest.raises(fastseq.InputError,
                       match=name + r": input must be 1-D or 2-D, got 3-D with shape \[2, 4, 1\]"):
        cell(torch.randn(2, 4, 1))
    with pytest.raises(fastseq.InputError, match=name + ": input is torch.float64 on cpu, the "
                                                        "module's parameters are torch.float32"):
        cell(torch.randn(2, 4, dtype=torch.float64))
