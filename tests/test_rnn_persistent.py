"""The persistent recurrence (torch.ops.fastseq.rnn_layer_{forward,backward}_persistent): on
CPU its C++ twin runs the CUDA kernel's own per-CTA phases (fastseq/rnn_persistent.h), CTA by
CTA and step by step, with at most 8 CTAs, so H=63 splits into 8 CTAs of 8 units (the last
owns 7) and H=300 into 8 of 38 (the last 34). On CUDA the same tests run the kernel. Its opcheck
and determinism tests are with the other implementations' in test_rnn_layer_ops.py, its
zoneout tests in test_rnn_zoneout.py."""
import pytest
import torch

import fastseq

from conftest import DEVICES
from recurrent_cases import (MODES, assert_backends_match_reference, assert_compiles_like_eager,
                             gradcheck_layer, lengths_for, make_grad_outputs, make_leaves,
                             persistent_layer)

pytestmark = pytest.mark.skipif(fastseq.backend.native_unavailable(torch.device("cpu")) is not None,
                                reason="fastseq._C is not built")

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
        y, h = persistent_layer("gru", inp, torch.zeros(3, 9), *params, lengths=[5, 2, 4])
        return y.square().sum() + h.sum()

    assert_compiles_like_eager(step, x, params)


def test_refuses_what_does_not_fit_on_chip_with_the_reason():
    """LSTM H=600 bf16 over 8 CTAs: 75 units each, a 300 x 601 bf16 slice of W_hh (360 KB) is
    more than 227 KB of shared memory. The CUDA op rnn_layer_forward falls back to its loop
    there; the persistent op itself says why it cannot."""
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
