"""Property-based tests (hypothesis): each op on every backend that runs here equals the
reference in float64 (outputs and every gradient, to 1e-9) over random shapes, lengths, masks
and options. float64 makes the property exact up to rounding, so no tolerance rule is needed
and a wrong index shows at any size; in fp32, bf16 and fp16 (drawn too) the recurrent layers
and attention keep to the tolerance rule. Derandomized (the same examples every run) with a bounded
budget for CI: the Triton kernels run through the interpreter."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastseq
from fastseq import reference

from conftest import TRITON_TEST_DEVICE
from test_attention import run as attention_run  # at import: it defines @given tests too
from numerics import assert_within_rule
from recurrent_cases import (MODES, layer_backends, layer_weights, make_grad_outputs, make_leaves,
                             make_stack, run)

pytestmark = pytest.mark.usefixtures("on_triton_test_device")
BUDGET = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow,
                                         HealthCheck.function_scoped_fixture])
F64 = dict(atol=1e-9, rtol=1e-9)

# Which public op each test covers (tests/dispatch/test_registry.py checks every op is named here).
_CELLS = ["test_cells_equal_reference"]
COVERS = {"rnn_stack": ["test_rnn_stack_equals_reference"],
          "rnn_layer": ["test_rnn_layer_equals_reference", "test_rnn_layer_low_precision_within_rule"],
          "rnn_bidirectional_layer": ["test_bidirectional_layer_equals_reference"],
          "layer_norm_rnn_layer": ["test_layer_norm_layer_equals_reference"],
          "lstm_cell": _CELLS, "gru_cell": _CELLS, "rnn_tanh_cell": _CELLS, "rnn_relu_cell": _CELLS,
          "attention": ["test_attention_equals_reference", "test_attention_low_precision_within_rule"],
          "attention_with_kv_cache": ["test_kv_cache_step_equals_reference"],
          "rel_attention": ["test_rel_attention_equals_reference"]}
EXCLUDES: dict = {}


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


@settings(BUDGET, max_examples=8)
@given(data=st.data())
def test_rnn_stack_equals_reference(data):
    """The whole stack (layers, directions, lengths, batch_first, projection) on torch's stacked
    forward and every fastseq backend, float64, equals the reference's network."""
    mode = data.draw(st.sampled_from(MODES), "mode")
    T, B = data.draw(st.integers(1, 6), "T"), data.draw(st.integers(1, 5), "B")
    I, H = data.draw(st.integers(1, 5), "I"), data.draw(st.integers(1, 6), "H")
    layers, bidirectional = data.draw(st.integers(1, 2), "layers"), data.draw(st.booleans(), "bi")
    proj = data.draw(st.integers(0, H - 1), "proj") if mode == "lstm" and H > 1 else 0
    lengths = data.draw(st.none() | st.lists(st.integers(1, T), min_size=B, max_size=B), "lengths")
    batch_first = data.draw(st.booleans(), "batch_first")
    x, hx, weights = make_stack(mode, T, B, I, H, layers, bidirectional, proj,
                                TRITON_TEST_DEVICE.type)
    x = x.transpose(0, 1) if batch_first else x
    states = list(hx) if mode == "lstm" else [hx]
    leaves = [x, *states, *weights]
    options = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                   lengths=lengths)

    def outputs_and_grads(out, state):
        outs = [out] + (list(state) if mode == "lstm" else [state])
        torch.manual_seed(1)
        total = sum((o * torch.randn_like(o)).sum() for o in outs)
        return outs + list(torch.autograd.grad(total, leaves))

    expected = outputs_and_grads(*reference.rnn(
        mode, x, hx, layer_weights(weights, 4 + bool(proj)), **options))
    for backend in ["torch"] + layer_backends(TRITON_TEST_DEVICE.type):
        got = outputs_and_grads(*fastseq.ops.rnn_stack(mode, x, hx, weights, backend=backend,
                                                       **options))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **F64, msg=lambda m: f"{backend}: {m}")


@BUDGET
@given(data=st.data())
def test_bidirectional_layer_equals_reference(data):
    """Both directions (one Triton launch; two rnn_layer calls elsewhere), float64, every
    fastseq backend, with and without lengths."""
    mode = data.draw(st.sampled_from(MODES), "mode")
    T, B = data.draw(st.integers(1, 7), "T"), data.draw(st.integers(1, 9), "B")
    I, H = data.draw(st.integers(1, 6), "I"), data.draw(st.integers(1, 12), "H")
    lengths = data.draw(st.none() | st.lists(st.integers(0, T), min_size=B, max_size=B),
                        "lengths")
    directions = [make_leaves(mode, T, B, I, H, TRITON_TEST_DEVICE.type) for _ in range(2)]
    x = directions[0][0]
    h0 = torch.stack([d[1] for d in directions])
    hx = (h0, torch.stack([d[2] for d in directions])) if mode == "lstm" else h0

    def call(backend):
        out, state = fastseq.ops.rnn_bidirectional_layer(
            mode, x, hx, directions[0][3:], directions[1][3:], lengths=lengths, backend=backend)
        return [out] + (list(state) if mode == "lstm" else [state])

    expected = call("reference")
    for backend in layer_backends(TRITON_TEST_DEVICE.type):
        for g, e in zip(call(backend), expected):
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


LOW_PRECISION = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@BUDGET
@given(data=st.data())
def test_cells_equal_reference(data):
    """One cell step on every backend here (torch's included), float64, batch 0 allowed."""
    mode = data.draw(st.sampled_from(MODES), "mode")
    B, I, H = (data.draw(st.integers(lo, hi), name)
               for name, lo, hi in (("B", 0, 20), ("I", 1, 9), ("H", 1, 24)))
    leaves = [t for t in make_leaves(mode, 1, B, I, H, TRITON_TEST_DEVICE.type)]
    leaves[0] = leaves[0][0]  # one step: [B, I]
    present = [t.requires_grad_() for t in leaves if t is not None]
    x, h, c, w_ih, w_hh, b_ih, b_hh = leaves
    hx = (h, c) if mode == "lstm" else h
    expected = getattr(reference, f"{mode}_cell")(x, hx, w_ih, w_hh, b_ih, b_hh)
    expected = list(expected) if mode == "lstm" else [expected]
    weights = [torch.randn_like(e) for e in expected]
    expected_grads = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)),
                                         present)
    for backend in layer_backends(TRITON_TEST_DEVICE.type) + ["torch"]:
        got = getattr(fastseq.ops, f"{mode}_cell")(x, hx, w_ih, w_hh, b_ih, b_hh, backend=backend)
        got = list(got) if mode == "lstm" else [got]
        grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), present)
        for g, e in zip(got + list(grads), expected + list(expected_grads)):
            torch.testing.assert_close(g, e, **F64, msg=lambda m: f"{backend}: {m}")


@BUDGET
@given(data=st.data())
def test_layer_norm_layer_equals_reference(data):
    """The layer-normalized recurrence (Triton) against the plain-PyTorch reference, float64."""
    triton_or_skip()
    from test_layer_norm_rnn import make_leaves as layer_norm_leaves, run as layer_norm_run

    mode = data.draw(st.sampled_from(["lstm", "gru"]), "mode")
    T, B = data.draw(st.integers(1, 7), "T"), data.draw(st.integers(1, 18), "B")
    I, H = data.draw(st.integers(1, 6), "I"), data.draw(st.integers(2, 24), "H")
    lengths = data.draw(st.none() | st.lists(st.integers(0, T), min_size=B, max_size=B),
                        "lengths")
    reverse, bias = data.draw(st.booleans(), "reverse"), data.draw(st.booleans(), "bias")
    leaves = layer_norm_leaves(mode, T, B, I, H, bias)
    grad_outputs = [torch.randn(T, B, H, dtype=torch.float64)] + \
        [torch.randn(B, H, dtype=torch.float64) for _ in range(2 if mode == "lstm" else 1)]
    expected = layer_norm_run(mode, leaves, torch.float64, "reference", lengths, reverse,
                              grad_outputs)
    got = layer_norm_run(mode, leaves, torch.float64, "triton", lengths, reverse, grad_outputs)
    for g, e in zip(got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(g, e, **F64)


@BUDGET
@given(data=st.data())
def test_rnn_layer_low_precision_within_rule(data):
    """fp32/bf16/fp16: every fastseq backend's outputs and gradients within the tolerance rule
    (2x plain PyTorch's error in the same dtype, against float64)."""
    from recurrent_cases import assert_backends_match_reference

    mode, dtype = data.draw(st.sampled_from(MODES), "mode"), data.draw(LOW_PRECISION, "dtype")
    T, B = data.draw(st.integers(1, 8), "T"), data.draw(st.integers(1, 18), "B")
    I, H = data.draw(st.integers(1, 8), "I"), data.draw(st.integers(1, 24), "H")
    lengths = data.draw(st.none() | st.lists(st.integers(0, T), min_size=B, max_size=B),
                        "lengths")
    reverse = data.draw(st.booleans(), "reverse")
    device = TRITON_TEST_DEVICE.type
    backends = [b for b in layer_backends(device) if b != "reference"]
    assert_backends_match_reference(mode, make_leaves(mode, T, B, I, H, device), dtype, backends,
                                    lengths, reverse, make_grad_outputs(mode, T, B, H, device))


@BUDGET
@given(data=st.data())
def test_attention_low_precision_within_rule(data):
    """fp32/bf16/fp16, random shapes and masks: output, lse and every gradient within the
    tolerance rule."""
    triton_or_skip()
    dtype = data.draw(LOW_PRECISION, "dtype")
    q, k, v, mask, gqa = attention_case(data)
    causal = data.draw(st.booleans(), "causal") and (mask is None or mask.dtype == torch.bool)
    args = (q, k, v, mask, causal, gqa)
    out64, lse64, _ = attention_run("plain", *args, torch.float64, torch.zeros(1), torch.zeros(1))
    grad_out, grad_lse = torch.randn_like(out64), torch.randn_like(lse64)
    ref = attention_run("plain", *args, torch.float64, grad_out, grad_lse)
    plain = attention_run("plain", *args, dtype, grad_out, grad_lse)
    fast = attention_run("triton", *args, dtype, grad_out, grad_lse)
    assert_within_rule("out", fast[0], plain[0], ref[0])
    finite = torch.isfinite(ref[1])
    assert_within_rule("lse", fast[1][finite], plain[1][finite].float(), ref[1][finite])
    terms = max(q.shape[-2], k.shape[-2]) * (q.shape[1] // k.shape[1])
    for name, f, p, r in zip(["dq", "dk", "dv"], fast[2], plain[2], ref[2]):
        assert_within_rule(name, f, p, r, terms=terms)


@BUDGET
@given(data=st.data())
def test_kv_cache_step_equals_reference(data):
    """A decode step on Triton (split-KV ranges, GQA, ragged lengths, new rows, causal or not,
    windows) equals the row-by-row reference, caches included."""
    triton_or_skip()
    B, HK = data.draw(st.integers(1, 3), "B"), data.draw(st.integers(1, 2), "Hk")
    HQ = HK * data.draw(st.sampled_from([1, 2, 3]), "group")
    LQ, S = data.draw(st.integers(1, 6), "Lq"), data.draw(st.integers(6, 70), "S_max")
    new = data.draw(st.sampled_from([0, LQ]), "new rows")
    E, EV = data.draw(st.sampled_from([8, 16, 24]), "E"), data.draw(st.sampled_from([4, 16]), "EV")
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, S - new), min_size=B, max_size=B),
                                     "lengths"), dtype=torch.int32)
    causal = data.draw(st.booleans(), "causal")
    window = data.draw(st.integers(0, 12), "window")
    q = torch.randn(B, HQ, LQ, E, dtype=torch.float64)
    caches = [torch.randn(B, HK, S, d, dtype=torch.float64) for d in (E, EV)]
    rows = [torch.randn(B, HK, new, d, dtype=torch.float64) for d in (E, EV)] if new else [None] * 2
    expected_caches = [c.clone() for c in caches]
    expected = reference.kv_cache.attention_with_kv_cache(
        q, *expected_caches, lengths, *rows, is_causal=causal, window=window)
    got = fastseq.ops.attention_with_kv_cache(q, *caches, lengths, *rows, is_causal=causal,
                                              window=window, return_lse=True, backend="triton")
    torch.testing.assert_close(got[0], expected[0], **F64)
    torch.testing.assert_close(got[1], expected[1], **F64)
    for c, e in zip(caches, expected_caches):
        assert torch.equal(c, e)
