"""The cell-step ops as registered ops: opcheck (schema, fake, autograd registration,
AOT dispatch) and torch.compile(fullgraph=True) of the ops and the layers."""
import pytest
import torch

import fastseq

from conftest import backends_for
from test_rnn_cell import MODES, make_inputs

KERNEL_BACKENDS = [b for b in ("native", "triton") if b in backends_for("cpu")]
FORWARD_OPS = {"native": "rnn_cell_forward", "triton": "rnn_cell_forward_triton"}
BACKWARD_OPS = {"native": "rnn_cell_backward", "triton": "rnn_cell_backward_triton"}


def forward_args(mode, requires_grad, dtype=torch.float32):
    x, h, c, w_ih, w_hh, b_ih, b_hh = [
        t.to(dtype).requires_grad_(requires_grad) if t is not None else None
        for t in make_inputs(mode, 3, 4, 5, True, "cpu")]
    return (mode, x, h, c, w_ih, w_hh, b_ih, b_hh, requires_grad)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_forward(backend, mode, requires_grad):
    op = getattr(torch.ops.fastseq, FORWARD_OPS[backend])
    torch.library.opcheck(op, forward_args(mode, requires_grad))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_backward(backend, mode):
    fwd = getattr(torch.ops.fastseq, FORWARD_OPS[backend])
    args = forward_args(mode, False)
    hy, cy, ws = fwd(*args[:-1], True)
    _, x, h, c = args[:4]
    lstm = mode == "lstm"
    bwd = getattr(torch.ops.fastseq, BACKWARD_OPS[backend])
    torch.library.opcheck(bwd, (mode, torch.randn_like(hy), torch.randn_like(cy) if lstm else None,
                                h, c, hy, cy if lstm else None, ws))


def make_layer(mode, backend):
    if mode == "lstm":
        return fastseq.nn.LSTMCell(6, 7, backend=backend)
    if mode == "gru":
        return fastseq.nn.GRUCell(6, 7, backend=backend)
    return fastseq.nn.RNNCell(6, 7, nonlinearity=mode.split("_")[1], backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["auto"])
@pytest.mark.parametrize("mode", MODES)
def test_compile_fullgraph_layer_training_step(backend, mode):
    """Forward and backward of a cell layer compiled whole (aot_eager: the traced graph is run
    as traced, so the test checks tracing, fakes and the autograd formula, not Inductor)."""
    torch._dynamo.reset()
    layer = make_layer(mode, backend)
    x = torch.randn(5, 6, requires_grad=True)

    def step(inp):
        out = layer(inp)
        out = out[0] + out[1] if mode == "lstm" else out
        return out.square().sum()

    eager_loss = step(x)
    eager_grads = torch.autograd.grad(eager_loss, [x] + list(layer.parameters()))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    grads = torch.autograd.grad(loss, [x] + list(layer.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_compile_fullgraph_inductor(mode):
    """Inductor around the native op (it compiles the surrounding graph with a C++ compiler)."""
    if "native" not in KERNEL_BACKENDS:
        pytest.skip("needs the native extension")
    torch._dynamo.reset()
    layer = make_layer(mode, "native")
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = layer(x)
        got = torch.compile(layer, fullgraph=True)(x)
    for g, e in zip(got if mode == "lstm" else (got,), expected if mode == "lstm" else (expected,)):
        torch.testing.assert_close(g, e)


def test_auto_on_cpu_runs_torchs_own_cell():
    """A drop-in CPU user gets PyTorch's own (vectorised) cell, never the reference."""
    x, h, c, w_ih, w_hh, b_ih, b_hh = [t.float() if t is not None else None
                                       for t in make_inputs("lstm", 2, 3, 4, True, "cpu")]
    with torch.profiler.profile() as prof:
        fastseq.ops.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    names = {e.name for e in prof.events()}
    assert "aten::lstm_cell" in names and "fastseq::rnn_cell_forward" not in names
