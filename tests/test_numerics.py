"""Numerics at the edges: a 10,000-step recurrence without overflow or drift, attention and
relative attention with scores near the fp16 limit, and no tensors left behind by repeated
forward/backward calls (Python-visible tensors stay flat)."""
import gc

import pytest
import torch

import fastseq
from fastseq import reference

from conftest import TRITON_TEST_DEVICE
from recurrent_cases import layer_backends

pytestmark = pytest.mark.usefixtures("on_triton_test_device")


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_ten_thousand_steps(mode):
    """T = 10,000: outputs, final states and gradients finite on every backend here, and within
    1e-4 of the float64 reference (a contractive recurrence: errors must not accumulate)."""
    T, B, I, H = 10_000, 2, 3, 4
    gates = 4 if mode == "lstm" else 3
    torch.manual_seed(0)
    x = torch.randn(T, B, I, dtype=torch.float64)
    weights = [torch.randn(gates * H, I, dtype=torch.float64) * 0.5,
               torch.randn(gates * H, H, dtype=torch.float64) * 0.5,
               torch.randn(gates * H, dtype=torch.float64) * 0.1,
               torch.randn(gates * H, dtype=torch.float64) * 0.1]

    def run(backend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in [x] + weights]
        out, state = fastseq.ops.rnn_layer(mode, leaves[0], None, *leaves[1:], backend=backend)
        grads = torch.autograd.grad(out.sum(), leaves)
        return out, grads

    # Ground truth: torch's own layer in float64 (equal to fastseq's reference to ~1e-15 in
    # tests/test_rnn_layer_ops.py; the reference's Python loop of 10,000 steps would take
    # minutes). Triton's recurrence loops over time inside one program, which the interpreter
    # runs at ~ms a step: it runs this in the GPU run only.
    expected, expected_grads = run("torch", torch.float64)
    backends = [b for b in layer_backends(TRITON_TEST_DEVICE.type)
                if b not in ("reference", "torch")
                and (b != "triton" or TRITON_TEST_DEVICE.type == "cuda")]
    if not backends:
        pytest.skip("no fastseq backend for a 10,000-step check here")
    for backend in backends:
        out, grads = run(backend, torch.float32)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        assert (out.double() - expected).abs().max() < 1e-4, backend
        # Weight gradients sum 20,000 terms: relative to their size.
        for g, e in zip(grads, expected_grads):
            assert (g.double() - e).abs().max() <= 1e-4 * max(e.abs().max().item(), 1.0), backend


def large_logit_inputs(L, S, D):
    """fp16 q and k whose scaled scores reach a few 1e4 (fp16's largest value is 65504; the
    unscaled dot products pass it): a kernel must accumulate wider and subtract the row max."""
    torch.manual_seed(1)
    q = (torch.randn(1, 2, L, D) * 120).half()
    k = (torch.randn(1, 2, S, D) * 120).half()
    v = torch.randn(1, 2, S, D).half()
    return q, k, v


def test_attention_scores_near_the_fp16_limit():
    if fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("Triton unavailable here")
    q, k, v = large_logit_inputs(19, 23, 16)
    scores = (q.double() @ k.double().transpose(-1, -2)) / 4
    assert scores.abs().max() > 2e4
    out = fastseq.ops.attention(q, k, v, backend="triton")
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_rel_attention_scores_near_the_fp16_limit():
    if fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("Triton unavailable here")
    q, k, v = large_logit_inputs(9, 20, 16)
    pos = (torch.randn(20, 2, 16) * 120).half()
    u, w = torch.zeros(2, 16).half(), torch.zeros(2, 16).half()
    out = fastseq.ops.rel_attention(q, k, v, pos, u, w, backend="triton")
    expected = reference.relative_attention(*(t.double() for t in (q, k, v, pos, u, w)))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def live_tensors() -> int:
    gc.collect()
    # By exact type: isinstance on every object would also poke deprecated module attributes.
    return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter))


@pytest.mark.parametrize("op", ["attention", "rel_attention", "lstm"])
def test_repeated_calls_leave_nothing_behind(op):
    """Ten more forward/backward calls leave as many live tensors as one did (no saved tensors,
    seeds or workspaces kept between calls)."""
    if fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("Triton unavailable here")
    q, k, v = [torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3)]
    pos, u, w = torch.randn(9, 2, 16), torch.randn(2, 16), torch.randn(2, 16)
    lstm = fastseq.nn.LSTM(16, 8, backend="triton")

    def step():
        if op == "attention":
            out = fastseq.ops.attention(q, k, v, is_causal=True, dropout_p=0.1, backend="triton")
        elif op == "rel_attention":
            out = fastseq.ops.rel_attention(q, k, v, pos, u, w, dropout_p=0.1, backend="triton")
        else:
            out = lstm(q[0])[0]
        out.sum().backward()

    step()
    before = live_tensors()
    for _ in range(10):
        step()
    assert live_tensors() == before
