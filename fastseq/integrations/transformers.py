"""fastseq attention inside Hugging Face transformers: attn_implementation="fastseq".

    import fastseq.integrations.transformers   # registers "fastseq" (on import, once)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fastseq")

Importing this module registers two functions under the name "fastseq": the attention function
(transformers' AttentionInterface) and its mask function (AttentionMaskInterface; without one,
transformers hands an implementation no mask at all and padding and sliding windows are
dropped). Registration happens on import because transformers reads the name when a model is
built, before any fastseq code runs, and an import is the one step a user already writes;
register(name) adds more names. transformers stays optional: only this module imports it.

Every model whose attention goes through transformers' AttentionInterface runs
fastseq.ops.attention: causal and bidirectional, padding (as key ranges), sliding windows, GQA
without repeating keys, soft-capping, attention sinks (gpt-oss's s_aux), position biases (as
transformers' sdpa path adds them), dropout and scaling as the model gives them; generation with
transformers' caches, left padding included (a decode step takes fastseq's split-KV kernels on
GPUs). The backend is fastseq's choice as anywhere else (use_backend, FASTSEQ_BACKEND,
use_backend(attention=...)). output_attentions is computed as transformers' eager attention
computes it (plain PyTorch, fastseq.explain says so), only when asked for.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .. import ops
from ..backend import report_path
from ..ops.attention_mask import AttentionMask, materialized, normalize
from .transformers_masks import fastseq_mask

NAME = "fastseq"
# The transformers releases this glue was written and tested against (the extra's range).
SUPPORTED = ">=5.0,<6"
if transformers.__version__.split(".")[0] != "5":
    warnings.warn(f"fastseq.integrations.transformers is tested with transformers {SUPPORTED}; "
                  f"this is {transformers.__version__}")


def _visible(mask, query: Tensor, key: Tensor, is_causal: bool) -> Optional[Tensor]:
    """The mask as a bool tensor broadcastable to [B, H, L, S] (True: kept), or a float one."""
    if mask is None and is_causal:
        mask = AttentionMask(causal=True)
    if isinstance(mask, AttentionMask):
        vis = normalize("fastseq (transformers)", mask, False, None, query, key)
        return materialized(vis, query.shape[-2], key.shape[-2], query.device)[0]
    return mask


def _wants_weights() -> bool:
    """transformers records attention weights through hooks when output_attentions is set; its
    collector says so (a ContextVar it also keeps readable under torch.compile)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    wanted = _active_collector.get()
    return bool(wanted) and ("attentions" in wanted or "cross_attentions" in wanted)


def _eager_weights(module, query, key, value, visible, dropout, scaling, softcap, sinks):
    """transformers' eager attention (its models' eager_attention_forward): scores, the mask as
    the dtype's minimum, softmax in fp32 (gpt-oss's sinks joining it as a column dropped after),
    dropout; returns (out [B, L, H, E], weights)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if visible is not None:
        if visible.dtype == torch.bool:
            scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        else:
            scores = scores + visible
    if sinks is not None:
        column = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, column], dim=-1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if sinks is not None:
        weights = weights[..., :-1]
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def fastseq_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, position_bias: Optional[Tensor] = None,
                      softcap: Optional[float] = None, s_aux: Optional[Tensor] = None,
                      **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """transformers' attention interface: query [B, Hq, L, E], key/value [B, Hk, S, E] (the
    cache's whole length in generation), the mask from fastseq_mask; returns (out [B, L, Hq,
    Ev], None or the weights when output_attentions asks)."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # transformers' sdpa path: no mask means causal only for more than one query row (a lone
    # row sees every key of the cache).
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    wants_weights = _wants_weights()
    if position_bias is not None or wants_weights:
        visible = _visible(attention_mask, query, key, is_causal)
        if position_bias is not None:
            from transformers.integrations.sdpa_attention import create_position_bias_mask
            visible = create_position_bias_mask(position_bias, visible, False, query, key)
        if wants_weights:
            report_path("fastseq (transformers)", query.device, "transformers' eager attention, "
                        "because output_attentions asks for the attention weights")
            return _eager_weights(module, query, key, value, visible, dropout,
                                  scaling if scaling is not None else query.shape[-1] ** -0.5,
                                  softcap, s_aux)
        attention_mask, is_causal = visible, False
    out = ops.attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                        is_causal=is_causal, scale=scaling,
                        enable_gqa=query.shape[1] != key.shape[1], softcap=softcap,
                        sinks=s_aux)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Register fastseq's attention and mask functions in transformers under `name` (idempotent)."""
    AttentionInterface.register(name, fastseq_attention)
    AttentionMaskInterface.register(name, fastseq_mask)


register()
