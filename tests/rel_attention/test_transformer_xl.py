"""fastseq's Transformer-XL layers and model against the original code's formulation (the
einsums, _rel_shift and dec_attn_mask of kimiyoung/transformer-xl, as
fastseq.reference.rel_attention_original writes them), in float64 on the Triton backend
(interpreter): outputs and gradients of the attention layer (memory, pre_lnorm, same_length,
the original's mask tensors), the model over several segments with its memory (clamp_len,
same_length, ext_len, untied biases, batch_first), state_dict names, errors, torch.compile."""
import pytest
import torch

import fastseq
from fastseq import reference
from fastseq.nn import RelPartialLearnableMultiHeadAttn, TransformerXL, TransformerXLLayer

from conftest import TRITON_TEST_DEVICE

pytestmark = pytest.mark.usefixtures("on_triton_test_device")

H, DH, DM = 2, 8, 16


def triton_backend():
    if fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("the Triton interpreter is off")
    return fastseq.use_backend("triton")


def original_attention(m, w, r, r_w_bias, r_r_bias, mems=None, same_length=False, mem_len=0):
    """The original RelPartialLearnableMultiHeadAttn.forward in eval mode, with the original's
    causal (and same_length) dec_attn_mask; r [klen, d_model] by distance klen-1 ... 0."""
    qlen, bsz = w.shape[:2]
    cat = w if mems is None else torch.cat([mems, w], 0)
    w_heads = m.qkv_net(m.layer_norm(cat) if m.pre_lnorm else cat)
    q, k, v = torch.chunk(w_heads, 3, dim=-1)
    q = q[-qlen:]

    def heads(t):
        return t.reshape(t.shape[0], bsz, m.n_head, m.d_head).permute(1, 2, 0, 3)

    r_head_k = m.r_net(r).view(r.shape[0], m.n_head, m.d_head)
    out = reference.rel_attention_original(heads(q), heads(k), heads(v), r_head_k, r_w_bias,
                                           r_r_bias, same_length=same_length, mem_len=mem_len,
                                           scale=m.scale)
    attn_out = m.o_net(out.permute(2, 0, 1, 3).reshape(qlen, bsz, m.n_head * m.d_head))
    return w + attn_out if m.pre_lnorm else m.layer_norm(w + attn_out)


def original_mask(qlen, klen, same_length=False, mem_len=0):
    """The original's dec_attn_mask [qlen, klen, 1] (1 = hidden)."""
    ones = torch.ones(qlen, klen)
    mlen = klen - qlen
    mask = torch.triu(ones, diagonal=1 + mlen)
    if same_length:
        mask_len = klen - mem_len
        shift = qlen - mask_len if mask_len > 0 else qlen
        mask = mask + torch.tril(ones, -shift)
    return mask.byte()[:, :, None]


@pytest.mark.parametrize("pre_lnorm", [False, True], ids=["post-ln", "pre-ln"])
@pytest.mark.parametrize("mlen,same_length", [(0, False), (6, False), (6, True)],
                         ids=["no-mems", "mems", "same-length"])
def test_attention_layer_matches_original(mlen, same_length, pre_lnorm):
    """Outputs and the gradients of w, mems, r, both biases and every weight."""
    torch.manual_seed(0)
    qlen, bsz, mem_len = 5, 3, 4
    m = RelPartialLearnableMultiHeadAttn(H, DM, DH, dropout=0.1, dropatt=0.1,
                                         pre_lnorm=pre_lnorm, dtype=torch.float64).eval()
    w = torch.randn(qlen, bsz, DM, dtype=torch.float64, requires_grad=True)
    mems = torch.randn(mlen, bsz, DM, dtype=torch.float64, requires_grad=True) if mlen else None
    r = torch.randn(qlen + mlen, 1, DM, dtype=torch.float64, requires_grad=True)
    u = torch.randn(H, DH, dtype=torch.float64, requires_grad=True)
    v = torch.randn(H, DH, dtype=torch.float64, requires_grad=True)
    leaves = [t for t in (w, mems, r, u, v) if t is not None] + list(m.parameters())
    expected = original_attention(m, w, r[:, 0], u, v, mems, same_length, mem_len)
    expected_grads = torch.autograd.grad(expected.square().sum(), leaves)
    with triton_backend():
        got = m(w, r, u, v, mems=mems, is_causal=True, window=mem_len if same_length else None)
        mask = original_mask(qlen, qlen + mlen, same_length, mem_len)
        with_mask = m(w, r, u, v, attn_mask=mask, mems=mems)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(with_mask, expected, atol=1e-12, rtol=1e-12)
    for g, e in zip(torch.autograd.grad(got.square().sum(), leaves), expected_grads):
        torch.testing.assert_close(g, e, atol=1e-11, rtol=1e-11)


def reference_model(model, tokens, mems):
    """The original MemTransformerLM._forward (eval) layer by layer on the original
    formulation: r embedded for every key position (clamped distances re-embedded), the mask
    built as a tensor, the memory updated with the original's _update_mems."""
    qlen, bsz = tokens.shape
    mlen = mems[0].shape[0] if mems else 0
    klen = mlen + qlen
    pos_seq = torch.arange(klen - 1, -1, -1.0)
    if model.clamp_len > 0:
        pos_seq = pos_seq.clamp(max=model.clamp_len)
    r = model.pos_emb(pos_seq).to(model.word_emb.weight.dtype)
    h = model.word_emb(tokens) * model.emb_scale
    hids = [h]
    for i, layer in enumerate(model.layers):
        attn = layer.dec_attn
        u = attn.r_w_bias if model.untie_r else model.r_w_bias
        v = attn.r_r_bias if model.untie_r else model.r_r_bias
        h = layer.pos_ff(original_attention(attn, h, r, u, v, mems[i] if mems else None,
                                            model.same_length, model.mem_len))
        hids.append(h)
    end = mlen + max(0, qlen - model.ext_len)
    begin = max(0, end - model.mem_len)
    new_mems = [(torch.cat([mems[i], hh], 0) if mems else hh)[begin:end]
                for i, hh in enumerate(hids[:-1])]
    return h, new_mems


@pytest.mark.parametrize("options", [
    dict(mem_len=6), dict(mem_len=6, clamp_len=3), dict(mem_len=4, same_length=True),
    dict(mem_len=5, ext_len=2, untie_r=True, pre_lnorm=True)],
    ids=["mems", "clamp_len", "same_length", "ext_len-untied-pre_ln"])
def test_model_over_segments_matches_reference(options):
    """Three segments (the last one shorter), the memory carried by each side."""
    torch.manual_seed(1)
    model = TransformerXL(50, 2, H, DM, DH, 24, dropout=0.1, dropatt=0.1,
                          dtype=torch.float64, **options).eval()
    segments = torch.randint(0, 50, (5 + 5 + 3, 2)).split([5, 5, 3])
    mems_ours = mems_ref = None
    with triton_backend():
        for tokens in segments:
            hidden, mems_ours = model(tokens, mems_ours)
            expected, mems_ref = reference_model(model, tokens, mems_ref)
            torch.testing.assert_close(hidden, expected, atol=1e-12, rtol=1e-12)
            assert len(mems_ours) == 2
            for a, b in zip(mems_ours, mems_ref):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
                assert not a.requires_grad


def test_model_gradients_match_reference_backend():
    """Training step: every parameter's gradient on the Triton backend equals the reference
    backend's (plain PyTorch), with memory from the previous segment and dropout off."""
    torch.manual_seed(2)
    model = TransformerXL(30, 2, H, DM, DH, 20, mem_len=4, clamp_len=5, dtype=torch.float64)
    tokens = torch.randint(0, 30, (2, 7, 2))
    grads = {}
    for backend in ("reference", "triton"):
        with (triton_backend() if backend == "triton" else fastseq.use_backend("reference")):
            _, mems = model(tokens[0])
            hidden, _ = model(tokens[1], mems)
            grads[backend] = torch.autograd.grad(hidden.square().sum(), list(model.parameters()))
    for g, e in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(g, e, atol=1e-11, rtol=1e-11)


def test_batch_first_is_the_same_model():
    torch.manual_seed(3)
    seq_first = TransformerXL(20, 1, H, DM, DH, 16, mem_len=3, dtype=torch.float64).eval()
    batch_first = TransformerXL(20, 1, H, DM, DH, 16, mem_len=3, batch_first=True,
                                dtype=torch.float64).eval()
    batch_first.load_state_dict(seq_first.state_dict())
    tokens = torch.randint(0, 20, (2, 4, 3))
    with triton_backend():
        h1, m1 = seq_first(tokens[0])
        h2, m2 = batch_first(tokens[0].t())
        torch.testing.assert_close(h2, h1.transpose(0, 1))
        h1, _ = seq_first(tokens[1], m1)
        h2, _ = batch_first(tokens[1].t(), m2)
        torch.testing.assert_close(h2, h1.transpose(0, 1))
        assert m2[0].shape == (3, 3, DM)  # [B, mlen, d_model]


def test_state_dict_names_follow_the_original():
    model = TransformerXL(10, 2, H, DM, DH, 12, mem_len=2)
    keys = set(model.state_dict())
    for name in ["word_emb.weight", "pos_emb.inv_freq", "r_w_bias", "r_r_bias",
                 "layers.1.dec_attn.qkv_net.weight", "layers.1.dec_attn.r_net.weight",
                 "layers.1.dec_attn.o_net.weight", "layers.1.dec_attn.layer_norm.weight",
                 "layers.1.pos_ff.CoreNet.0.weight", "layers.1.pos_ff.CoreNet.3.bias",
                 "layers.1.pos_ff.layer_norm.bias"]:
        assert name in keys, name
    untied = TransformerXL(10, 2, H, DM, DH, 12, untie_r=True)
    assert "layers.0.dec_attn.r_w_bias" in untied.state_dict()
    assert "r_w_bias" not in untied.state_dict()


def test_a_smaller_last_batch_gets_a_clear_error():
    model = TransformerXL(10, 1, H, DM, DH, 12, mem_len=3).eval()
    with fastseq.use_backend("reference"):
        _, mems = model(torch.randint(0, 10, (4, 3)))
        with pytest.raises(ValueError, match=r"holds 3 streams but tokens have 2.*m\[:, :2\]"):
            model(torch.randint(0, 10, (4, 2)), mems)
        hidden, _ = model(torch.randint(0, 10, (4, 2)), [m[:, :2] for m in mems])
    assert hidden.shape == (4, 2, DM)


def test_compile_fullgraph_training_step():
    """A training step of the model (two segments, memory carried) under
    torch.compile(fullgraph=True) gives eager's gradients."""
    torch.manual_seed(4)
    model = TransformerXL(20, 2, H, DM, DH, 16, mem_len=3)
    tokens = torch.randint(0, 20, (2, 5, 2))

    def step(first, second):
        _, mems = model(first)
        hidden, _ = model(second, mems)
        return hidden.square().mean()

    with triton_backend():
        torch._dynamo.reset()
        eager = torch.autograd.grad(step(*tokens), list(model.parameters()))
        loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*tokens)
        got = torch.autograd.grad(loss, list(model.parameters()))
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_layer_runs_with_its_own_biases_and_dropout():
    """own_biases (the untied variant) and training-mode dropout on the attention: finite, and
    the same torch seed gives the same output."""
    layer = TransformerXLLayer(H, DM, DH, 20, dropout=0.2, dropatt=0.3, own_biases=True)
    w, r = torch.randn(5, 2, DM), torch.randn(8, 1, DM)
    mems = torch.randn(3, 2, DM)
    with triton_backend():
        torch.manual_seed(7)
        a = layer(w, r, mems=mems, is_causal=True)
        torch.manual_seed(7)
        b = layer(w, r, mems=mems, is_causal=True)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    with pytest.raises(ValueError, match="own_biases=True"):
        TransformerXLLayer(H, DM, DH, 20, dropout=0.0)(w, r)


def test_layer_input_errors_name_the_argument():
    """Shapes, dtypes and masks checked by the attention module in its own terms (a wrong width
    used to fail inside a GEMM, a memory of another batch inside torch.cat)."""
    layer = TransformerXLLayer(H, DM, DH, 20, 0.0, own_biases=True)
    w, r, mems = torch.randn(5, 2, DM), torch.randn(8, 1, DM), torch.randn(3, 2, DM)
    cases = [
        (dict(dec_inp=torch.randn(5, 2, DM + 1)), r"w must be \[qlen, batch, d_model="),
        (dict(dec_inp=w[0]), r"w must be \[qlen, batch, d_model="),
        (dict(r=torch.randn(8, 1, DM - 1)), r"r must be \[rlen >= 1, d_model="),
        (dict(r=torch.randn(0, DM)), r"r must be \[rlen >= 1"),
        (dict(mems=torch.randn(3, 3, DM)), r"mems must be \[mlen, batch=2"),
        (dict(mems=mems, dec_attn_mask=torch.ones(5, 5)), r"attn_mask must be \[qlen, klen\] = "
                                                          r"\[5, 8\]"),
        (dict(dec_inp=w.double(), r=r.double()), r"w is torch.float64 on cpu"),
        (dict(r_w_bias=torch.zeros(H, DH + 1), r_r_bias=torch.zeros(H, DH + 1)),
         r"r_w_bias must be \[n_head, d_head\]"),
    ]
    for change, message in cases:
        kwargs = dict(dec_inp=w, r=r) | change
        with pytest.raises(fastseq.InputError, match="RelPartialLearnableMultiHeadAttn: " + message):
            layer(**kwargs)
