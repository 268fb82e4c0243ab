"""The cell-step ops on every backend against the float64 reference: outputs and every gradient
(input, states, weights, biases), odd shapes, with and without bias, batched and unbatched."""
import pytest
import torch

import fastseq
from fastseq import reference
from fastseq.kernels.recurrent_layout import GATES

from conftest import DEVICES, backends_for
from numerics import assert_within_rule

MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, input_size, hidden_size, dtype, bias): odd sizes in every dtype, with and without
# bias; H=333 (eleven 32-unit hidden tiles, the last partial) and B=100 (two 64-row batch
# tiles) once per mode, in fp32 with bias (the work grows as H^2: H=1000 took 13-40 s a mode in
# the interpreter on CI's machines, H=333 a ninth of that).
CASES = [(b, i, h, dtype, bias) for (b, i, h) in [(1, 1, 1), (13, 5, 63)] for dtype in DTYPES
         for bias in (True, False)] + [(2, 33, 333, torch.float32, True),
                                       (100, 7, 40, torch.float32, True)]


def make_inputs(mode, batch, input_size, hidden, bias, device, batched=True):
    """float64 leaves: (x, h, c or None, w_ih, w_hh, b_ih, b_hh); weights scaled like torch's
    init (U(-1/sqrt(H), 1/sqrt(H))) so activations stay in their sensitive range."""
    g = GATES[mode]
    lead = (batch,) if batched else ()
    k = hidden ** -0.5

    def rand(*shape, s=1.0):
        return ((torch.rand(*shape, dtype=torch.float64, device=device) * 2 - 1) * s)

    x = rand(*lead, input_size)
    h = rand(*lead, hidden)
    c = rand(*lead, hidden) if mode == "lstm" else None
    w_ih, w_hh = rand(g * hidden, input_size, s=k), rand(g * hidden, hidden, s=k)
    b_ih = rand(g * hidden, s=k) if bias else None
    b_hh = rand(g * hidden, s=k) if bias else None
    return [x, h, c, w_ih, w_hh, b_ih, b_hh]


def run_cell(fn, mode, tensors):
    x, h, c, w_ih, w_hh, b_ih, b_hh = tensors
    out = fn(x, (h, c) if mode == "lstm" else h, w_ih, w_hh, b_ih, b_hh)
    return out if mode == "lstm" else (out,)


def outputs_and_grads(fn, mode, leaves64, dtype, grad_outputs):
    """Run `fn` on copies of the float64 leaves cast to `dtype`; return outputs and gradients."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in leaves64]
    outs = run_cell(fn, mode, leaves)
    loss = sum((o.double() * go).sum() for o, go in zip(outs, grad_outputs))
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, present)
    return [o.detach() for o in outs], list(grads)


def torch_cell(mode):
    return getattr(torch, f"{mode}_cell")


def fastseq_cell(mode, backend):
    op = getattr(fastseq.ops, f"{mode}_cell")
    return lambda *args: op(*args, backend=backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_I{}_H{}_{}_{}".format(
    *c[:3], str(c[3]).split(".")[1], "bias" if c[4] else "nobias"))
def test_cell_matches_reference(device, mode, case):
    *shape, dtype, bias = case
    leaves64 = make_inputs(mode, *shape, bias, device)
    n_out = 2 if mode == "lstm" else 1
    grad_outputs = [torch.randn(shape[0], shape[2], dtype=torch.float64, device=device)
                    for _ in range(n_out)]
    ref_outs, ref_grads = outputs_and_grads(reference.rnn_cell.CELLS[mode], mode, leaves64,
                                            torch.float64, grad_outputs)
    plain_outs, plain_grads = outputs_and_grads(torch_cell(mode), mode, leaves64, dtype, grad_outputs)
    names = [n for n, t in zip(["input", "h", "c", "w_ih", "w_hh", "b_ih", "b_hh"], leaves64)
             if t is not None]
    for backend in backends_for(device):
        outs, grads = outputs_and_grads(fastseq_cell(mode, backend), mode, leaves64, dtype,
                                        grad_outputs)
        for i, (o, p, r) in enumerate(zip(outs, plain_outs, ref_outs)):
            assert o.dtype == dtype
            assert_within_rule(f"{backend} {mode} output {i}", o, p, r)
        for name, g, p, r in zip(names, grads, plain_grads, ref_grads):
            assert_within_rule(f"{backend} {mode} grad {name}", g, p, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_unbatched_and_default_state(device, mode):
    x, h, c, w_ih, w_hh, b_ih, b_hh = [t.float() if t is not None else None
                                       for t in make_inputs(mode, 1, 6, 9, True, device, batched=False)]
    zeros = torch.zeros_like(h)
    state = (zeros, zeros) if mode == "lstm" else zeros
    expected = torch_cell(mode)(x.unsqueeze(0), tuple(s.unsqueeze(0) for s in state)
                                if mode == "lstm" else state.unsqueeze(0), w_ih, w_hh, b_ih, b_hh)
    expected = expected if mode == "lstm" else (expected,)
    for backend in backends_for(device):
        out = getattr(fastseq.ops, f"{mode}_cell")(x, None, w_ih, w_hh, b_ih, b_hh, backend=backend)
        out = out if mode == "lstm" else (out,)
        for o, e in zip(out, expected):
            assert o.shape == (9,), backend
            torch.testing.assert_close(o, e.squeeze(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_no_workspace_without_grad(device, mode):
    """Inference writes no gates: the forward op is asked for no workspace."""
    x, h, c, w_ih, w_hh, b_ih, b_hh = [t.float() if t is not None else None
                                       for t in make_inputs(mode, 3, 4, 5, True, device)]
    for name in [n for n in ("native", "triton") if n in backends_for(device)]:
        op = (torch.ops.fastseq.rnn_cell_forward_triton if name == "triton"
              else torch.ops.fastseq.rnn_cell_forward)
        _, _, ws = op(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, False)
        assert ws.numel() == 0
        _, _, ws = op(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, True)
        assert ws.shape == ((3, 20) if mode in ("lstm", "gru") else (0, 0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gradcheck_float64(mode, backend):
    if backend not in backends_for("cpu"):
        pytest.skip(f"{backend} cannot run on this machine's CPU")
    leaves = [t.requires_grad_() if t is not None else None
              for t in make_inputs(mode, 2, 2, 3, True, "cpu")]
    fn = fastseq_cell(mode, backend)
    present = [i for i, t in enumerate(leaves) if t is not None]

    def f(*args):
        full = list(leaves)
        for i, a in zip(present, args):
            full[i] = a
        return run_cell(fn, mode, full)

    # fast_mode: random projections of the Jacobian (as the attention families' gradchecks):
    # the full Jacobian costs ~200 interpreted kernel calls per case, 10-40 s a case on CI.
    assert torch.autograd.gradcheck(f, [leaves[i] for i in present], eps=1e-6, atol=1e-6,
                                    fast_mode=True)


def test_save_workspace_false_cannot_backprop():
    x, h, c, w_ih, w_hh, b_ih, b_hh = make_inputs("lstm", 2, 3, 4, True, "cpu")
    for op in (torch.ops.fastseq.rnn_cell_forward, torch.ops.fastseq.rnn_cell_forward_triton):
        xg = x.clone().requires_grad_()
        hy, cy, ws = op("lstm", xg, h, c, w_ih, w_hh, b_ih, b_hh, False)
        with pytest.raises(RuntimeError, match="save_workspace=False"):
            hy.sum().backward()
