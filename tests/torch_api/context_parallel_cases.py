"""Context-parallel cases for tests/torch_api/test_multi_rank.py: ring attention equals
attention over the whole sequence (causal and not, both layouts, lengths that do not divide by
the ranks, GQA), forward and every gradient in float64, and the Transformer-XL segment split
across ranks equals the one-process LM over the same slices."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fastseq
from fastseq import distributed as cp
from fastseq import ops

F64 = torch.float64


def _ring_equals_whole(mesh_group, seq_len: int, layout: str, is_causal: bool, heads_k: int,
                       backend: str) -> None:
    torch.manual_seed(seq_len)
    q = torch.randn(2, 2, seq_len, 4, dtype=F64, requires_grad=True)
    k = torch.randn(2, heads_k, seq_len, 4, dtype=F64, requires_grad=True)
    v = torch.randn(2, heads_k, seq_len, 3, dtype=F64, requires_grad=True)
    dout = torch.randn(2, 2, seq_len, 3, dtype=F64)
    want = ops.attention(q, k, v, is_causal=is_causal, enable_gqa=heads_k != 2,
                         backend="reference")
    want_grads = torch.autograd.grad(want, (q, k, v), dout)

    def local(t):
        return cp.split_sequence(t.detach(), 2, group=mesh_group, layout=layout)
    lq, lk, lv = (local(t).requires_grad_() for t in (q, k, v))
    got = cp.ring_attention(lq, lk, lv, is_causal=is_causal, group=mesh_group, layout=layout,
                            backend=backend)
    grads = torch.autograd.grad(got, (lq, lk, lv), local(dout))

    def whole(t):
        return cp.gather_sequence(t, 2, seq_len, group=mesh_group, layout=layout)
    torch.testing.assert_close(whole(got), want)
    for name, g, w in zip("qkv", grads, want_grads):
        torch.testing.assert_close(whole(g), w, msg=lambda m: f"d{name}: {m}")


def ring_attention(mesh):
    group = mesh.get_group()
    n = mesh.size()
    for layout in cp.LAYOUTS:
        for is_causal in (True, False):
            # 3n + 1 positions: no layout splits them evenly; 2 < n pieces of 2n hold nothing
            _ring_equals_whole(group, 3 * n + 1, layout, is_causal, 2, "reference")
    _ring_equals_whole(group, 2, "zigzag", True, 2, "reference")
    # Triton blocks (the backward kernel given the final log-sum-exp), GQA
    _ring_equals_whole(group, 4 * n - 1, "zigzag", True, 1, "triton")
    _ring_equals_whole(group, 3 * n + 2, "contiguous", False, 2, "triton")


def ring_attention_refusals(mesh):
    group = mesh.get_group()
    q = torch.randn(1, 2, 3, 4, dtype=F64)
    with pytest.raises(fastseq.InputError, match="layout must be one of"):
        cp.ring_attention(q, q, q, group=group, layout="striped", seq_len=3 * mesh.size())
    with pytest.raises(fastseq.InputError, match="holds 3 positions, but its contiguous part"):
        cp.ring_attention(q, q, q, group=group, seq_len=5 * mesh.size())
    with pytest.raises(fastseq.InputError, match="backend must be one of .*'torch'"):
        cp.ring_attention(q, q, q, group=group, seq_len=3 * mesh.size(), backend="torch")
    with pytest.raises(fastseq.InputError, match="key must be a 4-D tensor"):
        cp.ring_attention(q, q[0], q, group=group, seq_len=3 * mesh.size())



def _lm():
    torch.manual_seed(5)
    return fastseq.nn.TransformerXLLM(13, 2, 2, 8, 4, 16, 0.0, 0.0, d_embed=8, div_val=2,
                                      cutoffs=[5, 9], tie_projs=[False, True, True],
                                      mem_len=3).double()


def transformer_xl_lm(mesh):
    """Two segments of 3n + 1 tokens (slices 4, 3, 3 on 3 ranks): each rank's loss equals the
    one-process LM's on its slice run after the slices before it; rank 0 carries the memory
    to the second segment; the gradients summed over ranks equal the one process's."""
    group, n, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    torch.manual_seed(6)
    steps = [torch.randint(13, (3 * n + 1, 2)) for _ in range(2)]
    targets = [torch.randint(13, (3 * n + 1, 2)) for _ in range(2)]
    one, mems, want = _lm(), None, []
    for data, target in zip(steps, targets):
        sizes = [size for (size,) in cp.piece_sizes(data.shape[0], n)]
        for piece, piece_target in zip(data.split(sizes), target.split(sizes)):
            loss, mems = one(piece, targets=piece_target, mems=mems)
            want.append(loss)
            loss.sum().backward()
    # Per-rank results are compared after every collective of the case: a rank that raised
    # early would leave the others waiting for its memory.
    ranked, got_mems, mismatches = _lm(), None, []
    for step, (data, target) in enumerate(zip(steps, targets)):
        local = cp.split_sequence(data, 0, group=group)
        loss, got_mems = cp.transformer_xl_lm_loss(
            ranked, local, cp.split_sequence(target, 0, group=group), got_mems, group=group)
        mismatches += _differs(f"step {step} loss", loss, want[step * n + rank])
        loss.sum().backward()
    if rank == 0:
        assert len(got_mems) == len(mems) == 3
        for i, (g, w) in enumerate(zip(got_mems, mems)):
            mismatches += _differs(f"memory {i}", g, w)
    else:
        assert got_mems is None
    for (name, p), w in zip(ranked.named_parameters(), one.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)
        mismatches += _differs(f"{name}.grad", grad, w.grad)
    assert not mismatches, "\n".join(mismatches)


def _differs(what: str, got, want) -> list:
    try:
        torch.testing.assert_close(got, want)
    except AssertionError as error:
        return [f"{what}: {error}"]
    return []


def transformer_xl_refusals(mesh):
    group = mesh.get_group()
    lm = _lm()
    with pytest.raises(fastseq.InputError, match="at least mem_len = 3 positions"):
        cp.transformer_xl_segment(lm, torch.zeros(2, 2, dtype=torch.long), group=group)
    with pytest.raises(fastseq.InputError, match="must be a fastseq.nn.TransformerXL"):
        cp.transformer_xl_segment(torch.nn.Linear(2, 2), torch.zeros(4, 2, dtype=torch.long),
                                  group=group)


CASES = {fn.__name__: fn for fn in (ring_attention, ring_attention_refusals, transformer_xl_lm,
                                    transformer_xl_refusals)}
