"""fastseq.ops.global_attention against the float64 reference on every backend (context,
alignments and every gradient, the alignments' own gradient included), with source lengths
(zero ones too), both scores and the additive score's extra term; the tolerance rule in fp32
and bf16; opcheck, torch.compile, autocast, vmap, strided views and bad inputs. Triton runs
through the interpreter on CPU (8-key, 16-feature tiles: the odd sizes here cross several).

The decoders and beam search are tests/attention_decoder/test_attention_decoder_layer.py's."""
import pytest
import torch

import fastseq
from fastseq.reference import attention_decoder as reference

from conftest import TRITON_TEST_DEVICE
from numerics import assert_within_rule

pytestmark = pytest.mark.usefixtures("on_triton_test_device")
BACKENDS = ["triton", "torch", "reference"]
op = fastseq.ops.global_attention

# The family's share of the cross-cutting checks (tests/dispatch/test_registry.py).
ACROSS_OPS = {
    "test_autocast": {"global_attention": ["test_under_autocast"]},
    "test_cuda_runtime": {"global_attention": ["test_on_cuda"]},
    "test_numerics": {"global_attention": ["test_scores_near_the_fp16_limit"]},
    "test_properties": {"global_attention": ["test_any_sizes_and_lengths"]},
    "test_strided_inputs": {"global_attention": ["test_takes_strided_views"]},
}


def backend_or_skip(backend):
    if backend == "triton" and fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("the Triton interpreter is off (a GPU run tests Triton on CUDA instead)")


def make_inputs(case, B=3, T=5, S=19, A=21, DV=13, dtype=torch.float64):
    """(tensors, names of the keyword tensors, options): query, keys, values, then v / extra."""
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    tensors = [r(B, T, A), r(B, S, A), r(B, S, DV)]
    names = []
    if case.startswith("additive"):
        tensors.append(r(A))
        names.append("v")
        if case == "additive-location":
            tensors.append(r(B, T, S, A) * 0.5)
            names.append("extra")
    lengths = torch.tensor([S, max(S - 12, 1), 0][:B] + [S] * max(B - 3, 0))
    options = dict(score="additive" if case.startswith("additive") else "dot", lengths=lengths,
                   scale=0.8)
    return tensors, names, options


def run(tensors, names, options, backend, weights=None, with_alignment_grad=True):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out, align = op(*leaves[:3], **dict(zip(names, leaves[3:])), **options, backend=backend)
    if weights is None:
        weights = (torch.randn_like(out), torch.randn_like(align))
    loss = (out * weights[0]).sum()
    if with_alignment_grad:
        loss = loss + (align * weights[1]).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [out.detach(), align.detach(), *grads], weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alignment_grad", [False, True])
@pytest.mark.parametrize("case", ["dot", "additive", "additive-location"])
def test_equals_reference_in_float64(case, alignment_grad, backend):
    """Context, alignments and the gradients of the query, keys, values, v and extra equal the
    reference's; a row of length 0 gives zeros; hidden keys get zero alignment."""
    backend_or_skip(backend)
    tensors, names, options = make_inputs(case)
    expected, weights = run(tensors, names, options, "reference", None, alignment_grad)
    got, _ = run(tensors, names, options, backend, weights, alignment_grad)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.isfinite(g).all(), f"{i}: non-finite (an unwritten element reads NaN)"
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=lambda m: f"{i}: {m}")
    assert (got[1][1, :, options["lengths"][1]:] == 0).all()
    assert (got[0][2] == 0).all() and (got[1][2] == 0).all()


def test_reference_is_the_original_codes_formula():
    """OpenNMT-py's GlobalAttention and SpeechBrain's content attention, written out: the
    reference gives their alignments and context."""
    q, k, values = torch.randn(2, 3, 4), torch.randn(2, 6, 4), torch.randn(2, 6, 5)
    v = torch.randn(4)
    lengths = torch.tensor([6, 4])
    mask = torch.arange(6)[None, None, :] >= lengths[:, None, None]
    scores = (torch.tanh(q[:, :, None] + k[:, None]) @ v).masked_fill(mask, float("-inf"))
    align = torch.softmax(scores * 1.5, -1)
    context, got_align = reference.global_attention(q, k, values, score="additive", v=v,
                                                    lengths=lengths, scale=1.5)
    torch.testing.assert_close(got_align, align)
    torch.testing.assert_close(context, align @ values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["dot", "additive-location"])
def test_tolerance_rule_against_plain_pytorch(case, dtype):
    backend_or_skip("triton")
    tensors, names, options = make_inputs(case)
    truth, weights = run(tensors, names, options, "reference")
    low = [t.to(dtype) for t in tensors]
    low_weights = tuple(w.to(dtype) for w in weights)
    plain, _ = run(low, names, options, "reference", low_weights)
    fast, _ = run(low, names, options, "triton", low_weights)
    terms = tensors[1].shape[1] * tensors[1].shape[2]
    for i, (f, p, t) in enumerate(zip(fast, plain, truth)):
        assert_within_rule(f"{case} {i} {dtype}", f, p, t, terms=terms)


def test_opcheck():
    """Small shapes: opcheck runs each op a dozen times (schema, fake tensors, autograd
    registration, AOT dispatch) through the interpreter (88 s at the default shapes)."""
    backend_or_skip("triton")
    for case in ("dot", "additive-location"):
        tensors, names, options = make_inputs(case, T=2, S=5, A=6, DV=3, dtype=torch.float32)
        q, k, values = tensors[:3]
        extra = dict(zip(names, tensors[3:]))
        args = (q, k, values, extra.get("v"), extra.get("extra"), options["lengths"], 0.8)
        forward = torch.ops.fastseq.global_attention_forward_triton
        torch.library.opcheck(forward, (q.requires_grad_(), *args[1:]))
        out, align, _ = forward(q.detach(), *args[1:])
        torch.library.opcheck(torch.ops.fastseq.global_attention_backward_triton,
                              (torch.randn_like(out), torch.randn_like(align), q.detach(),
                               *args[1:6], align, 0.8))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    backend_or_skip("triton")
    tensors, names, options = make_inputs("additive", dtype=torch.float32)
    leaves = [t.requires_grad_() for t in tensors]

    def loss(*t):
        out, align = op(*t[:3], **dict(zip(names, t[3:])), **options, backend="triton")
        return out.square().sum() + align[..., :3].sum()

    compiled = torch.compile(loss, backend=compiler, fullgraph=True)
    for g, e in zip(torch.autograd.grad(compiled(*leaves), leaves),
                    torch.autograd.grad(loss(*leaves), leaves)):
        torch.testing.assert_close(g, e)


def test_under_autocast():
    tensors, names, options = make_inputs("dot", dtype=torch.float32)
    with torch.autocast(TRITON_TEST_DEVICE.type, dtype=torch.bfloat16):
        out, align = op(*tensors, **options)
    assert out.dtype == align.dtype == torch.bfloat16
    expected = op(*[t.bfloat16() for t in tensors], **options)
    torch.testing.assert_close(out, expected[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda():
    """OpenNMT-py's default size (H = 1024, 50 source tokens, 64 rows) in bf16 against the
    float64 reference on the CPU."""
    tensors, names, options = make_inputs("additive", B=64, T=1, S=50, A=1024, DV=1024)
    got = op(*[t.cuda().bfloat16() for t in tensors[:3]], v=tensors[3].cuda().bfloat16(),
             **dict(options, lengths=options["lengths"].cuda()), backend="triton")
    expected = op(*tensors[:3], v=tensors[3], **options, backend="reference")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu().double(), e, atol=3e-2, rtol=3e-2)


def test_scores_near_the_fp16_limit():
    """Dot scores of ~6e4 in fp16: the fp32 softmax stays finite and right."""
    backend_or_skip("triton")
    tensors, names, options = make_inputs("dot")
    tensors = [tensors[0] * 60, tensors[1] * 60, tensors[2]]
    half = [t.half() for t in tensors]
    got = op(*half, **dict(options, scale=1.0), backend="triton")
    expected = op(*[t.double() for t in half], **dict(options, scale=1.0), backend="reference")
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), e, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("B,T,S,A,DV", [(1, 1, 1, 1, 1), (2, 1, 8, 16, 16), (2, 3, 9, 17, 1),
                                         (1, 2, 33, 5, 40), (3, 1, 0, 4, 4)])
def test_any_sizes_and_lengths(B, T, S, A, DV):
    """Sizes at and across the tiles (one key, 8 and 9 keys, 16 and 17 features, no keys at
    all), each score, lengths from 0 to S."""
    backend_or_skip("triton")
    for case in ("dot", "additive-location"):
        tensors, names, options = make_inputs(case, B=B, T=T, S=S, A=A, DV=DV)
        options["lengths"] = torch.arange(B) % (S + 1)
        expected, weights = run(tensors, names, options, "reference")
        got, _ = run(tensors, names, options, "triton", weights)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


def test_takes_strided_views():
    """Queries and keys as views (a beam search's [B, beams, H] queries, batch-second encoder
    states): read in place, equal to contiguous copies."""
    backend_or_skip("triton")
    tensors, names, options = make_inputs("additive")
    q, k, values, v = tensors
    views = [q.transpose(0, 1).contiguous().transpose(0, 1),
             k.transpose(0, 1).contiguous().transpose(0, 1),
             values.transpose(0, 1).contiguous().transpose(0, 1)]
    assert not any(t.is_contiguous() for t in views)
    got = op(*views, v=v, **options, backend="triton")
    expected = op(q, k, values, v=v, **options, backend="triton")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_vmap_equals_the_loop():
    backend_or_skip("triton")
    tensors, names, options = make_inputs("dot", B=4)
    lengths = options.pop("lengths")

    def one(q, k, values):
        return op(q[None], k[None], values[None], **options, backend="triton")

    got = torch.func.vmap(one)(*tensors)
    expected = op(*tensors, **options, backend="triton")
    torch.testing.assert_close(got[0][:, 0], expected[0])
    torch.testing.assert_close(got[1][:, 0], expected[1])
    del lengths


def test_bad_inputs_are_refused_by_name():
    tensors, names, options = make_inputs("additive")
    q, k, values, v = tensors
    error = fastseq.ops._checks.InputError
    with pytest.raises(error, match="query must be 3-D"):
        op(q[0], k, values)
    with pytest.raises(error, match=r"keys must have shape \[B, S, A\]"):
        op(q, k[:, :, :4], values)
    with pytest.raises(error, match="score must be one of"):
        op(q, k, values, score="bilinear")
    with pytest.raises(error, match="the additive score needs v"):
        op(q, k, values, score="additive")
    with pytest.raises(error, match="v and extra belong to the additive score"):
        op(q, k, values, v=v)
    with pytest.raises(error, match=r"lengths must be an integer tensor \[B=3\]"):
        op(q, k, values, lengths=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(error, match="values must have dtype"):
        op(q, k, values.float())
