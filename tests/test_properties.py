"""Property-based tests (hypothesis): each op on every backend that runs here equals the
reference in float64 (outputs and every gradient, to 1e-9) over random shapes, lengths, masks
and options. float64 makes the property exact up to rounding, so no tolerance rule is needed
and a wrong index shows at any size. Derandomized (the same examples every run) with a bounded
budget for CI: the Triton kernels run through the interpreter."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastseq
from fastseq import reference

from conftest import TRITON_TEST_DEVICE
from recurrent_cases import MODES, layer_backends, make_grad_outputs, make_leaves, run

pytestmark = pytest.mark.usefixtures("on_triton_test_device")
BUDGET = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow,
                                         HealthCheck.function_scoped_fixture])
F64 = dict(atol=1e-9, rtol=1e-9)


def triton_or_skip():
    if fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("Triton unavailable here")


@BUDGET
@given(data=st.data())
def test_rnn_layer_equals_reference(data):
    mode = data.draw(st.sampled_from(MODES), "mode")
    T, B = data.draw(st.integers(1, 9), "T"), data.draw(st.integers(1, 20), "B")
    I, H = data.draw(st.integers(1, 8), "I"), data.draw(st.integers(1, 24), "H")
    lengths = data.draw(st.none() | st.lists(st.integers(0, T), min_size=B, max_size=B),
                        "lengths")
    reverse = data.draw(st.booleans(), "reverse")
    leaves = make_leaves(mode, T, B, I, H, TRITON_TEST_DEVICE.type)
    grad_outputs = make_grad_outputs(mode, T, B, H, TRITON_TEST_DEVICE.type)
    expected = run(mode, leaves, torch.float64, "reference", lengths, reverse, grad_outputs)
    for backend in layer_backends(TRITON_TEST_DEVICE.type):
        got = run(mode, leaves, torch.float64, backend, lengths, reverse, grad_outputs)
        for g, e in zip(got[0] + got[1], expected[0] + expected[1]):
            torch.testing.assert_close(g, e, **F64, msg=lambda m: f"{backend}: {m}")


def attention_case(data):
    B, Hk = data.draw(st.integers(1, 2), "B"), data.draw(st.integers(1, 2), "Hk")
    group = data.draw(st.integers(1, 2), "group")
    L, S = data.draw(st.integers(1, 40), "L"), data.draw(st.integers(1, 40), "S")
    E, EV = data.draw(st.sampled_from([8, 16, 40]), "E"), data.draw(st.sampled_from([4, 16]), "EV")
    q = torch.randn(B, Hk * group, L, E, dtype=torch.float64)
    k, v = torch.randn(B, Hk, S, E, dtype=torch.float64), torch.randn(B, Hk, S, EV,
                                                                        dtype=torch.float64)
    kind = data.draw(st.sampled_from(["none", "bool-keys", "bool-tile", "float-tile"]), "mask")
    mask = None
    if kind == "bool-keys":
        mask = torch.rand(B, 1, 1, S) > 0.3
    elif kind == "bool-tile":
        mask = torch.rand(L, S) > 0.3
    elif kind == "float-tile":
        mask = torch.randn(1, Hk * group, L, S, dtype=torch.float64)
    return q, k, v, mask, group > 1


def grads_of(out, inputs, seed_tensor):
    return torch.autograd.grad((out * seed_tensor).sum(), inputs)


@BUDGET
@given(data=st.data())
def test_attention_equals_reference(data):
    triton_or_skip()
    q, k, v, mask, gqa = attention_case(data)
    causal = data.draw(st.booleans(), "causal")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    expected = reference.scaled_dot_product_attention(*leaves, mask, 0.0, causal, None, gqa)
    got = fastseq.ops.attention(*leaves, mask, 0.0, causal, None, gqa, backend="triton")
    torch.testing.assert_close(got, expected, **F64)
    weights = torch.randn_like(expected)
    for g, e in zip(grads_of(got, leaves, weights), grads_of(expected, leaves, weights)):
        torch.testing.assert_close(g, e, **F64)


@BUDGET
@given(data=st.data())
def test_rel_attention_equals_reference(data):
    triton_or_skip()
    B, H = data.draw(st.integers(1, 2), "B"), data.draw(st.integers(1, 2), "H")
    L, M = data.draw(st.integers(1, 30), "Lq"), data.draw(st.integers(0, 30), "memory")
    P = data.draw(st.integers(1, L + M + 4), "P")
    D, DV = data.draw(st.sampled_from([8, 16, 24]), "D"), data.draw(st.sampled_from([4, 16]), "DV")
    variant = data.draw(st.sampled_from(["causal", "window", "bidirectional", "key-mask"]))
    kwargs = {"window": data.draw(st.integers(1, L + M), "window")} if variant == "window" else {}
    if variant == "bidirectional":
        kwargs = {"is_causal": False, "pos_offset": data.draw(st.integers(0, L), "offset")}
    if variant == "key-mask":
        kwargs = {"attn_mask": torch.rand(B, 1, 1, L + M) > 0.3}
    r = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    leaves = [r(B, H, L, D), r(B, H, L + M, D), r(B, H, L + M, DV), r(P, H, D), r(H, D), r(H, D)]
    expected = reference.relative_attention(*leaves, **kwargs)
    got = fastseq.ops.rel_attention(*leaves, backend="triton", **kwargs)
    torch.testing.assert_close(got, expected, **F64)
    weights = torch.randn_like(expected)
    for g, e in zip(grads_of(got, leaves, weights), grads_of(expected, leaves, weights)):
        torch.testing.assert_close(g, e, **F64)
