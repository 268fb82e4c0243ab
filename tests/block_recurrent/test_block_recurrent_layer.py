"""fastseq.nn.BlockRecurrentTransformerLayer and BlockRecurrentTransformerLM against the
original's block-by-block formulation (fastseq.reference.block_recurrent.layer_original) in
float64 on every backend: outputs, the final state and every gradient, for each gate and
configuration, with W and S odd and segments that are not a multiple of W; one long call equal
to the same tokens in pieces (one at a time included: the step protocol); causality; generation
equal to the teacher-forced forward; compile; bad memories refused by name."""
import copy
import itertools

import pytest
import torch

import fastseq
from fastseq.nn import BlockRecurrentMemory, BlockRecurrentTransformerLayer, BlockRecurrentTransformerLM
from fastseq.reference.block_recurrent import layer_original

from conftest import TRITON_TEST_DEVICE

pytestmark = pytest.mark.usefixtures("on_triton_test_device")
BACKENDS = ["triton", "torch", "reference"]
D_MODEL, HEADS, HEAD_DIM, MLP, WINDOW, STATES = 12, 2, 5, 16, 5, 3


def backend_or_skip(backend):
    if backend == "triton" and fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("the Triton interpreter is off (a GPU run tests Triton on CUDA instead)")


def make_layer(gate="bias", configuration="dual", states=STATES, backend=None):
    layer = BlockRecurrentTransformerLayer(D_MODEL, HEADS, HEAD_DIM, MLP, WINDOW, states,
                                           gate=gate, configuration=configuration,
                                           backend=backend, dtype=torch.float64)
    with torch.no_grad():  # a state that matters: away from its small initial values
        for name, p in layer.named_parameters():
            if "initial_state" in name or "gate_bias" in name:
                p.normal_(0, 1)
    return layer.eval()


def run_and_grads(layer, fn, x):
    x = x.clone().requires_grad_()
    y, state = fn(layer, x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
    loss = (y * weights).sum() + (state.sum() if state is not None else 0)
    params = [p for _, p in sorted(layer.named_parameters())]
    grads = torch.autograd.grad(loss, [x] + params, allow_unused=True)
    return [y.detach()] + ([state.detach()] if state is not None else []) + [
        g if g is not None else torch.zeros_like(p) for g, p in zip(grads, [x] + params)]


def fastseq_forward(layer, x):
    y, memory = layer(x)
    return y, memory.state


CONFIGS = list(itertools.product(["bias", "lstm"], ["dual", "single", "skip"])) + [("bias", "none")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate,configuration", CONFIGS)
def test_layer_equals_the_original_in_float64(gate, configuration, backend):
    """13 tokens in blocks of 5 (two complete, one partial), 3 states: output, final state and
    the gradients of the input and every parameter equal the original's block-by-block
    computation."""
    backend_or_skip(backend)
    states = 0 if configuration == "none" else STATES
    layer = make_layer(gate, "dual" if configuration == "none" else configuration, states,
                       backend)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    expected = run_and_grads(layer, layer_original, x)
    got = run_and_grads(layer, fastseq_forward, x)
    names = ["y"] + (["state"] if states else []) + ["x"] + sorted(
        n for n, _ in layer.named_parameters())
    for name, g, e in zip(names, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_the_state_and_the_window_reach_the_tokens():
    """Not vacuous: another initial state changes the tokens of the first blocks, and the
    tokens of one block change the next block's outputs only through the window and state."""
    layer = make_layer()
    x = torch.randn(1, 13, D_MODEL, dtype=torch.float64)
    y, _ = layer(x)
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.recurrence.initial_state.add_(1.0)
    assert (other(x)[0][:, :5] - y[:, :5]).abs().max() > 1e-3
    bias_changed = copy.deepcopy(layer)
    with torch.no_grad():
        bias_changed.relative_bias.add_(torch.randn_like(bias_changed.relative_bias))
    assert (bias_changed(x)[0] - y).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splits", [[13], [3, 1, 5, 4], [5, 5, 3], [1] * 13, [7, 6]])
def test_a_long_call_equals_the_same_tokens_in_pieces(splits, backend):
    """Memory carried between calls (the previous block, the block under way, the state):
    outputs and the final memory equal the long call's, whatever the pieces (one token at a
    time is the step protocol)."""
    backend_or_skip(backend)
    layer = make_layer(backend=backend)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    y, memory = layer(x)
    pieces, carried, start = [], layer.init_state(2), 0
    for n in splits:
        out, carried = layer.step(x[:, start:start + n], carried)
        pieces.append(out)
        start += n
    torch.testing.assert_close(torch.cat(pieces, 1), y, rtol=1e-9, atol=1e-10)
    for g, e in zip(carried, memory):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


def test_no_gradient_from_future_tokens():
    """Causality: y[:, t] depends on x[:, :t + 1] only, across blocks and the state."""
    layer = make_layer(backend="triton" if fastseq.backend.triton_unavailable(
        TRITON_TEST_DEVICE) is None else "torch")
    x = torch.randn(1, 12, D_MODEL, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    for t in (0, 4, 5, 9, 11):
        grad, = torch.autograd.grad(y[0, t].sum(), x, retain_graph=True)
        assert (grad[0, t + 1:] == 0).all(), t
        assert grad[0, :t + 1].abs().sum() > 0


def test_layer_compiles_fullgraph():
    backend_or_skip("triton")
    layer = make_layer(backend="triton").float()
    x = torch.randn(2, 13, D_MODEL, requires_grad=True)

    def loss(x):
        y, memory = layer(x)
        return y.square().sum() + memory.state.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x), x)[0]
    expected = torch.autograd.grad(loss(x), x)[0]
    torch.testing.assert_close(got, expected)


def test_layer_under_autocast():
    """bf16 autocast: the attention runs in bf16 (as SDPA's), the result close to fp32's."""
    layer = make_layer().float()
    x = torch.randn(2, 13, D_MODEL)
    with torch.autocast(TRITON_TEST_DEVICE.type, dtype=torch.bfloat16):
        y, _ = layer(x)
    torch.testing.assert_close(y.float(), layer(x)[0], atol=0.1, rtol=0.05)


def test_bad_memory_and_arguments_are_refused_by_name():
    layer = make_layer()
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    _, memory = layer(x)
    with pytest.raises(fastseq.ops._checks.InputError, match=r"memory.keys must be \[3, 2"):
        layer(torch.randn(3, 2, D_MODEL, dtype=torch.float64), memory)
    with pytest.raises(fastseq.ops._checks.InputError, match="memory must be a BlockRecurrentMemory"):
        layer(x, (memory.keys, memory.values))
    with pytest.raises(fastseq.ops._checks.InputError, match=r"memory.state must be \[batch=2"):
        layer(x, memory._replace(state=memory.state[:, :2]))
    with pytest.raises(fastseq.ops._checks.InputError, match="memory.state must be None"):
        make_layer(states=0)(x, memory)
    with pytest.raises(fastseq.ops._checks.InputError, match=r"x must be \[batch, tokens, d_model=12\]"):
        layer(torch.randn(2, 6, 7, dtype=torch.float64))
    with pytest.raises(fastseq.ops._checks.InputError, match="gate must be one of"):
        BlockRecurrentTransformerLayer(8, 2, 4, 8, 4, 2, gate="full")
    with pytest.raises(fastseq.ops._checks.InputError, match="window >= 1"):
        BlockRecurrentTransformerLayer(8, 2, 4, 8, 0, 2)


def make_lm(backend=None):
    torch.manual_seed(3)
    return BlockRecurrentTransformerLM(29, 3, D_MODEL, HEADS, HEAD_DIM, MLP, WINDOW, STATES,
                                       backend=backend, dtype=torch.float64).eval()


def test_lm_segments_and_steps_equal_the_long_call():
    """The LM's memory across segments (TXL-style, detached) and its step protocol: the
    log-probabilities of 17 tokens equal the one-call forward's."""
    lm = make_lm()
    tokens = torch.randint(0, 29, (2, 17))
    full, memory = lm(tokens)
    parts, carried = [], None
    for a, b in ((0, 6), (6, 7), (7, 17)):
        out, carried = lm(tokens[:, a:b], carried)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-10)
    state, steps = lm.init_state(2), []
    for t in range(17):
        out, state = lm.step(tokens[:, t:t + 1], state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-10)
    assert all(not m.keys.requires_grad for m in memory)


def test_lm_loss_is_the_cross_entropy_of_its_log_probabilities():
    lm = make_lm()
    tokens, targets = torch.randint(0, 29, (2, 11)), torch.randint(0, 29, (2, 11))
    loss, _ = lm(tokens, targets=targets)
    log_probs, _ = lm(tokens)
    expected = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(loss, expected)


def test_greedy_generation_equals_the_teacher_forced_argmax():
    """Each generated token is the argmax of the teacher-forced forward over the generated
    sequence (the states update at block boundaries, mid-generation here)."""
    lm = make_lm()
    prompt = torch.randint(0, 29, (2, 3))
    generated = lm.generate(prompt, 9)
    assert torch.equal(generated[:, :3], prompt)
    log_probs, _ = lm(generated)
    assert torch.equal(log_probs[:, 2:-1].argmax(-1), generated[:, 3:])


def test_lm_refuses_bad_arguments_by_name():
    lm = make_lm()
    with pytest.raises(fastseq.ops._checks.InputError, match="tokens must be integer ids"):
        lm(torch.randn(2, 3))
    with pytest.raises(fastseq.ops._checks.InputError, match="memory must hold one"):
        lm(torch.randint(0, 29, (2, 3)), lm.init_state(2)[:2])
    with pytest.raises(fastseq.ops._checks.InputError, match="recurrent_layers must index"):
        BlockRecurrentTransformerLM(29, 2, 8, 2, 4, 8, 4, 2, recurrent_layers=(5,))


def test_memory_is_a_named_tuple_of_the_documented_shapes():
    layer = make_layer()
    memory = layer.init_state(3)
    assert isinstance(memory, BlockRecurrentMemory)
    assert memory.keys.shape == (3, HEADS, WINDOW, HEAD_DIM)
    assert memory.state.shape == (3, STATES, D_MODEL)
    _, memory = layer(torch.randn(3, 7, D_MODEL, dtype=torch.float64), memory)
    assert memory.keys.shape == (3, HEADS, WINDOW + 2, HEAD_DIM)  # 2 tokens of the next block


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_the_fused_layer_holds_no_score_tensor(backend):
    """A layer's forward and backward on triton allocate nothing as large as half of the
    token scores (H x T x W, each row's window): activations are [B, T, d], keys
    [B, H, W + T, head_dim], the scores stay in the kernels' registers. The torch backend (SDPA
    with the window as an H x T x S mask, the control) does allocate them."""
    backend_or_skip(backend)
    from test_block_recurrent import _LargestAllocation
    layer = BlockRecurrentTransformerLayer(8, 4, 2, 8, 32, 32, backend=backend,
                                           dtype=torch.float64)
    x = torch.randn(1, 64, 8, dtype=torch.float64, requires_grad=True)
    with _LargestAllocation() as seen:
        y, memory = layer(x)
        torch.autograd.grad(y.sum() + memory.state.sum(), [x] + list(layer.parameters()))
    half_scores = 4 * 64 * 32 // 2
    if backend == "triton":
        assert seen.largest < half_scores, seen.largest
    else:
        assert seen.largest >= 2 * half_scores, seen.largest


def test_generate_refuses_bad_arguments_by_name():
    """The Transformer-XL LM's checks (one helper): prompt ids, count, sampling settings."""
    lm = make_lm()
    error = fastseq.ops._checks.InputError
    with pytest.raises(error, match=r"prompt must be integer token ids \[B, P >= 1\]"):
        lm.generate(torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(error, match="max_new_tokens must be an int >= 0"):
        lm.generate(torch.zeros(2, 1, dtype=torch.long), -1)
    with pytest.raises(error, match="sampling needs temperature > 0"):
        lm.generate(torch.zeros(2, 1, dtype=torch.long), 3, do_sample=True, temperature=0.0)
