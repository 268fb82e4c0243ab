"""fastseq.nn.MultiheadAttention and the Transformer layers against torch's, with the same
weights (state_dicts loaded both ways): outputs, attention weights and gradients of the inputs
and every parameter, on the Triton backend (interpreter) and on auto (torch's SDPA on CPU)."""
import pytest
import torch

import fastseq

from conftest import TRITON_TEST_DEVICE

pytestmark = pytest.mark.usefixtures("on_triton_test_device")

BACKENDS = ["triton", "auto"]


def backend_or_skip(name):
    if name == "triton" and fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("the Triton interpreter is off")
    return fastseq.use_backend(name)


def twin(torch_module, fastseq_class, *args, **kwargs):
    """A fastseq module with torch_module's weights (loaded through the state_dict)."""
    ours = fastseq_class(*args, **kwargs)
    ours.load_state_dict(torch_module.state_dict())
    return ours


def assert_same_forward_backward(theirs, ours, inputs, call):
    """call(module, *inputs) -> tensor or tuple; outputs and gradients of inputs and params."""
    leaves_a = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    leaves_b = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out_a, out_b = call(theirs, *leaves_a), call(ours, *leaves_b)
    out_a = out_a if isinstance(out_a, tuple) else (out_a,)
    out_b = out_b if isinstance(out_b, tuple) else (out_b,)
    for a, b in zip(out_a, out_b):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)
    loss_a = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out_a if o is not None)
    loss_b = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out_b if o is not None)
    params_a, params_b = list(theirs.parameters()), list(ours.parameters())
    grads_a = torch.autograd.grad(loss_a, [t for t in leaves_a if t.requires_grad] + params_a)
    grads_b = torch.autograd.grad(loss_b, [t for t in leaves_b if t.requires_grad] + params_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_with_padding_and_float_mask(backend, batch_first):
    N, L, E, H = 3, 13, 24, 4
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=batch_first)
    ours = twin(theirs, fastseq.nn.MultiheadAttention, E, H, batch_first=batch_first)
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1, 9:] = True
    padding[2, 4:] = True
    mask = torch.randn(L, L)

    def call(m, x, mask):
        return m(x, x, x, key_padding_mask=padding, attn_mask=mask, need_weights=False)

    with backend_or_skip(backend):
        assert_same_forward_backward(theirs, ours, (x, mask), call)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_kdim_vdim_bias_kv_zero_attn(backend):
    N, L, S, E, H = 2, 7, 11, 16, 2
    kwargs = dict(kdim=10, vdim=6, add_bias_kv=True, add_zero_attn=True, batch_first=True)
    theirs = torch.nn.MultiheadAttention(E, H, **kwargs)
    ours = twin(theirs, fastseq.nn.MultiheadAttention, E, H, **kwargs)
    assert "q_proj_weight" in dict(ours.named_parameters()) and ours.bias_k is not None
    q, k, v = torch.randn(N, L, E), torch.randn(N, S, 10), torch.randn(N, S, 6)
    mask = torch.rand(N * H, L, S) < 0.3  # bool, True = hidden (torch's convention)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[0, -3:] = True

    def call(m, q, k, v):
        return m(q, k, v, key_padding_mask=padding, attn_mask=mask, need_weights=False)

    with backend_or_skip(backend):
        assert_same_forward_backward(theirs, ours, (q, k, v), call)


@pytest.mark.parametrize("average", [True, False])
def test_need_weights_returns_torchs_weights(average):
    N, L, E, H = 2, 6, 12, 3
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True)
    ours = twin(theirs, fastseq.nn.MultiheadAttention, E, H, batch_first=True)
    x, mem = torch.randn(N, L, E), torch.randn(N, L + 2, E)
    padding = torch.zeros(N, L + 2)
    padding[1, -2:] = float("-inf")  # a float key_padding_mask

    def call(m, x, mem):
        return m(x, mem, mem, key_padding_mask=padding, average_attn_weights=average)

    assert_same_forward_backward(theirs, ours, (x, mem), call)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_and_causal_hint(backend):
    L, E, H = 9, 8, 2
    theirs = torch.nn.MultiheadAttention(E, H)
    ours = twin(theirs, fastseq.nn.MultiheadAttention, E, H)
    x = torch.randn(L, E)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)

    def call(m, x):
        return m(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)

    with backend_or_skip(backend):
        assert_same_forward_backward(theirs, ours, (x,), call)


def test_state_dict_both_ways_and_fully_masked_rows_give_zeros():
    theirs = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    ours = fastseq.nn.MultiheadAttention(8, 2, batch_first=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 8)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1] = True  # the second sequence hides every key: torch gives NaN, fastseq zeros
    out, _ = ours(x, x, x, key_padding_mask=padding, need_weights=False)
    bias_only = ours.out_proj.bias.expand(5, 8)
    torch.testing.assert_close(out[1], bias_only)


def test_errors_name_the_argument():
    m = fastseq.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) = \[5, 5\]"):
        m(x, x, x, attn_mask=torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(N, S\) = \[2, 5\]"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_dim 8"):
        m(torch.randn(2, 5, 6), x, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch(backend, norm_first):
    kwargs = dict(d_model=16, nhead=4, dim_feedforward=32, dropout=0.0, activation="gelu",
                  batch_first=True, norm_first=norm_first)
    torch.manual_seed(1)
    theirs = torch.nn.TransformerEncoderLayer(**kwargs)
    torch.manual_seed(1)
    ours = fastseq.nn.TransformerEncoderLayer(**kwargs)
    for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b), "the same seed gives torch's initial weights"
    x = torch.randn(3, 10, 16)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[0, 6:] = True

    def call(m, x):
        return m(x, src_key_padding_mask=padding)

    with backend_or_skip(backend):
        assert_same_forward_backward(theirs, ours, (x,), call)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_layer_seq2seq_matches_torch(backend):
    kwargs = dict(d_model=16, nhead=2, dim_feedforward=24, dropout=0.0, batch_first=False)
    theirs = torch.nn.TransformerDecoderLayer(**kwargs)
    ours = twin(theirs, fastseq.nn.TransformerDecoderLayer, **kwargs)
    tgt, memory = torch.randn(7, 2, 16), torch.randn(12, 2, 16)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(7)
    memory_padding = torch.zeros(2, 12, dtype=torch.bool)
    memory_padding[1, 8:] = True

    def call(m, tgt, memory):
        return m(tgt, memory, tgt_mask=tgt_mask, memory_key_padding_mask=memory_padding,
                 tgt_is_causal=True)

    with backend_or_skip(backend):
        assert_same_forward_backward(theirs, ours, (tgt, memory), call)


def test_dropout_is_applied_in_training_only():
    m = fastseq.nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
    x = torch.randn(2, 6, 8)
    m.eval()
    a, _ = m(x, x, x, need_weights=False)
    b, _ = m(x, x, x, need_weights=False)
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(3)
    c, _ = m(x, x, x, need_weights=False)
    torch.manual_seed(3)
    d, _ = m(x, x, x, need_weights=False)
    assert torch.equal(c, d) and not torch.allclose(a, c)


def test_compile_fullgraph_encoder_decoder():
    """A small seq2seq step (encoder layer, decoder layer with causal self-attention and
    cross-attention) under torch.compile(fullgraph=True) on the Triton path."""
    if fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("the Triton interpreter is off")
    enc = fastseq.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    dec = fastseq.nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    src, tgt = torch.randn(2, 9, 16), torch.randn(2, 5, 16)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True

    def step(src, tgt):
        memory = enc(src, src_key_padding_mask=padding)
        return dec(tgt, memory, memory_key_padding_mask=padding, tgt_is_causal=True).sum()

    params = list(enc.parameters()) + list(dec.parameters())
    with fastseq.use_backend("triton"):
        torch._dynamo.reset()
        eager = torch.autograd.grad(step(src, tgt), params)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(src, tgt), params)
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_projects_with_one_gemm(batch_first, monkeypatch):
    """query is key is value: one F.linear for q, k and v (plus the output projection), in
    either layout."""
    m = fastseq.nn.MultiheadAttention(8, 2, batch_first=batch_first)
    x = torch.randn(2, 5, 8)
    calls = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda *a, **k: calls.append(a[1].shape) or real_linear(*a, **k))
    m(x, x, x, need_weights=False)
    assert calls == [torch.Size([24, 8]), torch.Size([8, 8])]


def test_input_errors_name_the_argument():
    """Widths, lengths, dtypes and mask dtypes checked in the module's own terms before any
    projection (F.linear or the op would report them on projected, per-head shapes)."""
    m = fastseq.nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=5)
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    cases = [
        ((q, torch.randn(2, 4, 8), v), {}, r"key must have kdim 6 features in its last dim"),
        ((q, k, torch.randn(2, 4, 6)), {}, r"value must have vdim 5 features in its last dim"),
        ((q[..., :7], k, v), {}, r"query must have embed_dim 8 features"),
        ((q, k, torch.randn(2, 5, 5)), {}, r"key and value must have the same batch and length"),
        ((q, torch.randn(3, 4, 6), torch.randn(3, 4, 5)), {}, r"key must have the query's batch 2"),
        ((q.double(), k, v), {}, r"query is torch.float64 on cpu, the module's parameters are "
                                 r"torch.float32"),
        ((q, k, v), dict(attn_mask=torch.zeros(3, 4, dtype=torch.int64)),
         r"attn_mask must be bool \(True hides\) or floating"),
        ((q, k, v), dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.int32)),
         r"key_padding_mask must be bool"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match="fastseq.nn.MultiheadAttention: " + message):
            m(*args, need_weights=False, **kwargs)


# ---- the module's extras: window, soft-capping, ALiBi, sinks (issue 27) ----

EXTRAS = {"window": (3, 0), "softcap": 4.0, "alibi_slopes": [0.25, 0.5], "sinks": True}


def extras_module(**kwargs):
    torch.manual_seed(0)
    mha = fastseq.nn.MultiheadAttention(8, 2, batch_first=True, **EXTRAS, **kwargs).double()
    with torch.no_grad():
        mha.sinks.copy_(torch.tensor([0.5, -1.0]))
    return mha


@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
def test_extras_fused_path_equals_the_weights_path_and_the_reference(backend):
    """need_weights=False (fastseq.ops.attention with the extras) equals need_weights=True
    (plain PyTorch) and the float64 reference on the module's own projections; the sinks'
    parameter gets its gradient through the fused path as through plain PyTorch."""
    mha = extras_module()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, :2] = True
    with backend_or_skip(backend):
        fused = mha(x, x, x, key_padding_mask=pad, need_weights=False, is_causal=False)[0]
        grad_fused = torch.autograd.grad(fused.square().sum(), mha.sinks)[0]
    weighted, weights = mha(x, x, x, key_padding_mask=pad, need_weights=True)
    grad_weighted = torch.autograd.grad(weighted.square().sum(), mha.sinks)[0]
    torch.testing.assert_close(fused, weighted, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_fused, grad_weighted, atol=1e-12, rtol=1e-12)
    assert (weights.sum(-1) < 1).all()  # the sinks take their share of every row
    q, k, v = (t.view(2, 7, 2, 4).transpose(1, 2) for t in
               torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
    heads = fastseq.reference.scaled_dot_product_attention(
        q, k, v, ~pad.view(2, 1, 1, 7), window=(3, 0), softcap=4.0,
        alibi_slopes=torch.tensor([0.25, 0.5], dtype=torch.float64), sinks=mha.sinks)
    expected = mha.out_proj(heads.transpose(1, 2).reshape(2, 7, 8))
    torch.testing.assert_close(fused, expected, atol=1e-12, rtol=1e-12)


def test_extras_keep_torchs_state_dict_keys_but_the_sinks():
    """alibi_slopes is a non-persistent buffer; sinks=True adds one parameter, 'sinks'. A module
    without extras loads torch's state_dict as before."""
    torch_keys = set(torch.nn.MultiheadAttention(8, 2).state_dict())
    assert set(fastseq.nn.MultiheadAttention(8, 2, alibi_slopes=[1.0, 2.0]).state_dict()) \
        == torch_keys
    assert set(extras_module().state_dict()) == torch_keys | {"sinks"}
    with pytest.raises(fastseq.InputError, match="alibi_slopes must have num_heads = 2"):
        fastseq.nn.MultiheadAttention(8, 2, alibi_slopes=[1.0])


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_extras_steps_equal_the_causal_forward(backend):
    """Decoding with the extras (the window as the step's window, soft-capping, ALiBi and the
    sinks through attention_with_kv_cache) equals the module's causal forward."""
    mha = extras_module().eval()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    with backend_or_skip(backend), torch.no_grad():
        expected = mha(x, x, x, is_causal=True, need_weights=False,
                       attn_mask=torch.ones(6, 6, dtype=torch.bool).triu(1))[0]
        state = mha.init_state(2, capacity=8)
        pieces = []
        for begin, end in ((0, 3), (3, 4), (4, 6)):
            out, state = mha.step(x[:, begin:end], state)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), expected, rtol=1e-12, atol=1e-12)
