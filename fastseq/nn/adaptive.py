"""Adaptive input embeddings and the projected adaptive softmax (Grave et al. 2017; Baevski &
Auli 2019) with the original Transformer-XL code's arguments, parameter names and results
(kimiyoung/transformer-xl, pytorch/utils/proj_adaptive_softmax.py and mem_transformer.py's
AdaptiveEmbedding), so its checkpoints load with strict=True.

The vocabulary is split at `cutoffs` into a head (the most frequent words, plus one entry per
tail cluster) and tail clusters; with div_val > 1 cluster i embeds in d_embed // div_val**i
dimensions, projected to and from d_proj (the model's width).

The loss never holds the whole logits matrix: each linear + log-softmax + NLL (the head over
every token, each tail over its tokens) runs over chunks of tokens, saving only each row's
log-sum-exp for the backward, which recomputes a chunk's logits at a time. Peak memory is
chunk_tokens x cluster size instead of tokens x vocabulary (WikiText-103's 267,735 words at
tgt_len 150 and batch 60: 9.6 GB of fp32 logits in a plain head).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.limits import accumulator_dtype
from .scripting import RefusesTorchScript

# Logit elements a chunk may hold (its fp32 logits and their softmax: 2 x 64 MB); a chunk
# is at least one token.
CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(vocab: int, chunk_tokens: Optional[int]) -> int:
    return chunk_tokens if chunk_tokens else max(1, CHUNK_ELEMENTS // max(vocab, 1))


class _ChunkedLinearNLL(torch.autograd.Function):
    """nll[n] = logsumexp(hidden[n] W^T + b) - (hidden[n] W^T + b)[target[n]], chunk by chunk.
    Saves hidden, the weights, the targets and one log-sum-exp per row; the backward recomputes
    each chunk's logits: d logits = (softmax - onehot(target)) * d nll."""

    @staticmethod
    def forward(hidden, weight, bias, target, chunk):
        acc = accumulator_dtype(hidden.dtype)
        nll = hidden.new_empty(hidden.shape[0], dtype=acc)
        lse = hidden.new_empty(hidden.shape[0], dtype=acc)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(hidden[rows], weight, bias).to(acc)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            nll[rows] = lse[rows] - logits.gather(1, target[rows, None]).squeeze(1)
        return nll.to(hidden.dtype), lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, target, chunk = inputs
        ctx.save_for_backward(hidden, weight, bias, target, output[1])
        ctx.chunk = chunk
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_nll, _grad_lse):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        acc = lse.dtype
        d_hidden = torch.empty_like(hidden) if need[0] else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if need[1] else None
        d_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) \
            if need[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            logits = F.linear(hidden[rows], weight, bias).to(acc)
            d_logits = torch.exp(logits - lse[rows, None])
            d_logits.scatter_add_(1, target[rows, None],
                                  torch.full_like(lse[rows, None], -1.0))
            d_logits *= grad_nll[rows, None].to(acc)
            if d_hidden is not None:
                d_hidden[rows] = (d_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if d_weight is not None:
                d_weight += d_logits.t() @ hidden[rows].to(acc)
            if d_bias is not None:
                d_bias += d_logits.sum(0)
        return (d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype), None, None)


def linear_nll(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
               chunk_tokens: Optional[int] = None) -> Tensor:
    """-log_softmax(hidden W^T + b)[target] per row, never holding more than a chunk of logits
    (chunk_tokens rows; default: CHUNK_ELEMENTS // vocabulary)."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0) + 0 * hidden.sum()
    chunk = _chunk_rows(weight.shape[0], chunk_tokens)
    return _ChunkedLinearNLL.apply(hidden, weight, bias, target, chunk)[0]


class AdaptiveEmbedding(RefusesTorchScript, nn.Module):
    """The original's AdaptiveEmbedding: token ids [...] -> [..., d_proj], scaled by
    sqrt(d_proj). Parameters emb_layers.{i}.weight and emb_projs.{i} as the original names
    them (div_val = 1: one embedding, and one projection only when d_proj != d_embed)."""

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: Sequence[int],
                 div_val: int = 1, sample_softmax: bool = False, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        if sample_softmax:
            raise NotImplementedError(
                "fastseq.nn.AdaptiveEmbedding: sample_softmax (sparse embeddings for the "
                "sampled softmax) is not supported; use the full adaptive softmax")
        factory = {"device": device, "dtype": dtype}
        self.n_token, self.d_embed, self.d_proj, self.div_val = n_token, d_embed, d_proj, div_val
        self.cutoffs = _checked_cutoffs("AdaptiveEmbedding", cutoffs, n_token)
        self.cutoff_ends = [0] + self.cutoffs
        self.emb_scale = d_proj ** 0.5
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(n_token, d_embed, **factory))
            if d_proj != d_embed:
                self.emb_projs.append(nn.Parameter(torch.empty(d_proj, d_embed, **factory)))
        else:
            for i in range(len(self.cutoffs)):
                size = self.cutoff_ends[i + 1] - self.cutoff_ends[i]
                d_emb_i = d_embed // (div_val ** i)
                self.emb_layers.append(nn.Embedding(size, d_emb_i, **factory))
                self.emb_projs.append(nn.Parameter(torch.empty(d_proj, d_emb_i, **factory)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The original's train.py initialisation: N(0, 0.02) embeddings, N(0, 0.01) projections.
        for layer in self.emb_layers:
            nn.init.normal_(layer.weight, std=0.02)
        for proj in self.emb_projs:
            nn.init.normal_(proj, std=0.01)

    def forward(self, inp: Tensor) -> Tensor:
        if self.div_val == 1:
            embed = self.emb_layers[0](inp)
            if self.d_proj != self.d_embed:
                embed = F.linear(embed, self.emb_projs[0])
            return embed * self.emb_scale
        flat = inp.reshape(-1)
        embed = self.emb_projs[0].new_zeros(flat.shape[0], self.d_proj)
        for i, layer in enumerate(self.emb_layers):
            low, high = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            # Every token through every cluster's table with its ids clamped, kept where it
            # belongs: no data-dependent shapes (torch.compile), the cost of a gather.
            inside = (flat >= low) & (flat < high)
            rows = F.linear(layer((flat - low).clamp(0, high - low - 1)), self.emb_projs[i])
            embed = torch.where(inside[:, None], rows, embed)
        return (embed * self.emb_scale).view(*inp.shape, self.d_proj)


class ProjectedAdaptiveLogSoftmax(RefusesTorchScript, nn.Module):
    """The original's ProjectedAdaptiveLogSoftmax: forward(hidden [N, d_proj], target [N]) ->
    nll [N]. Parameters cluster_weight, cluster_bias, out_layers.{i}.{weight,bias} and
    out_projs.{i} as the original names them (div_val = 1: one output layer over the whole
    vocabulary, sliced per cluster; a projection entry per cluster, None when d_proj ==
    d_embed). As the original's: tail cluster i's entry in the head is column -i (its weight
    row n_clusters - i), and unless keep_order the nll comes grouped by cluster (head first),
    which keeps its mean and sum.

    chunk_tokens: tokens per chunk of every linear + log-softmax + NLL (default:
    CHUNK_ELEMENTS // the cluster's size, at least 1)."""

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: Sequence[int],
                 div_val: int = 1, keep_order: bool = False, *,
                 chunk_tokens: Optional[int] = None, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.n_token, self.d_embed, self.d_proj, self.div_val = n_token, d_embed, d_proj, div_val
        self.cutoffs = _checked_cutoffs("ProjectedAdaptiveLogSoftmax", cutoffs, n_token)
        self.cutoff_ends = [0] + self.cutoffs
        self.shortlist_size = self.cutoffs[0]
        self.n_clusters = len(self.cutoffs) - 1
        self.head_size = self.shortlist_size + self.n_clusters
        self.keep_order, self.chunk_tokens = keep_order, chunk_tokens
        if self.n_clusters > 0:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, d_embed, **factory))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters, **factory))
        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ParameterList()
        if div_val == 1:
            for _ in self.cutoffs:
                self.out_projs.append(nn.Parameter(torch.empty(d_proj, d_embed, **factory))
                                      if d_proj != d_embed else None)
            self.out_layers.append(nn.Linear(d_embed, n_token, **factory))
        else:
            for i in range(len(self.cutoffs)):
                d_emb_i = d_embed // (div_val ** i)
                size = self.cutoff_ends[i + 1] - self.cutoff_ends[i]
                self.out_projs.append(nn.Parameter(torch.empty(d_proj, d_emb_i, **factory)))
                self.out_layers.append(nn.Linear(d_emb_i, size, **factory))
        for proj in self.out_projs:
            if proj is not None:
                nn.init.normal_(proj, std=0.01)

    def cluster(self, i: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(weight, bias, projection) of cluster i (0: the head, with the clusters' rows)."""
        if self.div_val == 1:
            low, high = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            weight = self.out_layers[0].weight[low:high]
            bias = self.out_layers[0].bias[low:high]
        else:
            weight, bias = self.out_layers[i].weight, self.out_layers[i].bias
        if i == 0 and self.n_clusters > 0:
            weight = torch.cat([weight, self.cluster_weight], dim=0)
            bias = torch.cat([bias, self.cluster_bias], dim=0)
        return weight, bias, self.out_projs[i]

    @staticmethod
    def _projected(hidden: Tensor, proj: Optional[Tensor]) -> Tensor:
        return hidden if proj is None else F.linear(hidden, proj.t())

    def forward(self, hidden: Tensor, target: Tensor, keep_order: bool = False) -> Tensor:
        if hidden.dim() != 2 or hidden.shape[1] != self.d_proj:
            raise ValueError(f"ProjectedAdaptiveLogSoftmax: hidden must be [N, d_proj="
                             f"{self.d_proj}], got {list(hidden.shape)}")
        if target.shape != hidden.shape[:1]:
            raise ValueError(f"ProjectedAdaptiveLogSoftmax: target must be [N={hidden.shape[0]}]"
                             f", got {list(target.shape)}")
        weight, bias, proj = self.cluster(0)
        # The head's column of each token: its own word, or its cluster's entry (column -i).
        column = target.clamp(max=self.shortlist_size - 1)
        cluster_of = torch.bucketize(target, torch.tensor(self.cutoffs, device=target.device),
                                     right=True)
        in_tail = cluster_of > 0
        column = torch.where(in_tail, self.head_size - cluster_of, column)
        nll = linear_nll(self._projected(hidden, proj), weight, bias, column, self.chunk_tokens)
        for i in range(1, self.n_clusters + 1):
            # Each tail's tokens only (a data-dependent selection, as the original's).
            rows = (cluster_of == i).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            weight, bias, proj = self.cluster(i)
            tail = linear_nll(self._projected(hidden.index_select(0, rows), proj), weight, bias,
                              target.index_select(0, rows) - self.cutoff_ends[i],
                              self.chunk_tokens)
            nll = nll.index_add(0, rows, tail)
        if keep_order or self.keep_order or self.n_clusters == 0:
            return nll
        return nll[torch.argsort(cluster_of, stable=True)]  # grouped by cluster, as the original

    def log_prob(self, hidden: Tensor) -> Tensor:
        """log p(word) for every word: [N, n_token] (the whole distribution, for sampling or
        scoring every word; the loss never needs it)."""
        acc = accumulator_dtype(hidden.dtype)
        weight, bias, proj = self.cluster(0)
        head = F.log_softmax(F.linear(self._projected(hidden, proj), weight, bias).to(acc), -1)
        parts = [head[:, :self.shortlist_size]]
        for i in range(1, self.n_clusters + 1):
            weight, bias, proj = self.cluster(i)
            tail = F.log_softmax(F.linear(self._projected(hidden, proj), weight, bias).to(acc),
                                 -1)
            parts.append(head[:, self.head_size - i, None] + tail)
        return torch.cat(parts, dim=-1).to(hidden.dtype)


def _checked_cutoffs(owner: str, cutoffs: Sequence[int], n_token: int) -> list[int]:
    cutoffs = list(cutoffs)
    if any(not 0 < c < n_token for c in cutoffs) or cutoffs != sorted(set(cutoffs)):
        raise ValueError(f"fastseq.nn.{owner}: cutoffs must increase strictly inside (0, "
                         f"n_token={n_token}), got {cutoffs}")
    return cutoffs + [n_token]
