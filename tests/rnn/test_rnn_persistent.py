"""The persistent recurrence (torch.ops.fastseq.rnn_layer_{forward,backward}_persistent), run
by fastseq.ops.rnn_layer's native backend where fastseq/ops/rnn_native.py's rule says
so, per pass. On CPU (with FASTSEQ_PERSISTENT=1, set for every test here) its C++ twin runs the
CUDA kernel's own per-CTA phases (fastseq/rnn_persistent.h), CTA by CTA and step by step, with
at most 8 CTAs, so H=63 splits into 8 CTAs of 8 units (the last owns 7) and H=300 into 8 of 38
(the last 34). On CUDA the same tests run the kernel. Its opcheck and determinism tests are
with the other implementations' in test_rnn.py, its zoneout tests in
test_rnn_zoneout.py."""
import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

import fastseq
from fastseq.ops import rnn_native

from conftest import DEVICES
from recurrent_cases import (MODES, assert_backends_match_reference, assert_compiles_like_eager,
                             gradcheck_layer, lengths_for, make_grad_outputs, make_leaves,
                             persistent_everywhere, persistent_layer)

pytestmark = pytest.mark.skipif(fastseq.backend.native_unavailable(torch.device("cpu")) is not None,
                                reason="fastseq._C is not built")

PERSISTENT_FORWARD = "fastseq::rnn_layer_forward_persistent"
PERSISTENT_BACKWARD = "fastseq::rnn_layer_backward_persistent"
LOOP_FORWARD, LOOP_BACKWARD = "fastseq::rnn_layer_forward", "fastseq::rnn_layer_backward"


@pytest.fixture(autouse=True)
def persistent_kernel_on_cpu():
    with persistent_everywhere():
        yield

# (T, B, I, H, dtype): one unit and one CTA; 8 CTAs with a short last one at odd B; 8 CTAs of 38
# units (the GEMM's depth 300 not a multiple of 4); the half dtypes on the 8-CTA case.
CASES = [(1, 1, 1, 1, torch.float32), (7, 13, 5, 63, torch.float32), (4, 3, 4, 300, torch.float32),
         (7, 13, 5, 63, torch.bfloat16), (7, 13, 5, 63, torch.float16)]


def case_id(c):
    return "T{}_B{}_I{}_H{}_{}".format(*c[:4], str(c[4]).split(".")[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("variable", [False, True], ids=["full", "lengths"])
def test_persistent_matches_reference(device, mode, case, reverse, variable):
    T, B, I, H, dtype = case
    leaves64 = make_leaves(mode, T, B, I, H, device)
    lengths = lengths_for(T, B, variable)
    grad_outputs = make_grad_outputs(mode, T, B, H, device)
    assert_backends_match_reference(mode, leaves64, dtype, ["persistent"], lengths, reverse,
                                    grad_outputs)

@pytest.mark.parametrize("mode", MODES)
def test_persistent_equals_loop_and_their_workspaces_interchange(mode):
    """Same algorithm as the GEMM-per-step loop, in float64 to rounding; and the workspace one
    writes is the one the other reads (the CUDA op mixes them where only one direction fits)."""
    T, B, H = 6, 5, 11
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = make_leaves(mode, T, B, 3, H, "cpu")
    gates_x = x @ w_ih.t() + b_ih
    lengths = torch.tensor([6, 0, 3, 1, 5], dtype=torch.int32)
    ops = torch.ops.fastseq
    args = (mode, gates_x, h0, c0, w_hh, b_hh, lengths, None, None, True, True)
    loop, persistent = ops.rnn_layer_forward(*args), ops.rnn_layer_forward_persistent(*args)
    for a, b in zip(loop, persistent):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    y, h_n, c_n, ws = persistent
    grads = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(h_n) if mode == "lstm" else None)
    back = (mode, *grads, h0, c0, w_hh, y, ws, lengths, None, None, True)
    for a, b in zip(ops.rnn_layer_backward(*back), ops.rnn_layer_backward_persistent(*back)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    assert gradcheck_layer(mode, "persistent", 3, 2, 2, 10, lengths=[3, 2])


def test_compile_fullgraph_training_step():
    params = [t.float().requires_grad_() for t in make_leaves("gru", 5, 3, 4, 9, "cpu")[3:]]
    x = torch.randn(5, 3, 4, requires_grad=True)

    def step(inp):
        y, h = fastseq.ops.rnn_layer("gru", inp, torch.zeros(3, 9), *params, lengths=[5, 2, 4],
                                     backend="native")
        return y.square().sum() + h.sum()

    assert_compiles_like_eager(step, x, params)


class OpLog(TorchDispatchMode):
    """The names of the ops that ran inside the block (forward and, on CPU, backward)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def split_case():
    """An LSTM size in float64 whose forward plan does not fit on the CPU twin while its
    backward's does (the forward's partial sums are 4x wider): hidden 210, batch 60."""
    hidden, batch = 210, 60
    forward_limit = rnn_native.batch_limits("lstm", False, torch.float64, torch.device("cpu"))
    backward_limit = rnn_native.batch_limits("lstm", True, torch.float64, torch.device("cpu"))
    assert forward_limit[hidden] < batch <= backward_limit[hidden]
    return hidden, batch


def test_forward_and_backward_choose_separately():
    """Forward on the loop, backward on the persistent kernel, in one training step: they share
    the workspace, the gradients equal the reference's, and explain names each pass's choice."""
    H, B = split_case()
    leaves = [t.requires_grad_() if t is not None else None for t in make_leaves("lstm", 3, B, 2, H, "cpu")]
    x, h0, c0, *weights = leaves
    report = fastseq.explain(fastseq.ops.rnn_layer, "lstm", x, (h0, c0), *weights, backend="native")
    variant = report.decisions[0].variant
    assert "forward: the C++ loop" in variant and "a CTA would need" in variant
    assert "backward: the persistent kernel" in variant
    with OpLog() as log:
        y, (h_n, c_n) = fastseq.ops.rnn_layer("lstm", x, (h0, c0), *weights, backend="native")
        loss = y.sum() + h_n.square().sum() + c_n.sum()
        grads = torch.autograd.grad(loss, leaves)
    assert LOOP_FORWARD in log.names and PERSISTENT_BACKWARD in log.names
    assert PERSISTENT_FORWARD not in log.names and LOOP_BACKWARD not in log.names
    y_ref, (h_ref, c_ref) = fastseq.ops.rnn_layer("lstm", x, (h0, c0), *weights, backend="reference")
    ref_grads = torch.autograd.grad(y_ref.sum() + h_ref.square().sum() + c_ref.sum(), leaves)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_compile_makes_the_eager_choice_for_each_pass():
    """Under torch.compile(fullgraph=True, dynamic=True) the rule reads the plan's table with
    a symbolic batch (a guard on it): the traced forward and backward graphs hold the ops the
    eager call runs, on both sides of the forward's limit."""
    H, B = split_case()
    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(str(gm.code))
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    x0, h0, c0, *weights = [t.requires_grad_() for t in make_leaves("lstm", 2, B, 2, H, "cpu")]

    def step(x, h0, c0):
        y, (h_n, c_n) = fastseq.ops.rnn_layer("lstm", x, (h0, c0), *weights, backend="native")
        return y.sum() + h_n.square().sum() + c_n.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=backend)
    for batch in (8, B):  # both passes persistent; the forward on the loop
        args = [t[:, :batch].detach().requires_grad_() if t.dim() == 3 else
                t[:batch].detach().requires_grad_() for t in (x0, h0, c0)]
        loss = compiled(*args)
        torch.autograd.grad(loss, args)
        forward_persistent = rnn_native.runs_persistent("lstm", False, batch, H,
                                                               torch.float64, x0.device)
        backward_persistent = rnn_native.runs_persistent("lstm", True, batch, H,
                                                                torch.float64, x0.device)
        assert backward_persistent and forward_persistent == (batch == 8)
        assert ("rnn_layer_forward_persistent" in graphs["forward"][-1]) == forward_persistent
        assert ("rnn_layer_backward_persistent" in graphs["backward"][-1]) == backward_persistent
    assert len(graphs["forward"]) == 2  # one graph each side of the limit (the guard)


def test_the_plan_table_and_the_ops_agree():
    """Every batch up to a hidden size's entry fits (the op runs it); the next one does not
    (the op refuses it by name), for each mode, pass and dtype the twin serves."""
    cpu = torch.device("cpu")
    for mode in MODES:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for backward in (False, True):
                limits = rnn_native.batch_limits(mode, backward, dtype, cpu)
                assert len(limits) > 100 and limits[0] == 0 and limits[1] == 64
                for hidden in (1, len(limits) // 2, len(limits) - 1):
                    limit = limits[hidden]
                    assert rnn_native.refusal(mode, backward, limit, hidden, dtype, cpu) is None
                    assert "rows it runs" in rnn_native.refusal(mode, backward, 65, hidden, dtype, cpu) \
                        or limit < 64
                    if limit < 64:
                        assert "shared memory" in rnn_native.refusal(
                            mode, backward, limit + 1, hidden, dtype, cpu)
                past = len(limits)  # no batch fits past the table
                assert not rnn_native.runs_persistent(mode, backward, 1, past, dtype, cpu)
    H = 600  # the op itself: 1 row of LSTM H=600 bf16 is past the table
    assert len(rnn_native.batch_limits("lstm", False, torch.bfloat16, cpu)) <= H


def test_the_rule_follows_fastseq_persistent(monkeypatch):
    cpu = torch.device("cpu")
    assert rnn_native.runs_persistent("gru", False, 4, 9, torch.float32, cpu)
    monkeypatch.setenv("FASTSEQ_PERSISTENT", "0")
    assert not rnn_native.runs_persistent("gru", False, 4, 9, torch.float32, cpu)
    assert "FASTSEQ_PERSISTENT=0" in rnn_native.refusal("gru", True, 4, 9, torch.float32, cpu)
    monkeypatch.delenv("FASTSEQ_PERSISTENT")
    assert "C++ twin" in rnn_native.refusal("gru", False, 4, 9, torch.float32, cpu)
    monkeypatch.setenv("FASTSEQ_PERSISTENT", "yes")
    with pytest.raises(ValueError, match="FASTSEQ_PERSISTENT must be unset, 0 or 1; got 'yes'"):
        fastseq.ops.rnn_layer("gru", torch.randn(2, 1, 3), None, torch.randn(12, 3),
                              torch.randn(12, 4), backend="native")


def test_refuses_what_does_not_fit_on_chip_with_the_reason():
    """LSTM H=600 bf16 over 8 CTAs: 75 units each, a 300 x 601 bf16 slice of W_hh (360 KB) is
    more than 227 KB of shared memory. rnn_layer's native backend runs the loop there (the
    plan's table ends before H=600); the persistent op itself says why it cannot."""
    H = 600
    gates_x = torch.zeros(2, 1, 4 * H, dtype=torch.bfloat16)
    h0 = torch.zeros(1, H, dtype=torch.bfloat16)
    w_hh = torch.zeros(4 * H, H, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"cannot run this call: a CTA would need \d+ bytes of "
                                           r"shared memory \(\d+ for its 75 units' slice of W_hh"):
        torch.ops.fastseq.rnn_layer_forward_persistent("lstm", gates_x, h0, h0, w_hh, None, None,
                                                       None, None, False, False)


def test_empty_batch_and_zero_steps():
    ops = torch.ops.fastseq
    for T, B in ((0, 3), (4, 0)):
        gx = torch.randn(T, B, 12)
        y, h_n, c_n, ws = ops.rnn_layer_forward_persistent("lstm", gx, torch.ones(B, 3), torch.ones(B, 3),
                                                           torch.randn(12, 3), None, None, None,
                                                           None, False, True)
        assert y.shape == (T, B, 3) and not y.isnan().any() and torch.equal(h_n, torch.ones(B, 3))


def test_refuses_batches_over_64_rows():
    with pytest.raises(RuntimeError, match="batch 65 is more than the 64 rows it runs"):
        torch.ops.fastseq.rnn_layer_forward_persistent(
            "gru", torch.zeros(1, 65, 6), torch.zeros(65, 2), None, torch.zeros(6, 2), None, None,
            None, None, False, False)
