"""fastseq.nn.LSTM/GRU/RNN as drop-ins for torch's: constructor, parameters and state_dict both
ways; on fastseq's sequence path (backend="triton"/"reference") the same outputs, final states
and gradients as torch over layers, directions, batch_first, padded/packed/`lengths=` and
unbatched input; `auto` runs torch's own forward."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq

from numerics import assert_within_rule
from recurrent_cases import layer_backends

KINDS = {
    "lstm": (torch.nn.LSTM, fastseq.nn.LSTM, {}),
    "gru": (torch.nn.GRU, fastseq.nn.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, fastseq.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, fastseq.nn.RNN, {"nonlinearity": "relu"}),
}
CONFIGS = [(1, False, False), (2, True, True), (3, True, False)]  # layers, bidirectional, batch_first
INPUTS = ["padded", "packed", "lengths", "unbatched"]
LENGTHS = [7, 2, 5, 1, 7]


def build(kind, layers, bidirectional, batch_first, dtype, backend=None, **extra):
    torch_cls, fast_cls, kwargs = KINDS[kind]
    args = dict(input_size=4, hidden_size=6, num_layers=layers, bidirectional=bidirectional,
                batch_first=batch_first, dtype=dtype, **kwargs, **extra)
    return torch_cls(**args), fast_cls(backend=backend, **args)


def run(module, x, hx, how, batch_first):
    """Forward + backward of `module` on x (float64 leaves cast to the module's dtype)."""
    dtype = next(module.parameters()).dtype
    x = x.detach().to(dtype).requires_grad_()
    state = tuple(h.to(dtype) for h in hx) if isinstance(hx, tuple) else hx.to(dtype)
    lengths = torch.tensor(LENGTHS)
    if how == "packed":
        out, final = module(pack_padded_sequence(x, lengths, batch_first=batch_first,
                                                 enforce_sorted=False), state)
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=7)
    elif how == "lengths":
        if isinstance(module, (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN)) and \
                not isinstance(module, (fastseq.nn.LSTM, fastseq.nn.GRU, fastseq.nn.RNN)):
            packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
            out, final = module(packed, state)
            out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=7)
        else:
            out, final = module(x, state, lengths=lengths)
    else:
        out, final = module(x, state)
    finals = list(final) if isinstance(final, tuple) else [final]
    torch.manual_seed(1)
    # randn by shape, not randn_like: the latter follows memory layout, so two equal outputs
    # with different strides would get different weights.
    loss = sum((t.double() * torch.randn(t.shape, dtype=torch.float64)).sum() for t in [out] + finals)
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, [x] + params)
    return [t.detach() for t in [out] + finals], list(grads)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layers,bidirectional,batch_first", CONFIGS)
@pytest.mark.parametrize("how", INPUTS)
def test_sequence_backends_match_torch(kind, layers, bidirectional, batch_first, how):
    d = 2 if bidirectional else 1
    if how == "unbatched":
        x = torch.randn(7, 4, dtype=torch.float64)
        h = torch.randn(layers * d, 6, dtype=torch.float64)
    else:
        x = torch.randn(5, 7, 4, dtype=torch.float64) if batch_first else torch.randn(7, 5, 4, dtype=torch.float64)
        h = torch.randn(layers * d, 5, 6, dtype=torch.float64)
    hx = (h, torch.randn_like(h)) if kind == "lstm" else h
    truth, _ = build(kind, layers, bidirectional, batch_first, torch.float64)
    plain, _ = build(kind, layers, bidirectional, batch_first, torch.float32)
    plain.load_state_dict(truth.state_dict())
    ref_outs, ref_grads = run(truth, x, hx, how, batch_first)
    plain_outs, plain_grads = run(plain, x, hx, how, batch_first)
    for backend in layer_backends("cpu"):
        _, ours = build(kind, layers, bidirectional, batch_first, torch.float32, backend=backend)
        ours.load_state_dict(truth.state_dict())
        outs, grads = run(ours, x, hx, how, batch_first)
        for i, (o, p, r) in enumerate(zip(outs, plain_outs, ref_outs)):
            assert_within_rule(f"{backend} {kind} output {i}", o, p, r)
        names = ["input"] + [n for n, _ in ours.named_parameters()]
        for name, g, p, r in zip(names, grads, plain_grads, ref_grads):
            assert_within_rule(f"{backend} {kind} grad {name}", g, p, r)


def test_packed_output_keeps_the_input_structure():
    torch_lstm, ours = build("lstm", 2, True, False, torch.float32, backend=layer_backends("cpu")[0])
    ours.load_state_dict(torch_lstm.state_dict())
    packed = pack_padded_sequence(torch.randn(7, 5, 4), torch.tensor(LENGTHS), enforce_sorted=False)
    theirs, _ = torch_lstm(packed)
    mine, _ = ours(packed)
    for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
        assert torch.equal(getattr(mine, field), getattr(theirs, field))
    torch.testing.assert_close(mine.data, theirs.data, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_dict_both_ways_and_auto_is_torch(kind):
    theirs, ours = build(kind, 2, True, True, torch.float32, **({"proj_size": 3} if kind == "lstm" else {}))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    back, _ = build(kind, 2, True, True, torch.float32, **({"proj_size": 3} if kind == "lstm" else {}))
    back.load_state_dict(ours.state_dict())
    ours.flatten_parameters()  # torch's, harmless
    x = torch.randn(3, 5, 4)
    with torch.profiler.profile() as prof:
        out, _ = ours(x)
    expected, _ = back(x)
    torch.testing.assert_close(out, expected)
    names = {e.name for e in prof.events()}
    assert not any(n.startswith("fastseq::") for n in names)  # auto: torch's own kernels


def test_lengths_on_the_auto_path_match_packed():
    torch_gru, ours = build("gru", 2, True, True, torch.float32)
    ours.load_state_dict(torch_gru.state_dict())
    x = torch.randn(5, 7, 4)
    out, h = ours(x, lengths=LENGTHS)
    packed, h_expected = torch_gru(pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=True,
                                                        enforce_sorted=False))
    expected, _ = pad_packed_sequence(packed, batch_first=True, total_length=7)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(h, h_expected)


def test_dropout_between_layers_in_training_only():
    _, ours = build("lstm", 3, False, False, torch.float32, backend=layer_backends("cpu")[0], dropout=0.5)
    x = torch.randn(6, 2, 4)
    ours.eval()
    a, _ = ours(x)
    b, _ = ours(x)
    assert torch.equal(a, b)
    ours.train()
    torch.manual_seed(1)
    c, _ = ours(x)
    torch.manual_seed(2)
    d, _ = ours(x)
    assert not torch.allclose(c, d)


def test_errors_name_the_problem():
    _, lstm = build("lstm", 2, False, False, torch.float32, backend=layer_backends("cpu")[0], proj_size=3)
    with pytest.raises(fastseq.InputError, match=r"c0 must have shape \[num_layers\*num_directions, "
                                                 r"batch, hidden_size\] = \[2, 2, 6\], got \[2, 2, 3\]"):
        lstm(torch.randn(3, 2, 4), (torch.zeros(2, 2, 3), torch.zeros(2, 2, 3)))
    _, gru = build("gru", 2, True, False, torch.float32, backend="reference")
    with pytest.raises(fastseq.InputError, match=r"h0 must have shape \[num_layers\*num_directions, "
                                                 r"batch, hidden_size\] = \[4, 2, 6\], got \[2, 2, 6\]"):
        gru(torch.randn(3, 2, 4), torch.zeros(2, 2, 6))
    packed = pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 2]))
    with pytest.raises(fastseq.InputError, match="lengths is for padded input"):
        gru(packed, lengths=[3, 2])


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_compile_fullgraph_training_step(backend):
    """A whole training step through a 2-layer bidirectional LSTM compiles as one graph (torch's
    own nn.LSTM graph-breaks); under compile, auto takes fastseq's sequence path."""
    if layer_backends("cpu")[0] != "triton":
        pytest.skip("needs the Triton interpreter")
    torch._dynamo.reset()
    _, lstm = build("lstm", 2, True, True, torch.float32, backend=backend)
    x = torch.randn(3, 5, 4, requires_grad=True)

    def step(inp):
        y, (h, c) = lstm(inp, lengths=[5, 2, 4])
        return y.square().sum() + h.sum() + c.sum()

    eager = step(x)
    eager_grads = torch.autograd.grad(eager, [x] + list(lstm.parameters()))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    grads = torch.autograd.grad(compiled, [x] + list(lstm.parameters()))
    torch.testing.assert_close(compiled, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_constructor_arguments_as_torch():
    rnn = fastseq.nn.RNN(4, 6, 2, "relu", False, True)  # torch's positional order
    assert (rnn.nonlinearity, rnn.mode, rnn.num_layers, rnn.bias, rnn.batch_first) == \
        ("relu", "RNN_RELU", 2, False, True)
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        fastseq.nn.RNN(4, 6, nonlinearity="gelu")
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        fastseq.nn.GRU(4, 6, proj_size=2)
    assert repr(fastseq.nn.LSTM(4, 6, 2, proj_size=3)) == repr(torch.nn.LSTM(4, 6, 2, proj_size=3))


@pytest.mark.parametrize("backend", layer_backends("cpu"))
@pytest.mark.parametrize("how", ["padded", "packed", "lengths"])
def test_projection_on_every_backend_matches_torch(how, backend):
    """proj_size > 0 on fastseq's sequence path, each backend: outputs, final states and every
    gradient as torch.nn.LSTM's, 2 layers, bidirectional."""
    x = torch.randn(7, 5, 4, dtype=torch.float64)
    hx = (torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 5, 6, dtype=torch.float64))
    truth, _ = build("lstm", 2, True, False, torch.float64, proj_size=3)
    plain, ours = build("lstm", 2, True, False, torch.float32, backend=backend, proj_size=3)
    plain.load_state_dict(truth.state_dict())
    ours.load_state_dict(truth.state_dict())
    ref_outs, ref_grads = run(truth, x, hx, how, False)
    plain_outs, plain_grads = run(plain, x, hx, how, False)
    outs, grads = run(ours, x, hx, how, False)
    for i, (o, p, r) in enumerate(zip(outs, plain_outs, ref_outs)):
        assert_within_rule(f"proj output {i}", o, p, r)
    for name, g, p, r in zip(["input"] + [n for n, _ in ours.named_parameters()], grads, plain_grads, ref_grads):
        assert_within_rule(f"proj grad {name}", g, p, r)


def test_projection_compiles_fullgraph():
    torch._dynamo.reset()
    theirs, ours = build("lstm", 1, False, False, torch.float32, proj_size=3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 2, 4)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    out, (h, c) = compiled(x)
    expected, (h_e, c_e) = theirs(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, c_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto"] + layer_backends("cpu"))
def test_layer_input_errors_name_the_argument(backend):
    """The layer checks its input before any backend: the same message on every backend
    (fastseq.ops would otherwise blame w_ih for an input of the wrong width)."""
    lstm = fastseq.nn.LSTM(4, 5, batch_first=True, backend=backend)
    x = torch.randn(2, 3, 4)
    cases = [
        (dict(input=torch.randn(2, 3, 6)), r"input must have input_size 4 features in its last "
                                           r"dim, got shape \[2, 3, 6\]"),
        (dict(input=x.double()), "input is torch.float64 on cpu, the module's parameters are "
                                 "torch.float32 on cpu"),
        (dict(input=x[..., None]), r"input must be 3-D \[batch, steps, input_size\] or 2-D"),
        (dict(input=x, lengths=[3, 4]), r"lengths must lie in \[0, 3\] .* from 3 to 4"),
        (dict(input=x, lengths=[3]), r"lengths must be 1-D with one length per batch row \[2\]"),
        (dict(input=x, lengths=torch.tensor([1.0, 2.0])), "lengths must be integers"),
        (dict(input=x[0], lengths=[3]), r"lengths is for a padded batch"),
    ]
    for kwargs, message in cases:
        with pytest.raises(fastseq.InputError, match="fastseq.nn.LSTM: " + message):
            lstm(**kwargs)


def test_zero_lengths_leave_torch_for_fastseq():
    """A row of length 0 (torch's packing refuses it) or no step at all (torch's RNNs refuse
    it): `auto` runs fastseq's sequence path (zeros out, h0 kept), an explicit torch backend
    says why it cannot."""
    theirs, ours = build("lstm", 2, True, True, torch.float32)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 4)
    out, (h_n, c_n) = ours(x, lengths=[4, 0, 2])
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(h_n[:, 1]) == 0
    packed = pack_padded_sequence(x[[0, 2]], torch.tensor([4, 2]), batch_first=True)
    expected, (h_e, c_e) = theirs(packed)  # rows 0 and 2 alone, by torch
    expected, _ = pad_packed_sequence(expected, batch_first=True, total_length=4)
    torch.testing.assert_close(out[[0, 2]], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_n[:, [0, 2]], h_e, rtol=1e-5, atol=1e-6)
    h0 = torch.randn(4, 3, 6), torch.randn(4, 3, 6)
    out, (h_n, c_n) = ours(x[:, :0], h0)  # no step at all
    assert out.shape == (3, 0, 12) and torch.equal(h_n, h0[0]) and torch.equal(c_n, h0[1])
    ours.backend = "torch"
    with pytest.raises(fastseq.BackendError, match="torch's packed sequences refuse zero lengths"):
        ours(x, lengths=[4, 0, 2])
    with pytest.raises(fastseq.BackendError, match="torch's RNNs refuse zero-length sequences"):
        ours(x[:, :0])
