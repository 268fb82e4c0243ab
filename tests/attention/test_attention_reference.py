"""fastseq.reference.scaled_dot_product_attention against torch's SDPA in float64: masks of every
broadcastable shape, causal with L != S, scale, GQA, value head dim, the deliberate zeros for
fully masked rows, log-sum-exp and dropout with an explicit mask."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastseq import reference

sdpa = reference.scaled_dot_product_attention


def qkv(b=2, hq=4, hk=4, lq=5, lk=7, e=8, ev=None, requires_grad=False):
    def r(*s):
        return torch.randn(*s, dtype=torch.float64, requires_grad=requires_grad)
    return r(b, hq, lq, e), r(b, hk, lk, e), r(b, hk, lk, ev or e)


MASK_SHAPES = [(5, 7), (2, 1, 5, 7), (2, 4, 5, 7), (1, 4, 1, 7), (2, 1, 1, 7)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_match_sdpa(shape, kind):
    q, k, v = qkv(requires_grad=True)
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
        mask[..., 0] = True  # every row keeps a key: torch gives NaN for empty rows
    else:
        mask = torch.randn(shape, dtype=torch.float64)
    ours = sdpa(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, theirs)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(theirs, (q, k, v), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("lq,lk", [(5, 7), (7, 5), (1, 1), (6, 6)])
def test_causal_top_left_and_scale(lq, lk):
    q, k, v = qkv(lq=lq, lk=lk)
    ours = sdpa(q, k, v, is_causal=True, scale=0.3)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(ours, theirs)


def test_gqa_and_value_head_dim():
    q, k, v = qkv(hq=6, hk=2, ev=3)
    ours = sdpa(q, k, v, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert ours.shape == (2, 6, 5, 3)
    torch.testing.assert_close(ours, theirs)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    q, k, v = qkv(requires_grad=True)
    mask = torch.rand(5, 7) > 0.5
    mask[2] = False
    mask[2 + 1, 0] = True
    out, lse = sdpa(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.isinf(lse[:, :, 2]).all() and (lse[:, :, 2] < 0).all()
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # Older torch gives NaN there (the documented difference); torch 2.14's CPU math path
    # already gives zeros. Either way fastseq's row is zeros.
    empty_row = torch_out[:, :, 2]
    assert torch.isnan(empty_row).all() or torch.equal(empty_row, torch.zeros_like(empty_row))
    rows = [i for i in range(5) if i != 2]
    torch.testing.assert_close(out[:, :, rows], torch_out[:, :, rows])
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][:, :, 2], torch.zeros_like(grads[0][:, :, 2]))


def test_float_mask_with_minus_inf_rows():
    q, k, v = qkv()
    mask = torch.zeros(5, 7, dtype=torch.float64)
    mask[1] = float("-inf")
    out = sdpa(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))


def test_log_sum_exp():
    q, k, v = qkv()
    _, lse = sdpa(q, k, v, return_lse=True, scale=0.5)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-2, -1) * 0.5, dim=-1))


def test_dropout_explicit_mask_and_keep_rate():
    q, k, v = qkv()
    keep = torch.rand(2, 4, 5, 7) > 0.25
    out = sdpa(q, k, v, dropout_p=0.25, dropout_mask=keep)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(out, (probs * keep / 0.75) @ v)
    q, k, v = qkv(b=4, lq=64, lk=64)
    v = torch.ones_like(v)
    out = sdpa(q, k, v, dropout_p=0.3)  # each output is (sum of kept probs) / 0.7, mean 1
    assert abs(out.mean().item() - 1.0) < 0.03


def test_causal_combined_with_padding_mask():
    q, k, v = qkv(lq=6, lk=6)
    pad = torch.tensor([True] * 4 + [False] * 2)
    ours = sdpa(q, k, v, attn_mask=pad, is_causal=True)
    both = torch.ones(6, 6, dtype=torch.bool).tril() & pad
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=both))
