"""Reference global attention for RNN encoder-decoders (Luong et al. 2015, Bahdanau et al.
2015, Chorowski et al. 2015), as OpenNMT-py (onmt/modules/global_attention.py) and SpeechBrain
(speechbrain/nnet/attention.py) compute it: the definition fastseq's kernels implement, in
plain PyTorch, the tests' float64 truth.

`global_attention(query [B, T, A], keys [B, S, A], values [B, S, Dv])` scores every key for each
of the T queries of a batch row:

- score="dot": s_j = scale * q . k_j (Luong's "dot"; his "general" is q = W_a h, applied by the
  caller; SpeechBrain's key-value attention with scale 1 / sqrt(A));
- score="additive": s_j = scale * v . tanh(q + k_j + e_j) (Bahdanau's "concat", OpenNMT's
  "mlp": q = W h + b, k_j = U h_j computed once per sequence; SpeechBrain's content attention,
  and its location-aware one with e_j the location features of the previous alignment).

Keys j >= lengths[b] are hidden; a row with no visible key gives zeros. Returns the context
sum_j p_j values_j [B, T, Dv] and the alignments p [B, T, S].
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .attention import masked_softmax

SCORES = ("dot", "additive")


def global_attention(query: Tensor, keys: Tensor, values: Tensor, *, score: str = "dot",
                     lengths: Optional[Tensor] = None, v: Optional[Tensor] = None,
                     extra: Optional[Tensor] = None, scale: float = 1.0
                     ) -> tuple[Tensor, Tensor]:
    """query [B, T, A], keys [B, S, A], values [B, S, Dv]; v [A] (additive); extra [B, T, S, A]
    or None (additive: added inside the tanh); lengths [B] or None."""
    if score == "dot":
        scores = query @ keys.transpose(1, 2)
    else:
        hidden = torch.tanh(query[:, :, None, :] + keys[:, None, :, :]
                            + (extra if extra is not None else 0))
        scores = hidden @ v
    scores = scores * scale
    S = keys.shape[1]
    visible = torch.ones(query.shape[0], 1, S, dtype=torch.bool, device=query.device)
    if lengths is not None:
        visible = (torch.arange(S, device=query.device)[None, :]
                   < lengths.to(query.device)[:, None])[:, None, :]
    probs, _ = masked_softmax(scores, visible)
    return probs @ values, probs
