"""fastseq.nn.MultiheadAttention: torch.nn.MultiheadAttention on fastseq's fused attention.

A subclass of torch's module: the same constructor, parameters (in_proj_weight or
q/k/v_proj_weight when kdim/vdim differ, in_proj_bias, out_proj, bias_k/bias_v), state_dict keys
and forward arguments and outputs, batch_first either way, unbatched inputs. Differences:
  * a query that sees no key (every key masked) gets zeros, not NaN;
  * need_weights=True (torch's default) computes the weights in plain PyTorch (the L x S
    probabilities must exist to be returned); pass need_weights=False, as torch's Transformer
    layers do, for the fused kernel;
  * is_causal=True is taken at its word, as torch's hint asks: the kernel applies the causal
    rule itself (skipping hidden blocks) and attn_mask, if given, is not read;
  * attn_mask may be a torch.nn.attention.bias CausalBias (causal_upper_left or
    causal_lower_right, for L queries and S keys): the kernel applies that alignment itself
    (lower-right: query i sees keys j <= i + S - L, a decode step's rule against a cache).
    torch's module refuses these biases (it reads them as a 3-D mask of the wrong shape).
Heads are views of the projections ([N, L, H, D] seen as [N, H, L, D]): no copies before the
kernel, which reads any strides.

Keyword-only extras beyond torch's constructor (fastseq.ops.attention's, all off by default, so
the module stays torch's drop-in): window=(left, right) (a sliding window on is_causal's
diagonal), softcap=c, alibi_slopes=[num_heads] (a non-persistent buffer: state_dict keys stay
torch's) and sinks=True (a learned per-head logit, the parameter `sinks` [num_heads], zeros at
first, as gpt-oss). Both the fused path and need_weights=True apply them; the step protocol does
too (a self-attention step's window is the decode step's window + 1 positions).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant

from .. import backend as _backends
from .. import ops
from ..ops._checks import InputError, check_features, check_like_parameters
from ..reference import attention as _reference
from . import plain_calls
from .attention_steps import AttentionSteps
from .scripting import RefusesTorchScript

OP = "fastseq.nn.MultiheadAttention"


class AttentionInputError(InputError, AssertionError):
    """A bad MultiheadAttention input. torch's module asserts on most (AssertionError: widths,
    key/value shapes, mask dtypes and shapes, dims) and raises RuntimeError on others (a 2-D
    attn_mask of the wrong shape); this error is both, and a ValueError, so code and tests
    written against torch's module catch it where they caught torch's."""


class MultiheadAttention(RefusesTorchScript, AttentionSteps, torch.nn.MultiheadAttention):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, device=None, dtype=None, *, window=None,
                 softcap: Optional[float] = None, alibi_slopes=None, sinks: bool = False):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                         vdim, batch_first, device, dtype)
        self.window = window
        self.softcap = softcap
        if alibi_slopes is not None:
            slopes = torch.as_tensor(alibi_slopes, dtype=torch.float32, device=device)
            if slopes.shape != (num_heads,):
                raise AttentionInputError(f"{OP}: alibi_slopes must have num_heads = "
                                          f"{num_heads} entries, got {list(slopes.shape)}")
            self.register_buffer("alibi_slopes", slopes, persistent=False)
        else:
            self.alibi_slopes = None
        self.sinks = (torch.nn.Parameter(torch.zeros(num_heads, device=device, dtype=dtype))
                      if sinks else None)

    def _score_extras(self) -> dict:
        """The fastseq.ops.attention keywords of this module's extras (none for a torch module
        patched into this class, which has no such attributes)."""
        return {"window": getattr(self, "window", None),
                "softcap": getattr(self, "softcap", None),
                "alibi_slopes": getattr(self, "alibi_slopes", None),
                "sinks": getattr(self, "sinks", None)}

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise AttentionInputError(
                f"{OP} does not take nested tensors (torch's module takes them only on its "
                f"own inference fast path, a kernel of torch's): pad them "
                f"(torch.nested.to_padded_tensor) and pass key_padding_mask")
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise AttentionInputError(
                f"{OP}: query, key and value must all be 3-D (batched) or 2-D "
                f"(unbatched), got shapes {list(query.shape)}, {list(key.shape)}, "
                f"{list(value.shape)}")
        self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if not batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)

        def batch_first(t):
            return t.unsqueeze(0) if not batched else t if self.batch_first else t.transpose(0, 1)

        # Self-attention stays recognisable (query is key is value) after the layout change, so
        # _project makes q, k and v with one GEMM.
        query_b = batch_first(query)
        key_b = query_b if key is query else batch_first(key)
        value_b = key_b if value is key else batch_first(value)
        out, weights = self._attend(query_b, key_b, value_b, key_padding_mask, need_weights,
                                    attn_mask, average_attn_weights, is_causal)
        if not batched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> None:
        """Widths, lengths, dtypes and devices as torch's forward checks them, named here
        (otherwise F.linear or the attention op reports them on projected, per-head shapes)."""
        for name, t, size in (("query", query, "embed_dim"), ("key", key, "kdim"),
                              ("value", value, "vdim")):
            check_features(OP, name, t, size, getattr(self, size), AttentionInputError)
        if key.shape[:-1] != value.shape[:-1]:
            raise AttentionInputError(
                f"{OP}: key and value must have the same batch and length, got "
                f"shapes {list(key.shape)} and {list(value.shape)}")
        batch_dim = 0 if self.batch_first else 1
        if query.dim() == 3 and key.shape[batch_dim] != query.shape[batch_dim]:
            raise AttentionInputError(
                f"{OP}: key must have the query's batch {query.shape[batch_dim]} in "
                f"dim {batch_dim}, got shape {list(key.shape)}")
        weight = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_like_parameters(OP, name, t, weight, AttentionInputError)
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if isinstance(mask, CausalBias):
                seq_dim = 1 if query.dim() == 3 and self.batch_first else 0
                L, S = query.shape[seq_dim], key.shape[seq_dim]
                if name != "attn_mask" or (mask.seq_len_q, mask.seq_len_kv) != (L, S):
                    raise AttentionInputError(
                        f"{OP}: a CausalBias is taken as attn_mask for the query's {L} rows "
                        f"and the key's {S}; got one for {mask.seq_len_q} and "
                        f"{mask.seq_len_kv} as {name}")
                continue
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise AttentionInputError(
                    f"{OP}: {name} must be bool (True hides) or floating "
                    f"(added to the scores), got {mask.dtype}")

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal):
        """Batch-first [N, L, E] inputs -> ([N, L, E], weights or None)."""
        N, L, E = query.shape
        q, k, v = self._project(query, key, value)
        heads, head_dim = self.num_heads, self.head_dim
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], 1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], 1)
        # view, not unflatten: torch 2.11's Dynamo cannot trace unflatten under a device context.
        q, k, v = (t.view(N, t.shape[1], heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, heads, 1, head_dim)], 2)
            v = torch.cat([v, v.new_zeros(N, heads, 1, head_dim)], 2)
        S = k.shape[2]
        extra = S - key.shape[1]  # bias_k and the zero key: visible to every query
        extras = self._score_extras()
        if isinstance(attn_mask, CausalBias):
            if not need_weights and key_padding_mask is None and not extra:
                # The kernel's own causal rule, at the bias's alignment: nothing materialized.
                dropout_p = self.dropout if self.training else 0.0
                out = ops.attention(q, k, v, attn_mask, dropout_p, **extras)
                return self._out_projection(out), None
            if attn_mask.variant == CausalVariant.LOWER_RIGHT and (
                    extras["window"] is not None or extras["alibi_slopes"] is not None):
                raise AttentionInputError(
                    f"{OP}: a causal_lower_right attn_mask with a key_padding_mask, "
                    f"need_weights=True or extra keys is materialized, which loses the "
                    f"alignment the window and ALiBi are measured from; pass "
                    f"need_weights=False without a key_padding_mask")
            attn_mask, is_causal = _hidden_by(attn_mask, query.device), False
        causal = is_causal and not need_weights
        mask = self._merged_mask(None if causal else attn_mask, key_padding_mask, N, L, S,
                                 extra, query)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            _backends.report_path(OP + "(need_weights=True)", query.device,
                                  "the L x S probabilities in plain PyTorch, returned as the "
                                  "weights (need_weights=False runs fastseq.ops.attention)")
            plain_calls.note(self, "called with need_weights=True (torch's default): the "
                                   "L x S weights it returns are computed in plain PyTorch; "
                                   "pass need_weights=False for fastseq's kernel")
            out, weights = _weighted(q, k, v, mask, dropout_p, is_causal and attn_mask is None,
                                     **extras)
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out, weights = ops.attention(q, k, v, mask, dropout_p, causal, **extras), None
        return self._out_projection(out), weights

    def _out_projection(self, out: Tensor) -> Tensor:
        """Heads [N, H, L, D] joined to [N, L, E] and projected."""
        N, _, L, _ = out.shape
        return F.linear(out.transpose(1, 2).reshape(N, L, self.embed_dim), self.out_proj.weight,
                        self.out_proj.bias)

    def _project(self, query, key, value):
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            w, b = self.in_proj_weight, self.in_proj_bias
            if query is key and key is value:  # self-attention: one GEMM for q, k and v
                return _linear(query, w, b).chunk(3, dim=-1)
            ws, bs = w.split(E), (b.split(E) if b is not None else (None,) * 3)
        else:
            ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            b = self.in_proj_bias
            bs = b.split(E) if b is not None else (None,) * 3
        return tuple(_linear(x, w, bias) for x, w, bias in zip((query, key, value), ws, bs))

    def _merged_mask(self, attn_mask, key_padding_mask, N, L, S, extra, query):
        """torch's masks (bool True = hidden) as one fastseq mask (bool True = visible, or
        additive float) that broadcasts to [N, H, L, S]; None when nothing is masked."""
        masks = []
        if attn_mask is not None:
            heads = self.num_heads
            if attn_mask.dim() == 2 and attn_mask.shape == (L, S - extra):
                m = attn_mask
            elif attn_mask.dim() == 3 and attn_mask.shape == (N * heads, L, S - extra):
                m = attn_mask.reshape(N, heads, L, S - extra)
            else:
                raise AttentionInputError(
                    f"{OP}: attn_mask must have shape (L, S) = {[L, S - extra]} or "
                    f"(N * num_heads, L, S) = {[N * heads, L, S - extra]}, got "
                    f"{list(attn_mask.shape)}")
            masks.append(m)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S - extra):
                raise AttentionInputError(
                    f"{OP}: key_padding_mask must have shape (N, S) = "
                    f"{[N, S - extra]}, got {list(key_padding_mask.shape)}")
            masks.append(key_padding_mask.reshape(N, 1, 1, S - extra))
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            merged = ~masks[0] if len(masks) == 1 else ~(masks[0] | masks[1])
            return F.pad(merged, (0, extra), value=True) if extra else merged
        merged = sum(_additive(m, query.dtype) for m in masks)
        return F.pad(merged, (0, extra), value=0.0) if extra else merged


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear, with a bias of another dtype added after the GEMM under type promotion, as
    torch's module does (its transposed inputs take matmul + add; F.linear's addmm refuses the
    mix; torch's test_multihead_attn_fast_path_query_and_bias_have_different_dtypes runs a
    float64 module with a float16 in_proj_bias)."""
    if bias is not None and bias.dtype != x.dtype:
        return F.linear(x, weight) + bias
    return F.linear(x, weight, bias)


def _hidden_by(bias: CausalBias, device: torch.device) -> Tensor:
    """A CausalBias as torch's bool attn_mask [L, S] (True = hidden), for the paths that merge
    masks or return the weights."""
    L, S = bias.seq_len_q, bias.seq_len_kv
    shift = S - L if bias.variant == CausalVariant.LOWER_RIGHT else 0
    return ~torch.ones(L, S, dtype=torch.bool, device=device).tril(shift)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def _weighted(q, k, v, mask, dropout_p, causal, window=None, softcap=None, alibi_slopes=None,
              sinks=None):
    """The need_weights path in plain PyTorch: (out [N, H, L, D], probabilities [N, H, L, S]
    after dropout, as torch returns them; with sinks they sum to less than one per row)."""
    scores = _reference.soft_cap((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), softcap)
    visible, bias = _reference.visible_and_bias(scores, mask, causal, 0, window)
    if bias is not None:
        scores = scores + bias
    if alibi_slopes is not None:
        scores = scores + _reference.alibi_bias(alibi_slopes, q.shape[2], k.shape[2], 0,
                                                scores.dtype)
    probs, _ = _reference.masked_softmax(scores, visible, sinks)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v, probs
