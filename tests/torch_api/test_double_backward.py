"""Double backward (a gradient of a gradient: gradient penalties, Hessian-vector products,
meta-learning) through every op family on every backend. The fused kernels have no
second-order formula: their backward ops refuse by name (a C++ op used to return silent zeros,
torch only warning that no autograd kernel was registered). The plain-PyTorch backends are
differentiable twice, and gradgradcheck holds there, so the refusal's advice is sound."""
import pytest
import torch

import fastseq
from fastseq import DoubleBackwardError

from conftest import backends_for

FUSED = [b for b in backends_for("cpu") if b in ("triton", "native")]
PLAIN = ["reference", "torch"]


def rand(*shape):
    return torch.rand(*shape, dtype=torch.float64, requires_grad=True)


def cell_case(mode):
    g = {"lstm": 4, "gru": 3}[mode]
    x, h, c = rand(2, 3), rand(2, 4), rand(2, 4)
    weights = [rand(g * 4, 3), rand(g * 4, 4), rand(g * 4), rand(g * 4)]
    op = getattr(fastseq.ops, f"{mode}_cell")

    def call(backend, x, *weights):
        out = op(x, (h, c) if mode == "lstm" else h, *weights, backend=backend)
        return out[0] if mode == "lstm" else out
    return call, [x] + weights


def layer_case(mode, bidirectional=False):
    g = {"lstm": 4, "gru": 3}[mode]
    x = rand(3, 2, 3)
    weights = [rand(g * 4, 3), rand(g * 4, 4), rand(g * 4), rand(g * 4)]

    def call(backend, x, *weights):
        if bidirectional:
            out, _ = fastseq.ops.rnn_bidirectional_layer(mode, x, None, weights, weights,
                                                         backend=backend)
        else:
            out, _ = fastseq.ops.rnn_layer(mode, x, None, *weights, backend=backend)
        return out
    return call, [x] + weights


def layer_norm_case(mode):
    g = {"lstm": 4, "gru": 3}[mode]
    x = rand(3, 2, 3)
    w = [rand(g * 4, 3), rand(g * 4, 4), rand(g * 4), rand(g * 4), 1 + rand(g * 4), 1 + rand(g * 4)]
    extra = (1 + rand(4), rand(4)) if mode == "lstm" else (None, None)

    def call(backend, x, *w):
        out, _ = fastseq.ops.layer_norm_rnn_layer(mode, x, None, *w, *extra, backend=backend)
        return out
    return call, [x] + w


def attention_case():
    q, k, v = rand(1, 2, 5, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)

    def call(backend, q, k, v):
        return fastseq.ops.attention(q, k, v, backend=backend)
    return call, [q, k, v]


def rel_attention_case():
    q, k, v, pos, u, w = rand(1, 2, 4, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8), rand(6, 2, 8), \
        rand(2, 8), rand(2, 8)

    def call(backend, *t):
        return fastseq.ops.rel_attention(*t, backend=backend)
    return call, [q, k, v, pos, u, w]


CASES = {"lstm_cell": lambda: cell_case("lstm"), "gru_cell": lambda: cell_case("gru"),
         "lstm_layer": lambda: layer_case("lstm"), "gru_layer": lambda: layer_case("gru"),
         "lstm_bidirectional": lambda: layer_case("lstm", True),
         "layer_norm_lstm": lambda: layer_norm_case("lstm"),
         "layer_norm_gru": lambda: layer_norm_case("gru"),
         "attention": attention_case, "rel_attention": rel_attention_case}
# Which fused backends each family has (the others refuse the call before any gradient).
FUSED_FOR = {"layer_norm_lstm": ["triton"], "layer_norm_gru": ["triton"],
             "lstm_bidirectional": ["triton"], "attention": ["triton"],
             "rel_attention": ["triton"]}


def fused_params():
    return [(case, backend) for case in CASES for backend in FUSED
            if backend in FUSED_FOR.get(case, FUSED)]


@pytest.mark.parametrize("case,backend", fused_params())
def test_fused_backward_refuses_a_second_derivative_by_name(case, backend):
    call, leaves = CASES[case]()
    out = call(backend, *leaves)
    # First-order gradients with create_graph=True still work (and equal the reference's) ...
    grads = torch.autograd.grad(out.pow(2).sum(), leaves, create_graph=True)
    expected = torch.autograd.grad(call("reference", *leaves).pow(2).sum(), leaves)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-9)
    # ... and differentiating them again raises, naming double backward and the kernel.
    with pytest.raises(DoubleBackwardError, match="double backward.*fastseq::"):
        torch.autograd.grad(sum(g.sum() for g in grads), leaves)
    assert issubclass(DoubleBackwardError, RuntimeError)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", PLAIN)
def test_plain_backends_are_twice_differentiable(case, backend):
    call, leaves = CASES[case]()
    try:
        call(backend, *leaves)
    except fastseq.BackendError as refusal:  # torch has no kernel for it: refused by name
        pytest.skip(str(refusal))
    if backend == "torch" and case == "attention":
        # torch's own SDPA kernels have no second derivative on CPU; fastseq's torch backend
        # is those kernels, so it refuses as torch does, by name.
        with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
            torch.autograd.gradgradcheck(lambda *t: call(backend, *t), leaves)
        return
    assert torch.autograd.gradgradcheck(lambda *t: call(backend, *t), leaves)


def test_module_double_backward_is_never_zeros():
    """The issue's repro: a gradient penalty through fastseq.nn.LSTM(backend="native") gave
    zeros; now every fused backend raises and the plain ones agree with torch's layer."""
    torch.manual_seed(0)
    reference = torch.nn.LSTM(4, 5).double()
    x = torch.rand(1, 3, 4, dtype=torch.float64, requires_grad=True)

    def second_derivative(module):
        g, = torch.autograd.grad(module(x)[0].pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g.sum(), x)[0]
    expected = second_derivative(reference)
    assert expected.abs().sum() > 0
    for backend in FUSED + PLAIN:
        layer = fastseq.nn.LSTM(4, 5, backend=backend).double()
        layer.load_state_dict(reference.state_dict())
        if backend in FUSED:
            with pytest.raises(DoubleBackwardError):
                second_derivative(layer)
        else:
            torch.testing.assert_close(second_derivative(layer), expected)
