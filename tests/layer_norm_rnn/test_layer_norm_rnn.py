"""Layer-normalized LSTM/GRU: the fused Triton recurrence (through the interpreter on CPU)
against the float64 reference (outputs, final states and the gradients of the input, the states
and every parameter, gains included), gradcheck, opcheck, compile, determinism, the layer norm's
scale invariance, the nn layers (parameters, state_dict, packed/padded/unbatched input) and the
errors."""
import statistics

import pytest
import torch

import fastseq
from fastseq.nn import LayerNormGRU, LayerNormLSTM
from fastseq.reference import layer_norm_rnn as reference

from numerics import assert_within_rule, max_error
from recurrent_cases import parameter_gradient_terms

NAMES = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih_weight", "ln_hh_weight",
         "ln_c_weight", "ln_c_bias"]
triton_or_skip = pytest.mark.skipif(fastseq.backend.triton_unavailable(torch.device("cpu")) is not None,
                                    reason="the Triton interpreter is off")


def make_leaves(mode, T, B, I, H, bias=True):
    """float64 leaves in NAMES order (None where the mode or `bias` has none); gains around 1 and
    shifts around 0, but not exactly, so that every gradient term counts."""
    g, k = {"lstm": 4, "gru": 3}[mode], H ** -0.5
    lstm = mode == "lstm"

    def rand(*shape, s=1.0, at=0.0):
        return at + (torch.rand(*shape, dtype=torch.float64) * 2 - 1) * s

    return [rand(T, B, I), rand(B, H), rand(B, H) if lstm else None, rand(g * H, I, s=k),
            rand(g * H, H, s=k), rand(g * H, s=k) if bias else None, rand(g * H, s=k) if bias else None,
            rand(g * H, s=0.3, at=1.0), rand(g * H, s=0.3, at=1.0),
            rand(H, s=0.3, at=1.0) if lstm else None, rand(H, s=0.3) if lstm else None]


def call(mode, leaves, backend, lengths=None, reverse=False, eps=reference.EPS):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, a_ih, a_hh, a_c, b_c = leaves
    hx = (h0, c0) if mode == "lstm" else h0
    y, h_n = fastseq.ops.layer_norm_rnn_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh, a_ih, a_hh, a_c,
                                              b_c, lengths=lengths, reverse=reverse, eps=eps,
                                              backend=backend)
    return [y] + (list(h_n) if mode == "lstm" else [h_n])


def run(mode, leaves64, dtype, backend, lengths, reverse, grad_outputs):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in leaves64]
    outs = call(mode, leaves, backend, lengths, reverse)
    loss = sum((o.double() * go).sum() for o, go in zip(outs, grad_outputs))
    present = [t for t in leaves if t is not None]
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, present))


@triton_or_skip
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("shape", [(6, 5, 3, 20), (5, 17, 4, 20), (1, 2, 3, 33)],
                         ids=["T6-B5-H20", "T5-B17-H20", "T1-B2-H33"])
@pytest.mark.parametrize("variant", ["forward", "reverse-lengths", "forward-lengths-nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_triton_matches_reference(mode, shape, variant, dtype):
    T, B, I, H = shape
    reverse = variant.startswith("reverse")
    lengths = [T - (i * 5) % T for i in range(B)] if "lengths" in variant else None
    if lengths is not None and B > 2:
        lengths[2] = 0  # a row with no steps keeps its initial state
    leaves64 = make_leaves(mode, T, B, I, H, bias="nobias" not in variant)
    grad_outputs = [torch.randn(T, B, H, dtype=torch.float64)] + \
        [torch.randn(B, H, dtype=torch.float64) for _ in range(2 if mode == "lstm" else 1)]
    ref_outs, ref_grads = run(mode, leaves64, torch.float64, "reference", lengths, reverse, grad_outputs)
    plain_outs, plain_grads = run(mode, leaves64, dtype, "reference", lengths, reverse, grad_outputs)
    outs, grads = run(mode, leaves64, dtype, "triton", lengths, reverse, grad_outputs)
    for name, o, p, r in zip(["y", "h_n", "c_n"], outs, plain_outs, ref_outs):
        assert o.dtype == dtype
        assert_within_rule(f"{mode} {name}", o, p, r)
    names = [n for n, t in zip(NAMES, leaves64) if t is not None]
    for name, g, p, r in zip(names, grads, plain_grads, ref_grads):
        assert_within_rule(f"{mode} grad {name}", g, p, r,
                           terms=parameter_gradient_terms(name, leaves64[0], leaves64[4]))


@triton_or_skip
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_accuracy_on_a_narrow_layer_norm(mode, dtype):
    """H=5: the layer norms span 15-20 and 5 values, and one random draw's errors swing 5-15x
    either way with the rounding order alone (20 draws, fp32: the ratio of fastseq's error to
    plain PyTorch's had medians 0.8-1.2 and maxima up to 15 per output; a two-pass layer norm
    written in plain PyTorch moves as much against torch's own). So the tolerance rule is
    applied to the typical draw: over 12 draws, the median ratio of every output and gradient
    (over 6, the fp32 LSTM c0 median was 2.06 with numpy 2.4.6: the median of so few draws
    still swung with the summation order of the interpreter's numpy)."""
    T, B, H = 7, 17, 5
    lengths = [T - (i * 5) % T for i in range(B)]
    ratios = []
    for seed in range(12):
        torch.manual_seed(seed)
        leaves64 = make_leaves(mode, T, B, 4, H)
        grad_outputs = [torch.randn(T, B, H, dtype=torch.float64)] + \
            [torch.randn(B, H, dtype=torch.float64) for _ in range(2 if mode == "lstm" else 1)]
        ref = run(mode, leaves64, torch.float64, "reference", lengths, True, grad_outputs)
        plain = run(mode, leaves64, dtype, "reference", lengths, True, grad_outputs)
        fast = run(mode, leaves64, dtype, "triton", lengths, True, grad_outputs)
        ratios.append([max_error(f, r) / max(max_error(p, r), 1e-30)
                       for f, p, r in zip(fast[0] + fast[1], plain[0] + plain[1], ref[0] + ref[1])])
    names = ["y", "h_n"] + (["c_n"] if mode == "lstm" else []) + \
        [n for n, t in zip(NAMES, make_leaves(mode, 1, 1, 1, 1)) if t is not None]
    for name, column in zip(names, zip(*ratios)):
        assert statistics.median(column) <= 2.0, f"{mode} {name}: error ratios {column}"


@triton_or_skip
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_hidden_size_one_float64(mode):
    """H=1: the recurrent layer norm spans only G values and the cell state's a single one
    (normalized to 0, so h = o tanh(b_c)). In fp32 such a tiny layer norm is so ill-conditioned
    that rounding order alone moves errors 10x (a two-pass LN in plain PyTorch does the same
    against torch's), so it is checked in float64, to rounding."""
    T, B = 7, 17
    leaves64 = make_leaves(mode, T, B, 4, 1)
    grad_outputs = [torch.randn(T, B, 1, dtype=torch.float64)] + \
        [torch.randn(B, 1, dtype=torch.float64) for _ in range(2 if mode == "lstm" else 1)]
    lengths = [T - (i * 5) % T for i in range(B)]
    ref_outs, ref_grads = run(mode, leaves64, torch.float64, "reference", lengths, True, grad_outputs)
    outs, grads = run(mode, leaves64, torch.float64, "triton", lengths, True, grad_outputs)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@triton_or_skip
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gradcheck_float64(mode):
    leaves = [t.requires_grad_() if t is not None else None for t in make_leaves(mode, 4, 3, 2, 3)]
    present = [i for i, t in enumerate(leaves) if t is not None]

    def f(*args):
        full = list(leaves)
        for i, a in zip(present, args):
            full[i] = a
        return tuple(call(mode, full, "triton", lengths=[4, 2, 3], reverse=True))

    # fast_mode: a random projection of the Jacobian (the full one took 60 s through the
    # interpreter); every gradient is also compared with the reference's in float64 above.
    assert torch.autograd.gradcheck(f, [leaves[i] for i in present], eps=1e-6, atol=1e-6,
                                    fast_mode=True)


@triton_or_skip
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_opcheck(mode):
    leaves = make_leaves(mode, 3, 2, 2, 5)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, a_ih, a_hh, a_c, b_c = leaves
    gates_x = reference.input_gates(x, w_ih, b_ih, a_ih).detach().requires_grad_()
    lengths = torch.tensor([3, 1], dtype=torch.int32)
    args = (mode, gates_x, h0.requires_grad_(), c0, w_hh.requires_grad_(), b_hh, a_hh, a_c, b_c,
            lengths, 1e-5, True, True)
    torch.library.opcheck(torch.ops.fastseq.layer_norm_rnn_layer_forward_triton, args)
    y, h_n, c_n, ws, stats = torch.ops.fastseq.layer_norm_rnn_layer_forward_triton(*args)
    backward_args = (mode, torch.randn_like(y), torch.randn_like(h_n),
                     torch.randn_like(c_n) if mode == "lstm" else None, h0, c0, w_hh, a_hh, a_c, b_c,
                     y, ws, stats, lengths, True)
    torch.library.opcheck(torch.ops.fastseq.layer_norm_rnn_layer_backward_triton,
                          tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in backward_args))


@triton_or_skip
def test_forward_without_workspace_cannot_be_differentiated():
    leaves = make_leaves("gru", 3, 2, 2, 4)
    x, h0, _, w_ih, w_hh, b_ih, b_hh, a_ih, a_hh, _, _ = leaves
    gates_x = reference.input_gates(x, w_ih, b_ih, a_ih)
    y, h_n, _, ws, stats = torch.ops.fastseq.layer_norm_rnn_layer_forward_triton(
        "gru", gates_x, h0, None, w_hh, b_hh, a_hh, None, None, None, 1e-5, False, False)
    assert ws.numel() == 0 and stats.numel() == 0
    with pytest.raises(RuntimeError, match="save_workspace=False"):
        torch.ops.fastseq.layer_norm_rnn_layer_backward_triton(
            "gru", y, h_n, None, h0, None, w_hh, a_hh, None, None, y, ws, stats, None, False)


@triton_or_skip
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_deterministic(mode):
    leaves = [t.float().requires_grad_() if t is not None else None for t in make_leaves(mode, 5, 18, 3, 9)]
    present = [t for t in leaves if t is not None]

    def once():
        outs = call(mode, leaves, "triton", lengths=[5 - i % 5 for i in range(18)])
        grads = torch.autograd.grad(sum(o.sum() for o in outs), present)
        return [o.detach() for o in outs] + list(grads)

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=triton_or_skip)])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_recurrent_scale_invariance(mode, backend):
    """The recurrent projection is layer-normalized: scaling W_hh (without its bias) changes
    nothing but through eps; with a tiny eps the outputs agree to rounding."""
    leaves = make_leaves(mode, 5, 3, 2, 6)
    scaled = list(leaves)
    scaled[4] = leaves[4] * 7.5
    a = call(mode, leaves, backend, eps=1e-12)
    b = call(mode, scaled, backend, eps=1e-12)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
    assert (call(mode, scaled, backend)[0] - a[0]).abs().max() > 1e-9  # and it is a real check


# -- nn layers -------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, gates", [(LayerNormLSTM, 4), (LayerNormGRU, 3)])
def test_parameters_and_state_dict(cls, gates):
    m = cls(5, 7, num_layers=2, bidirectional=True, bias=True)
    torch_cls = torch.nn.LSTM if gates == 4 else torch.nn.GRU
    plain = torch_cls(5, 7, num_layers=2, bidirectional=True)
    extra = set(m.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(m.state_dict())
    want = {f"{n}_l{layer}{d}" for layer in range(2) for d in ("", "_reverse")
            for n in ("ln_ih_weight", "ln_hh_weight") + (("ln_c_weight", "ln_c_bias") if gates == 4 else ())}
    assert extra == want
    for name in want:
        value = m.state_dict()[name]
        assert value.shape == ((gates * 7,) if "ln_ih" in name or "ln_hh" in name else (7,))
        assert torch.equal(value, torch.ones_like(value) if "weight" in name else torch.zeros_like(value))
    # torch's weights load into it (the gains keep their initial values), and its state_dict
    # loads into a fresh one in full.
    missing, unexpected = m.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == want and not unexpected
    assert torch.equal(m.weight_hh_l1_reverse, plain.weight_hh_l1_reverse)
    with torch.no_grad():
        m.ln_hh_weight_l0.mul_(2.0)
    other = cls(5, 7, num_layers=2, bidirectional=True)
    other.load_state_dict(m.state_dict())
    assert torch.equal(other.ln_hh_weight_l0, m.ln_hh_weight_l0)
    m.reset_parameters()
    assert torch.equal(m.ln_hh_weight_l0, torch.ones(gates * 7))
    assert m.weight_hh_l0.abs().max() <= 7 ** -0.5  # torch's uniform init for the rest


def _module_pair(cls, **kwargs):
    torch.manual_seed(1)
    m = cls(4, 6, dtype=torch.float64, **kwargs)
    with torch.no_grad():  # gains and shifts away from 1 and 0
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(torch.rand_like(p) * 0.4 - 0.2)
    return m


@triton_or_skip
@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
@pytest.mark.parametrize("layout", ["padded-batch_first", "packed", "unbatched", "lengths"])
def test_layer_triton_matches_reference(cls, layout):
    m = _module_pair(cls, num_layers=2, bidirectional=True, batch_first=layout == "padded-batch_first",
                     dropout=0.0)
    x = torch.randn(5, 3, 4, dtype=torch.float64)  # [T, B, I] (batch-first for that layout)
    lstm = cls is LayerNormLSTM
    kwargs = {}
    if layout == "packed":
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 2, 4], enforce_sorted=False)
    elif layout == "unbatched":
        inp = x[:, 0]
    else:
        inp = x
        kwargs = {"lengths": [5, 2, 4]} if layout == "lengths" else {}

    def outputs(backend):
        m.backend = backend
        m.zero_grad()
        out, state = m(inp, **kwargs)
        data = out.data if layout == "packed" else out
        states = list(state) if lstm else [state]
        (data.sum() + sum((s * s).sum() for s in states)).backward()
        return [data.detach()] + [s.detach() for s in states] + \
            [p.grad.clone() for p in m.parameters()]

    for a, b in zip(outputs("reference"), outputs("triton")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@triton_or_skip
def test_compiles_with_fullgraph():
    m = _module_pair(LayerNormLSTM, num_layers=2)
    m.backend = "triton"
    head = torch.nn.Linear(6, 2, dtype=torch.float64)
    x = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters()) + list(head.parameters())

    def loss_fn(inp):
        return head(m(inp, lengths=[4, 1, 3])[0]).square().sum()

    torch._dynamo.reset()
    eager = loss_fn(x)
    eager_grads = torch.autograd.grad(eager, [x] + params)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x)
    grads = torch.autograd.grad(compiled, [x] + params)
    torch.testing.assert_close(compiled, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# -- errors ----------------------------------------------------------------------------------

def test_errors_name_the_argument():
    leaves = make_leaves("lstm", 3, 2, 2, 4)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, a_ih, a_hh, a_c, b_c = leaves
    op = fastseq.ops.layer_norm_rnn_layer
    with pytest.raises(fastseq.InputError, match=r"ln_hh_weight must have shape \[4\*hidden_size\] = \[16\], got \[12\]"):
        op("lstm", x, (h0, c0), w_ih, w_hh, b_ih, b_hh, a_ih, a_hh[:12], a_c, b_c)
    with pytest.raises(fastseq.InputError, match="ln_c_bias is required for the lstm"):
        op("lstm", x, (h0, c0), w_ih, w_hh, b_ih, b_hh, a_ih, a_hh, a_c, None)
    with pytest.raises(fastseq.InputError, match="ln_c_weight must have dtype torch.float64"):
        op("lstm", x, (h0, c0), w_ih, w_hh, b_ih, b_hh, a_ih, a_hh, a_c.float(), b_c)
    with pytest.raises(fastseq.InputError, match="eps must be a positive number"):
        op("lstm", x, (h0, c0), w_ih, w_hh, b_ih, b_hh, a_ih, a_hh, a_c, b_c, eps=0.0)
    with pytest.raises(fastseq.InputError, match="mode must be one of lstm, gru"):
        op("rnn_tanh", x, h0, w_ih, w_hh, b_ih, b_hh, a_ih, a_hh)
    g = make_leaves("gru", 3, 2, 2, 4)
    with pytest.raises(fastseq.InputError, match="ln_c_weight is for the lstm's cell state"):
        op("gru", g[0], g[1], *g[3:9], torch.ones(4, dtype=torch.float64), None)
    with pytest.raises(fastseq.BackendError, match="backend 'torch' cannot run this call: torch "
                                                   "and cuDNN have no layer-normalized RNN"):
        op("gru", g[0], g[1], *g[3:9], backend="torch")
    with pytest.raises(fastseq.BackendError, match="torch and cuDNN have no layer-normalized RNN"):
        LayerNormGRU(2, 4, backend="torch")(torch.randn(3, 1, 2))
    with pytest.raises(ValueError, match="proj_size is not supported"):
        LayerNormLSTM(2, 4, proj_size=2)
