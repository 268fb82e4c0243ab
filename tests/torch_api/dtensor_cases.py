"""The DTensor cases tests/torch_api/test_multi_rank.py runs in its gloo processes: each public op called
with DTensor inputs (sharded on the batch or the heads, weights replicated) equals the same op
on the whole tensors in one process, in float64, outputs and every gradient; bad placements are
refused by name. Every rank computes the one-process result itself from the same seeded
tensors, so nothing but the DTensors' own gathers crosses processes."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import fastseq
from fastseq import ops

F64 = torch.float64
PLAIN = "plain"  # a layout entry: pass the whole tensor as a plain tensor
GRIDS = {}  # size -> a [1, size] DeviceMesh, set by tests/torch_api/multi_rank.py


def _flat(result) -> list:
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [leaf for item in result for leaf in _flat(item)]
    return []


def _distribute(value, mesh, placement):
    if isinstance(value, (tuple, list)):
        return type(value)(_distribute(v, mesh, placement) for v in value)
    if not isinstance(value, Tensor) or placement == PLAIN:
        return value
    dt = distribute_tensor(value.detach(), mesh, [placement])
    return dt.requires_grad_(value.requires_grad)


def _leaves_needing_grad(kwargs: dict) -> list:
    return [t for t in _flat(list(kwargs.values())) if t.requires_grad]


def check_equal(op, mesh, layout: dict, args: tuple = (), *, grads: bool = True,
                after=None, **kwargs) -> None:
    """op(*args, **kwargs) on DTensors laid out as `layout` ({name: placement}; unlisted
    tensors replicated) equals op on the whole tensors: outputs, and the gradients of every
    input that requires grad for one random cotangent. `after(kwargs)`: tensors to compare
    after the call (caches written in place)."""
    whole = {k: (v.clone() if isinstance(v, Tensor) and not v.requires_grad else v)
             for k, v in kwargs.items()}
    want = _flat(op(*args, **whole))
    torch.manual_seed(1)
    cotangents = [torch.randn_like(w) for w in want]
    sharded = {k: _distribute(v, mesh, layout.get(k, Replicate())) for k, v in kwargs.items()}
    got = _flat(op(*args, **sharded))
    assert len(got) == len(want), (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        assert isinstance(g, DTensor), f"output {i} is a {type(g).__name__}, not a DTensor"
        assert g.shape == w.shape, f"output {i}: global shape {g.shape} != {w.shape}"
        torch.testing.assert_close(g.full_tensor(), w, msg=lambda m: f"output {i}: {m}")
    if after is not None:
        for i, (g, w) in enumerate(zip(after(sharded), after(whole))):
            torch.testing.assert_close(g.full_tensor() if isinstance(g, DTensor) else g, w,
                                       msg=lambda m: f"after the call, tensor {i}: {m}")
    if not grads:
        return
    inputs, d_inputs = _leaves_needing_grad(whole), _leaves_needing_grad(sharded)
    assert inputs and len(inputs) == len(d_inputs)
    pairs = [(w, c) for w, c in zip(want, cotangents) if w.requires_grad]
    expected = torch.autograd.grad([w for w, _ in pairs], inputs, [c for _, c in pairs])
    d_pairs = [(g, distribute_tensor(c, mesh, g.placements)) for g, c in zip(got, cotangents)
               if g.requires_grad]
    found = torch.autograd.grad([g for g, _ in d_pairs], d_inputs, [c for _, c in d_pairs])
    for i, (g, w) in enumerate(zip(found, expected)):
        torch.testing.assert_close(g.full_tensor(), w, msg=lambda m: f"gradient {i}: {m}")


def refused(match: str, op, mesh, layout: dict, args: tuple = (), **kwargs) -> None:
    sharded = {k: _distribute(v, mesh, layout.get(k, Replicate())) for k, v in kwargs.items()}
    with pytest.raises(fastseq.InputError, match=match):
        op(*args, **sharded)


def randn(*shape, grad=True) -> Tensor:
    return torch.randn(*shape, dtype=F64).requires_grad_(grad)


# Each case takes the mesh (1-D, 2 or 3 ranks) and raises on a mismatch. Shapes are odd and the
# batch 5 does not divide by 2 or 3 (DTensor's uneven pieces: 3+2, 2+2+1).

def attention_batch(mesh):
    q, k, v = randn(5, 2, 3, 4), randn(5, 2, 7, 4), randn(5, 2, 7, 3)
    mask = torch.rand(5, 1, 3, 7) > 0.3
    batch = {"query": Shard(0), "key": Shard(0), "value": Shard(0), "attn_mask": PLAIN}
    for backend in ("triton", "torch"):  # torch's SDPA gives no log-sum-exp
        check_equal(ops.attention, mesh, batch, query=q, key=k, value=v, attn_mask=mask,
                    is_causal=True, return_lse=backend == "triton", backend=backend)
    description = ops.AttentionMask(key_end=torch.tensor([7, 3, 0, 5, 1]))
    check_equal(ops.attention, mesh, batch, query=q, key=k, value=v, attn_mask=description,
                backend="reference")


def attention_heads_gqa(mesh):
    n = mesh.size()
    q, k, v = randn(2, 2 * n, 5, 4), randn(2, n, 6, 4), randn(2, n, 6, 4)
    heads = {"query": Shard(1), "key": Shard(1), "value": Shard(1), "sinks": Shard(0),
             "alibi_slopes": Shard(0)}
    check_equal(ops.attention, mesh, heads, query=q, key=k, value=v, enable_gqa=True,
                sinks=randn(2 * n), alibi_slopes=torch.rand(2 * n, dtype=F64),
                window=(2, 1), return_lse=True, backend="triton")


def attention_varlen_heads(mesh):
    cu = torch.tensor([0, 3, 3, 8])
    heads = {"query": Shard(1), "key": Shard(1), "value": Shard(1)}
    check_equal(ops.attention_varlen, mesh, heads, query=randn(8, 5, 4), key=randn(8, 5, 4),
                value=randn(8, 5, 4), cu_seqlens_q=cu, cu_seqlens_k=cu, is_causal=True,
                return_lse=True, backend="reference")


def kv_cache_step(mesh):
    torch.manual_seed(2)
    q, kc, vc = randn(5, 3, 1, 4, grad=False), randn(5, 3, 9, 4, grad=False), \
        randn(5, 3, 9, 4, grad=False)
    new_k, new_v = randn(5, 3, 1, 4, grad=False), randn(5, 3, 1, 4, grad=False)
    lengths = torch.tensor([0, 4, 8, 2, 5])

    def caches(kwargs):
        return kwargs["k_cache"], kwargs["v_cache"]
    for axis in (0, 1):
        layout = {name: Shard(axis) for name in ("query", "k_cache", "v_cache", "key", "value")}
        layout["cache_seqlens"] = PLAIN if axis else Shard(0)
        check_equal(ops.attention_with_kv_cache, mesh, layout, grads=False, after=caches,
                    query=q, k_cache=kc.clone(), v_cache=vc.clone(), cache_seqlens=lengths,
                    key=new_k, value=new_v, return_lse=True, backend="triton")


def rel_attention_heads_and_batch(mesh):
    q, k, v = randn(5, 3, 4, 4), randn(5, 3, 6, 4), randn(5, 3, 6, 4)
    extra = dict(pos=randn(6, 3, 4), content_bias=randn(3, 4), position_bias=randn(3, 4))
    heads = {"query": Shard(1), "key": Shard(1), "value": Shard(1), "pos": Shard(1),
             "content_bias": Shard(0), "position_bias": Shard(0)}
    check_equal(ops.rel_attention, mesh, heads, query=q, key=k, value=v, return_lse=True,
                backend="triton", **extra)
    batch = {"query": Shard(0), "key": Shard(0), "value": Shard(0)}
    check_equal(ops.rel_attention, mesh, batch, query=q, key=k, value=v, window=3,
                backend="torch", **extra)


def block_recurrent(mesh):
    q, k, v = randn(5, 2, 3, 4), randn(5, 2, 6, 4), randn(5, 2, 6, 4)
    q2, k2, v2 = randn(5, 2, 3, 4), randn(5, 2, 2, 3, 4), randn(5, 2, 2, 3, 4)
    batch = {name: Shard(0) for name in ("query", "key", "value", "query2", "key2", "value2")}
    check_equal(ops.block_recurrent_attention, mesh, batch, query=q, key=k, value=v,
                query2=q2, key2=k2, value2=v2, window=3, bias=randn(2, 4), group_size=2,
                backend="triton")
    gate = {"state": Shard(0), "y": Shard(0), "forget": Shard(0), "remember": Shard(0)}
    check_equal(ops.block_recurrent_gate, mesh, gate, state=randn(5, 3, 4), y=randn(5, 3, 4),
                forget=randn(5, 3, 4), remember=randn(5, 3, 4), backend="triton")


def global_attention_batch(mesh):
    batch = {"query": Shard(0), "keys": Shard(0), "values": Shard(0), "lengths": PLAIN}
    check_equal(ops.global_attention, mesh, batch, query=randn(5, 2, 4), keys=randn(5, 6, 4),
                values=randn(5, 6, 3), score="additive", v=randn(4),
                lengths=torch.tensor([6, 0, 3, 1, 5]), backend="triton")


def recurrent_cells(mesh):
    weights = dict(w_ih=randn(12, 3), w_hh=randn(12, 3), b_ih=randn(12), b_hh=randn(12))
    batch = {"input": Shard(0), "hx": Shard(0)}
    check_equal(ops.lstm_cell, mesh, batch, input=randn(5, 3), hx=(randn(5, 3), randn(5, 3)),
                backend="triton", **weights)
    gru = {k: v[:9] for k, v in weights.items()}
    check_equal(ops.gru_cell, mesh, batch, input=randn(5, 3), hx=randn(5, 3), backend="torch",
                **gru)


def recurrent_layers(mesh):
    weights = [randn(12, 3), randn(12, 3), randn(12), randn(12)]
    batch = {"input": Shard(1), "hx": Shard(0)}
    check_equal(ops.rnn_layer, mesh, batch, ("lstm",), input=randn(4, 5, 3),
                hx=(randn(5, 3), randn(5, 3)), w_ih=weights[0], w_hh=weights[1],
                b_ih=weights[2], b_hh=weights[3], lengths=[4, 1, 0, 3, 2], backend="triton")
    gru = [w[:9] for w in weights]
    check_equal(ops.rnn_bidirectional_layer, mesh,
                {"input": Shard(1), "hx": Shard(1), "lengths": PLAIN},
                ("gru",), input=randn(4, 5, 3), hx=randn(2, 5, 3), forward_weights=gru,
                reverse_weights=[w.detach().clone().requires_grad_() for w in gru],
                lengths=torch.tensor([4, 1, 0, 3, 2]), backend="triton")
    check_equal(ops.layer_norm_rnn_layer, mesh, {"input": Shard(1)}, ("gru",),
                input=randn(4, 5, 3), hx=None, w_ih=gru[0], w_hh=gru[1], b_ih=gru[2],
                b_hh=gru[3], ln_ih_weight=randn(9), ln_hh_weight=randn(9), backend="reference")


def recurrent_stack(mesh):
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    weights = [w.detach().clone().requires_grad_() for w in lstm._flat_weights]
    check_equal(ops.rnn_stack, mesh, {"input": Shard(0), "hx": Shard(1)}, ("lstm",),
                input=randn(5, 4, 3), hx=(randn(4, 5, 4), randn(4, 5, 4)), weights=weights,
                num_layers=2, bidirectional=True, batch_first=True, backend="torch")


def tensor_parallel_block(mesh):
    from fastseq.examples.tensor_parallel import check_tensor_parallel_block
    check_tensor_parallel_block(mesh)


def two_dim_mesh(mesh):
    """A [1, n] mesh ("dp" x "tp", the data-parallel x tensor-parallel shape): the batch on
    mesh dim 0 and the heads on dim 1 at once, then the batch nested over both dims. (The
    runner builds the grids: every rank of the world takes part in making a mesh.)"""
    n = mesh.size()
    grid = GRIDS[n]
    q, k, v = randn(5, 2 * n, 3, 4), randn(5, 2 * n, 6, 4), randn(5, 2 * n, 6, 4)
    for placements in ([Shard(0), Shard(1)], [Shard(0), Shard(0)]):
        whole = ops.attention(q, k, v, is_causal=True, return_lse=True, backend="reference")
        cotangents = [torch.randn_like(w) for w in whole]
        expected = torch.autograd.grad(whole, (q, k, v), cotangents)
        local = [distribute_tensor(t.detach(), grid, placements).requires_grad_()
                 for t in (q, k, v)]
        got = ops.attention(*local, is_causal=True, return_lse=True, backend="reference")
        for g, w in zip(got, whole):
            assert list(g.placements) == placements, g.placements
            torch.testing.assert_close(g.full_tensor(), w)
        grads = torch.autograd.grad(got, local, [distribute_tensor(c, grid, placements)
                                                 for c in cotangents])
        for g, w in zip(grads, expected):
            torch.testing.assert_close(g.full_tensor(), w)


def refusals(mesh):
    n = mesh.size()
    q, k, v = randn(4, 2 * n, 5, 4), randn(4, 2 * n, 5, 4), randn(4, 2 * n, 5, 4)
    both = dict(query=q, key=k, value=v)
    refused("sharded on dim 2 .* can be sharded along the batch \\(dim 0\\) or the heads",
            ops.attention, mesh, {"query": Shard(2), "key": Shard(2), "value": Shard(2)},
            **both)
    refused("splits query along the batch but key along the heads", ops.attention, mesh,
            {"query": Shard(0), "key": Shard(1), "value": Shard(0)}, **both)
    refused("value .* must be sharded on dim 1 too", ops.attention, mesh,
            {"query": Shard(1), "key": Shard(1)}, **both)
    partial = DTensor.from_local(q.detach()[:, :, :, :], mesh, [Partial()])
    with pytest.raises(fastseq.InputError, match="query is Partial on mesh dim 0"):
        ops.attention(partial, k.detach(), v.detach())
    refused("sinks is a plain tensor that requires grad", ops.attention, mesh,
            {"query": Shard(1), "key": Shard(1), "value": Shard(1), "sinks": PLAIN},
            sinks=randn(2 * n), **both)
    gqa = dict(query=randn(2, n + 1, 3, 4), key=randn(2, 1, 3, 4), value=randn(2, 1, 3, 4))
    if (n + 1) % n:
        refused("do not split evenly .* GQA|do not split evenly", ops.attention, mesh,
                {"query": Shard(1), "key": Shard(1), "value": Shard(1)}, enable_gqa=True,
                **gqa)
    table = torch.arange(4).reshape(4, 1)
    refused("split such a step along the heads", ops.attention_with_kv_cache, mesh,
            {"query": Shard(0), "block_table": Shard(0)},
            query=randn(4, 2, 1, 4, grad=False), k_cache=randn(4, 2, 8, 4, grad=False),
            v_cache=randn(4, 2, 8, 4, grad=False), cache_seqlens=3, block_table=table)
    d = distribute_tensor(q.detach(), mesh, [Shard(0)])
    with pytest.raises(RuntimeError, match="takes local tensors, not DTensors"):
        torch.ops.fastseq.block_recurrent_gate_triton(d, d, None, None, None)


CASES = {fn.__name__: fn for fn in (
    attention_batch, attention_heads_gqa, attention_varlen_heads, kv_cache_step,
    rel_attention_heads_and_batch, block_recurrent, global_attention_batch, recurrent_cells,
    recurrent_layers, recurrent_stack, tensor_parallel_block, two_dim_mesh, refusals)}
