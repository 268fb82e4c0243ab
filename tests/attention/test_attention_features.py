"""What fastseq.ops.attention adds to SDPA (issue 27): windows in both alignments, soft-capping,
ALiBi, sinks, per-row key ranges, masks as descriptions and packed variable-length sequences,
each inside the fused kernels. Against the float64 reference (outputs, lse and every gradient
within 2x plain PyTorch's error in the same dtype), against torch's SDPA where it can express
the feature, and against FlashAttention's documented semantics, written here from its docs.
Triton runs through the interpreter on CPU (small odd shapes)."""
import pytest
import torch

import fastseq
from fastseq.ops import AttentionMask
from fastseq.reference import attention as reference

from numerics import assert_within_rule
from test_attention import losses, triton_or_skip

pytestmark = pytest.mark.usefixtures("on_triton_test_device")

# (B, Hq, Hk, L, S, E, Ev): odd lengths crossing 16-row blocks (L < S and L > S), GQA.
SHAPES = {"odd": (2, 3, 3, 21, 38, 24, 16), "gqa-long-queries": (2, 4, 2, 35, 19, 16, 8)}


def key_ranges(B, S):
    """Left padding on row 0, right padding on row 1 (and one row seeing nothing: 5 > 4)."""
    start = torch.tensor([3, 0, 5][:B], dtype=torch.int32)
    end = torch.tensor([S, S - 7, 4][:B], dtype=torch.int32)
    return start, end


def features(name, shape):
    """(attn_mask, keyword arguments) of a feature case on `shape`."""
    B, Hq, _, L, S, _, _ = shape
    g = torch.Generator().manual_seed(7)
    slopes = torch.rand(Hq, generator=g) * 0.5
    if name == "window":
        return None, {"window": (6, 3)}
    if name == "window-causal-bottom-right":
        return AttentionMask(causal=True, window=(9, None), align="bottom_right"), {}
    if name == "window-left-only-top-left":
        return AttentionMask(window=(4, -1)), {}
    if name == "softcap-causal":
        return None, {"is_causal": True, "softcap": 1.5}
    if name == "alibi-heads-bottom-right":
        return AttentionMask(causal=True, align="bottom_right"), {"alibi_slopes": slopes}
    if name == "alibi-batch-heads":
        return None, {"alibi_slopes": torch.rand(B, Hq, generator=g)}
    if name == "sinks-window":  # the window leaves rows with nothing visible: the sink alone
        return AttentionMask(window=(2, 0), align="bottom_right"), {
            "sinks": torch.randn(Hq, generator=g)}
    if name == "key-ranges":
        start, end = key_ranges(B, S)
        return AttentionMask(key_start=start, key_end=end), {}
    if name == "key-ranges-causal-bottom-right":
        start, end = key_ranges(B, S)
        return AttentionMask(causal=True, align="bottom_right", key_start=start,
                             key_end=end), {}
    if name == "window-with-bool-mask":  # the torch backend combines mask and description
        return torch.rand(B, 1, L, S, generator=g) > 0.3, {"window": (6, 3)}
    if name == "alibi-with-float-mask":
        return torch.randn(B, 1, L, S, generator=g, dtype=torch.float64), {
            "is_causal": True, "alibi_slopes": slopes}
    if name == "everything":
        start, end = key_ranges(B, S)
        return (AttentionMask(causal=True, window=(11, None), align="bottom_right",
                              key_start=start, key_end=end),
                {"softcap": 2.0, "alibi_slopes": slopes, "sinks": torch.randn(Hq, generator=g)})
    raise KeyError(name)


FEATURES = ["window", "window-causal-bottom-right", "window-left-only-top-left",
            "softcap-causal", "alibi-heads-bottom-right", "alibi-batch-heads", "sinks-window",
            "key-ranges", "key-ranges-causal-bottom-right", "everything"]


def run(backend, q, k, v, mask, options, dtype, grad_out, grad_lse):
    """(out, lse, gradients of q, k, v and the sinks) of one backend in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    options = dict(options)
    if options.get("sinks") is not None:
        options["sinks"] = options["sinks"].detach().to(dtype).requires_grad_()
        leaves.append(options["sinks"])
    gqa = q.shape[1] != k.shape[1]
    if backend in ("plain", "truth"):
        vis = mask if mask is not None else AttentionMask()
        window = options.pop("window", vis.window)
        out, lse = reference.scaled_dot_product_attention(
            *leaves[:3], None, 0.0, options.pop("is_causal", False) or vis.causal, None, gqa,
            return_lse=True, window=window, bottom_right=vis.align == "bottom_right",
            key_start=vis.key_start, key_end=vis.key_end, upcast=backend == "truth",
            **options)
    else:
        out, lse = fastseq.ops.attention(*leaves[:3], mask, enable_gqa=gqa, return_lse=True,
                                         backend=backend, **options)
    grads = torch.autograd.grad(losses(out, lse.to(out.dtype), grad_out.to(dtype),
                                       grad_lse.to(dtype)), leaves)
    return out, lse, grads


def make_inputs(shape):
    B, Hq, Hk, L, S, E, EV = shape
    return (torch.randn(B, Hq, L, E, dtype=torch.float64), torch.randn(B, Hk, S, E, dtype=torch.float64),
            torch.randn(B, Hk, S, EV, dtype=torch.float64))


def check_against_truth(backend, shape, mask, options, dtype):
    q, k, v = make_inputs(shape)
    out64, lse64, _ = run("truth", q, k, v, mask, options, torch.float64, torch.zeros(1),
                          torch.zeros(1))
    grad_out, grad_lse = torch.randn_like(out64), torch.randn_like(lse64)
    truth = run("truth", q, k, v, mask, options, torch.float64, grad_out, grad_lse)
    plain = run("plain", q, k, v, mask, options, dtype, grad_out, grad_lse)
    fast = run(backend, q, k, v, mask, options, dtype, grad_out, grad_lse)
    assert fast[0].dtype == dtype and fast[1].dtype == (torch.float64 if dtype == torch.float64
                                                        else torch.float32)
    assert_within_rule("out", fast[0], plain[0], truth[0])
    finite = torch.isfinite(truth[1])
    assert torch.equal(torch.isfinite(fast[1]), finite), "lse: -inf exactly where nothing is seen"
    assert_within_rule("lse", fast[1][finite], plain[1][finite].float(), truth[1][finite])
    for name, f, p, r in zip(["dq", "dk", "dv", "dsinks"], fast[2], plain[2], truth[2]):
        assert_within_rule(name, f, p, r, terms=max(shape[3], shape[4]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_triton_features_match_reference(shape, feature, dtype):
    triton_or_skip()
    torch.manual_seed(0)
    mask, options = features(feature, shape)
    check_against_truth("triton", shape, mask, options, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("feature", ["window-causal-bottom-right", "everything"])
def test_reference_backend_holds_the_rule_in_half_precision(feature, dtype):
    """The reference computes half inputs in fp32 and rounds once, as FlashAttention's
    attention_ref: held to the same 2x rule as every backend (its lse is fp32)."""
    torch.manual_seed(1)
    mask, options = features(feature, SHAPES["odd"])
    check_against_truth("reference", SHAPES["odd"], mask, options, dtype)


@pytest.mark.parametrize("feature", ["window", "window-causal-bottom-right",
                                     "window-left-only-top-left", "alibi-heads-bottom-right",
                                     "alibi-batch-heads", "key-ranges",
                                     "key-ranges-causal-bottom-right", "window-with-bool-mask",
                                     "alibi-with-float-mask"])
def test_torch_backend_materializes_what_sdpa_can_express(feature):
    torch.manual_seed(2)
    shape = SHAPES["odd"]
    mask, options = features(feature, shape)
    q, k, v = make_inputs(shape)
    expected = fastseq.ops.attention(q, k, v, mask, backend="reference", **options)
    got = fastseq.ops.attention(q, k, v, mask, backend="torch", **options)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("option, reason", [({"softcap": 2.0}, "soft-capping"),
                                            ({"sinks": torch.zeros(3)}, "sinks")])
def test_torch_backend_refuses_what_sdpa_lacks_by_name(option, reason):
    q, k, v = make_inputs(SHAPES["odd"])
    with pytest.raises(fastseq.BackendError, match=reason):
        fastseq.ops.attention(q, k, v, backend="torch", **option)
    auto = fastseq.ops.attention(q, k, v, **option)  # auto on a CPU: the reference serves it
    torch.testing.assert_close(auto, fastseq.ops.attention(q, k, v, backend="reference",
                                                           **option))


# ---- packed variable-length sequences (flash_attn_varlen_func's layout) ----

def packed_inputs(lengths_q, lengths_k, Hq=4, Hk=2, E=16, EV=8, dtype=torch.float64):
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    return (torch.randn(int(cu_q[-1]), Hq, E, dtype=dtype),
            torch.randn(int(cu_k[-1]), Hk, E, dtype=dtype),
            torch.randn(int(cu_k[-1]), Hk, EV, dtype=dtype), cu_q, cu_k)


PACKED = {"causal": {"is_causal": True}, "window": {"window": (5, 2)},
          "alibi-per-sequence-sinks": {"is_causal": True, "alibi_slopes": "per-sequence",
                                       "sinks": "heads"},
          "softcap": {"softcap": 3.0}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(PACKED))
def test_varlen_matches_each_sequence_alone(case, dtype):
    """Sequences of 1, 19, 0 and 33 rows against 7, 19, 4 and 20 keys (one empty, queries
    longer than keys): each one's output, lse and gradients are attention on that sequence
    alone (FlashAttention's bottom-right alignment)."""
    triton_or_skip()
    torch.manual_seed(3)
    q, k, v, cu_q, cu_k = packed_inputs([1, 19, 0, 33], [7, 19, 4, 20])
    options = dict(PACKED[case])
    if options.get("alibi_slopes") == "per-sequence":
        options["alibi_slopes"] = torch.rand(4, 4)
    if options.get("sinks") == "heads":
        options["sinks"] = torch.randn(4)

    def both(backend, dt, grad_out=None, grad_lse=None):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        opts = dict(options)
        if "sinks" in opts:
            opts["sinks"] = opts["sinks"].to(dt).requires_grad_()
            leaves.append(opts["sinks"])
        if backend == "triton":
            out, lse = fastseq.ops.attention_varlen(*leaves[:3], cu_q, cu_k, return_lse=True,
                                                    backend="triton", **opts)
        else:
            causal = opts.pop("is_causal", False)
            out, lse = reference.packed_attention(
                *leaves[:3], cu_q, cu_k, return_lse=True, is_causal=causal, bottom_right=True,
                upcast=backend == "truth", **opts)
        if grad_out is None:
            return out, lse
        return out, lse, torch.autograd.grad(
            losses(out, lse.to(out.dtype), grad_out.to(dt), grad_lse.to(dt)), leaves)

    out64, lse64 = both("truth", torch.float64)
    grad_out, grad_lse = torch.randn_like(out64), torch.randn_like(lse64)
    truth = both("truth", torch.float64, grad_out, grad_lse)
    plain = both("plain", dtype, grad_out, grad_lse)
    fast = both("triton", dtype, grad_out, grad_lse)
    assert fast[0].shape == (53, 4, 8) and fast[1].shape == (4, 53)
    assert_within_rule("out", fast[0], plain[0], truth[0])
    finite = torch.isfinite(truth[1])  # bottom-right: the 33-row sequence's first 13 see nothing
    assert torch.equal(torch.isfinite(fast[1]), finite)
    assert_within_rule("lse", fast[1][finite], plain[1][finite].float(), truth[1][finite])
    for name, f, p, r in zip(["dq", "dk", "dv", "dsinks"], fast[2], plain[2], truth[2]):
        assert_within_rule(name, f, p, r, terms=33)


def test_varlen_equals_block_diagonal_description_on_every_backend():
    """attention_varlen is attention with AttentionMask(cu_seqlens...) on [1, H, T, E]: the
    torch backend builds the block-diagonal mask, the reference loops over sequences."""
    torch.manual_seed(4)
    q, k, v, cu_q, cu_k = packed_inputs([3, 8, 5], [3, 8, 5])
    expected = fastseq.ops.attention_varlen(q, k, v, cu_q, cu_k, is_causal=True,
                                            backend="reference")
    for backend in ("torch",) + (("triton",) if fastseq.backend.triton_unavailable(
            q.device) is None else ()):
        got = fastseq.ops.attention_varlen(q, k, v, cu_q, cu_k, is_causal=True, backend=backend)
        torch.testing.assert_close(got, expected)


# ---- FlashAttention's documented semantics, checked on every backend that serves them ----

def backends_for(option_names=()):
    names = ["reference"]
    if not {"softcap", "sinks"} & set(option_names):
        names.append("torch")
    if fastseq.backend.triton_unavailable(torch.device("cpu")) is None:
        names.append("triton")
    return names


def uniform_probe(L, S, H=2):
    """q = 0 (every score 0) and v = the identity over keys: row i of the output is row i's
    attention probabilities, so the visible keys are its non-zero entries."""
    q = torch.zeros(1, H, L, 16, dtype=torch.float64)
    k = torch.randn(1, H, S, 16, dtype=torch.float64)
    v = torch.eye(S, dtype=torch.float64).expand(1, H, S, S).contiguous()
    return q, k, v


@pytest.mark.parametrize("backend", backends_for())
@pytest.mark.parametrize("window", [(3, 0), (2, 4), (-1, 1), (0, -1)])
@pytest.mark.parametrize("L, S", [(5, 11), (9, 4)])
def test_window_follows_flash_attentions_doc(L, S, window, backend):
    """flash_attn_func: "query at position i will only attend to keys between
    [i + seqlen_k - seqlen_q - window_size[0], i + seqlen_k - seqlen_q + window_size[1]]
    inclusive" (-1: infinite), i.e. align="bottom_right"; rows with no such key give zeros."""
    q, k, v = uniform_probe(L, S)
    out = fastseq.ops.attention(q, k, v, AttentionMask(window=window, align="bottom_right"),
                                backend=backend)
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    lo = i + S - L - (window[0] if window[0] >= 0 else S + L)
    hi = i + S - L + (window[1] if window[1] >= 0 else S + L)
    expected = ((j >= lo) & (j <= hi)).double()
    expected = expected / expected.sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(out[0, 0], expected)


@pytest.mark.parametrize("backend", backends_for(["softcap"]))
def test_softcap_is_softcap_times_tanh_of_scores_over_softcap(backend):
    """flash_attn_func's softcap: scores = softcap * tanh(scores / softcap), scores already
    scaled, before the softmax."""
    q = torch.tensor([[[[2.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[3.0, 0.0], [-1.0, 0.0], [0.5, 0.0]]]], dtype=torch.float64)
    v = torch.eye(3, dtype=torch.float64)[None, None]
    cap, scale = 1.7, 0.8
    out = fastseq.ops.attention(q, k, v, scale=scale, softcap=cap, backend=backend)
    scores = cap * torch.tanh(torch.tensor([6.0, -2.0, 1.0], dtype=torch.float64) * scale / cap)
    torch.testing.assert_close(out[0, 0, 0], torch.softmax(scores, 0))


@pytest.mark.parametrize("backend", backends_for())
def test_alibi_adds_minus_slope_times_distance_to_the_diagonal(backend):
    """flash_attn_func's alibi_slopes: "a bias of (-alibi_slope * |i + seqlen_k - seqlen_q - j|)
    is added to the attention score of query i and key j" (align="bottom_right" here; the
    default top-left alignment measures from i instead)."""
    L, S = 3, 6
    q, k, v = uniform_probe(L, S, H=2)
    slopes = torch.tensor([0.5, 1.25], dtype=torch.float64)
    for align, shift in (("bottom_right", S - L), ("top_left", 0)):
        out = fastseq.ops.attention(q, k, v, AttentionMask(align=align), alibi_slopes=slopes,
                                    backend=backend)
        i = torch.arange(L)[:, None]
        j = torch.arange(S)[None, :]
        bias = -slopes[:, None, None] * (i + shift - j).abs()
        torch.testing.assert_close(out[0], torch.softmax(bias, -1))


@pytest.mark.parametrize("backend", backends_for(["sinks"]))
def test_sinks_join_the_denominator_with_no_value(backend):
    """gpt-oss's sinks: softmax over [scores, sink] with the sink's column dropped, so with
    every score 0 and values 1 a row's output is S / (S + exp(sink)); lse includes the sink."""
    S = 5
    q = torch.zeros(1, 2, 3, 8, dtype=torch.float64)
    k = torch.randn(1, 2, S, 8, dtype=torch.float64)
    v = torch.ones(1, 2, S, 4, dtype=torch.float64)
    sinks = torch.tensor([0.0, 2.0], dtype=torch.float64)
    out, lse = fastseq.ops.attention(q, k, v, sinks=sinks, return_lse=True, backend=backend)
    expected = S / (S + sinks.exp())
    torch.testing.assert_close(out[0, :, :, 0], expected[:, None].expand(2, 3))
    torch.testing.assert_close(lse[0], torch.log(S + sinks.exp())[:, None].expand(2, 3))


# ---- bad input: refused by name, never read out of bounds ----

def bad_calls():
    q, k, v = make_inputs((2, 3, 3, 5, 6, 8, 8))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    return {
        "window-negative": (lambda: fastseq.ops.attention(q, k, v, window=(-2, 0)),
                            "window sides must be >= 0"),
        "window-not-a-pair": (lambda: fastseq.ops.attention(q, k, v, window=3),
                              "window must be \\(left, right\\)"),
        "window-twice": (lambda: fastseq.ops.attention(q, k, v, AttentionMask(window=(1, 1)),
                                                       window=(2, 2)), "window is given twice"),
        "align": (lambda: fastseq.ops.attention(q, k, v, AttentionMask(align="lower")),
                  "attn_mask.align must be one of"),
        "softcap-negative": (lambda: fastseq.ops.attention(q, k, v, softcap=-1.0),
                             "softcap must be a number >= 0"),
        "alibi-shape": (lambda: fastseq.ops.attention(q, k, v, alibi_slopes=torch.ones(4)),
                        "alibi_slopes must be a float tensor of shape \\[3\\] or \\[2, 3\\]"),
        "alibi-grad": (lambda: fastseq.ops.attention(
            q, k, v, alibi_slopes=torch.ones(3, requires_grad=True)),
            "alibi_slopes must not require grad"),
        "sinks-shape": (lambda: fastseq.ops.attention(q, k, v, sinks=torch.ones(2, 3)),
                        "sinks must be a float tensor of shape \\[3\\]"),
        "key-end-past-keys": (lambda: fastseq.ops.attention(
            q, k, v, AttentionMask(key_end=torch.tensor([6, 7]))), "key_end <= 6"),
        "key-start-negative": (lambda: fastseq.ops.attention(
            q, k, v, AttentionMask(key_start=torch.tensor([-1, 0]))), "key_start must be >= 0"),
        "key-range-shape": (lambda: fastseq.ops.attention(
            q, k, v, AttentionMask(key_start=torch.tensor([0]))),
            "attn_mask.key_start must have the batch dims' shape \\[2\\]"),
        "key-range-float": (lambda: fastseq.ops.attention(
            q, k, v, AttentionMask(key_end=torch.tensor([1.0, 2.0]))),
            "attn_mask.key_end must be an integer tensor"),
        "packed-batch": (lambda: fastseq.ops.attention(
            q, k, v, AttentionMask(cu_seqlens_q=cu, cu_seqlens_k=cu)),
            "packed sequences \\(cu_seqlens\\) take query \\[1, H, T, E\\]"),
        "offsets-decreasing": (lambda: fastseq.ops.attention_varlen(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
            torch.tensor([0, 3, 2]), torch.tensor([0, 3, 6])), "never decrease"),
        "offsets-past-rows": (lambda: fastseq.ops.attention_varlen(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
            torch.tensor([0, 3, 9]), torch.tensor([0, 3, 6])), "end at 5"),
        "offsets-short-of-rows": (lambda: fastseq.ops.attention_varlen(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
            torch.tensor([0, 3, 4]), torch.tensor([0, 3, 6])), "end at 5"),
        "offsets-lengths-differ": (lambda: fastseq.ops.attention_varlen(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
            torch.tensor([0, 5]), torch.tensor([0, 3, 6])), "must have the same length"),
        "varlen-4d": (lambda: fastseq.ops.attention_varlen(q, k, v, cu, cu),
                      "query must be 3-D"),
        "max-seqlen-short": (lambda: fastseq.ops.attention_varlen(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
            torch.tensor([0, 1, 5]), torch.tensor([0, 3, 6]), 2, 3), "shorter than a sequence"),
        "description-not-tensor": (lambda: fastseq.ops.attention(
            "q", k, v, AttentionMask(causal=True)), "query must be a torch.Tensor"),
    }


@pytest.mark.parametrize("case", list(bad_calls()))
def test_bad_descriptions_and_modifiers_are_refused_by_name(case):
    call, message = bad_calls()[case]
    with pytest.raises(fastseq.InputError, match=message):
        call()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_described_attention_compiles_fullgraph(compiler):
    """A window, soft-capping, sinks and key ranges under torch.compile(fullgraph=True):
    outputs and gradients (the sinks' too) equal eager."""
    triton_or_skip()
    torch.manual_seed(5)
    q, k, v = [t.float().requires_grad_() for t in make_inputs((2, 2, 2, 11, 14, 16, 16))]
    sinks = torch.randn(2, requires_grad=True)
    end = torch.tensor([14, 9], dtype=torch.int32)

    def loss(q, k, v, sinks):
        mask = AttentionMask(causal=True, window=(5, None), align="bottom_right", key_end=end)
        return fastseq.ops.attention(q, k, v, mask, softcap=3.0, sinks=sinks,
                                     backend="triton").square().sum()

    torch._dynamo.reset()
    eager = torch.autograd.grad(loss(q, k, v, sinks), (q, k, v, sinks))
    compiled = torch.compile(loss, fullgraph=True, backend=compiler)
    got = torch.autograd.grad(compiled(q, k, v, sinks), (q, k, v, sinks))
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)


# ---- properties: any window, alignment, key range and modifier together ----

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_description_equals_the_reference(data):
    """Random shapes, windows (either side unbounded or any width), both alignments, causal or
    not, key ranges (empty ones too), soft-capping, ALiBi and sinks: outputs, lse and every
    gradient equal the float64 reference."""
    triton_or_skip()
    B, Hk = data.draw(st.integers(1, 2), "B"), data.draw(st.integers(1, 2), "Hk")
    Hq = Hk * data.draw(st.integers(1, 2), "G")
    L, S = data.draw(st.integers(1, 40), "L"), data.draw(st.integers(1, 40), "S")
    side = st.one_of(st.just(-1), st.integers(0, 45))
    window = (data.draw(side, "left"), data.draw(side, "right"))
    starts = data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B), "key_start")
    ends = data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B), "key_end")
    use_ranges = data.draw(st.booleans(), "ranges")
    mask = AttentionMask(causal=data.draw(st.booleans(), "causal"), window=window,
                         align=data.draw(st.sampled_from(["top_left", "bottom_right"]), "align"),
                         key_start=torch.tensor(starts) if use_ranges else None,
                         key_end=torch.tensor(ends) if use_ranges else None)
    options = {}
    if data.draw(st.booleans(), "softcap"):
        options["softcap"] = data.draw(st.floats(0.5, 5.0), "cap")
    if data.draw(st.booleans(), "alibi"):
        options["alibi_slopes"] = torch.rand(Hq, dtype=torch.float64)
    if data.draw(st.booleans(), "sinks"):
        options["sinks"] = torch.randn(Hq, dtype=torch.float64).requires_grad_()
    q, k, v = make_inputs((B, Hq, Hk, L, S, 16, 8))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    grads_of = [*leaves] + ([options["sinks"]] if "sinks" in options else [])
    results = []
    for backend in ("triton", "reference"):
        out, lse = fastseq.ops.attention(*leaves, mask, enable_gqa=Hq != Hk, return_lse=True,
                                         backend=backend, **options)
        finite = torch.isfinite(lse)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() \
            + torch.where(finite, lse, 0).sum()
        results.append((out, lse, torch.autograd.grad(loss, grads_of, allow_unused=True)))
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = results
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-10, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g if g is not None else torch.zeros(()),
                                   r if r is not None else torch.zeros(()), atol=1e-10,
                                   rtol=1e-10)
