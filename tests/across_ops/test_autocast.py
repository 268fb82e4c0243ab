"""Under torch.autocast fastseq's ops and layers take the dtype their torch equivalents take
(on CPU with bfloat16 here: torch's table is selective, see fastseq/ops/_autocast.py; on CUDA
everything runs in the autocast dtype), give torch's values to bf16 rounding, and send float32
gradients to float32 parameters."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastseq

from conftest import TRITON_TEST_DEVICE

# Which public op each test covers (tests/dispatch/test_registry.py checks every op is named here).
COVERS = {"attention": ["test_attention_follows_sdpa", "test_multihead_attention_and_rel_attention"],
          "rel_attention": ["test_multihead_attention_and_rel_attention"],
          "attention_with_kv_cache": ["test_kv_cache_step_runs_in_the_caches_dtype"],
          "rnn_stack": ["test_recurrent_layers_follow_torch"],
          "rnn_layer": ["test_recurrent_layers_follow_torch"],
          "rnn_bidirectional_layer": ["test_recurrent_layers_follow_torch"],
          "lstm_cell": ["test_cells_follow_torch"], "gru_cell": ["test_cells_follow_torch"],
          "rnn_tanh_cell": ["test_cells_follow_torch"], "rnn_relu_cell": ["test_cells_follow_torch"],
          "layer_norm_rnn_layer": ["test_layer_norm_layers_take_their_plain_layers_dtype"]}
EXCLUDES: dict = {}

DEVICE = TRITON_TEST_DEVICE
AUTOCAST = torch.bfloat16


def under_autocast(fn):
    with torch.autocast(DEVICE.type, dtype=AUTOCAST):
        return fn()


def torch_layer_under_autocast(layer, x):
    """torch's recurrent layer under autocast: what the fastseq layer must match. oneDNN runs
    torch's CPU LSTM under bf16 autocast, and on CPUs whose oneDNN has no bf16 LSTM primitive
    (AVX2-only, as some CI machines: "could not create a primitive descriptor") torch's own layer
    fails there. What autocast asks of it is the layer in bf16; without oneDNN torch runs that
    natively, so that is the expectation on such a machine."""
    try:
        return under_autocast(lambda: layer(x)[0])
    except RuntimeError as error:
        if DEVICE.type != "cpu" or "primitive descriptor" not in str(error):
            raise
    with torch.backends.mkldnn.flags(enabled=False):
        return copy.deepcopy(layer).to(AUTOCAST)(x.to(AUTOCAST))[0]


def close(got, expected):
    assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
    torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_follows_sdpa(backend):
    if backend == "triton" and fastseq.backend.triton_unavailable(DEVICE) is not None:
        pytest.skip("Triton unavailable here")
    q, k, v = torch.randn(3, 1, 2, 9, 16, device=DEVICE).unbind(0)
    mask = torch.randn(9, 9, device=DEVICE)
    expected = under_autocast(lambda: F.scaled_dot_product_attention(q, k, v, mask))
    close(under_autocast(lambda: fastseq.ops.attention(q, k, v, mask, backend=backend)),
          expected)


def test_multihead_attention_and_rel_attention():
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(16, 2, batch_first=True, device=DEVICE)
    ours = fastseq.nn.MultiheadAttention(16, 2, batch_first=True, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 16, device=DEVICE)
    close(under_autocast(lambda: ours(x, x, x, need_weights=False)[0]),
          under_autocast(lambda: theirs(x, x, x, need_weights=False)[0]))
    q, k, v = torch.randn(3, 1, 2, 4, 8, device=DEVICE).unbind(0)
    pos, u, w = torch.randn(4, 2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE), \
        torch.randn(2, 8, device=DEVICE)
    out = under_autocast(lambda: fastseq.ops.rel_attention(q, k, v, pos, u, w))
    assert out.dtype == AUTOCAST  # the dtype SDPA takes: torch has no relative attention


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("cls,bidirectional", [("LSTM", False), ("GRU", False), ("RNN", False),
                                               ("LSTM", True)])
def test_recurrent_layers_follow_torch(cls, bidirectional, backend):
    """Through rnn_stack, then rnn_layer (rnn_bidirectional_layer for the bidirectional LSTM)."""
    if backend == "native" and fastseq.backend.native_unavailable(DEVICE) is not None:
        pytest.skip("the native extension is not built")
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cls)(8, 6, device=DEVICE, bidirectional=bidirectional)
    ours = getattr(fastseq.nn, cls)(8, 6, device=DEVICE, backend=backend,
                                    bidirectional=bidirectional)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 3, 8, device=DEVICE)
    got = under_autocast(lambda: ours(x)[0])
    close(got, torch_layer_under_autocast(theirs, x))
    got.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.parametrize("cls,kwargs", [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {}),
                                        ("RNNCell", {"nonlinearity": "relu"})])
def test_cells_follow_torch(cls, kwargs):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cls)(8, 6, device=DEVICE, **kwargs)
    ours = getattr(fastseq.nn, cls)(8, 6, device=DEVICE, backend="reference", **kwargs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 8, device=DEVICE)

    def first(out):
        return out[0] if isinstance(out, tuple) else out
    close(under_autocast(lambda: first(ours(x))), under_autocast(lambda: first(theirs(x))))


@pytest.mark.parametrize("cls,plain", [("LayerNormLSTM", "LSTM"), ("LayerNormGRU", "GRU")])
def test_layer_norm_layers_take_their_plain_layers_dtype(cls, plain):
    layer = getattr(fastseq.nn, cls)(8, 6, device=DEVICE, backend="reference")
    x = torch.randn(5, 3, 8, device=DEVICE)
    expected = torch_layer_under_autocast(getattr(torch.nn, plain)(8, 6, device=DEVICE), x).dtype
    assert under_autocast(lambda: layer(x)[0]).dtype == expected


def test_autocast_under_compile_fullgraph():
    """The cast and the autocast-off region trace into one graph, with eager's result."""
    q, k, v = torch.randn(3, 1, 2, 6, 8, device=DEVICE).unbind(0)
    x = torch.randn(4, 2, 8, device=DEVICE)
    lstm = fastseq.nn.LSTM(8, 5, device=DEVICE, backend="reference")

    def f(q, k, v, x):
        with torch.autocast(DEVICE.type, dtype=AUTOCAST):
            return fastseq.ops.attention(q, k, v, backend="reference"), lstm(x)[0]

    torch._dynamo.reset()
    eager = f(q, k, v, x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, x)
    for got, expected in zip(compiled, eager):
        assert got.dtype == expected.dtype == AUTOCAST
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_kv_cache_step_runs_in_the_caches_dtype(backend):
    """Under autocast a decode step takes its caches' dtype (they are written in place and
    cannot be cast): fp32 query and new rows from an fp32 layer meet bf16 caches."""
    if backend == "triton" and fastseq.backend.triton_unavailable(DEVICE) is not None:
        pytest.skip("Triton unavailable here")
    q, key, value = torch.randn(3, 2, 2, 1, 16, device=DEVICE).unbind(0)
    caches = [torch.randn(2, 2, 20, 16, device=DEVICE, dtype=AUTOCAST) for _ in range(2)]
    lengths = torch.tensor([3, 9], dtype=torch.int32, device=DEVICE)
    expected_caches = [c.clone() for c in caches]
    expected = fastseq.ops.attention_with_kv_cache(q.to(AUTOCAST), *expected_caches, lengths,
                                                   key.to(AUTOCAST), value.to(AUTOCAST),
                                                   backend=backend)
    got = under_autocast(lambda: fastseq.ops.attention_with_kv_cache(
        q, *caches, lengths, key, value, backend=backend))
    close(got, expected)
    assert torch.equal(caches[0], expected_caches[0])
