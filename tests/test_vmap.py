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
    k, v = rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    pos, u, wb = rand(6, 2, 8), rand(2, 8), rand(2, 8)
    return {
        "gru_cell": (lambda b, x: fastseq.ops.gru_cell(x, None, *w, backend=b), rand(2, 3),
                     ("triton", "native", "torch", "reference")),
        "rnn_layer": (lambda b, x: fastseq.ops.rnn_layer("gru", x, None, *w, backend=b)[0],
                      rand(3, 2, 3), ("triton", "native", "torch", "reference")),
        "layer_norm_rnn_layer": (lambda b, x: fastseq.ops.layer_norm_rnn_layer(
            "gru", x, None, *ln, backend=b)[0], rand(3, 2, 3), ("triton", "reference")),
        "attention": (lambda b, x: fastseq.ops.attention(x, k, v, is_causal=True, backend=b),
                      rand(1, 2, 5, 8), ("triton", "torch", "reference")),
        "rel_attention": (lambda b, x: fastseq.ops.rel_attention(x, k, v, pos, u, wb, backend=b),
                          rand(1, 2, 4, 8), ("triton", "torch", "reference")),
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
