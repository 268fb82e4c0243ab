"""Zoneout (h_t = m h_{t-1} + (1 - m) h~_t, LSTM h and c, GRU h) on the sequence op: Triton
(interpreter), native (the GEMM-per-step loop), the persistent kernel's twin, against the float64
reference, with training masks and evaluation weights; gradcheck of the backward's zoneout
terms (the LSTM's recomputed c~_t included); refusals."""
import pytest
import torch

import fastseq

from recurrent_cases import (assert_backends_match_reference, gradcheck_layer, layer_backends,
                             make_grad_outputs, make_leaves)

native_or_skip = pytest.mark.skipif("native" not in layer_backends("cpu"), reason="fastseq._C is not built")


def masks(mode, T, B, H, kind):
    """(zoneout_h, zoneout_c) in float64: Bernoulli(0.3) masks (training) or 0.3 everywhere
    (evaluation); c only for the LSTM."""
    def one():
        if kind == "train":
            return (torch.rand(T, B, H) < 0.3).double()
        return torch.full((T, B, H), 0.3, dtype=torch.float64)
    return one(), (one() if mode == "lstm" else None)


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
    backends = [b for b in layer_backends("cpu") if b != "reference"] + ["persistent"]
    assert_backends_match_reference(mode, leaves64, dtype, backends, lengths, reverse, grad_outputs,
                                    zoneout64)


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
    # H=3: every gradcheck evaluation runs the whole layer, through the interpreter for Triton.
    assert gradcheck_layer(mode, backend, 4, 2, 2, 3, lengths=[4, 3], zoneout=True)


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
