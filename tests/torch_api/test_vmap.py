"""torch.func.vmap over every public op family on every backend, and vectorized jacobians
(torch.autograd.functional.jacobian(..., vectorize=True), which vmaps the backward), against
the loop over the batch and the reference's jacobian. Every registered op, forward and
backward, has a batching rule (fastseq/ops/_registration.py)."""
import pytest
import torch
from torch.func import vmap

import fastseq

from conftest import backends_for

BACKENDS = backends_for("cpu")


def rand(*shape):
    return torch.rand(*shape, dtype=torch.float64)


def families():
    """{name: (call(backend, x) -> tensor, x, backends that serve it)}: x is the vmapped input."""
    g = 3
    w = [rand(g * 4, 3), rand(g * 4, 4), rand(g * 4), rand(g * 4)]
    ln = w + [1 + rand(g * 4), 1 + rand(g * 4)]
    # Head dim 4: a jacobian runs the backward once per output element (the batching rule's
    # slices), 80 and 64 launches at head dim 8 (25-29 s each in the interpreter).
    k, v = rand(1, 2, 6, 4), rand(1, 2, 6, 4)
    pos, u, wb = rand(6, 2, 4), rand(2, 4), rand(2, 4)
    return {
        "gru_cell": (lambda b, x: fastseq.ops.gru_cell(x, None, *w, backend=b), rand(2, 3),
                     ("triton", "native", "torch", "reference")),
        "rnn_layer": (lambda b, x: fastseq.ops.rnn_layer("gru", x, None, *w, backend=b)[0],
                      rand(3, 2, 3), ("triton", "native", "torch", "reference")),
        "layer_norm_rnn_layer": (lambda b, x: fastseq.ops.layer_norm_rnn_layer(
            "gru", x, None, *ln, backend=b)[0], rand(3, 2, 3), ("triton", "reference")),
        "attention": (lambda b, x: fastseq.ops.attention(x, k, v, is_causal=True, backend=b),
                      rand(1, 2, 5, 4), ("triton", "torch", "reference")),
        "rel_attention": (lambda b, x: fastseq.ops.rel_attention(x, k, v, pos, u, wb, backend=b),
                          rand(1, 2, 4, 4), ("triton", "torch", "reference")),
    }


def cases():
    return [(name, b) for name, (_, _, served) in families().items() for b in served
            if b in BACKENDS]


# torch's own whole-sequence RNN kernels (aten::gru/lstm/rnn_*) have no batching rule: torch.nn.GRU
# under vmap fails, and so does fastseq's torch backend, which is those kernels.
TORCH_UNBATCHED = {"rnn_layer"}


def test_torchs_own_recurrent_layer_has_no_batching_rule():
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        vmap(torch.nn.GRU(3, 4).double())(rand(2, 3, 2, 3))


@pytest.mark.parametrize("family,backend", cases())
def test_vmap_equals_the_loop(family, backend):
    call, x, _ = families()[family]
    xs = torch.stack([x, 2 * x, x.flip(-1)])
    if backend == "torch" and family in TORCH_UNBATCHED:
        with pytest.raises(RuntimeError, match="Batching rule not implemented"):
            vmap(lambda t: call(backend, t))(xs)
        return
    got = vmap(lambda t: call(backend, t))(xs)
    torch.testing.assert_close(got, torch.stack([call(backend, t) for t in xs]))


@pytest.mark.parametrize("family,backend", cases())
def test_vectorized_jacobian_equals_the_reference(family, backend):
    call, x, _ = families()[family]
    jacobian = torch.autograd.functional.jacobian
    got = jacobian(lambda t: call(backend, t), x, vectorize=True)
    torch.testing.assert_close(got, jacobian(lambda t: call("reference", t), x))


# torch.func's own transforms through the fused ops: the public ops call them through an
# autograd.Function with setup_context (torch's custom-op autograd alone was refused with
# "must override the setup_context staticmethod").

@pytest.mark.parametrize("family,backend", cases())
def test_jacrev_equals_the_reference(family, backend):
    call, x, _ = families()[family]
    got = torch.func.jacrev(lambda t: call(backend, t))(x)
    torch.testing.assert_close(got, torch.func.jacrev(lambda t: call("reference", t))(x))


@pytest.mark.parametrize("family,backend", cases())
def test_func_grad_and_vjp_equal_the_reference(family, backend):
    call, x, _ = families()[family]
    weights = torch.linspace(-1, 1, call("reference", x).numel(), dtype=x.dtype)

    def loss(b):
        return lambda t: (call(b, t).flatten() * weights).sum()
    torch.testing.assert_close(torch.func.grad(loss(backend))(x),
                               torch.func.grad(loss("reference"))(x))
    out, pullback = torch.func.vjp(lambda t: call(backend, t), x)
    torch.testing.assert_close(pullback(torch.ones_like(out))[0],
                               torch.func.vjp(lambda t: call("reference", t), x)[1](
                                   torch.ones_like(out))[0])


LAYERS = {
    "LSTM": lambda: fastseq.nn.LSTM(3, 4, num_layers=2, bidirectional=True),
    "GRUCell": lambda: fastseq.nn.GRUCell(3, 4),
    "MultiheadAttention": lambda: fastseq.nn.MultiheadAttention(8, 2, batch_first=True),
}
LAYER_INPUTS = {"LSTM": (4, 2, 3), "GRUCell": (2, 3), "MultiheadAttention": (2, 5, 8)}


def layer_loss(layer, name, backend, x):
    def loss(params):
        args = (x, x, x) if name == "MultiheadAttention" else (x,)
        with fastseq.use_backend(backend):
            out = torch.func.functional_call(layer, params, args)
        return (out[0] if isinstance(out, tuple) else out).pow(2).sum()
    return loss


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("backend", [b for b in ("triton", "native") if b in BACKENDS])
def test_func_grad_over_a_layers_parameters(name, backend):
    """Meta-learning's use: torch.func.grad over functional_call's parameter dict."""
    if name == "MultiheadAttention" and backend == "native":
        backend = "auto"  # attention has no native kernel; auto is torch's SDPA on CPU
    layer = LAYERS[name]().double()
    x = rand(*LAYER_INPUTS[name])
    params = {k: p.detach() for k, p in layer.named_parameters()}
    got = torch.func.grad(layer_loss(layer, name, backend, x))(params)
    want = torch.func.grad(layer_loss(layer, name, "reference", x))(params)
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], msg=key)


@pytest.mark.parametrize("backend", [b for b in ("triton", "native") if b in BACKENDS])
def test_func_grad_of_grad_refuses_by_name(backend):
    """Second derivatives through a fused kernel raise fastseq's error under torch.func too."""
    w = [rand(12, 3), rand(12, 4), rand(12), rand(12)]

    def first(x):
        return torch.func.grad(lambda t: fastseq.ops.gru_cell(t, None, *w, backend=backend)
                               .pow(2).sum())(x).sum()
    with pytest.raises(fastseq.DoubleBackwardError, match="double backward"):
        torch.func.grad(first)(rand(2, 3))
