"""fastseq.ops.block_recurrent_attention against the float64 reference (every backend, outputs
and every gradient), the tolerance rule in fp32 and bf16, its edges (rows with no visible key,
groups crossing tiles, part 1 alone), the memory it never holds (no L x S tensor), opcheck,
torch.compile, autocast, vmap, strided views and bad inputs. Triton runs through the
interpreter on CPU (16 x 16 tiles: the odd shapes here cross several, and the window's edges).

The layer and the language model are tests/block_recurrent/test_block_recurrent_layer.py's."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastseq
from fastseq.reference import block_recurrent as reference

from conftest import TRITON_TEST_DEVICE
from numerics import assert_within_rule

pytestmark = pytest.mark.usefixtures("on_triton_test_device")
BACKENDS = ["triton", "torch", "reference"]
op = fastseq.ops.block_recurrent_attention

# The family's share of the cross-cutting checks (tests/dispatch/test_registry.py).
ACROSS_OPS = {
    "test_autocast": {"block_recurrent_attention": ["test_under_autocast"],
                      "block_recurrent_gate": ["test_gate_under_autocast"]},
    "test_cuda_runtime": {"block_recurrent_attention": ["test_on_cuda"],
                          "block_recurrent_gate": ["test_gate_on_cuda"]},
    "test_numerics": {"block_recurrent_attention": ["test_scores_near_the_fp16_limit"],
                      "block_recurrent_gate": ["test_gate_saturates_without_overflow"]},
    "test_properties": {"block_recurrent_attention": ["test_any_window_and_grouping"],
                        "block_recurrent_gate": ["test_gate_equals_reference_for_any_shape"]},
    "test_strided_inputs": {"block_recurrent_attention": ["test_takes_strided_views"],
                            "block_recurrent_gate": ["test_gate_takes_strided_views"]},
}


def backend_or_skip(backend):
    if fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None and backend == "triton":
        pytest.skip("the Triton interpreter is off (a GPU run tests Triton on CUDA instead)")


def token_inputs(B=2, H=3, D=5, DV=4, W=7, pending=3, L=19, states=6, dtype=torch.float64):
    """The token direction: rows after W carried keys and `pending` keys of a block under way,
    windowed with the bias; part 2 reads one state per block (group)."""
    S = W + pending + L
    G = (pending + L - 1) // W + 1
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    tensors = [r(B, H, L, D), r(B, H, S, D), r(B, H, S, DV), r(B, H, L, D),
               r(B, H, G, states, D), r(B, H, G, states, DV), r(H, W + 1)]
    options = dict(window=W, group_size=W, group_offset=pending, scale=0.7, scale2=1.3)
    return tensors, options


def state_inputs(B=2, H=2, D=6, DV=6, states=9, window=14, dtype=torch.float64):
    """The state direction: the states among themselves, and against a window of tokens."""
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    tensors = [r(B, H, states, D), r(B, H, states, D), r(B, H, states, DV),
               r(B, H, states, D), r(B, H, 1, window, D), r(B, H, 1, window, DV)]
    return tensors, dict(scale=0.9, scale2=1.1)


def call(tensors, options, backend):
    if len(tensors) == 7:
        q, k, v, q2, k2, v2, bias = tensors
        return op(q, k, v, q2, k2, v2, bias=bias, **options, backend=backend)
    return op(*tensors, **options, backend=backend)


def outputs_and_grads(tensors, options, backend, weights=None):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outs = [o for o in call(leaves, options, backend) if o is not None]
    weights = weights or [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), leaves)
    return [o.detach() for o in outs] + list(grads), weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["tokens", "tokens-block-multiple", "tokens-W1", "states",
                                  "tokens-no-part2", "tokens-no-bias"])
def test_equals_reference_in_float64(case, backend):
    """Outputs and the gradients of every input (both parts' queries, keys and values, the
    bias) equal the reference's."""
    backend_or_skip(backend)
    if case == "states":
        tensors, options = state_inputs()
    elif case == "tokens-block-multiple":
        tensors, options = token_inputs(W=5, pending=0, L=20, states=4, H=2)
    elif case == "tokens-W1":
        tensors, options = token_inputs(W=1, pending=0, L=6, states=3)
    else:
        tensors, options = token_inputs()
        if case == "tokens-no-part2":
            tensors = tensors[:3] + [tensors[6]]
            options = dict(window=options["window"], scale=options["scale"])
        if case == "tokens-no-bias":
            tensors = tensors[:6]
    if case == "tokens-no-part2":
        q, k, v, bias = tensors
        run = lambda t, be: op(t[0], t[1], t[2], bias=t[3], **options, backend=be)  # noqa: E731
        leaves = [t.clone().requires_grad_() for t in tensors]
        out, out2 = run(leaves, backend)
        assert out2 is None
        w = torch.randn_like(out)
        got = [out] + list(torch.autograd.grad((out * w).sum(), leaves))
        ref_leaves = [t.clone().requires_grad_() for t in tensors]
        expected = run(ref_leaves, "reference")[0]
        expected = [expected] + list(torch.autograd.grad((expected * w).sum(), ref_leaves))
    else:
        expected, weights = outputs_and_grads(tensors, options, "reference")
        got, _ = outputs_and_grads(tensors, options, backend, weights)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.isfinite(g).all(), f"{i}: non-finite (an unwritten element reads NaN)"
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=lambda m: f"{i}: {m}")


def test_reference_is_the_windowed_softmax_written_out():
    """The reference against the definition, entry by entry: row i sees exactly the W keys
    before it (never itself), the bias at their distance; part 2 reads its row's group."""
    (q, k, v, q2, k2, v2, bias), options = token_inputs(B=1, H=1, W=3, pending=1, L=5)
    out, out2 = reference.block_recurrent_attention(q, k, v, q2, k2, v2, bias=bias, **options)
    L, S, W = q.shape[2], k.shape[2], options["window"]
    for i in range(L):
        keys = [j for j in range(S) if 1 <= i + S - L - j <= W]
        assert len(keys) == W
        scores = torch.stack([options["scale"] * q[0, 0, i] @ k[0, 0, j]
                              + bias[0, i + S - L - j] for j in keys])
        expected = torch.softmax(scores, 0) @ v[0, 0, keys]
        torch.testing.assert_close(out[0, 0, i], expected)
        g = (i + options["group_offset"]) // options["group_size"]
        expected2 = torch.softmax(options["scale2"] * k2[0, 0, g] @ q2[0, 0, i], 0) @ v2[0, 0, g]
        torch.testing.assert_close(out2[0, 0, i], expected2)


def test_relative_bucket_is_t5s_unidirectional_bucketing():
    """meliad's _relative_position_bucket (bidirectional=False): exact below 16, logarithmic to
    128, bucket 31 beyond; values computed by hand from its formula."""
    distance = torch.tensor([0, 1, 15, 16, 17, 20, 31, 32, 63, 64, 100, 127, 128, 1000])
    expected = [0, 1, 15, 16, 16, 17, 21, 21, 26, 26, 30, 31, 31, 31]
    assert reference.relative_bucket(distance).tolist() == expected
    assert reference.relative_bucket(torch.tensor([-5])).tolist() == [0]  # keys after: 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_no_visible_key_give_zeros(backend):
    """S == L with a window: row 0 has no key before it (the original's safe softmax attends
    to nothing); its output is zeros and every gradient finite."""
    backend_or_skip(backend)
    (q, k, v, _, _, _, bias), _ = token_inputs(pending=0, W=4, L=6)
    k, v = k[:, :, -6:], v[:, :, -6:]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out, _ = op(*leaves[:3], window=4, bias=leaves[3], backend=backend)
    assert (out[:, :, 0] == 0).all()
    grads = torch.autograd.grad(out.sum(), leaves)
    expected = reference.block_recurrent_attention(q, k, v, window=4, bias=bias)[0]
    torch.testing.assert_close(out, expected)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["tokens", "states"])
def test_tolerance_rule_against_plain_pytorch(case, dtype):
    """fp32 and bf16: within 2x plain PyTorch's error (the reference run in the dtype) of the
    float64 truth, outputs and gradients."""
    backend_or_skip("triton")
    tensors, options = token_inputs() if case == "tokens" else state_inputs()
    truth, weights = outputs_and_grads(tensors, options, "reference")
    low = [t.to(dtype) for t in tensors]
    weights_low = [w.to(dtype) for w in weights]
    plain, _ = outputs_and_grads(low, options, "reference", weights_low)
    fast, _ = outputs_and_grads(low, options, "triton", weights_low)
    keys = tensors[1].shape[2] + (tensors[4].shape[3] if len(tensors) > 3 else 0)
    for i, (f, p, t) in enumerate(zip(fast, plain, truth)):
        assert_within_rule(f"{case} {i} {dtype}", f, p, t, terms=keys)


class _LargestAllocation(TorchDispatchMode):
    """The largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_the_fused_path_holds_no_rows_by_keys_tensor(backend):
    """Forward and backward on triton allocate nothing as large as one head's scores
    (L x S): the window's scores and the state scores live in registers. The torch backend,
    the check's control, does (its mask is L x S)."""
    backend_or_skip(backend)
    tensors, options = token_inputs(B=1, H=1, D=4, DV=4, W=24, pending=5, L=40, states=30)
    leaves = [t.clone().requires_grad_() for t in tensors]
    L, S = leaves[0].shape[2], leaves[1].shape[2]
    with _LargestAllocation() as seen:
        out, out2 = call(leaves, options, backend)
        torch.autograd.grad(out.sum() + out2.sum(), leaves)
    scores = L * min(S, options["window"] + leaves[4].shape[3])
    if backend == "triton":
        assert seen.largest < scores, (seen.largest, scores)
    else:
        assert seen.largest >= L * S


def test_opcheck():
    backend_or_skip("triton")
    (q, k, v, q2, k2, v2, bias), options = token_inputs(dtype=torch.float32, L=9, W=4)
    forward = torch.ops.fastseq.block_recurrent_forward_triton
    args = (q, k, v, bias, q2, k2, v2, options["window"], options["group_size"],
            options["group_offset"], options["scale"], options["scale2"])
    torch.library.opcheck(forward, (q.requires_grad_(), *args[1:]))
    out, lse, out2, lse2 = forward(q.detach(), *args[1:])
    torch.library.opcheck(torch.ops.fastseq.block_recurrent_backward_triton,
                          (torch.randn_like(out), torch.randn_like(out2), q.detach(), k, v, bias,
                           q2, k2, v2, lse, lse2, torch.randn_like(lse), torch.randn_like(lse2),
                           *args[7:]))
    # part 1 alone (no bias): the empty stand-ins of part 2
    args = (q.detach(), k, v, None, None, None, None, None, 9, 0, 1.0, 1.0)
    torch.library.opcheck(forward, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    backend_or_skip("triton")
    tensors, options = token_inputs(dtype=torch.float32, L=9, W=4)
    leaves = [t.requires_grad_() for t in tensors]

    def loss(*t):
        out, out2 = call(list(t), options, "triton")
        return out.square().sum() + out2.sum()

    compiled = torch.compile(loss, backend=compiler, fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(loss(*leaves), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_under_autocast():
    """Under autocast the op runs in the autocast dtype, as SDPA does."""
    tensors, options = token_inputs(dtype=torch.float32, L=9, W=4)
    with torch.autocast(TRITON_TEST_DEVICE.type, dtype=torch.bfloat16):
        out, out2 = call(tensors, options, None)
    assert out.dtype == out2.dtype == torch.bfloat16
    expected = call([t.bfloat16() for t in tensors], options, None)
    torch.testing.assert_close(out, expected[0])
    torch.testing.assert_close(out2, expected[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda():
    """The compiled kernels on a GPU (bf16, head 64, windows of 64) against the float64
    reference on the CPU."""
    tensors, options = token_inputs(B=2, H=4, D=64, DV=64, W=64, pending=17, L=300, states=33,
                                    dtype=torch.float64)
    got = call([t.cuda().bfloat16() for t in tensors], options, "triton")
    expected = call(tensors, options, "reference")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu().double(), e, atol=2e-2, rtol=2e-2)


def test_scores_near_the_fp16_limit():
    """Scores of magnitude ~6e4 in fp16: the kernel's fp32 softmax stays finite and right."""
    backend_or_skip("triton")
    tensors, options = state_inputs(dtype=torch.float64)
    tensors = [t * 60 if i in (0, 1, 3, 4) else t for i, t in enumerate(tensors)]
    half = [t.half() for t in tensors]
    got = call(half, dict(options, scale=1.0, scale2=1.0), "triton")
    expected = call([t.double() for t in half], dict(options, scale=1.0, scale2=1.0),
                    "reference")
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), e, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("W,pending,L", [(1, 0, 1), (2, 1, 1), (3, 2, 17), (16, 15, 2),
                                         (17, 0, 34), (5, 4, 33)])
def test_any_window_and_grouping(W, pending, L):
    """Windows and pending tokens around the 16-row tiles: groups start mid-tile, a single row,
    a window of one key; outputs and gradients equal the reference."""
    backend_or_skip("triton")
    tensors, options = token_inputs(B=1, H=2, D=3, DV=2, W=W, pending=pending, L=L, states=5)
    expected, weights = outputs_and_grads(tensors, options, "reference")
    got, _ = outputs_and_grads(tensors, options, "triton", weights)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


def test_takes_strided_views():
    """q, k, v as head-split views of [B, N, H, D] projections (the layer's layout): read in
    place, equal to contiguous copies."""
    backend_or_skip("triton")
    (q, k, v, q2, k2, v2, bias), options = token_inputs(L=9, W=4)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, q2)]
    assert not views[0].is_contiguous()
    got = op(*views[:3], views[3], k2.transpose(3, 4).contiguous().transpose(3, 4), v2,
             bias=bias, **options, backend="triton")
    expected = op(q, k, v, q2, k2, v2, bias=bias, **options, backend="triton")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_vmap_equals_the_loop():
    backend_or_skip("triton")
    (q, k, v, q2, k2, v2, bias), options = token_inputs(B=3, L=9, W=4)

    def one(q, k, v, q2, k2, v2):
        out, out2 = op(q[None], k[None], v[None], q2[None], k2[None], v2[None], bias=bias,
                       **options, backend="triton")
        return out[0], out2[0]

    got = torch.func.vmap(one)(q, k, v, q2, k2, v2)
    expected = op(q, k, v, q2, k2, v2, bias=bias, **options, backend="triton")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def _bad(message, **changes):
    (q, k, v, q2, k2, v2, bias), options = token_inputs(L=9, W=4)
    args = dict(query=q, key=k, value=v, query2=q2, key2=k2, value2=v2, bias=bias, **options)
    args.update(changes)
    with pytest.raises(fastseq.ops._checks.InputError, match=message):
        op(**args)


def test_bad_inputs_are_refused_by_name():
    q, k, v = token_inputs(L=9, W=4)[0][:3]
    _bad("query must be 4-D", query=q[0])
    _bad("key must have shape", key=k[:, :2])
    _bad(r"key length 5 must be >= query length 9", key=k[:, :, :5], value=v[:, :, :5])
    _bad("window must be None or an int >= 1", window=0, bias=None)
    _bad(r"bias must have shape \[H, window \+ 1\]", bias=torch.randn(3, 4, dtype=torch.float64))
    _bad("bias is read per distance inside the window", window=None)
    _bad("query2, key2 and value2 go together", query2=None)
    _bad("key2 must hold one group per 5 rows: 2 groups", group_size=5, group_offset=0)
    _bad("group_offset must be an int in", group_offset=4)
    _bad("value must have dtype", value=v.float())
    _bad("key2 holds 3 groups: give group_size", group_size=None, group_offset=0)


# The recurrent state's gate: fastseq.ops.block_recurrent_gate.
gate = fastseq.ops.block_recurrent_gate


def gate_inputs(kind, shape=(2, 7, 11), dtype=torch.float64):
    state, y = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
    if kind == "bias":
        return [state, y], {"gate_bias": torch.randn(shape[-1], dtype=dtype)}
    return [state, y], {"forget": torch.randn(*shape, dtype=dtype),
                        "remember": torch.randn(*shape, dtype=dtype)}


def gate_outputs_and_grads(tensors, options, backend, weight=None):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    extra = {k: v.detach().clone().requires_grad_() for k, v in options.items()}
    out = gate(*leaves, **extra, backend=backend)
    weight = torch.randn_like(out) if weight is None else weight
    grads = torch.autograd.grad((out * weight).sum(), leaves + list(extra.values()))
    return [out.detach()] + list(grads), weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bias", "lstm"])
def test_gate_equals_reference_in_float64(kind, backend):
    """The next state and the gradients of state, y and the gate's parameters (gate_bias summed
    over rows; the LSTM gate's pre-activations) equal the reference's."""
    backend_or_skip(backend)
    tensors, options = gate_inputs(kind)
    expected, weight = gate_outputs_and_grads(tensors, options, "reference")
    got, _ = gate_outputs_and_grads(tensors, options, backend, weight)
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"{i}: {m}")


def test_gate_is_the_originals_formula():
    state, y, b = torch.randn(3, 4), torch.randn(3, 4), torch.randn(4)
    g = 1 / (1 + torch.exp(-b))
    torch.testing.assert_close(gate(state, y, gate_bias=b, backend="reference"),
                               g * state + (1 - g) * y)
    f, i = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(
        gate(state, y, forget=f, remember=i, backend="reference"),
        state / (1 + torch.exp(-(f + 1))) + y / (1 + torch.exp(-(i - 1))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bias", "lstm"])
def test_gate_tolerance_rule(kind, dtype):
    backend_or_skip("triton")
    tensors, options = gate_inputs(kind, shape=(3, 37, 45))
    truth, weight = gate_outputs_and_grads(tensors, options, "reference")
    low = [t.to(dtype) for t in tensors]
    low_options = {k: v.to(dtype) for k, v in options.items()}
    plain, _ = gate_outputs_and_grads(low, low_options, "reference", weight.to(dtype))
    fast, _ = gate_outputs_and_grads(low, low_options, "triton", weight.to(dtype))
    for i, (f, p, t) in enumerate(zip(fast, plain, truth)):
        assert_within_rule(f"gate {kind} {i} {dtype}", f, p, t,
                           terms=3 * 37 if kind == "bias" and i == 3 else 1)


def test_gate_opcheck():
    backend_or_skip("triton")
    for kind in ("bias", "lstm"):
        (state, y), options = gate_inputs(kind, dtype=torch.float32)
        args = (state, y, options.get("gate_bias"), options.get("forget"),
                options.get("remember"))
        torch.library.opcheck(torch.ops.fastseq.block_recurrent_gate_triton,
                              (state.requires_grad_(), *args[1:]))
        torch.library.opcheck(torch.ops.fastseq.block_recurrent_gate_backward_triton,
                              (torch.randn_like(y), state.detach(), *args[1:]))


def test_gate_compiles_fullgraph():
    backend_or_skip("triton")
    (state, y), options = gate_inputs("lstm", dtype=torch.float32)
    leaves = [state.requires_grad_(), y.requires_grad_()]
    fn = lambda s, y: gate(s, y, **options, backend="triton").square().sum()  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for g, e in zip(torch.autograd.grad(compiled(*leaves), leaves),
                    torch.autograd.grad(fn(*leaves), leaves)):
        torch.testing.assert_close(g, e)


def test_gate_under_autocast():
    (state, y), options = gate_inputs("bias", dtype=torch.float32)
    with torch.autocast(TRITON_TEST_DEVICE.type, dtype=torch.bfloat16):
        out = gate(state, y, **options)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, gate(state.bfloat16(), y.bfloat16(),
                                         gate_bias=options["gate_bias"].bfloat16()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gate_on_cuda():
    for kind in ("bias", "lstm"):
        tensors, options = gate_inputs(kind, shape=(2, 512, 1024))
        expected = gate(*tensors, **options, backend="reference")
        got = gate(*[t.cuda().bfloat16() for t in tensors],
                   **{k: v.cuda().bfloat16() for k, v in options.items()}, backend="triton")
        torch.testing.assert_close(got.cpu().double(), expected, atol=3e-2, rtol=2e-2)


def test_gate_saturates_without_overflow():
    """Pre-activations of +-1e4 (fp32) and +-6e4 (fp16): sigmoids reach 0 and 1, no NaN."""
    backend_or_skip("triton")
    for dtype, big in ((torch.float32, 1e4), (torch.float16, 6e4)):
        (state, y), options = gate_inputs("lstm", dtype=dtype)
        options = {k: torch.sign(v) * big for k, v in options.items()}
        got = gate(state, y, **options, backend="triton")
        expected = gate(state.double(), y.double(), **{k: v.double() for k, v in options.items()},
                        backend="reference")
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("shape", [(1,), (5,), (3, 1), (2, 3, 65), (0, 4), (4, 0)])
def test_gate_equals_reference_for_any_shape(shape):
    """Sizes around the interpreter's 64-element programs, empty ones included."""
    backend_or_skip("triton")
    for kind in ("bias", "lstm"):
        tensors, options = gate_inputs(kind, shape=shape)
        expected, weight = gate_outputs_and_grads(tensors, options, "reference")
        got, _ = gate_outputs_and_grads(tensors, options, "triton", weight)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_gate_takes_strided_views():
    backend_or_skip("triton")
    state = torch.randn(11, 2, 7, dtype=torch.float64).transpose(0, 1)
    y = torch.randn(2, 11, 14, dtype=torch.float64)[..., ::2]
    bias = torch.randn(14, dtype=torch.float64)[::2]
    assert not (state.is_contiguous() or y.is_contiguous() or bias.is_contiguous())
    torch.testing.assert_close(gate(state, y, gate_bias=bias, backend="triton"),
                               gate(state, y, gate_bias=bias, backend="reference"))


def test_gate_refuses_bad_inputs_by_name():
    (state, y), options = gate_inputs("lstm")
    with pytest.raises(fastseq.ops._checks.InputError, match="give gate_bias .* or both"):
        gate(state, y, gate_bias=torch.randn(11, dtype=torch.float64), **options)
    with pytest.raises(fastseq.ops._checks.InputError, match="give gate_bias .* or both"):
        gate(state, y, forget=options["forget"])
    with pytest.raises(fastseq.ops._checks.InputError, match="y must have shape"):
        gate(state, y[:, :3], **options)
    with pytest.raises(fastseq.ops._checks.InputError, match=r"gate_bias must have shape \[d\]"):
        gate(state, y, gate_bias=torch.randn(5, dtype=torch.float64))
    with pytest.raises(fastseq.ops._checks.InputError, match="forget must have dtype"):
        gate(state, y, forget=options["forget"].float(), remember=options["remember"])
