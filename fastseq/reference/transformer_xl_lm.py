"""The original Transformer-XL language model (MemTransformerLM, attn_type=0) as one plain
function of a state dict with the original's key names: the ground truth of
fastseq.nn.TransformerXLLM's tests, written from the model's documented math, not from its
modules. The attention is the original's formulation (AC + rel_shift(BD), rel_attention_original);
the adaptive softmax computes every cluster's whole logits (keep_order: nll by token).
Dropout is not modelled (evaluate, or compare with dropout 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .rel_attention import rel_attention_original


@dataclass
class LMConfig:
    n_token: int
    n_layer: int
    n_head: int
    d_model: int
    d_head: int
    d_inner: int
    d_embed: int
    div_val: int
    cutoffs: Sequence[int]
    pre_lnorm: bool = False
    mem_len: int = 0
    ext_len: int = 0
    same_length: bool = False
    clamp_len: int = -1


def adaptive_embedding(p: dict, c: LMConfig, tokens: Tensor) -> Tensor:
    ends = [0, *c.cutoffs, c.n_token]
    out = torch.zeros(*tokens.shape, c.d_model, dtype=p["r_w_bias"].dtype)
    for i in range(len(ends) - 1):
        table = p[f"word_emb.emb_layers.{0 if c.div_val == 1 else i}.weight"]
        for index in zip(*torch.nonzero((tokens >= ends[i]) & (tokens < ends[i + 1]),
                                        as_tuple=True)):
            word = int(tokens[index]) - (0 if c.div_val == 1 else ends[i])
            vector = table[word]
            proj = p.get(f"word_emb.emb_projs.{0 if c.div_val == 1 else i}")
            out[index] = vector @ proj.t() if proj is not None else vector
    return out * math.sqrt(c.d_model)


def adaptive_log_prob(p: dict, c: LMConfig, hidden: Tensor) -> Tensor:
    """log p(word) [N, n_token] with the original's head: shortlist then one column per tail
    cluster, cluster i at column -i."""
    ends = [0, *c.cutoffs, c.n_token]
    clusters = len(ends) - 2

    def logits(i, rows):
        if c.div_val == 1:
            weight = p["crit.out_layers.0.weight"][ends[i]:ends[i + 1]]
            bias = p["crit.out_layers.0.bias"][ends[i]:ends[i + 1]]
        else:
            weight, bias = p[f"crit.out_layers.{i}.weight"], p[f"crit.out_layers.{i}.bias"]
        if i == 0 and clusters:
            weight = torch.cat([weight, p["crit.cluster_weight"]])
            bias = torch.cat([bias, p["crit.cluster_bias"]])
        proj = p.get(f"crit.out_projs.{i}")
        projected = rows @ proj if proj is not None else rows
        return projected @ weight.t() + bias

    head = torch.log_softmax(logits(0, hidden), -1)
    parts = [head[:, :ends[1]]]
    for i in range(1, clusters + 1):
        parts.append(head[:, head.shape[1] - i, None] + torch.log_softmax(logits(i, hidden), -1))
    return torch.cat(parts, -1)


def _layer(p: dict, prefix: str, c: LMConfig, w: Tensor, r: Tensor, mem: Optional[Tensor]):
    qlen, bsz = w.shape[:2]
    cat = torch.cat([mem, w]) if mem is not None else w
    norm = lambda name, x: F.layer_norm(x, (c.d_model,), p[f"{prefix}.{name}.weight"],  # noqa
                                        p[f"{prefix}.{name}.bias"])
    attn = prefix + ".dec_attn"
    heads = (norm("dec_attn.layer_norm", cat) if c.pre_lnorm else cat) @ \
        p[f"{attn}.qkv_net.weight"].t()
    q, k, v = heads.chunk(3, -1)
    q = q[-qlen:]
    split = lambda x: x.reshape(x.shape[0], bsz, c.n_head, c.d_head).permute(1, 2, 0, 3)  # noqa
    r_head = (r @ p[f"{attn}.r_net.weight"].t()).reshape(r.shape[0], c.n_head, c.d_head)
    vec = rel_attention_original(split(q), split(k), split(v), r_head, p["r_w_bias"],
                                 p["r_r_bias"], same_length=c.same_length, mem_len=c.mem_len)
    vec = vec.permute(2, 0, 1, 3).reshape(qlen, bsz, c.n_head * c.d_head)
    out = vec @ p[f"{attn}.o_net.weight"].t()
    out = w + out if c.pre_lnorm else norm("dec_attn.layer_norm", w + out)
    ff = prefix + ".pos_ff.CoreNet"
    core = lambda x: torch.relu(x @ p[f"{ff}.0.weight"].t() + p[f"{ff}.0.bias"]) @ \
        p[f"{ff}.3.weight"].t() + p[f"{ff}.3.bias"]  # noqa: E731
    if c.pre_lnorm:
        return core(norm("pos_ff.layer_norm", out)) + out
    return norm("pos_ff.layer_norm", out + core(out))


def lm_forward(p: dict, c: LMConfig, data: Tensor, target: Optional[Tensor],
               mems: Optional[list[Tensor]]):
    """(nll [tgt_len, B] by token, or log p [qlen, B, n_token] without target; new mems:
    n_layer + 1 tensors, or None without memory)."""
    qlen, bsz = data.shape
    mlen = mems[0].shape[0] if mems else 0
    klen = mlen + qlen
    pos_seq = torch.arange(klen - 1, -1, -1.0, dtype=p["r_w_bias"].dtype)
    if c.clamp_len > 0:
        pos_seq = pos_seq.clamp(max=c.clamp_len)
    inv_freq = p["pos_emb.inv_freq"].to(pos_seq.dtype)
    sinusoid = torch.outer(pos_seq, inv_freq)
    r = torch.cat([sinusoid.sin(), sinusoid.cos()], -1)
    hids = [adaptive_embedding(p, c, data)]
    for i in range(c.n_layer):
        hids.append(_layer(p, f"layers.{i}", c, hids[-1], r, mems[i] if mems else None))
    hidden = hids[-1]
    new_mems = None
    if c.mem_len > 0:
        end = mlen + max(0, qlen - c.ext_len)
        begin = max(0, end - c.mem_len)
        new_mems = [(torch.cat([mems[i], h]) if mems else h)[begin:end]
                    for i, h in enumerate(hids)]
    if target is None:
        return adaptive_log_prob(p, c, hidden.reshape(-1, c.d_model)).view(qlen, bsz, -1), \
            new_mems
    tgt_len = target.shape[0]
    log_prob = adaptive_log_prob(p, c, hidden[-tgt_len:].reshape(-1, c.d_model))
    nll = -log_prob.gather(1, target.reshape(-1, 1)).squeeze(1)
    return nll.view(tgt_len, bsz), new_mems


def adaptive_nll_original(crit, hidden: Tensor, target: Tensor) -> Tensor:
    """The original ProjectedAdaptiveLogSoftmax's computation with a module's weights (by
    token): the head's whole logits for every token, each tail's whole logits for its tokens,
    log_softmax over them. The plain baseline of the chunked head (what it replaces)."""
    weight, bias, proj = crit.cluster(0)
    head = torch.log_softmax(crit._projected(hidden, proj) @ weight.t() + bias, -1)
    cluster = torch.bucketize(target, torch.tensor(crit.cutoffs, device=target.device),
                              right=True)
    nll = -head.gather(1, target.clamp(max=crit.shortlist_size - 1)[:, None]).squeeze(1)
    for i in range(1, crit.n_clusters + 1):
        rows = (cluster == i).nonzero().squeeze(1)
        weight, bias, proj = crit.cluster(i)
        tail = torch.log_softmax(crit._projected(hidden[rows], proj) @ weight.t() + bias, -1)
        logprob = head[rows, crit.head_size - i] + \
            tail.gather(1, (target[rows] - crit.cutoff_ends[i])[:, None]).squeeze(1)
        nll = nll.index_put((rows,), -logprob)
    return nll
