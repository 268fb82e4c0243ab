"""fastseq.ops.rel_attention (the fused Triton kernels through the interpreter on CPU) against
the float64 reference and its rel_shift formulation, with the tolerance rule against plain
PyTorch in the same dtype: outputs, lse and the gradients of query, key, value, pos, both
biases and a float mask; memory, clamped positions, window, bidirectional offsets, masks,
dropout, determinism, opcheck, torch.compile, errors."""
import math

import pytest
import torch

import fastseq
from fastseq import reference
from fastseq.kernels.rel_attention import launch as rel_attention_launch

from conftest import TRITON_TEST_DEVICE
from numerics import assert_within_rule

pytestmark = pytest.mark.usefixtures("on_triton_test_device")

# (B, H, Lq, memory, P, D, Dv): Lq = 1 without memory; odd lengths crossing the 16-row blocks;
# memory shorter and longer than the segment; clamped positions (P < Lk); padded head dims
# (40 -> 64), the largest (128), value head dims unlike the query's. P = None: P = Lk.
CASES = {
    "Lq1-M0": (1, 1, 1, 0, None, 16, 16),
    "Lq7-M5-d40": (2, 3, 7, 5, None, 40, 24),
    "Lq33-M0-d64": (2, 2, 33, 0, None, 64, 64),
    "Lq45-M70-clamped": (1, 2, 45, 70, 30, 16, 16),
    "Lq9-M4-d128": (1, 2, 9, 4, None, 128, 96),
}
VARIANTS = ["causal", "window", "bidirectional", "key-padding", "float-mask"]


def triton_or_skip():
    if fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("the Triton interpreter is off (a GPU run tests Triton on CUDA instead)")


def make_inputs(case, variant="causal", dtype=torch.float64):
    """(tensors q, k, v, pos, u, w[, mask], keyword arguments of the variant)."""
    B, H, L, M, P, D, DV = case
    S = L + M
    kwargs = {}
    if variant == "window":
        kwargs["window"] = max(M // 2 + 3, 1)
    if variant == "bidirectional":
        # Distances run from -(L - 1) to M + L - 1: offset L // 2 clamps the most negative.
        kwargs.update(is_causal=False, pos_offset=L // 2)
        P = P or S
    P = P or S
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    tensors = [r(B, H, L, D), r(B, H, S, D), r(B, H, S, DV), r(P, H, D), r(H, D), r(H, D)]
    if variant == "key-padding":  # [B, 1, 1, Lk]: the last keys of every sequence but the first
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        for b in range(1, B):
            mask[b, ..., S - 1 - S // (b + 2):] = False
        kwargs["attn_mask"] = mask
    if variant == "float-mask":  # [1, H, Lq, Lk] added; -inf on the first keys (rows see none)
        mask = r(1, H, L, S)
        mask[..., : max(S // 3, 1)] = float("-inf")
        tensors.append(mask)
    return tensors, kwargs


NAMES = ["dq", "dk", "dv", "dpos", "du", "dw", "dmask"]


def run(backend, tensors, kwargs, dtype, grad_out=None, grad_lse=None):
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    q, k, v, pos, u, w = leaves[:6]
    kwargs = dict(kwargs)
    if len(leaves) > 6:
        kwargs["attn_mask"] = leaves[6]
    if backend == "plain":
        out, lse = reference.relative_attention(q, k, v, pos, u, w, return_lse=True, **kwargs)
    else:
        out, lse = fastseq.ops.rel_attention(q, k, v, pos, u, w, return_lse=True,
                                             backend=backend, **kwargs)
    if grad_out is None:
        return out, lse, None
    finite = torch.isfinite(lse)
    loss = (out * grad_out.to(dtype)).sum() + (torch.where(finite, lse, 0) * grad_lse).sum()
    return out, lse, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_triton_matches_reference(case, variant, dtype):
    """Outputs, lse and every gradient within 2x plain PyTorch's error in the same dtype."""
    triton_or_skip()
    tensors, kwargs = make_inputs(case, variant)
    out64, lse64, _ = run("plain", tensors, kwargs, torch.float64)
    grad_out, grad_lse = torch.randn_like(out64), torch.randn_like(lse64)
    ref = run("plain", tensors, kwargs, torch.float64, grad_out, grad_lse)
    plain = run("plain", tensors, kwargs, dtype, grad_out, grad_lse.to(dtype))
    fast = run("triton", tensors, kwargs, dtype, grad_out, grad_lse.float())
    assert fast[0].dtype == dtype and fast[1].dtype == torch.float32
    assert_within_rule("out", fast[0], plain[0], ref[0])
    finite = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(fast[1]), finite), "lse: -inf exactly on empty rows"
    assert_within_rule("lse", fast[1][finite], plain[1][finite].float(), ref[1][finite])
    B, H, L, M, _, D, DV = case
    # Summed terms: a query or key gradient sums over the other length; pos and the biases
    # over the batch and every (query, key) pair. Every gradient but dv goes through dS =
    # P (dP - delta), whose delta the flash backward takes from out (dO . O, Dv terms) rather
    # than from P: at Lq = Lk = 1, dP - delta cancels to rounding, so one dS carries the
    # rounding of two D-term dot products (measured: 3e-7 in dq where plain PyTorch's own
    # one-term softmax backward cancels exactly).
    pairs = B * L * (L + M)
    terms = {"dq": (L + M) * DV, "dk": L * DV, "dv": L, "dpos": pairs * DV, "du": pairs * DV,
             "dw": pairs * DV, "dmask": DV}
    for name, f, p, r in zip(NAMES, fast[2], plain[2], ref[2]):
        assert_within_rule(name, f, p, r, terms=terms[name])


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_with_query_blocks_twice_the_key_blocks(monkeypatch, variant):
    """BLOCK_M = 2 BLOCK_N (the forward's three-chunk band, a tile a GPU autotunes to; the
    interpreter runs 16 x 16 otherwise): outputs and lse equal the reference in float64."""
    triton_or_skip()
    if TRITON_TEST_DEVICE.type != "cpu":
        pytest.skip("the interpreter's tile is what this sets; a GPU autotunes among both")
    monkeypatch.setattr(rel_attention_launch, "INTERPRETER_FORWARD_TILE", (32, 16))
    tensors, kwargs = make_inputs((2, 2, 45, 30, 50, 16, 24), variant)
    out, lse, _ = run("triton", tensors, kwargs, torch.float64)
    expected, expected_lse, _ = run("plain", tensors, kwargs, torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, expected_lse, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("variant", ["causal", "float-mask"])
def test_float16(variant):
    test_triton_matches_reference(CASES["Lq7-M5-d40"], variant, torch.float16)


@pytest.mark.parametrize("lq,mem,clamp_len,same_length", [
    (17, 17, None, False), (17, 17, 9, False), (20, 12, None, True), (5, 0, 3, True)])
def test_matches_original_rel_shift_formulation(lq, mem, clamp_len, same_length):
    """The original code's BD + _rel_shift (r ordered by distance Lk-1 ... 0, clamped at
    clamp_len before the embedding; same_length as a window of mem_len), in float64."""
    triton_or_skip()
    lk = lq + mem
    q, k, v = torch.randn(2, 2, lq, 16), torch.randn(2, 2, lk, 16), torch.randn(2, 2, lk, 16)
    q, k, v = q.double(), k.double(), v.double()
    u, w = torch.randn(2, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    rows = lk if clamp_len is None else clamp_len + 1
    embeddings = torch.randn(rows, 2, 16, dtype=torch.float64)
    distances = torch.arange(lk - 1, -1, -1).clamp(max=rows - 1)  # the original's pos_seq
    mem_len = max(mem, 4)
    expected = reference.rel_attention_original(q, k, v, embeddings[distances], u, w,
                                                same_length=same_length, mem_len=mem_len)
    got = fastseq.ops.rel_attention(q, k, v, embeddings, u, w,
                                    window=mem_len if same_length else None, backend="triton")
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_gradcheck_float64():
    """gradcheck of every input (query, key, value, pos, both biases, a float mask) with memory,
    clamped positions and a window."""
    triton_or_skip()
    tensors, _ = make_inputs((1, 2, 5, 4, 6, 4, 3), "float-mask")
    leaves = [t.requires_grad_() for t in tensors]

    def f(q, k, v, pos, u, w, mask):
        return fastseq.ops.rel_attention(q, k, v, pos, u, w, attn_mask=mask, window=6,
                                         return_lse=True, backend="triton")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, fast_mode=True)


def test_backward_is_deterministic():
    """Same inputs, bitwise the same outputs and gradients (no atomics anywhere)."""
    triton_or_skip()
    tensors, kwargs = make_inputs((2, 2, 21, 13, 17, 16, 16), "window", torch.float32)
    grad_out = torch.randn(2, 2, 21, 16)
    first = run("triton", tensors, kwargs, torch.float32, grad_out, torch.zeros(2, 2, 21))
    second = run("triton", tensors, kwargs, torch.float32, grad_out, torch.zeros(2, 2, 21))
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


def test_fully_hidden_rows_give_zeros():
    """A row whose keys are all masked gives zeros, lse -inf, and zero gradients."""
    triton_or_skip()
    tensors, _ = make_inputs((1, 2, 9, 3, None, 16, 16), dtype=torch.float32)
    q, k, v, pos, u, w = [t.requires_grad_() for t in tensors]
    mask = torch.ones(9, 12, dtype=torch.bool)
    mask[[0, 4, 8]] = False
    out, lse = fastseq.ops.rel_attention(q, k, v, pos, u, w, attn_mask=mask, return_lse=True,
                                         backend="triton")
    hidden = [0, 4, 8]
    assert torch.equal(out[:, :, hidden], torch.zeros_like(out[:, :, hidden]))
    assert torch.isneginf(lse[:, :, hidden]).all()
    out.sum().backward()
    assert torch.equal(q.grad[:, :, hidden], torch.zeros_like(q.grad[:, :, hidden]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, pos, u, w))


def test_strided_inputs():
    """Sequence-first buffers seen as [B, H, L, D] (what the Transformer-XL layer passes)."""
    triton_or_skip()
    L, M, B, H, D = 11, 6, 2, 3, 16
    qkv = torch.randn(L + M, B, 3, H, D)  # [Lk, B, (q, k, v), H, D]
    q = qkv[M:, :, 0].permute(1, 2, 0, 3)
    k, v = (qkv[:, :, i].permute(1, 2, 0, 3) for i in (1, 2))
    pos, u, w = torch.randn(L + M, H, D), torch.randn(H, D), torch.randn(H, D)
    expected = reference.relative_attention(q, k, v, pos, u, w)
    got = fastseq.ops.rel_attention(q, k, v, pos, u, w, backend="triton")
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


def dropout_keep_mask(p, seed, L=19, M=21, H=2):
    """Read the kernel's keep-mask back: q = 0 and zero biases make every score 0, so every key
    has probability 1/Lk (non-causal), and with v = I out[i, j] = keep[i, j] / (Lk (1 - p))."""
    S = L + M
    q = torch.zeros(1, H, L, 16, dtype=torch.float64)
    k = torch.randn(1, H, S, 16, dtype=torch.float64)
    v = torch.eye(S, dtype=torch.float64).expand(1, H, S, S)
    zeros = torch.zeros(H, 16, dtype=torch.float64)
    torch.manual_seed(seed)
    out = fastseq.ops.rel_attention(q, k, v, torch.randn(S, H, 16, dtype=torch.float64), zeros,
                                    zeros, is_causal=False, dropout_p=p, backend="triton")
    return (out * S * (1 - p)).round()


def test_dropout_keep_rate_and_determinism():
    triton_or_skip()
    p = 0.3
    keep = dropout_keep_mask(p, seed=3)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert abs(keep.mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / keep.numel())
    assert torch.equal(keep, dropout_keep_mask(p, seed=3))
    assert not torch.equal(keep, dropout_keep_mask(p, seed=4))


def test_dropout_forward_and_backward_use_the_same_mask():
    """Against the reference given the kernel's own keep-mask (float64): the backward
    regenerated exactly the forward's mask, in all three backward kernels."""
    triton_or_skip()
    p, seed, L, M, H = 0.3, 8, 19, 21, 2
    keep = dropout_keep_mask(p, seed, L, M, H)
    tensors, _ = make_inputs((1, H, L, M, 25, 16, L + M))
    leaves = [t.requires_grad_() for t in tensors]
    torch.manual_seed(seed)  # the op's seed: the first draw after it, as in dropout_keep_mask
    torch.randn(L + M, H, 16, dtype=torch.float64)  # (dropout_keep_mask's pos draw)
    out = fastseq.ops.rel_attention(*leaves, is_causal=False, dropout_p=p, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref = reference.relative_attention(*leaves, is_causal=False, dropout_p=p, dropout_mask=keep)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for g, r in zip(grads, torch.autograd.grad(ref, leaves, grad_out)):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("variant", ["causal-window", "float-mask-dropout"])
def test_opcheck(variant):
    triton_or_skip()
    tensors, _ = make_inputs((1, 2, 7, 4, 8, 16, 8), dtype=torch.float32)
    q, k, v, pos, u, w = tensors
    qu, qv = q + u[:, None], (q + w[:, None]).transpose(2, 3).contiguous().transpose(2, 3)
    mask, seed, p, causal, window, offset = None, None, 0.0, True, 5, 0
    if variant == "float-mask-dropout":
        mask, seed, p, causal, window, offset = (torch.randn(1, 1, 7, 11).expand(1, 2, 7, 11),
                                                 torch.tensor([99]), 0.2, False, None, 3)
    forward = torch.ops.fastseq.rel_attention_forward_triton
    args = (qu, qv, k, v, pos, mask, seed, p, causal, window, offset, 0.25)
    torch.library.opcheck(forward, (qu.requires_grad_(), *args[1:]))
    out, lse = forward(qu.detach(), *args[1:])
    torch.library.opcheck(torch.ops.fastseq.rel_attention_backward_triton,
                          (torch.randn_like(out), qu.detach(), qv, k, v, pos, lse,
                           torch.randn_like(lse), mask, mask is not None, seed, p, causal,
                           window, offset, 0.25))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    triton_or_skip()
    tensors, _ = make_inputs((2, 2, 9, 5, 10, 16, 16), dtype=torch.float32)
    leaves = [t.requires_grad_() for t in tensors]

    def loss(q, k, v, pos, u, w):
        return fastseq.ops.rel_attention(q, k, v, pos, u, w, window=7,
                                         backend="triton").square().sum()

    torch._dynamo.reset()
    eager = torch.autograd.grad(loss(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend=compiler)(*leaves),
                              leaves)
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_backend_matches_reference(variant):
    """The torch backend (auto's CPU choice: torch's SDPA with the position term as its mask):
    outputs and every gradient equal the reference in float64, rows with nothing visible
    included; it has no log-sum-exp, and says so by name."""
    tensors, kwargs = make_inputs(CASES["Lq45-M70-clamped"], variant)
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    extra = dict(kwargs, attn_mask=leaves[6]) if len(leaves) > 6 else kwargs
    grad_out = None
    results = []
    for backend in ("reference", "torch"):
        out = fastseq.ops.rel_attention(*leaves[:6], backend=backend, **extra)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        results.append((out, torch.autograd.grad((out * grad_out).sum(), leaves)))
    (expected, expected_grads), (got, grads) = results
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    for name, g, e in zip(NAMES, grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-11, rtol=1e-11, msg=name)
    with pytest.raises(fastseq.BackendError, match="does not return the log-sum-exp"):
        fastseq.ops.rel_attention(*leaves[:6], backend="torch", return_lse=True, **extra)


def test_auto_on_cpu_is_the_torch_backend():
    with torch.device("cpu"):  # auto's CPU choice, also in a GPU run
        tensors, _ = make_inputs((1, 2, 4, 3, None, 8, 8), dtype=torch.float32)
        torch.testing.assert_close(fastseq.ops.rel_attention(*tensors),
                                   fastseq.ops.rel_attention(*tensors, backend="torch"))
        torch.testing.assert_close(fastseq.ops.rel_attention(*tensors),
                                   reference.relative_attention(*tensors))


@pytest.mark.parametrize("shape", [(0, 2, 5, 3), (2, 2, 0, 3), (2, 2, 0, 0)],
                         ids=["B0", "Lq0", "Lk0"])
def test_empty_shapes(shape):
    triton_or_skip()
    B, H, L, M = shape
    q = torch.randn(B, H, L, 8, requires_grad=True)
    k, v = torch.randn(B, H, L + M, 8), torch.randn(B, H, L + M, 4)
    out = fastseq.ops.rel_attention(q, k, v, torch.randn(3, H, 8), torch.randn(H, 8),
                                    torch.randn(H, 8), backend="triton")
    assert out.shape == (B, H, L, 4)
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("bad, message", [
    (dict(key=torch.randn(2, 3, 4, 8), value=torch.randn(2, 3, 4, 8)),
     "key length 4 must be >= query length 5"),
    (dict(key=torch.randn(2, 3, 9, 7)), "key must have shape [B, H, Lk, D] = [2, 3, 9, 8]"),
    (dict(value=torch.randn(2, 3, 8, 8)), "value must have shape [B, H, Lk, Dv] = [2, 3, 9, 8]"),
    (dict(pos=torch.randn(6, 2, 8)), "pos must have shape [P, H, D] = [6, 3, 8]"),
    (dict(pos=torch.randn(0, 3, 8)), "pos must have at least one row"),
    (dict(content_bias=torch.randn(3, 4)), "content_bias must have shape [H, D] = [3, 8]"),
    (dict(position_bias=torch.randn(3, 8, dtype=torch.float64)),
     "position_bias must have dtype torch.float32"),
    (dict(query=torch.randn(3, 5, 8)), "query must be 4-D"),
    (dict(attn_mask=torch.ones(5, 8, dtype=torch.bool)),
     "attn_mask must broadcast to [B, H, Lq, Lk] = [2, 3, 5, 9]"),
    (dict(window=0), "window must be None or an int >= 1"),
    (dict(pos_offset=-1), "pos_offset must be an int >= 0"),
    (dict(dropout_p=1.0), "dropout_p must be a number in [0, 1)"),
])
def test_errors_name_the_argument(bad, message):
    args = dict(query=torch.randn(2, 3, 5, 8), key=torch.randn(2, 3, 9, 8),
                value=torch.randn(2, 3, 9, 8), pos=torch.randn(6, 3, 8),
                content_bias=torch.randn(3, 8), position_bias=torch.randn(3, 8))
    args.update(bad)
    with pytest.raises(fastseq.InputError) as info:
        fastseq.ops.rel_attention(**args)
    assert message in str(info.value)


@pytest.mark.parametrize("rows, variant", [(1, "causal"), (5, "window"), (16, "clamped"),
                                           (3, "bidirectional"), (2, "same-length")])
def test_short_queries_take_the_decode_kernel(rows, variant):
    """A generation step (<= 16 rows against >= 256 keys, no mask, dropout or gradient) runs
    the split-KV decode kernel (explain says so) and equals the reference: memory, clamped
    positions (P < Lk), windows, a bidirectional offset; with a gradient needed the fused
    kernel runs instead."""
    triton_or_skip()
    B, H, S, D, DV = 2, 2, 300, 16, 8
    P = 40 if variant == "clamped" else S
    kwargs = {"window": {"window": 37}, "same-length": {"window": 250},
              "bidirectional": {"is_causal": False, "pos_offset": 4}}.get(variant, {})
    q = torch.randn(B, H, rows, D, dtype=torch.float64)
    k, v = torch.randn(B, H, S, D, dtype=torch.float64), torch.randn(B, H, S, DV,
                                                                     dtype=torch.float64)
    pos = torch.randn(P, H, D, dtype=torch.float64)
    u, w = torch.randn(H, D, dtype=torch.float64), torch.randn(H, D, dtype=torch.float64)
    report = fastseq.explain(fastseq.ops.rel_attention, q, k, v, pos, u, w, **kwargs,
                             return_lse=True, backend="triton")
    assert "split-KV decode" in report.decisions[0].variant
    out, lse = report.result
    expected = reference.relative_attention(q, k, v, pos, u, w, **kwargs, return_lse=True)
    torch.testing.assert_close(out, expected[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, expected[1], atol=1e-12, rtol=1e-12)
    report = fastseq.explain(fastseq.ops.rel_attention, q, k, v, pos.requires_grad_(), u, w,
                             **kwargs, backend="triton")
    assert "fused kernels" in report.decisions[0].variant


def test_decode_kernel_low_precision_within_the_rule():
    triton_or_skip()
    B, H, S, D = 2, 2, 270, 32
    leaves = [torch.randn(B, H, 4, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D),
              torch.randn(S, H, D), torch.randn(H, D), torch.randn(H, D)]
    expected = reference.relative_attention(*[t.double() for t in leaves], window=100)
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.to(dtype) for t in leaves]
        plain = reference.relative_attention(*args, window=100)
        got = fastseq.ops.rel_attention(*args, window=100, backend="triton")
        assert_within_rule(f"out {dtype}", got, plain, expected)


def test_decode_op_passes_opcheck():
    triton_or_skip()
    qu, qv = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    k, v, pos = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 8), torch.randn(20, 2, 16)
    torch.library.opcheck(torch.ops.fastseq.rel_attention_decode_triton,
                          (qu, qv, k, v, pos, True, 30, 0, 0.25))
