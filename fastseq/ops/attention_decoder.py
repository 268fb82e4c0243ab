"""Global attention for RNN encoder-decoders: fastseq.ops.global_attention.

The math is fastseq.reference.attention_decoder's (Luong's dot and general, Bahdanau's
additive "concat"/OpenNMT's "mlp", SpeechBrain's content, location-aware and key-value
attention): each decoder query scores its row's encoder states, a softmax over the visible ones
(lengths), and the context. The Triton backend (auto's choice on CUDA) does score, softmax and
context in one launch (one program per query), never building the additive score's
[B, T, S, A] tanh tensor; its backward is one launch for the queries plus, for the additive
score, one for the keys. On CPU, auto runs the same formula in PyTorch's ops (the "torch"
backend, as OpenNMT-py's and SpeechBrain's code runs it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backends
from ..reference import attention_decoder as _reference
from . import attention_decoder_registration as _registered_ops  # noqa: F401  (registers the ops)
from ._autocast import autocast_op
from ._checks import check_same_dtype_device, check_shape, check_tensor, fail, needs_grad
from ._registration import fused
from ._sharding import shards
from ._sharding_rules import global_attention_axes

OP = "fastseq.ops.global_attention"
SCORES = _reference.SCORES


@shards(global_attention_axes)
@autocast_op("global_attention")
def global_attention(query: Tensor, keys: Tensor, values: Tensor, *, score: str = "dot",
                     lengths: Optional[Tensor] = None, v: Optional[Tensor] = None,
                     extra: Optional[Tensor] = None, scale: float = 1.0,
                     backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """query [B, T, A] (T decoder steps, or one), keys [B, S, A], values [B, S, Dv].
    score="dot": scale * q . k_j; score="additive": scale * v . tanh(q + k_j + extra_j), v [A],
    extra [B, T, S, A] or None (location features). lengths [B] (int): keys j >= lengths[b]
    are hidden; a row with none visible gives zeros. Returns (context [B, T, Dv],
    alignments [B, T, S])."""
    _validate(query, keys, values, score, lengths, v, extra, scale)
    call = {"device": query.device, "query": query, "keys": keys, "values": values,
            "score": score, "lengths": lengths, "v": v, "extra": extra, "scale": float(scale),
            "needs_grad": needs_grad(query, keys, values, v, extra)}
    return BACKENDS.run(call, backend)


def _reference_attention(query, keys, values, score, lengths, v, extra, scale, **_):
    return _reference.global_attention(query, keys, values, score=score, lengths=lengths, v=v,
                                       extra=extra, scale=scale)


def _torch_attention(query, keys, values, score, lengths, v, extra, scale, **_):
    """The ops OpenNMT-py and SpeechBrain run (a bmm or the [B, T, S, A] tanh, a masked softmax,
    a bmm), and no more: the reference's log-sum-exp and NaN guards cost 3 of its ~8 launches
    (a location-aware decoder step on the CPU ran 0.59x SpeechBrain's with them)."""
    if score == "dot":
        scores = torch.bmm(query, keys.transpose(1, 2))
    else:
        hidden = query[:, :, None, :] + keys[:, None, :, :]
        scores = torch.tanh(hidden if extra is None else hidden + extra) @ v
    if scale != 1.0:
        scores = scores * scale
    if lengths is not None:
        S = keys.shape[1]
        lengths = lengths.to(query.device)
        hidden_keys = (torch.arange(S, device=query.device)[None, :] >= lengths[:, None])
        # The most negative finite score, not -inf: a source of length 0 then softmaxes to a
        # finite row, which the multiply below zeroes (no NaN forward or backward).
        scores = scores.masked_fill(hidden_keys[:, None, :], torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, -1) * (lengths > 0).to(scores.dtype)[:, None, None]
    else:
        probs = torch.softmax(scores, -1)
    return torch.bmm(probs, values), probs


def _triton_attention(query, keys, values, score, lengths, v, extra, scale, **_):
    if lengths is not None:
        lengths = lengths.to(device=query.device, dtype=torch.int64).contiguous()
    out, align, _ = fused("fastseq::global_attention_forward_triton")(
        query, keys, values, v.contiguous() if v is not None else None, extra, lengths, scale)
    return out, align.to(query.dtype)


BACKENDS = _backends.OpBackends(
    OP,
    backends={
        "triton": _backends.serves(
            _backends.triton_refuses, _triton_attention,
            "one launch: score, softmax and context per query, chunked over the keys and "
            "features (no [B, T, S, A] tensor for the additive score)"),
        "torch": _backends.serves(
            _backends.serves_every_call, _torch_attention,
            "PyTorch's ops as OpenNMT-py and SpeechBrain run them (bmm or the [B, T, S, A] "
            "tanh, masked softmax, bmm)"),
        "reference": _backends.serves(_backends.serves_every_call, _reference_attention,
                                      "fastseq.reference.attention_decoder")},
    preference={"cuda": ("triton", "torch", "reference"), "cpu": ("torch", "reference")})


def _validate(query, keys, values, score, lengths, v, extra, scale) -> None:
    for name, t in (("query", query), ("keys", keys), ("values", values)):
        check_tensor(OP, name, t, ndims=(3,))
    check_same_dtype_device(OP, ("query", query), (("keys", keys), ("values", values),
                                                   ("v", v), ("extra", extra)))
    B, T, A = query.shape
    S = keys.shape[1]
    check_shape(OP, "keys", keys, (B, S, A), "[B, S, A]")
    check_shape(OP, "values", values, (B, S, values.shape[2]), "[B, S, Dv]")
    if score not in SCORES:
        fail(OP, f"score must be one of {SCORES}, got {score!r}")
    if score == "additive":
        if v is None:
            fail(OP, "the additive score needs v [A] (score_j = v . tanh(q + k_j))")
        check_tensor(OP, "v", v, ndims=(1,))
        check_shape(OP, "v", v, (A,), "[A]")
    elif v is not None or extra is not None:
        fail(OP, "v and extra belong to the additive score (score='additive')")
    if extra is not None:
        check_tensor(OP, "extra", extra, ndims=(4,))
        check_shape(OP, "extra", extra, (B, T, S, A), "[B, T, S, A]")
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.shape[0] != B \
                or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            got = (f"{lengths.dtype} of shape {list(lengths.shape)}"
                   if isinstance(lengths, Tensor) else type(lengths).__name__)
            fail(OP, f"lengths must be an integer tensor [B={B}], got {got}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        fail(OP, f"scale must be a number, got {type(scale).__name__}")
