"""Zoneout (h_t = m h_{t-1} + (1 - m) h~_t, LSTM h and c, GRU h) on the sequence op: Triton
(interpreter), native (the GEMM-per-step loop), the persistent kernel's twin, against the float64
reference, with training masks and evaluation weights; gradcheck of the backward's zoneout
terms (the LSTM's recomputed c~_t included); refusals."""
import pytest
import torch

import fastseq

from numerics import assert_within_rule
from recurrent_cases import LEAF_NAMES, layer_backends, make_grad_outputs, make_leaves, persistent_layer

native_or_skip = pytest.mark.skipif("native" not in layer_backends("cpu"), reason="fastseq._C is not built")


def masks(mode, T, B, H, kind):
    """(zoneout_h, zoneout_c) in float64: Bernoulli(0.3) masks (training) or 0.3 everywhere
    (evaluation); c only for the LSTM."""
    def one():
        if kind == "train":
            return (torch.rand(T, B, H) < 0.3).double()
        return torch.full((T, B, H), 0.3, dtype=torch.float64)
    return one(), (one() if mode == "lstm" else None)


def run(mode, leaves64, zoneout64, dtype, backend, lengths, reverse, grad_outputs):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in leaves64]
    zh, zc = [z.to(dtype) if z is not None else None for z in zoneout64]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = leaves
    hx = (h0, c0) if mode == "lstm" else h0
    if backend == "persistent":
        y, h_n = persistent_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse, zh, zc)
    else:
        y, h_n = fastseq.ops.rnn_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh, lengths=lengths,
                                       reverse=reverse, zoneout_h=zh, zoneout_c=zc, backend=backend)
    outs = [y] + (list(h_n) if mode == "lstm" else [h_n])
    loss = sum((o.double() * go).sum() for o, go in zip(outs, grad_outputs))
    present = [t for t in leaves if t is not None]
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, present))


@native_or_skip
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("kind", ["train", "eval"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_zoneout_matches_reference(mode, kind, reverse, dtype):
    T, B, I, H = 6, 5, 3, 20  # small: the Triton interpreter runs it too
    leaves64 = make_leaves(mode, T, B, I, H, "cpu")
    zoneout64 = masks(mode, T, B, H, kind)
    lengths = [T - (i * 5) % T for i in range(B)]
    grad_outputs = make_grad_outputs(mode, T, B, H, "cpu")
    ref = run(mode, leaves64, zoneout64, torch.float64, "reference", lengths, reverse, grad_outputs)
    plain = run(mode, leaves64, zoneout64, dtype, "reference", lengths, reverse, grad_outputs)
    names = ["y", "h_n", "c_n"] + [n for n, t in zip(LEAF_NAMES, leaves64) if t is not None]
    for backend in [b for b in layer_backends("cpu") if b != "reference"] + ["persistent"]:
        outs, grads = run(mode, leaves64, zoneout64, dtype, backend, lengths, reverse, grad_outputs)
        for name, o, p, r in zip(names, outs + grads, plain[0] + plain[1], ref[0] + ref[1]):
            assert_within_rule(f"{backend} {mode} zoneout {name}", o, p, r)


def test_reference_zoneout_keeps_the_state_where_the_mask_is_one():
    leaves = make_leaves("lstm", 4, 3, 2, 5, "cpu")
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = leaves
    ones = torch.ones(4, 3, 5, dtype=torch.float64)
    y, (h, c) = fastseq.ops.rnn_layer("lstm", x, (h0, c0), w_ih, w_hh, b_ih, b_hh, zoneout_h=ones,
                                      zoneout_c=ones, backend="reference")
    assert torch.equal(h, h0) and torch.equal(c, c0) and torch.equal(y[2], h0)


@native_or_skip
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["triton", "native", "persistent"])
def test_gradcheck_float64(mode, backend):
    if backend == "triton" and "triton" not in layer_backends("cpu"):
        pytest.skip("the Triton interpreter is off")
    """Fractional weights (neither 0 nor 1) exercise both shares of every gradient."""
    # H=3: every gradcheck evaluation runs the whole layer, through the interpreter for Triton.
    leaves = [t.requires_grad_() if t is not None else None for t in make_leaves(mode, 4, 2, 2, 3, "cpu")]
    zh = torch.rand(4, 2, 3, dtype=torch.float64)
    zc = torch.rand(4, 2, 3, dtype=torch.float64) if mode == "lstm" else None
    present = [i for i, t in enumerate(leaves) if t is not None]

    def f(*args):
        full = list(leaves)
        for i, a in zip(present, args):
            full[i] = a
        x, h0, c0, w_ih, w_hh, b_ih, b_hh = full
        hx = (h0, c0) if mode == "lstm" else h0
        if backend == "persistent":
            y, h_n = persistent_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh, [4, 3], True, zh, zc)
        else:
            y, h_n = fastseq.ops.rnn_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh, lengths=[4, 3],
                                           reverse=True, zoneout_h=zh, zoneout_c=zc, backend=backend)
        return (y,) + (tuple(h_n) if mode == "lstm" else (h_n,))

    assert torch.autograd.gradcheck(f, [leaves[i] for i in present], eps=1e-6, atol=1e-6)


def test_refusals():
    x, w_ih, w_hh = torch.randn(5, 3, 4), torch.randn(6, 4), torch.randn(6, 6)
    mask = torch.zeros(5, 3, 6)
    with pytest.raises(fastseq.InputError, match="zoneout_h is for lstm and gru layers, not rnn_tanh"):
        fastseq.ops.rnn_layer("rnn_tanh", x, None, w_ih, w_hh, zoneout_h=mask)
    w_ih3, w_hh3 = torch.randn(18, 4), torch.randn(18, 6)
    with pytest.raises(fastseq.InputError, match="zoneout_c is for lstm layers, not gru"):
        fastseq.ops.rnn_layer("gru", x, None, w_ih3, w_hh3, zoneout_c=mask)
    with pytest.raises(fastseq.InputError, match=r"zoneout_h must have shape \[steps, batch, hidden_size\]"):
        fastseq.ops.rnn_layer("gru", x, None, w_ih3, w_hh3, zoneout_h=mask[:4])
    with pytest.raises(fastseq.BackendError, match="torch.s RNNs have no zoneout"):
        fastseq.ops.rnn_layer("gru", x, None, w_ih3, w_hh3, zoneout_h=mask, backend="torch")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_layer_zoneout_argument(kind):
    """fastseq.nn.LSTM/GRU(zoneout=...): training draws fresh masks (same seed, same result;
    p=1 freezes the state), evaluation equals the reference with weights p; state_dict is
    torch's; torch's backend refuses."""
    cls = fastseq.nn.LSTM if kind == "lstm" else fastseq.nn.GRU
    p = (0.25, 0.5) if kind == "lstm" else 0.25
    layer = cls(4, 6, num_layers=2, bidirectional=True, zoneout=p).double()
    assert set(layer.state_dict()) == set(getattr(torch.nn, kind.upper())(4, 6, num_layers=2,
                                                                           bidirectional=True).state_dict())
    assert "zoneout" in repr(layer)
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    layer.train()
    torch.manual_seed(5)
    first = layer(x)[0]
    torch.manual_seed(5)
    assert torch.equal(layer(x)[0], first)
    layer.eval()
    out, _ = layer(x)
    ref_layer = cls(4, 6, num_layers=2, bidirectional=True, zoneout=p, backend="reference").double().eval()
    ref_layer.load_state_dict(layer.state_dict())
    expected, _ = ref_layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    frozen = cls(4, 6, zoneout=(1.0, 1.0) if kind == "lstm" else 1.0).double().train()
    h0 = torch.randn(1, 3, 6, dtype=torch.float64)
    state = (h0, torch.randn(1, 3, 6, dtype=torch.float64)) if kind == "lstm" else h0
    _, final = frozen(x, state)
    torch.testing.assert_close(final[0] if kind == "lstm" else final, h0)
    with pytest.raises(fastseq.BackendError, match="torch's RNNs have no zoneout"):
        cls(4, 6, zoneout=0.1, backend="torch")(x.float())


def test_layer_zoneout_bad_arguments():
    with pytest.raises(ValueError, match="zoneout must be a probability"):
        fastseq.nn.LSTM(4, 6, zoneout=1.5)
    with pytest.raises(ValueError, match="one probability for the GRU"):
        fastseq.nn.GRU(4, 6, zoneout=(0.1, 0.1))
    with pytest.raises(ValueError, match="not the plain RNN"):
        fastseq.nn.RNN(4, 6, zoneout=0.1)


@native_or_skip
def test_layer_zoneout_compiles_fullgraph():
    torch._dynamo.reset()
    layer = fastseq.nn.LSTM(4, 6, zoneout=(0.2, 0.3)).eval()
    x = torch.randn(5, 3, 4, requires_grad=True)

    def loss(inp):
        out, (h, c) = layer(inp)
        return out.square().sum() + c.sum()

    eager = loss(x)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(torch.autograd.grad(compiled, x)[0], torch.autograd.grad(eager, x)[0])
