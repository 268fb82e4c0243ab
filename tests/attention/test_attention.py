"""fastseq.ops.attention against the float64 reference (tolerance rule), torch's SDPA, and its
own promises: masks of every broadcast shape, causal (top-left, L != S), GQA, fully masked rows,
dropout with the same mask in forward and backward, the log-sum-exp and its gradient, opcheck,
torch.compile, errors. Triton runs through the interpreter on CPU (small odd shapes)."""
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch.nn.functional as F

import fastseq
from fastseq.reference import attention as reference

from conftest import TRITON_TEST_DEVICE
from numerics import assert_within_rule

pytestmark = pytest.mark.usefixtures("on_triton_test_device")

# attention_varlen's share of the cross-cutting checks (tests/dispatch/test_registry.py).
ACROSS_OPS = {
    "test_autocast": {"attention_varlen": ["test_varlen_under_autocast"]},
    "test_cuda_runtime": {"attention_varlen": ["test_varlen_on_cuda"]},
    "test_numerics": {"attention_varlen": ["test_varlen_scores_near_the_fp16_limit"]},
    "test_properties": {"attention_varlen": ["test_varlen_equals_reference_for_any_lengths"]},
    "test_strided_inputs": {"attention_varlen": ["test_varlen_takes_strided_views"]},
}

# (B, Hq, Hk, L, S, E, Ev): L=1, odd lengths crossing 16-row blocks, padded head dims (40, 80,
# 96), a value head dim unlike the query's, GQA and MQA, Lq > Lk and Lq < Lk.
CASES = {
    "L1": (1, 1, 1, 1, 1, 16, 16),
    "odd": (2, 3, 3, 37, 45, 40, 24),
    "long-keys-d80": (1, 2, 2, 17, 63, 80, 80),
    "gqa": (1, 4, 2, 33, 20, 16, 16),
    "mqa-d96": (2, 2, 1, 7, 34, 96, 32),
}
MASKS = ["none", "causal", "key-padding", "float-key-padding", "float-causal", "bool-2d"]


def triton_or_skip():
    if fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("the Triton interpreter is off (a GPU run tests Triton on CUDA instead)")


def make_inputs(case, dtype=torch.float64, device=None):
    B, Hq, Hk, L, S, E, EV = case
    q = torch.randn(B, Hq, L, E, dtype=dtype, device=device)
    k = torch.randn(B, Hk, S, E, dtype=dtype, device=device)
    v = torch.randn(B, Hk, S, EV, dtype=dtype, device=device)
    return q, k, v


def make_mask(kind, case, dtype=torch.float64):
    """(attn_mask, is_causal); masks hide whole rows somewhere (fully masked rows)."""
    B, Hq, _, L, S, _, _ = case
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind == "key-padding":  # [B, 1, 1, S]: the last keys of every sequence but the first
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        for b in range(1, B):
            mask[b, ..., S - 1 - S // (b + 2):] = False
        return mask, False
    if kind == "float-key-padding":  # [B, 1, 1, S] additive, read by the kernels as one row
        mask = torch.randn(B, 1, 1, S, dtype=dtype)
        mask[-1, ..., S // 2:] = float("-inf")
        return mask, False
    if kind == "bool-2d":  # [L, S], one row with nothing visible
        mask = torch.rand(L, S) > 0.4
        mask[L // 2] = False
        return mask, False
    mask = torch.randn(1, Hq, L, S, dtype=dtype)  # float, added; -inf hides
    mask[..., : max(S // 3, 1)] = float("-inf")  # with causal: the first rows see nothing
    return mask, True


def losses(out, lse, grad_out, grad_lse):
    """A scalar that reaches out and (where finite) lse, so the lse gradient is checked too."""
    finite = torch.isfinite(lse)
    return (out * grad_out).sum() + (torch.where(finite, lse, 0) * grad_lse).sum()


def run(backend, q, k, v, mask, causal, gqa, dtype, grad_out, grad_lse, mask_grad=False):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    m = mask
    if mask is not None and mask.dtype != torch.bool:
        m = mask.detach().to(dtype).requires_grad_(mask_grad)
        if mask_grad:
            leaves.append(m)
    if backend == "plain":
        # In the tested dtype itself: the rule's "plain PyTorch" (the reference backend rounds
        # half precision once, from fp32).
        out, lse = reference.scaled_dot_product_attention(*leaves[:3], m, 0.0, causal, None, gqa,
                                                          return_lse=True, upcast=False)
    else:
        out, lse = fastseq.ops.attention(*leaves[:3], m, 0.0, causal, None, gqa, return_lse=True,
                                         backend=backend)
    grads = torch.autograd.grad(losses(out, lse.to(out.dtype), grad_out.to(dtype),
                                       grad_lse.to(dtype)), leaves)
    return out, lse, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_triton_matches_reference(case, mask_kind, dtype):
    """Outputs, lse and every gradient within 2x plain PyTorch's error in the same dtype."""
    triton_or_skip()
    q, k, v = make_inputs(case)
    mask, causal = make_mask(mask_kind, case)
    gqa = case[1] != case[2]
    mask_grad = mask is not None and mask.dtype != torch.bool
    out64, lse64, _ = run("plain", q, k, v, mask, causal, gqa, torch.float64,
                          torch.zeros(1), torch.zeros(1))
    grad_out, grad_lse = torch.randn_like(out64), torch.randn_like(lse64)
    args = (q, k, v, mask, causal, gqa)
    ref = run("plain", *args, torch.float64, grad_out, grad_lse, mask_grad)
    plain = run("plain", *args, dtype, grad_out, grad_lse, mask_grad)
    fast = run("triton", *args, dtype, grad_out, grad_lse, mask_grad)
    assert fast[0].dtype == dtype and fast[1].dtype == torch.float32
    assert_within_rule("out", fast[0], plain[0], ref[0])
    finite = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(fast[1]), finite), "lse: -inf exactly on rows with nothing visible"
    assert_within_rule("lse", fast[1][finite], plain[1][finite].float(), ref[1][finite])
    names = ["dq", "dk", "dv", "dmask"]
    for name, f, p, r in zip(names, fast[2], plain[2], ref[2]):
        assert_within_rule(name, f, p, r, terms=max(case[3], case[4]) if name != "dmask" else 1)


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    triton_or_skip()
    q, k, v = [t.float().requires_grad_() for t in make_inputs((1, 2, 2, 9, 5, 16, 16))]
    mask = torch.ones(9, 5, dtype=torch.bool)
    mask[[0, 4, 8]] = False
    out, lse = fastseq.ops.attention(q, k, v, mask, return_lse=True, backend="triton")
    assert torch.equal(out[:, :, [0, 4, 8]], torch.zeros_like(out[:, :, [0, 4, 8]]))
    assert torch.isneginf(lse[:, :, [0, 4, 8]]).all() and torch.isfinite(lse[:, :, [1, 2, 3]]).all()
    out.sum().backward()
    assert torch.equal(q.grad[:, :, [0, 4, 8]], torch.zeros_like(q.grad[:, :, [0, 4, 8]]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_causal_top_left_alignment_when_lengths_differ():
    """Query i sees keys j <= i (torch's SDPA convention) for L < S and L > S."""
    triton_or_skip()
    for L, S in ((5, 23), (23, 5)):
        q, k, v = [t.float() for t in make_inputs((1, 1, 1, L, S, 16, 16))]
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        got = fastseq.ops.attention(q, k, v, is_causal=True, backend="triton")
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("shape", ["2d", "3d", "5d"])
def test_any_leading_dims_match_torch(shape):
    """[L, E], [H, L, E] and [A, B, H, L, E] inputs, with a mask broadcast over the batch dims."""
    triton_or_skip()
    dims = {"2d": (), "3d": (3,), "5d": (2, 1, 3)}[shape]
    q, k, v = (torch.randn(*dims, 11, 24), torch.randn(*dims, 19, 24), torch.randn(*dims, 19, 8))
    mask = torch.randn(11, 19)
    expected = F.scaled_dot_product_attention(q, k, v, mask)
    got = fastseq.ops.attention(q, k, v, mask, backend="triton")
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=3e-6, rtol=3e-6)


def test_non_contiguous_inputs():
    """Strided q/k/v (a [B, L, H, E] buffer seen as [B, H, L, E], as nn.MultiheadAttention makes)."""
    triton_or_skip()
    base = torch.randn(3, 2, 21, 5, 32)  # [qkv, B, L, H, E]
    q, k, v = (t.transpose(1, 2) for t in base.unbind(0))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = fastseq.ops.attention(q, k, v, is_causal=True, backend="triton")
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


def dropout_keep_mask(case, p, seed):
    """Read the kernel's keep-mask back: with q = 0 every visible probability is 1/S, and with
    v = I (Ev = S) out[i, j] = keep[i, j] / (S (1 - p))."""
    B, Hq, Hk, L, S, E, _ = case
    torch.manual_seed(seed)
    q = torch.zeros(B, Hq, L, E, dtype=torch.float64)
    k = torch.randn(B, Hk, S, E, dtype=torch.float64)
    v = torch.eye(S, dtype=torch.float64).expand(B, Hk, S, S)
    torch.manual_seed(seed)
    out = fastseq.ops.attention(q, k, v, dropout_p=p, enable_gqa=Hq != Hk, backend="triton")
    return (out * S * (1 - p)).round()


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_keep_rate_and_determinism(p):
    triton_or_skip()
    case = (2, 3, 3, 40, 37, 16, 37)
    keep = dropout_keep_mask(case, p, seed=5)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(keep, dropout_keep_mask(case, p, seed=5)), "same torch seed, same mask"
    assert not torch.equal(keep, dropout_keep_mask(case, p, seed=6))
    assert not torch.equal(keep[0, 0], keep[0, 1]), "heads draw different masks"


def test_dropout_forward_and_backward_use_the_same_mask():
    """Against the reference given the kernel's own keep-mask, in float64: outputs and gradients
    equal to rounding, so the backward regenerated exactly the forward's mask."""
    triton_or_skip()
    case, p, seed = (1, 4, 2, 19, 37, 16, 37), 0.3, 11
    keep = dropout_keep_mask(case, p, seed)
    q, k, v = [t.requires_grad_() for t in make_inputs(case)]
    torch.manual_seed(seed)  # the op's seed is the first draw after it, as in dropout_keep_mask
    out = fastseq.ops.attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True,
                                backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = reference.scaled_dot_product_attention(q, k, v, None, p, True, None, True,
                                                 dropout_mask=keep)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("mask_shape", [(5, 6), (2, 1, 5, 6), (2, 2, 5, 6)])
def test_gradcheck_float64(mask_shape):
    """gradcheck of query, key, value and a float mask of each broadcast shape (GQA, causal)."""
    triton_or_skip()
    q, k, v = [t.requires_grad_() for t in make_inputs((2, 2, 1, 5, 6, 4, 3))]
    mask = torch.randn(*mask_shape, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, mask):
        out, lse = fastseq.ops.attention(q, k, v, mask, is_causal=True, enable_gqa=True,
                                         return_lse=True, backend="triton")
        return out, lse

    # fast_mode: random projections of the Jacobian (the full one took 45 s a shape here).
    assert torch.autograd.gradcheck(f, (q, k, v, mask), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("variant", ["plain", "bool-mask-causal", "float-mask-dropout",
                                     "causal-lower-right", "window-softcap-alibi-sinks",
                                     "key-range", "packed"])
def test_opcheck(variant):
    """Strided q/k/v (as the MHA's head views) so the fakes' layouts must match the kernels'."""
    triton_or_skip()
    q, k, v = [t.float().transpose(2, 3).contiguous().transpose(2, 3)
               for t in make_inputs((1, 2, 1, 7, 9, 16, 8))]
    tensors = dict(mask=None, seed=None, cu_seqlens_q=None, cu_seqlens_k=None, key_start=None,
                   key_end=None, alibi_slopes=None, sinks=None)
    options = dict(dropout_p=0.0, bottom_right=False, window_left=-1, window_right=-1,
                   softcap=0.0, max_seqlen_q=0, max_seqlen_k=0, scale=0.3)
    if variant == "bool-mask-causal":
        tensors["mask"] = (torch.rand(1, 1, 7, 9) > 0.3).expand(1, 2, 7, 9)
        options["window_right"] = 0
    if variant == "float-mask-dropout":
        tensors.update(mask=torch.randn(1, 2, 7, 9), seed=torch.tensor([123]))
        options["dropout_p"] = 0.25
    if variant == "causal-lower-right":
        options.update(window_right=0, bottom_right=True)
    if variant == "window-softcap-alibi-sinks":
        tensors.update(alibi_slopes=torch.rand(2), sinks=torch.randn(2, requires_grad=True))
        options.update(window_left=3, window_right=1, softcap=2.0, bottom_right=True)
    if variant == "key-range":
        tensors.update(key_start=torch.tensor([2], dtype=torch.int32),
                       key_end=torch.tensor([8], dtype=torch.int32))
        options.update(window_right=0, bottom_right=True)
    if variant == "packed":
        tensors.update(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32),
                       cu_seqlens_k=torch.tensor([0, 5, 9], dtype=torch.int32))
        options.update(window_right=0, bottom_right=True, max_seqlen_q=4, max_seqlen_k=5)
    forward = torch.ops.fastseq.attention_forward_triton
    torch.library.opcheck(forward, (q.requires_grad_(), k, v, *tensors.values()), options)
    out, lse = (t.detach() for t in forward(q.detach(), k, v, *tensors.values(), **options))
    delta = torch.randn_like(lse)
    mask = tensors.pop("mask")
    mask_grad = mask is not None and mask.dtype != torch.bool
    tensors.pop("sinks")
    torch.library.opcheck(torch.ops.fastseq.attention_backward_triton,
                          (torch.randn_like(out), q.detach(), k, v, lse, delta, mask, mask_grad,
                           *tensors.values()), options)


@pytest.mark.parametrize("mask_kind", ["none", "float-causal"])
def test_float16(mask_kind):
    """fp16 within the rule (one odd case; bf16 and fp32 sweep every case above)."""
    test_triton_matches_reference(CASES["odd"], mask_kind, torch.float16)


def test_dropout_under_compile_follows_torchs_seed():
    """Compiled (fullgraph) and eager calls draw the same dropout mask after the same
    torch.manual_seed: the op's seed is an ordinary torch random draw in the graph."""
    triton_or_skip()
    q, k, v = [t.float() for t in make_inputs((1, 2, 2, 9, 12, 16, 16))]

    def f(q, k, v):
        return fastseq.ops.attention(q, k, v, dropout_p=0.4, backend="triton")

    torch._dynamo.reset()
    torch.manual_seed(21)
    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(21)
    torch.testing.assert_close(compiled(q, k, v), eager)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    triton_or_skip()
    q, k, v = [t.float().requires_grad_() for t in make_inputs((2, 2, 2, 11, 14, 16, 16))]
    mask = torch.rand(2, 1, 1, 14) > 0.2

    def loss(q, k, v):
        return fastseq.ops.attention(q, k, v, mask, is_causal=True, backend="triton").square().sum()

    torch._dynamo.reset()
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.compile(loss, fullgraph=True, backend=compiler)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_other_backends_follow_the_same_rules(backend):
    """The torch backend (auto's CPU choice) zeroes rows with nothing visible like the others."""
    q, k, v = [t.float() for t in make_inputs((2, 2, 2, 6, 5, 8, 8))]
    mask = torch.rand(2, 1, 6, 5) > 0.3
    mask[:, :, 2] = False
    got = fastseq.ops.attention(q, k, v, mask, backend=backend)
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[:, :, 2], torch.zeros_like(got[:, :, 2]))


def test_auto_on_cpu_is_torch_and_can_return_lse():
    with torch.device("cpu"):  # auto's CPU choice, also in a GPU run
        q, k, v = [t.float() for t in make_inputs((1, 2, 2, 4, 6, 8, 8))]
        torch.testing.assert_close(fastseq.ops.attention(q, k, v, is_causal=True),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True))
        # torch cannot return the lse: the next backend serves the call
        out, lse = fastseq.ops.attention(q, k, v, return_lse=True)
        torch.testing.assert_close(lse,
                                   torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(8), -1))


@pytest.mark.parametrize("bad, message", [
    (dict(key=torch.randn(2, 3, 5, 7)), "key must have the query's head dim 8"),
    (dict(value=torch.randn(2, 3, 4, 8)), "value must have as many positions as key (5)"),
    (dict(key=torch.randn(2, 2, 5, 8), value=torch.randn(2, 2, 5, 8)), "or pass enable_gqa=True"),
    (dict(value=torch.randn(2, 3, 5, 8, dtype=torch.float64)), "value must have dtype torch.float32"),
    (dict(attn_mask=torch.ones(2, 3, 6, 4, dtype=torch.bool)), "attn_mask must broadcast to [..., Hq, L, S] = [2, 3, 6, 5]"),
    (dict(attn_mask=torch.ones(6, 5, dtype=torch.int32)), "attn_mask must be bool or the query's dtype"),
    (dict(dropout_p=1.0), "dropout_p must be a number in [0, 1)"),
    (dict(query=torch.randn(8)), "query must have at least 2 dims"),
    (dict(key=torch.randn(5, 8), value=torch.randn(5, 8)), "the same number of dims"),
])
def test_errors_name_the_argument(bad, message):
    args = dict(query=torch.randn(2, 3, 6, 8), key=torch.randn(2, 3, 5, 8),
                value=torch.randn(2, 3, 5, 8))
    args.update(bad)
    with pytest.raises(fastseq.InputError, match=None) as info:
        fastseq.ops.attention(**args)
    assert message in str(info.value)


def test_head_dim_limit_is_stated():
    triton_or_skip()
    q = torch.randn(1, 1, 3, 300)
    with pytest.raises(fastseq.BackendError, match="head dims up to 256"):
        fastseq.ops.attention(q, q, q, backend="triton")


@pytest.mark.parametrize("shape", [(0, 2, 5, 6), (2, 2, 0, 6), (2, 2, 5, 0)], ids=["B0", "L0", "S0"])
def test_empty_shapes(shape):
    """Nothing to launch: B=0 and L=0 give empty outputs; S=0 (no key at all) gives zeros."""
    triton_or_skip()
    B, H, L, S = shape
    q = torch.randn(B, H, L, 8, requires_grad=True)
    k, v = torch.randn(B, H, S, 8, requires_grad=True), torch.randn(B, H, S, 4, requires_grad=True)
    out = fastseq.ops.attention(q, k, v, backend="triton")
    assert out.shape == (B, H, L, 4) and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("alignment", ["upper_left", "lower_right"])
@pytest.mark.parametrize("case", ["odd", "long-keys-d80", "gqa", "L1"])
def test_causal_bias_masks(case, alignment, backend):
    """torch.nn.attention.bias's causal_upper_left / causal_lower_right as attn_mask: the same
    answer as the explicit bool mask (query i sees keys j <= i, or j <= i + S - L), outputs
    and gradients within the tolerance rule; L > S bottom-right leaves the first rows nothing
    to see (zeros, fastseq's rule for fully masked rows)."""
    if backend == "triton":
        triton_or_skip()
    from torch.nn.attention import bias as attention_bias

    shape = CASES[case]
    L, S = shape[3], shape[4]
    gqa = shape[1] != shape[2]
    q, k, v = make_inputs(shape)
    shift = S - L if alignment == "lower_right" else 0
    explicit = torch.ones(L, S, dtype=torch.bool).tril(shift)
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64)

    def call(dtype, fast):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        if fast:
            bias = getattr(attention_bias, f"causal_{alignment}")(L, S)
            out = fastseq.ops.attention(*leaves, bias, enable_gqa=gqa, backend=backend)
        else:
            out = reference.scaled_dot_product_attention(*leaves, explicit, enable_gqa=gqa)
        return [out] + list(torch.autograd.grad((out * grad_out.to(dtype)).sum(), leaves))

    truth, plain, fast = call(torch.float64, False), call(torch.float32, False), \
        call(torch.float32, True)
    for name, f, p, r in zip(["out", "dq", "dk", "dv"], fast, plain, truth):
        assert_within_rule(f"{alignment} {name}", f, p, r, terms=S)
    if shift < 0:
        assert (fast[0][..., : -shift, :] == 0).all()


def test_causal_bias_errors_name_the_problem():
    from torch.nn.attention.bias import causal_lower_right

    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(fastseq.InputError, match="causal bias for 4 queries"):
        fastseq.ops.attention(q, q, q, causal_lower_right(4, 5))
    with pytest.raises(fastseq.InputError, match="leave is_causal False"):
        fastseq.ops.attention(q, q, q, causal_lower_right(5, 5), is_causal=True)


# ---- attention_varlen: its share of the cross-cutting checks ----

def packed(lengths_q, lengths_k, Hq=2, Hk=2, E=16, EV=8, dtype=torch.float64, device=None):
    cu = [torch.tensor([0] + list(itertools.accumulate(n)), dtype=torch.int32, device=device)
          for n in (lengths_q, lengths_k)]
    T, Tk = int(cu[0][-1]), int(cu[1][-1])
    return (torch.randn(T, Hq, E, dtype=dtype, device=device),
            torch.randn(Tk, Hk, E, dtype=dtype, device=device),
            torch.randn(Tk, Hk, EV, dtype=dtype, device=device), *cu)


def varlen_reference(q, k, v, cu_q, cu_k, **options):
    causal = options.pop("is_causal", False)
    return reference.packed_attention(q, k, v, cu_q, cu_k, is_causal=causal, bottom_right=True,
                                      **options)


def test_varlen_under_autocast():
    """Under autocast the op runs in the autocast dtype, as SDPA and fastseq.ops.attention."""
    q, k, v, cu_q, cu_k = packed([4, 9], [6, 9], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastseq.ops.attention_varlen(q, k, v, cu_q, cu_k, is_causal=True)
    assert out.dtype == torch.bfloat16
    expected = fastseq.ops.attention_varlen(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_q,
                                            cu_k, is_causal=True)
    torch.testing.assert_close(out, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_varlen_on_cuda():
    """The compiled kernels on a GPU against the float64 reference on the CPU."""
    q, k, v, cu_q, cu_k = packed([1, 130, 0, 77], [64, 130, 5, 300], Hq=8, Hk=2, E=64, EV=64,
                                 dtype=torch.bfloat16, device="cuda")
    out = fastseq.ops.attention_varlen(q, k, v, cu_q, cu_k, is_causal=True, window=(64, 0))
    expected = varlen_reference(*(t.cpu().double() for t in (q, k, v)), cu_q.cpu(), cu_k.cpu(),
                                is_causal=True, window=(64, 0))
    torch.testing.assert_close(out.cpu().double(), expected, atol=2e-2, rtol=2e-2)


def test_varlen_scores_near_the_fp16_limit():
    """Scores of magnitude ~6e4 in fp16: the kernel's fp32 softmax stays finite and right."""
    triton_or_skip()
    q, k, v, cu_q, cu_k = packed([5, 12], [7, 12], dtype=torch.float64)
    q, k = q * 60, k * 60
    half = [t.half() for t in (q, k, v)]
    out = fastseq.ops.attention_varlen(*half, cu_q, cu_k, scale=1.0, backend="triton")
    expected = varlen_reference(*(t.double() for t in half), cu_q, cu_k, scale=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_varlen_equals_reference_for_any_lengths(data):
    """Any sequence lengths (empty ones included), GQA, causal or a window: output and
    gradients equal the reference in float64."""
    triton_or_skip()
    n = data.draw(st.integers(1, 4), "sequences")
    lengths_q = data.draw(st.lists(st.integers(0, 20), min_size=n, max_size=n), "lengths_q")
    lengths_k = data.draw(st.lists(st.integers(0, 20), min_size=n, max_size=n), "lengths_k")
    Hk = data.draw(st.sampled_from([1, 2]), "Hk")
    options = data.draw(st.sampled_from([{}, {"is_causal": True}, {"window": (3, 1)},
                                         {"is_causal": True, "window": (5, None)}]), "options")
    q, k, v, cu_q, cu_k = packed(lengths_q, lengths_k, Hq=2 * Hk, Hk=Hk)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    got = fastseq.ops.attention_varlen(*leaves, cu_q, cu_k, backend="triton", **options)
    expected = varlen_reference(*leaves, cu_q, cu_k, **options)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    weights = torch.randn_like(expected)
    for g, e in zip(torch.autograd.grad((got * weights).sum(), leaves, allow_unused=True),
                    torch.autograd.grad((expected * weights).sum(), leaves, allow_unused=True)):
        torch.testing.assert_close(g if g is not None else torch.zeros(()),
                                   e if e is not None else torch.zeros(()), atol=1e-10,
                                   rtol=1e-10)


def test_varlen_takes_strided_views():
    """q, k and v as views of one packed qkv projection [T, 3, H, E] (FlashAttention's
    flash_attn_varlen_qkvpacked layout): read in place, equal to contiguous copies."""
    triton_or_skip()
    cu = torch.tensor([0, 6, 6, 17], dtype=torch.int32)
    qkv = torch.randn(17, 3, 2, 16, dtype=torch.float64)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    got = fastseq.ops.attention_varlen(q, k, v, cu, cu, is_causal=True, backend="triton")
    expected = fastseq.ops.attention_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu,
                                            cu, is_causal=True, backend="triton")
    torch.testing.assert_close(got, expected)
