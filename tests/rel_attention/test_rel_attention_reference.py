"""fastseq.reference.relative_attention: checked element by element against its written
definition, and against the original Transformer-XL formulation (BD + _rel_shift) with memory,
clamp_len and same_length."""
import math

import pytest
import torch

from fastseq import reference

rel = reference.relative_attention


def inputs(b=2, h=3, lq=5, lk=8, d=4, p=None):
    def r(*s):
        return torch.randn(*s, dtype=torch.float64)
    return r(b, h, lq, d), r(b, h, lk, d), r(b, h, lk, d), r(p or lk, h, d), r(h, d), r(h, d)


def by_definition(q, k, v, pos, u, w, *, is_causal=True, window=None, pos_offset=0):
    """The docstring's formula, one (b, h, i, j) at a time."""
    B, H, Lq, D = q.shape
    Lk, P = k.shape[2], pos.shape[0]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                scores, keys = [], []
                for j in range(Lk):
                    d = Lk - Lq + i - j
                    if (is_causal and d < 0) or (window is not None and d >= window):
                        continue
                    row = min(max(d + pos_offset, 0), P - 1)
                    s = (q[b, h, i] + u[h]) @ k[b, h, j] + (q[b, h, i] + w[h]) @ pos[row, h]
                    scores.append(s / math.sqrt(D))
                    keys.append(j)
                if keys:
                    p = torch.softmax(torch.stack(scores), 0)
                    out[b, h, i] = p @ v[b, h, keys]
    return out


@pytest.mark.parametrize("kwargs", [
    {}, {"window": 3}, {"is_causal": False, "pos_offset": 4}, {"pos_offset": 2},
], ids=["causal", "window", "bidirectional", "offset"])
@pytest.mark.parametrize("num_pos", [8, 3, 13], ids=["P=Lk", "clamped", "P>Lk"])
def test_matches_definition(kwargs, num_pos):
    q, k, v, pos, u, w = inputs(p=num_pos)
    torch.testing.assert_close(rel(q, k, v, pos, u, w, **kwargs),
                               by_definition(q, k, v, pos, u, w, **kwargs))


@pytest.mark.parametrize("lq,mem", [(5, 3), (4, 0), (1, 6), (7, 7)])
def test_matches_original_formulation(lq, mem):
    lk = lq + mem
    q, k, v, pos, u, w = inputs(lq=lq, lk=lk)
    r_original = pos.flip(0)  # original order: distances lk-1 ... 0
    torch.testing.assert_close(rel(q, k, v, pos, u, w),
                               reference.rel_attention_original(q, k, v, r_original, u, w))


@pytest.mark.parametrize("clamp_len", [0, 2, 5])
def test_clamp_len_matches_original(clamp_len):
    q, k, v, _, u, w = inputs(lq=4, lk=9)
    embeddings = torch.randn(clamp_len + 1, 3, 4, dtype=torch.float64)  # rows 0..clamp_len
    distances = torch.arange(8, -1, -1).clamp(max=clamp_len)         # the original's pos_seq
    original = reference.rel_attention_original(q, k, v, embeddings[distances], u, w)
    torch.testing.assert_close(rel(q, k, v, embeddings, u, w), original)


@pytest.mark.parametrize("lq,mem,mem_len", [(4, 4, 4), (5, 3, 3), (3, 6, 4), (4, 0, 4)])
def test_same_length_is_a_window_of_mem_len(lq, mem, mem_len):
    q, k, v, pos, u, w = inputs(lq=lq, lk=lq + mem)
    original = reference.rel_attention_original(q, k, v, pos.flip(0), u, w, same_length=True,
                                                mem_len=mem_len)
    torch.testing.assert_close(rel(q, k, v, pos, u, w, window=mem_len), original)


def test_extra_masks_lse_and_empty_rows():
    q, k, v, pos, u, w = inputs()
    mask = torch.rand(2, 1, 5, 8) > 0.3
    mask[0, 0, 1] = False
    out, lse = rel(q, k, v, pos, u, w, attn_mask=mask, return_lse=True)
    assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1]))
    assert torch.isinf(lse[0, :, 1]).all()
    float_mask = torch.where(mask, 0.0, float("-inf")).double()
    torch.testing.assert_close(rel(q, k, v, pos, u, w, attn_mask=float_mask), out)


def test_memory_must_come_first():
    q, k, v, pos, u, w = inputs(lq=6, lk=4)
    with pytest.raises(ValueError, match="key length 4 must be >= query length 6"):
        rel(q, k, v, pos, u, w)
