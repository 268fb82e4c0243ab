"""CUDA runtime behaviour of the fused ops (runs in the GPU run, bench/gpu_run.sh; a CPU has
nothing to check here): CUDA-graph capture of forward and backward, the current stream
honoured, no host sync, memory flat over repeated calls, a tensor on cuda:1 served on cuda:1.
Cases: every public op (attention, relative attention, an LSTM layer on Triton and on the
native (persistent) kernel, both directions in one launch, a two-layer stack, the
layer-normalized LSTM, the cell steps)."""
import pytest
import torch

import fastseq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA runtime checks: they run in the GPU run")


def attention_inputs(device="cuda"):
    torch.manual_seed(0)
    return [torch.randn(2, 4, 300, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)]


def rel_inputs(device="cuda"):
    torch.manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16,  # noqa: E731
                               requires_grad=True)
    return [r(2, 4, 100, 64), r(2, 4, 180, 64), r(2, 4, 180, 64), r(180, 4, 64), r(4, 64),
            r(4, 64)]


def lstm_inputs(device="cuda"):
    """A 50-step LSTM layer, batch 16, hidden 128, fp32 (the persistent kernel's size)."""
    torch.manual_seed(0)
    r = lambda *s: (torch.randn(*s, device=device) * 0.1).requires_grad_()  # noqa: E731
    return [r(50, 16, 64), r(512, 64), r(512, 128), r(512), r(512)]


def lstm_layer(backend):
    def run(x, w_ih, w_hh, b_ih, b_hh):
        return fastseq.ops.rnn_layer("lstm", x, None, w_ih, w_hh, b_ih, b_hh, backend=backend)[0]
    return run


def gru_cell(x, w_ih, w_hh, b_ih, b_hh):
    return fastseq.ops.gru_cell(x[0], None, w_ih[:384], w_hh[:384, :128], b_ih[:384], b_hh[:384])


def lstm_cell(x, w_ih, w_hh, b_ih, b_hh):
    """The LSTM cell on Triton and the RNN cells on native (fp32: native's first choice)."""
    h = fastseq.ops.lstm_cell(x[0], None, w_ih, w_hh, b_ih, b_hh, backend="triton")[0]
    h = fastseq.ops.rnn_tanh_cell(x[1], h, w_ih[:128], w_hh[:128], backend="native")
    return fastseq.ops.rnn_relu_cell(x[2], h, w_ih[:128], w_hh[:128], backend="native")


def lstm_bidirectional(x, w_ih, w_hh, b_ih, b_hh):
    """Both directions in one Triton launch."""
    weights = (w_ih, w_hh, b_ih, b_hh)
    return fastseq.ops.rnn_bidirectional_layer("lstm", x, None, weights, weights,
                                               lengths=[50] * 8 + [17] * 8, backend="triton")[0]


def lstm_stack(x, w_ih, w_hh, b_ih, b_hh):
    """Two layers through the stack op, fastseq's per-layer path on Triton."""
    w_ih_1 = w_hh.detach().requires_grad_(False)  # the second layer reads the first's H columns
    return fastseq.ops.rnn_stack("lstm", x, None, [w_ih, w_hh, b_ih, b_hh, w_ih_1, w_hh, b_ih, b_hh],
                                 num_layers=2, backend="triton")[0]


def layer_norm_lstm(x, w_ih, w_hh, b_ih, b_hh):
    gains = torch.ones(512, device=x.device)
    return fastseq.ops.layer_norm_rnn_layer("lstm", x, None, w_ih, w_hh, b_ih, b_hh, gains,
                                            gains, gains[:128], b_hh[:128], backend="triton")[0]


CASES = {
    "attention": (attention_inputs, lambda *t: fastseq.ops.attention(*t, is_causal=True)),
    "rel_attention": (rel_inputs, lambda *t: fastseq.ops.rel_attention(*t, window=120)),
    "lstm_triton": (lstm_inputs, lstm_layer("triton")),
    "lstm_native": (lstm_inputs, lstm_layer("native")),  # the persistent (cooperative) kernel
    "gru_cell": (lstm_inputs, gru_cell),
    "lstm_and_rnn_cells": (lstm_inputs, lstm_cell),
    "lstm_bidirectional": (lstm_inputs, lstm_bidirectional),
    "layer_norm_lstm": (lstm_inputs, layer_norm_lstm),
    "lstm_stack": (lstm_inputs, lstm_stack),
}
# Which public op each test covers (tests/dispatch/test_registry.py checks every op is named here):
# every test runs every case.
_ALL = ["test_cuda_graph_capture_of_forward_and_backward", "test_current_stream_is_honoured",
        "test_memory_stays_flat", "test_second_device", "test_no_host_sync_in_the_hot_path"]
COVERS = {op: _ALL for op in ("attention", "rel_attention", "rnn_stack", "rnn_layer", "gru_cell", "lstm_cell",
                              "rnn_tanh_cell", "rnn_relu_cell", "rnn_bidirectional_layer",
                              "layer_norm_rnn_layer")}
# The decode step is forward only: its own tests below.
COVERS["attention_with_kv_cache"] = ["test_a_decode_loop_captures_in_a_cuda_graph",
                                     "test_a_decode_step_makes_no_host_sync_and_keeps_memory_flat"]
EXCLUDES: dict = {}


def forward_backward(fn, leaves, grad):
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, grad))


@pytest.fixture(params=list(CASES))
def case(request):
    """(fn, leaves, a gradient for fn's output) of one case, on cuda:0."""
    make, fn = CASES[request.param]
    leaves = make()
    return fn, leaves, torch.randn_like(fn(*leaves))


def test_cuda_graph_capture_of_forward_and_backward(case):
    fn, leaves, grad = case
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning and compilation happen outside capture
        for _ in range(3):
            eager = forward_backward(fn, leaves, grad)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = forward_backward(fn, leaves, grad)
    with torch.no_grad():
        for t in leaves:
            t.mul_(0.5)  # new input values in place: the replay must see them
    eager = forward_backward(fn, leaves, grad)
    graph.replay()
    torch.cuda.synchronize()
    for c, e in zip(captured, eager):
        torch.testing.assert_close(c, e)


def test_current_stream_is_honoured(case):
    fn, leaves, grad = case
    expected = forward_backward(fn, leaves, grad)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(10_000_000)  # the side stream is busy: a launch elsewhere would race
        got = forward_backward(fn, leaves, grad)
    torch.cuda.current_stream().wait_stream(stream)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_memory_stays_flat(case):
    fn, leaves, grad = case
    forward_backward(fn, leaves, grad)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(10):
        forward_backward(fn, leaves, grad)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_second_device(name):
    make, fn = CASES[name]
    expected = fn(*make("cuda:0"))
    got = fn(*make("cuda:1"))
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), expected.cpu())


def test_no_host_sync_in_the_hot_path(case):
    """After a warm-up call (compilation, autotuning), forward and backward make no call that
    waits for the GPU: torch's sync debug mode turns any such call into an error."""
    fn, leaves, grad = case
    forward_backward(fn, leaves, grad)
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(fn, leaves, grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_a_multi_layer_streaming_step_captures_in_a_cuda_graph(backend):
    """fastseq.nn.LSTM.step: one fused cell a layer, no host sync, so a whole 3-layer step
    replays from a CUDA graph with fixed shapes and equals an eager step."""
    torch.manual_seed(0)
    layer = fastseq.nn.LSTM(64, 128, num_layers=3, device="cuda", backend=backend).eval()
    frame = torch.randn(4, 64, device="cuda")
    h, c = torch.randn(3, 4, 128, device="cuda"), torch.randn(3, 4, 128, device="cuda")
    with torch.no_grad():
        for _ in range(3):  # warm-up: compilation and autotuning stay out of the capture
            layer.step(frame, (h, c))
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, (h_n, c_n) = layer.step(frame, (h, c))
        frame.copy_(torch.randn_like(frame))
        h.copy_(torch.randn_like(h))
        graph.replay()
        expected, (h_e, c_e) = layer.step(frame, (h, c))
    for got, want in ((out, expected), (h_n, h_e), (c_n, c_e)):
        torch.testing.assert_close(got, want)


def decode_inputs(batch=4, capacity=4096):
    """A bf16 GQA decode step (8 query heads on 2 key/value heads, head dim 128) against
    caches filled to ragged lengths."""
    torch.manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    lengths = torch.randint(100, capacity // 2, (batch,), device="cuda", dtype=torch.int32)
    return (r(batch, 8, 1, 128), r(batch, 2, capacity, 128), r(batch, 2, capacity, 128),
            lengths, r(batch, 2, 1, 128), r(batch, 2, 1, 128))


def decode_step(q, k_cache, v_cache, lengths, key, value):
    out = fastseq.ops.attention_with_kv_cache(q, k_cache, v_cache, lengths, key, value)
    lengths.add_(1)
    return out


def test_a_decode_loop_captures_in_a_cuda_graph():
    """One step (append, attend, advance the lengths) captured once and replayed for five
    tokens equals five eager steps: no host sync, no shape-dependent work per step."""
    q, k_cache, v_cache, lengths, key, value = decode_inputs()
    eager_state = [k_cache.clone(), v_cache.clone(), lengths.clone()]
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation) on copies, outside the capture
            decode_step(q, k_cache.clone(), v_cache.clone(), lengths.clone(), key, value)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = decode_step(q, k_cache, v_cache, lengths, key, value)
        lengths.copy_(eager_state[2])  # capture ran nothing: the lengths stay as they were
        for _ in range(5):
            for t in (q, key, value):
                t.copy_(torch.randn_like(t))
            graph.replay()
            expected = decode_step(q, *eager_state, key, value)
            torch.testing.assert_close(captured, expected)
    for got, want in zip((k_cache, v_cache, lengths), eager_state):
        assert torch.equal(got, want)


def test_a_decode_step_makes_no_host_sync_and_keeps_memory_flat():
    q, k_cache, v_cache, lengths, key, value = decode_inputs()
    with torch.no_grad():
        decode_step(q, k_cache, v_cache, lengths, key, value)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(10):
                decode_step(q, k_cache, v_cache, lengths, key, value)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
