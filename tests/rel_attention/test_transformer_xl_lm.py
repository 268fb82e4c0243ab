"""fastseq.nn.TransformerXLLM, AdaptiveEmbedding and ProjectedAdaptiveLogSoftmax against the
float64 reference of the whole original model (fastseq.reference.transformer_xl_lm, a function
of a state dict with the original's key names): loss, new memories and every gradient over
three segments, on every backend of the relative attention; a state dict built from the
original's documented layout loads with strict=True; both call forms; the chunked loss never
holds the logits of every token."""
import pytest
import torch
import torch.nn.functional as F

import fastseq
from fastseq.nn.adaptive import linear_nll
from fastseq.reference.transformer_xl_lm import LMConfig, adaptive_nll_original, lm_forward

BACKENDS = [b for b in ("triton", "torch", "reference")
            if b != "triton" or fastseq.backend.triton_unavailable(torch.device("cpu")) is None]
N_TOKEN, D_MODEL = 13, 8
# (name, div_val, d_embed, cutoffs, tie_weight, tie_projs, pre_lnorm, same_length, clamp_len)
CONFIGS = [
    ("div2-two-tails", 2, 8, [5, 9], True, [False, True, True], False, True, 6),
    ("div1-projected", 1, 6, [7], True, [False, True], True, False, -1),
    ("no-clusters", 1, 8, [], False, [False], False, False, 3),
    ("div3-untied", 3, 9, [3, 6, 10], False, [False] * 4, True, True, -1),
]


def build(config, **extra):
    _, div_val, d_embed, cutoffs, tie_weight, tie_projs, pre_lnorm, same_length, clamp = config
    kwargs = dict(n_token=N_TOKEN, n_layer=2, n_head=2, d_model=D_MODEL, d_head=4, d_inner=16,
                  dropout=0.0, dropatt=0.0, tie_weight=tie_weight, d_embed=d_embed,
                  div_val=div_val, tie_projs=tie_projs, pre_lnorm=pre_lnorm, mem_len=5,
                  cutoffs=cutoffs, same_length=same_length, clamp_len=clamp)
    kwargs.update(extra)
    torch.manual_seed(0)
    model = fastseq.nn.TransformerXLLM(**kwargs).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    reference = LMConfig(n_token=N_TOKEN, n_layer=2, n_head=2, d_model=D_MODEL, d_head=4,
                         d_inner=16, d_embed=d_embed, div_val=div_val, cutoffs=cutoffs,
                         pre_lnorm=pre_lnorm, mem_len=kwargs["mem_len"],
                         same_length=same_length, clamp_len=clamp)
    return model, reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_three_segments_equal_the_reference(config, backend):
    model, reference = build(config)
    model.crit.keep_order = True
    params = dict(model.state_dict(keep_vars=True))
    mems, reference_mems = model.init_mems(), None
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        data = torch.randint(0, N_TOKEN, (4, 3), generator=g)
        target = torch.randint(0, N_TOKEN, (4, 3), generator=g)
        with fastseq.use_backend(backend):
            loss, *new_mems = model(data, target, *mems)
        expected, expected_mems = lm_forward(params, reference, data, target, reference_mems)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        assert len(new_mems) == model.n_layer + 1
        for got, want in zip(new_mems, expected_mems):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        weights = torch.linspace(-1, 1, loss.numel(), dtype=loss.dtype).view_as(loss)
        leaves = [p for p in model.parameters()]
        grads = torch.autograd.grad((loss * weights).sum(), leaves, allow_unused=True)
        want_grads = torch.autograd.grad((expected * weights).sum(), leaves, allow_unused=True)
        for name, got, want in zip(dict(model.named_parameters()), grads, want_grads):
            if want is None:
                assert got is None or torch.count_nonzero(got) == 0, name
                continue
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11, msg=name)
        mems, reference_mems = new_mems, [m.detach() for m in expected_mems]


def original_layout(div_val, d_embed, cutoffs, n_layer=2, n_head=2, d_head=4, d_inner=16):
    """The original MemTransformerLM's state dict keys and shapes (attn_type 0, untied
    biases off, tie_weight and tie_projs on), from its documented module layout."""
    ends = [0, *cutoffs, N_TOKEN]
    layout = {"r_w_bias": (n_head, d_head), "r_r_bias": (n_head, d_head),
              "pos_emb.inv_freq": (D_MODEL // 2,)}
    clusters = range(len(ends) - 1) if div_val > 1 else [0]
    for i in clusters:
        size = ends[i + 1] - ends[i] if div_val > 1 else N_TOKEN
        d_i = d_embed // div_val ** i
        layout[f"word_emb.emb_layers.{i}.weight"] = (size, d_i)
        if div_val > 1 or d_embed != D_MODEL:
            layout[f"word_emb.emb_projs.{i}"] = (D_MODEL, d_i)
        layout[f"crit.out_layers.{i}.weight"] = (size, d_i)
        layout[f"crit.out_layers.{i}.bias"] = (size,)
    for i in range(len(ends) - 1):
        if div_val > 1 or d_embed != D_MODEL:
            layout[f"crit.out_projs.{i}"] = (D_MODEL, d_embed // div_val ** i)
    if cutoffs:
        layout["crit.cluster_weight"] = (len(cutoffs), d_embed)
        layout["crit.cluster_bias"] = (len(cutoffs),)
    for n in range(n_layer):
        a, f = f"layers.{n}.dec_attn", f"layers.{n}.pos_ff"
        layout.update({f"{a}.qkv_net.weight": (3 * n_head * d_head, D_MODEL),
                       f"{a}.o_net.weight": (D_MODEL, n_head * d_head),
                       f"{a}.layer_norm.weight": (D_MODEL,), f"{a}.layer_norm.bias": (D_MODEL,),
                       f"{a}.r_net.weight": (n_head * d_head, D_MODEL),
                       f"{f}.CoreNet.0.weight": (d_inner, D_MODEL), f"{f}.CoreNet.0.bias": (d_inner,),
                       f"{f}.CoreNet.3.weight": (D_MODEL, d_inner), f"{f}.CoreNet.3.bias": (D_MODEL,),
                       f"{f}.layer_norm.weight": (D_MODEL,), f"{f}.layer_norm.bias": (D_MODEL,)})
    return layout


@pytest.mark.parametrize("div_val,d_embed,cutoffs", [(1, 8, [5, 9]), (2, 8, [5, 9]),
                                                    (1, 6, [])])
def test_a_checkpoint_in_the_originals_layout_loads_strictly(div_val, d_embed, cutoffs):
    layout = original_layout(div_val, d_embed, cutoffs)
    g = torch.Generator().manual_seed(2)
    state = {k: torch.randn(shape, generator=g, dtype=torch.float64) for k, shape in layout.items()}
    state["pos_emb.inv_freq"] = 1 / (10000 ** (torch.arange(0.0, D_MODEL, 2.0) / D_MODEL))
    # The original ties the output layers to the embeddings and, with tie_projs, the tails'
    # projections: one tensor under both names.
    for key in [k for k in state if k.startswith("crit.out_layers") and k.endswith("weight")]:
        state[key] = state[key.replace("crit.out_layers", "word_emb.emb_layers")]
    for i in range(1, len(cutoffs) + 1):
        if f"crit.out_projs.{i}" in state:
            state[f"crit.out_projs.{i}"] = state[f"word_emb.emb_projs.{i if div_val > 1 else 0}"]
    model = fastseq.nn.TransformerXLLM(
        N_TOKEN, 2, 2, D_MODEL, 4, 16, 0.0, 0.0, tie_weight=True, d_embed=d_embed,
        div_val=div_val, tie_projs=[False] + [True] * len(cutoffs), mem_len=4,
        cutoffs=cutoffs).double().eval()
    model.load_state_dict(state, strict=True)
    assert set(model.state_dict()) == set(layout)
    data, target = torch.randint(0, N_TOKEN, (5, 2), generator=g), \
        torch.randint(0, N_TOKEN, (5, 2), generator=g)
    loss, _ = model(data, targets=target, mems=model.init_mems())
    reference = LMConfig(N_TOKEN, 2, 2, D_MODEL, 4, 16, d_embed, div_val, cutoffs, mem_len=4)
    torch.testing.assert_close(loss, lm_forward(state, reference, data, target, None)[0])


def test_keyword_form_log_probs_and_grouped_order():
    model, reference = build(CONFIGS[0])
    data = torch.randint(0, N_TOKEN, (4, 3))
    target = torch.randint(0, N_TOKEN, (4, 3))
    grouped, *mems = model(data, target)  # the original's default: nll grouped by cluster
    loss, keyword_mems = model(data, targets=target, mems=None)
    assert grouped.shape == loss.shape == (4, 3)
    torch.testing.assert_close(grouped.sum(), loss.sum())  # the same values, reordered
    cluster = torch.bucketize(target.reshape(-1), torch.tensor([5, 9]), right=True)
    torch.testing.assert_close(grouped.reshape(-1),
                               loss.reshape(-1)[torch.argsort(cluster, stable=True)])
    for a, b in zip(mems, keyword_mems):
        torch.testing.assert_close(a, b)
    log_probs, _ = model(data, mems=keyword_mems)
    params = dict(model.state_dict(keep_vars=True))
    expected, _ = lm_forward(params, reference, data, None, [m for m in keyword_mems])
    torch.testing.assert_close(log_probs, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(4, 3, dtype=torch.float64))


def test_chunked_nll_equals_the_plain_head_and_saves_no_logits():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(600, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1000, 16, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1000, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 1000, (600,), generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        nll = linear_nll(hidden, weight, bias, target, chunk_tokens=64)
    assert sum(saved) < 600 * 1000 / 10, saved  # inputs, weights and one lse per row
    expected = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction="none")
    torch.testing.assert_close(nll, expected)
    g_out = torch.randn(600, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(nll, (hidden, weight, bias), g_out),
                         torch.autograd.grad(expected, (hidden, weight, bias), g_out)):
        torch.testing.assert_close(got, want)
    small = [t.detach()[:7, :5].clone().requires_grad_() for t in (hidden, weight)]
    assert torch.autograd.gradcheck(
        lambda h, w: linear_nll(h, w, None, target[:7] % 7, chunk_tokens=3), small)


def test_low_precision_loss_within_the_rule():
    from numerics import assert_within_rule
    model, _ = build(CONFIGS[0])
    data, target = torch.randint(0, N_TOKEN, (6, 2)), torch.randint(0, N_TOKEN, (6, 2))
    truth, _ = model(data, targets=target)
    plain_model, _ = build(CONFIGS[0])
    for dtype in (torch.float32, torch.bfloat16):
        fast = model.to(dtype)(data, targets=target)[0]
        crit = plain_model.to(dtype).crit
        hidden = plain_model._hidden(data, None)[0].reshape(-1, D_MODEL)
        plain = -crit.log_prob(hidden).gather(1, target.reshape(-1, 1)).view(6, 2)
        assert_within_rule(f"loss {dtype}", fast, plain, truth)
        model.double(), plain_model.double()


def test_refusals_name_the_argument():
    with pytest.raises(NotImplementedError, match="attn_type=2 is not implemented"):
        fastseq.nn.TransformerXLLM(13, 1, 2, 8, 4, 16, 0.0, 0.0, attn_type=2)
    with pytest.raises(NotImplementedError, match="sample_softmax"):
        fastseq.nn.TransformerXLLM(13, 1, 2, 8, 4, 16, 0.0, 0.0, sample_softmax=100)
    with pytest.raises(ValueError, match="cutoffs must increase"):
        fastseq.nn.TransformerXLLM(13, 1, 2, 8, 4, 16, 0.0, 0.0, cutoffs=[9, 5])
    model, _ = build(CONFIGS[0])
    data = torch.randint(0, N_TOKEN, (4, 3))
    with pytest.raises(ValueError, match="n_layer \\+ 1 = 3 tensors"):
        model(data, targets=data, mems=[torch.zeros(2, 3, 8)] * 2)
    with pytest.raises(TypeError, match="not both"):
        model(data, data, mems=[])


@pytest.mark.parametrize("div_val", [1, 2])
def test_chunked_head_equals_the_original_formulation(div_val):
    """ProjectedAdaptiveLogSoftmax (chunks of 5 tokens) against the original's computation
    (every cluster's whole logits) with the same weights: nll by token and every gradient."""
    torch.manual_seed(4)
    crit = fastseq.nn.ProjectedAdaptiveLogSoftmax(40, 12, 10, [8, 20], div_val=div_val,
                                                  keep_order=True, chunk_tokens=5).double()
    with torch.no_grad():
        for p in crit.parameters():
            p.normal_(0, 0.5)
    hidden = torch.randn(23, 10, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 40, (23,))
    got, want = crit(hidden, target), adaptive_nll_original(crit, hidden, target)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    leaves = [hidden, *crit.parameters()]
    for g, w in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves)):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)
