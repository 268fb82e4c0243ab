"""fastseq.ops.rnn_layer (one layer, one direction over a sequence) on every backend against
the float64 reference: outputs, final states and every gradient, both directions, padded
variable lengths, odd sizes; plus opcheck, gradcheck, torch.compile and bad inputs."""
import pytest
import torch

import fastseq

from conftest import DEVICES, backends_for
from numerics import assert_within_rule
from test_strided_inputs import compare, strided  # tests/across_ops' helpers
from recurrent_cases import (MODES, assert_backends_match_reference, assert_compiles_like_eager,
                             gradcheck_layer, layer_backends, lengths_for, make_grad_outputs,
                             make_leaves, run)

# This family's share of the checks run over every op (tests/dispatch/test_registry.py reads it
# beside tests/across_ops' own COVERS): check -> {op: its tests here}.
ACROSS_OPS = {"test_strided_inputs": {"rnn_stack": ["test_rnn_stack_takes_strided_views"]}}

# (T, B, I, H, dtype): odd sizes in fp32 (B=37: three 16-row programs), the half-precision
# dtypes on one mid-size case.
CASES = [(1, 1, 1, 1, torch.float32), (7, 13, 5, 63, torch.float32), (3, 37, 6, 20, torch.float32),
         (7, 13, 5, 63, torch.bfloat16), (7, 13, 5, 63, torch.float16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_B{}_I{}_H{}_{}".format(
    *c[:4], str(c[4]).split(".")[1]))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("variable", [False, True], ids=["full", "lengths"])
def test_layer_matches_reference(device, mode, case, reverse, variable):
    T, B, I, H, dtype = case
    leaves64 = make_leaves(mode, T, B, I, H, device)
    lengths = lengths_for(T, B, variable)
    grad_outputs = make_grad_outputs(mode, T, B, H, device)
    assert_backends_match_reference(mode, leaves64, dtype, layer_backends(device), lengths, reverse,
                                    grad_outputs)

@pytest.mark.parametrize("mode", MODES)
def test_padded_outputs_are_zero_and_final_state_is_last_valid(mode):
    leaves = [t.float() if t is not None else None for t in make_leaves(mode, 6, 4, 3, 5, "cpu")]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = leaves
    lengths = [6, 2, 0, 4]
    backend = layer_backends("cpu")[0]
    y, h_n = fastseq.ops.rnn_layer(mode, x, (h0, c0) if mode == "lstm" else h0, w_ih, w_hh, b_ih,
                                   b_hh, lengths=lengths, backend=backend)
    h_n = h_n[0] if mode == "lstm" else h_n
    assert torch.equal(y[2:, 1], torch.zeros_like(y[2:, 1])) and torch.equal(y[:, 2], torch.zeros_like(y[:, 2]))
    torch.testing.assert_close(h_n[1], y[1, 1])
    torch.testing.assert_close(h_n[2], h0[2])  # length 0: the state never moves


def test_matches_torch_lstm_layer():
    lstm = torch.nn.LSTM(5, 7)
    x = torch.randn(9, 3, 5)
    expected, (h, c) = lstm(x)
    y, (h_n, c_n) = fastseq.ops.rnn_layer("lstm", x, None, lstm.weight_ih_l0, lstm.weight_hh_l0,
                                          lstm.bias_ih_l0, lstm.bias_hh_l0, backend=layer_backends("cpu")[0])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_n, h[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_n, c[0], rtol=1e-5, atol=1e-6)


def triton_or_skip():
    if "triton" not in layer_backends("cpu"):
        pytest.skip("the Triton interpreter is off (a GPU run tests Triton on CUDA instead)")


@pytest.mark.parametrize("backend", ["triton", "native", "persistent"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
def test_opcheck(backend, mode, reverse):
    """opcheck of each implementation's forward and backward op (persistent: the CPU twin)."""
    if (backend if backend != "persistent" else "native") not in layer_backends("cpu"):
        pytest.skip(f"{backend} cannot run on this machine's CPU")
    suffix = {"triton": "_triton", "native": "", "persistent": "_persistent"}[backend]
    forward = getattr(torch.ops.fastseq, "rnn_layer_forward" + suffix)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = [t.float() if t is not None else None
                                         for t in make_leaves(mode, 4, 3, 2, 5, "cpu")]
    gx = x @ w_ih.t() + b_ih
    lengths = torch.tensor([4, 1, 3], dtype=torch.int32)
    for save in (False, True):
        args = (mode, gx.requires_grad_(save), h0, c0, w_hh, b_hh, lengths, None, None, reverse, save)
        torch.library.opcheck(forward, args)
    y, h_n, c_n, ws = forward(mode, gx.detach(), h0, c0, w_hh, b_hh, lengths, None, None, reverse,
                              True)
    lstm = mode == "lstm"
    torch.library.opcheck(getattr(torch.ops.fastseq, "rnn_layer_backward" + suffix), (
        mode, torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n) if lstm else None,
        h0, c0, w_hh, y, ws, lengths, None, None, reverse))


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(backend, mode):
    if backend not in layer_backends("cpu"):
        pytest.skip(f"{backend} cannot run on this machine's CPU")
    assert gradcheck_layer(mode, backend, 3, 2, 2, 3, lengths=[3, 2])


def test_compile_fullgraph_training_step():
    triton_or_skip()
    params = [t.float().requires_grad_() for t in make_leaves("lstm", 5, 3, 4, 6, "cpu")[3:]]
    x = torch.randn(5, 3, 4, requires_grad=True)

    def step(inp):
        y, (h, c) = fastseq.ops.rnn_layer("lstm", inp, None, *params, lengths=[5, 2, 4],
                                          backend="triton")
        return y.square().sum() + h.sum() + c.sum()

    assert_compiles_like_eager(step, x, params)


def bad_calls():
    x, h0 = torch.randn(5, 3, 4), torch.zeros(3, 6)
    w_ih, w_hh, b = torch.randn(24, 4), torch.randn(24, 6), torch.zeros(24)
    op = fastseq.ops.rnn_layer
    return [
        ("input must be 3-D", lambda: op("lstm", x[0], None, w_ih, w_hh)),
        ("mode must be one of", lambda: op("lstmx", x, None, w_ih, w_hh)),
        (r"h0 must have shape \[batch, hidden_size\] = \[3, 6\], got \[2, 6\]",
         lambda: op("gru", x, torch.zeros(2, 6), torch.randn(18, 4), torch.randn(18, 6))),
        (r"lengths must be 1-D with one length per batch row \[3\]",
         lambda: op("lstm", x, None, w_ih, w_hh, lengths=[5, 5])),
        (r"lengths must lie in \[0, 5\] .*from 1 to 6",
         lambda: op("lstm", x, None, w_ih, w_hh, lengths=[6, 1, 2])),
        ("lengths must be integers", lambda: op("lstm", x, None, w_ih, w_hh, lengths=torch.ones(3))),
        ("b_ih and b_hh must be given together", lambda: op("lstm", x, None, w_ih, w_hh, b, None)),
        (r"hx must be a tuple \(h0, c0\)", lambda: op("lstm", x, h0, w_ih, w_hh)),
    ]


@pytest.mark.parametrize("message,call", bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_clear_error(message, call):
    with pytest.raises(fastseq.InputError, match=message):
        call()


def test_torch_backend_refuses_what_it_cannot_do():
    x = torch.randn(5, 3, 4)
    with pytest.raises(fastseq.BackendError, match="backend 'torch' cannot run this call: .*reverse"):
        fastseq.ops.rnn_layer("gru", x, None, torch.randn(18, 4), torch.randn(18, 6), reverse=True,
                              backend="torch")


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_deterministic_bitwise(mode):
    """The same inputs give bitwise the same outputs and gradients, run to run (no atomics:
    each program or CTA owns its rows or units; K splits add in a fixed order; dW_hh is one
    GEMM): the first backend here, and the persistent kernel's twin over 8 CTAs of 5 units."""
    backends = layer_backends("cpu")[:1] + (["persistent"] if "native" in layer_backends("cpu") else [])
    leaves64 = make_leaves(mode, 6, 21, 5, 40, "cpu")
    grad_outputs = make_grad_outputs(mode, 6, 21, 40, "cpu")
    for backend in backends:
        first = run(mode, leaves64, torch.float32, backend, lengths_for(6, 21, True), True, grad_outputs)
        second = run(mode, leaves64, torch.float32, backend, lengths_for(6, 21, True), True, grad_outputs)
        for a, b in zip(first[0] + first[1], second[0] + second[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_long_sequence(mode):
    """T=100 (the issue's longer size): errors must not grow past the rule over many steps, on
    every backend here and the persistent kernel's twin."""
    T, B, I, H = 100, 3, 4, 5
    leaves64 = make_leaves(mode, T, B, I, H, "cpu")
    lengths = [100, 37, 1]
    grad_outputs = make_grad_outputs(mode, T, B, H, "cpu")
    backends = layer_backends("cpu")[:-1] + (["persistent"] if "native" in layer_backends("cpu") else [])
    assert_backends_match_reference(mode, leaves64, torch.float32, backends, lengths, False, grad_outputs)


PROJECTION_CASES = [(None, False), ([9, 4, 0], False), ([9, 4, 0], True), (None, True)]


@pytest.mark.parametrize("lengths,reverse", PROJECTION_CASES)
def test_projection_on_every_backend_matches_the_reference(lengths, reverse):
    """proj_size (LSTMP) on every fastseq backend: outputs, final states and every gradient
    (w_hr's too) equal the float64 reference, and in float32 stay within the tolerance rule of
    torch's own float32 LSTM, over lengths (a row of length 0 keeps h0) and both directions."""
    T, B, I, H, P = 9, 3, 5, 7, 3
    g = torch.Generator().manual_seed(4)
    k = H ** -0.5
    leaves64 = [torch.randn(T, B, I, generator=g, dtype=torch.float64),
                torch.randn(B, P, generator=g, dtype=torch.float64),
                torch.randn(B, H, generator=g, dtype=torch.float64)] + \
        [(torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * k
         for shape in ((4 * H, I), (4 * H, P), (4 * H,), (4 * H,), (P, H))]
    grad_outputs = [torch.randn(T, B, P, generator=g, dtype=torch.float64),
                    torch.randn(B, P, generator=g, dtype=torch.float64),
                    torch.randn(B, H, generator=g, dtype=torch.float64)]

    def run(backend, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = leaves
        y, (h_n, c_n) = fastseq.ops.rnn_layer("lstm", x, (h0, c0), w_ih, w_hh, b_ih, b_hh,
                                              w_hr=w_hr, lengths=lengths, reverse=reverse,
                                              backend=backend)
        loss = sum((o.double() * go).sum() for o, go in zip((y, h_n, c_n), grad_outputs))
        return [y, h_n, c_n] + list(torch.autograd.grad(loss, leaves))

    names = ["y", "h_n", "c_n", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr"]
    truth = run("reference", torch.float64)
    for backend in layer_backends("cpu"):
        for name, got, want in zip(names, run(backend, torch.float64), truth):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{backend} {name}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        plain = run("torch", dtype) if lengths is None and not reverse else \
            run("reference", dtype)
        for backend in layer_backends("cpu"):
            for name, got, p, want in zip(names, run(backend, dtype), plain, truth):
                assert_within_rule(f"{backend} {dtype} {name}", got, p, want)


def test_projection_gradcheck_on_the_fused_backends():
    T, B, I, H, P = 3, 2, 3, 4, 2
    g = torch.Generator().manual_seed(5)
    leaves = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
              for shape in ((T, B, I), (B, P), (B, H), (4 * H, I), (4 * H, P), (4 * H,),
                            (4 * H,), (P, H))]
    for backend in [b for b in layer_backends("cpu") if b != "reference"]:
        def f(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
            y, (h_n, c_n) = fastseq.ops.rnn_layer("lstm", x, (h0, c0), w_ih, w_hh, b_ih, b_hh,
                                                  w_hr=w_hr, lengths=[3, 1], reverse=True,
                                                  backend=backend)
            return y, h_n, c_n
        assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


def test_projection_errors_name_the_argument():
    lstm = torch.nn.LSTM(5, 7, proj_size=3)
    x = torch.randn(9, 2, 5)
    with pytest.raises(fastseq.InputError, match=r"w_hh must have shape \[4\*hidden_size, proj_size\]"):
        fastseq.ops.rnn_layer("lstm", x, None, lstm.weight_ih_l0, torch.zeros(28, 7),
                              w_hr=lstm.weight_hr_l0)
    with pytest.raises(fastseq.InputError, match="w_hr .* is for the lstm, not gru"):
        fastseq.ops.rnn_layer("gru", x, None, torch.zeros(21, 5), torch.zeros(21, 3),
                              w_hr=lstm.weight_hr_l0)


# fastseq.ops.rnn_stack: the whole stack (what fastseq.nn.LSTM/GRU/RNN call).

@pytest.mark.parametrize("backend", ["torch", "native", "reference"])
@pytest.mark.parametrize("layout", ["packed", "unbatched", "batch_first"])
def test_rnn_stack_takes_torch_layouts(backend, layout):
    """Packed (rows unsorted), unbatched and batch-first inputs, as torch.nn.LSTM takes them,
    with the module's own flat weights: equal to torch's module in float64."""
    if backend == "native" and fastseq.backend.native_unavailable(torch.device("cpu")) is not None:
        pytest.skip("the native extension is not built")
    torch.manual_seed(0)
    module = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2,
                           batch_first=layout == "batch_first").double()
    x = torch.randn(2, 5, 3, dtype=torch.float64) if layout == "batch_first" else \
        torch.randn(5, 3, dtype=torch.float64) if layout == "unbatched" else \
        torch.nn.utils.rnn.pack_padded_sequence(torch.randn(5, 3, 3, dtype=torch.float64),
                                                [2, 5, 3], enforce_sorted=False)
    got_out, (got_h, got_c) = fastseq.ops.rnn_stack(
        "lstm", x, None, module._flat_weights, num_layers=2, bidirectional=True,
        batch_first=layout == "batch_first", backend=backend)
    out, (h, c) = module(x)
    for got, expected in ((got_out, out), (got_h, h), (got_c, c)):
        got = got.data if layout == "packed" else got
        expected = expected.data if layout == "packed" else expected
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_rnn_stack_names_what_is_wrong():
    x = torch.randn(4, 2, 3)
    weights = [torch.randn(12, 3), torch.randn(12, 3), torch.randn(12), torch.randn(12)]
    cases = [(dict(mode="lstmx"), "mode must be one of"),
             (dict(weights=weights[:3]), r"4 tensors .* for each of the 1 layers and directions"),
             (dict(weights=[weights[0], None] + weights[2:]), r"weights\[1\] must be a Tensor"),
             (dict(hx=torch.zeros(1, 2, 3)), "hx must be a tuple"),
             (dict(lengths=[4]), "lengths must be 1-D with one length per batch row"),
             (dict(zoneout=(0.5, 2.0)), "zoneout must be"),
             (dict(input=torch.randn(4, 2, 3, 1)), "input must be 3-D or 2-D")]
    for change, message in cases:
        call = dict(mode="lstm", input=x, hx=None, weights=weights) | change
        with pytest.raises(fastseq.InputError, match=message):
            fastseq.ops.rnn_stack(call.pop("mode"), call.pop("input"), call.pop("hx"),
                                  call.pop("weights"), **call)
    with pytest.raises(fastseq.InputError, match="zoneout"):
        fastseq.ops.rnn_stack("rnn_tanh", x, None, [w[:3] for w in weights], zoneout=(0.1, 0.0))


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_rnn_stack_takes_strided_views(backend):
    """Two bidirectional layers, batch-first input seen through a transpose, weights as
    views: torch's stacked forward and fastseq's per-layer path."""
    T, B, g, I, H = 5, 2, 3, 5, 4
    views = [strided((B, T, I), "transposed"), strided((4, B, H), "every_other")]
    for layer in range(2):
        for _ in range(2):
            views += [strided((g * H, I if layer == 0 else 2 * H), "transposed"),
                      strided((g * H, H), "every_other"), torch.randn(2 * g * H)[::2],
                      torch.randn(g * H)]

    def run(x, h, *weights):
        y, h_n = fastseq.ops.rnn_stack("gru", x, h, weights, num_layers=2, bidirectional=True,
                                       batch_first=True, backend=backend)
        return [y, h_n]

    compare(run, views)
