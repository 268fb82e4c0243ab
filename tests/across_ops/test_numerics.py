"""Numerics at the edges: a 10,000-step recurrence without overflow or drift, attention and
relative attention with scores near the fp16 limit, and no tensors left behind by repeated
forward/backward calls (Python-visible tensors stay flat)."""
import gc

import pytest
import torch
import triton
import triton.language as tl

import fastseq
from fastseq import reference
from fastseq.kernels.common import tanh_accurate

from conftest import TRITON_TEST_DEVICE
from recurrent_cases import layer_backends

pytestmark = pytest.mark.usefixtures("on_triton_test_device")

# Which public op each test covers (tests/dispatch/test_registry.py checks every op is named here).
_CELLS = ["test_recurrent_cell_empty_batch"]
COVERS = {"rnn_layer": ["test_ten_thousand_steps", "test_recurrent_layer_empty_shapes",
                        "test_repeated_calls_leave_nothing_behind"],
          "rnn_bidirectional_layer": ["test_recurrent_modules_empty_shapes"],
          "rnn_stack": ["test_recurrent_modules_empty_shapes"],
          "layer_norm_rnn_layer": ["test_recurrent_modules_empty_shapes"],
          "lstm_cell": _CELLS, "gru_cell": _CELLS, "rnn_tanh_cell": _CELLS, "rnn_relu_cell": _CELLS,
          "attention": ["test_attention_scores_near_the_fp16_limit",
                        "test_repeated_calls_leave_nothing_behind"],
          "attention_with_kv_cache": ["test_decode_scores_near_the_fp16_limit",
                                      "test_repeated_calls_leave_nothing_behind"],
          "rel_attention": ["test_rel_attention_scores_near_the_fp16_limit",
                            "test_repeated_calls_leave_nothing_behind"]}
EXCLUDES: dict = {}


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
    # tests/rnn/test_rnn.py; the reference's Python loop of 10,000 steps would take
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


def test_decode_scores_near_the_fp16_limit():
    """The split-KV ranges each see scores of 2e4 (exp of them overflows anything): their
    partial maxima and the combine keep the step finite and right."""
    if fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("Triton unavailable here")
    q, k, v = large_logit_inputs(1, 60, 16)
    lengths = torch.tensor([60], dtype=torch.int32)
    out = fastseq.ops.attention_with_kv_cache(q, k, v, lengths, backend="triton")
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


@pytest.mark.parametrize("op", ["attention", "rel_attention", "lstm", "attention_with_kv_cache"])
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
        elif op == "attention_with_kv_cache":  # forward only: a decode step appending a row
            with torch.no_grad():
                fastseq.ops.attention_with_kv_cache(q[:, :, :1], k, v, 3, k[:, :, :1],
                                                    v[:, :, :1], backend="triton")
            return
        else:
            out = lstm(q[0])[0]
        out.sum().backward()

    step()
    before = live_tensors()
    for _ in range(10):
        step()
    assert live_tensors() == before


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("T,B", [(0, 3), (4, 0)], ids=["T0", "B0"])
def test_recurrent_layer_empty_shapes(mode, T, B):
    """B=0 (torch allows it) and T=0 (torch refuses it; fastseq returns an empty output and h0
    as the final state, what a sequence of length 0 in `lengths` gives) on every fastseq
    backend, gradients included: d h_n / d h0 is the identity when no step runs. The torch
    backend refuses T=0 by name, and auto passes over it."""
    lstm = mode == "lstm"
    g = {"lstm": 4, "gru": 3}.get(mode, 1)
    x = torch.randn(T, B, 3)
    h0, c0 = torch.randn(B, 5), torch.randn(B, 5)
    weights = [torch.randn(g * 5, 3), torch.randn(g * 5, 5), torch.randn(g * 5), torch.randn(g * 5)]
    names = layer_backends(TRITON_TEST_DEVICE.type) + ["torch", "auto"]
    for backend in names:
        leaves = [t.clone().requires_grad_() for t in [x, h0, c0] + weights]
        hx = (leaves[1], leaves[2]) if lstm else leaves[1]
        if T == 0 and backend == "torch":
            with pytest.raises(fastseq.BackendError, match="zero-length sequences"):
                fastseq.ops.rnn_layer(mode, leaves[0], hx, *leaves[3:], backend=backend)
            continue
        y, state = fastseq.ops.rnn_layer(mode, leaves[0], hx, *leaves[3:], backend=backend)
        h_n, c_n = state if lstm else (state, None)
        assert y.shape == (T, B, 5) and h_n.shape == (B, 5), backend
        if T == 0:
            assert torch.equal(h_n, h0) and (c_n is None or torch.equal(c_n, c0)), backend
            grad_h0, = torch.autograd.grad(h_n, leaves[1], torch.ones_like(h_n))
            assert torch.equal(grad_h0, torch.ones(B, 5)), backend
        else:
            total = y.sum() + h_n.sum() + (c_n.sum() if lstm else 0)
            grads = torch.autograd.grad(total, [t for t in leaves if lstm or t is not leaves[2]],
                                        allow_unused=True)
            assert all(gr is None or torch.count_nonzero(gr) == 0 for gr in grads), backend


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_recurrent_cell_empty_batch(mode):
    """B=0 through a cell step, forward and backward, on every fastseq backend here."""
    g = {"lstm": 4, "gru": 3}.get(mode, 1)
    for backend in layer_backends(TRITON_TEST_DEVICE.type) + ["torch"]:
        leaves = [torch.randn(0, 3), torch.randn(0, 5), torch.randn(0, 5), torch.randn(g * 5, 3),
                  torch.randn(g * 5, 5), torch.randn(g * 5), torch.randn(g * 5)]
        leaves = [t.requires_grad_() for t in leaves]
        hx = (leaves[1], leaves[2]) if mode == "lstm" else leaves[1]
        out = getattr(fastseq.ops, f"{mode}_cell")(leaves[0], hx, *leaves[3:], backend=backend)
        outs = out if mode == "lstm" else (out,)
        assert all(o.shape == (0, 5) for o in outs), backend
        grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves[3:])
        assert all(torch.count_nonzero(gr) == 0 for gr in grads), backend


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LayerNormLSTM"])
def test_recurrent_modules_empty_shapes(cls):
    """The layers (2 layers, bidirectional, batch_first) on each fastseq backend: B=0 as torch
    gives it, T=0 with h0 passed through; the backward leaves zero parameter gradients."""
    backends = layer_backends(TRITON_TEST_DEVICE.type)
    if cls.startswith("LayerNorm"):  # no native layer-normalized recurrence
        backends = [b for b in backends if b != "native"]
    for backend in backends:
        module = getattr(fastseq.nn, cls)(3, 4, num_layers=2, bidirectional=True, batch_first=True,
                                          backend=backend)
        for B, T in ((0, 5), (2, 0)):
            x = torch.randn(B, T, 3, requires_grad=True)
            out, state = module(x)
            h_n = state[0] if isinstance(state, tuple) else state
            assert out.shape == (B, T, 8) and h_n.shape == (4, B, 4), (backend, B, T)
            assert T > 0 or torch.count_nonzero(h_n) == 0, backend
            total = out.sum() + h_n.sum()
            if not total.requires_grad:  # the reference at T=0: nothing touched a parameter
                continue
            grads = torch.autograd.grad(total, [x] + list(module.parameters()), allow_unused=True)
            assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), (backend, B, T)


@triton.jit
def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(y_ptr + offsets, tanh_accurate(x), mask=offsets < n)


def tanh_kernel(x):
    y = torch.full_like(x, float("nan"))
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


def test_kernel_tanh_is_accurate_near_zero():
    """The kernels' soft-capping tanh: within 2 ulp of float64 tanh in fp32,
    small arguments included, where 1 - exp(-2|x|) cancels (44,000 ulp at 6e-6 before the
    polynomial branch; the KV-cache smoke's soft-capped scores are that small)."""
    x = torch.cat([torch.linspace(-3, 3, 6001), torch.logspace(-8, 0, 801),
                   -torch.logspace(-8, 0, 801), torch.tensor([0.0, 20.0, -20.0, 90.0])])
    x = x.to(TRITON_TEST_DEVICE)
    truth = torch.tanh(x.double())
    ulp = (torch.nextafter(truth.float().abs(), torch.tensor(float("inf"))) -
           truth.float().abs()).double()
    assert ((tanh_kernel(x).double() - truth).abs() / ulp).max() <= 2.0
    x64 = x.double() * 0.999
    torch.testing.assert_close(tanh_kernel(x64), torch.tanh(x64), rtol=1e-13, atol=1e-15)
