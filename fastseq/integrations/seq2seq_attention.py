"""fastseq.patch for the attention modules of OpenNMT-py's and SpeechBrain's RNN decoders: their
own classes, subclassed with a forward on fastseq.ops.global_attention (score, softmax and
context in one launch), the parameters untouched (the same tensors, the same state_dict keys).

    OpenNMT-py  onmt.modules.global_attention.GlobalAttention   dot, general, mlp (softmax)
    SpeechBrain speechbrain.nnet.attention.ContentBasedAttention   additive, scaling
                speechbrain.nnet.attention.LocationAwareAttention  additive + location features
                speechbrain.nnet.attention.KeyValueAttention       dot, 1 / sqrt(attn_dim)

`swaps()` offers them only for packages the process has already imported (a model holding
their modules has): fastseq never imports OpenNMT-py or SpeechBrain itself. Each subclass is
built once, on first use. Their forwards reproduce the originals' code line for line where it
is not the attention itself (the caches SpeechBrain keeps between steps, OpenNMT-py's coverage
term), and are checked against the originals in tests/integrations.
"""
from __future__ import annotations

import functools
import sys

import torch

from ..nn.attention_decoder import GlobalAttention as _FastGlobalAttention
from ..ops.attention_decoder import global_attention

_OPENNMT = "onmt.modules.global_attention"
_SPEECHBRAIN = "speechbrain.nnet.attention"


@functools.lru_cache(maxsize=None)
def _opennmt_class():
    base = sys.modules[_OPENNMT].GlobalAttention

    class GlobalAttention(base):
        """OpenNMT-py's GlobalAttention on fastseq's fused attention (fastseq.patch)."""
        keys = _FastGlobalAttention.keys
        attend = _FastGlobalAttention.attend
        forward = _FastGlobalAttention.forward

    GlobalAttention.__module__ = __name__
    GlobalAttention.__qualname__ = "OpenNMTGlobalAttention"
    return GlobalAttention


def _lengths_mask(enc_len, max_len, device):
    """speechbrain.dataio.dataio.length_to_mask's mask, as its attention modules keep it."""
    return (torch.arange(max_len, device=device)[None, :] < enc_len[:, None]).to(torch.float32)


@functools.lru_cache(maxsize=None)
def _speechbrain_classes():
    module = sys.modules[_SPEECHBRAIN]

    class ContentBasedAttention(module.ContentBasedAttention):
        """SpeechBrain's content-based attention on fastseq's fused additive attention."""

        def forward(self, enc_states, enc_len, dec_states):
            if self.precomputed_enc_h is None:
                self.precomputed_enc_h = self.mlp_enc(enc_states)
                self.mask = _lengths_mask(enc_len, enc_states.size(1), enc_states.device)
            context, attn = global_attention(
                self.mlp_dec(dec_states)[:, None], self.precomputed_enc_h, enc_states,
                score="additive", v=self.mlp_attn.weight[0], lengths=enc_len.long(),
                scale=float(self.scaling), backend=getattr(self, "backend", None))
            return self.mlp_out(context[:, 0]), attn[:, 0]

    class LocationAwareAttention(module.LocationAwareAttention):
        """SpeechBrain's location-aware attention (Chorowski et al.): its location features
        are the additive score's extra term inside the fused kernel."""

        def forward(self, enc_states, enc_len, dec_states):
            if self.precomputed_enc_h is None:
                self.precomputed_enc_h = self.mlp_enc(enc_states)
                self.mask = _lengths_mask(enc_len, enc_states.size(1), enc_states.device)
                # The original's first alignment: 1 / length over the valid frames (float32).
                self.prev_attn = self.mask * (1 / enc_len.float()).unsqueeze(1)
            location = self.mlp_loc(self.conv_loc(self.prev_attn.unsqueeze(1)).transpose(1, 2))
            context, attn = global_attention(
                self.mlp_dec(dec_states)[:, None], self.precomputed_enc_h, enc_states,
                score="additive", v=self.mlp_attn.weight[0], extra=location[:, None],
                lengths=enc_len.long(), scale=float(self.scaling),
                backend=getattr(self, "backend", None))
            attn = attn[:, 0]
            self.prev_attn = attn.detach()
            return self.mlp_out(context[:, 0]), attn

    class KeyValueAttention(module.KeyValueAttention):
        """SpeechBrain's key-value attention on fastseq's fused dot-product attention."""

        def forward(self, enc_states, enc_len, dec_states):
            if self.keys is None:
                self.keys = self.key_linear(enc_states)
                self.values = self.value_linear(enc_states)
                self.mask = _lengths_mask(enc_len, enc_states.size(1),
                                          enc_states.device).unsqueeze(2)
            out, attn = global_attention(
                self.query_linear(dec_states)[:, None], self.keys, self.values,
                lengths=enc_len.long(), scale=1.0 / float(self.scaling),
                backend=getattr(self, "backend", None))
            return out[:, 0], attn  # the original's [B, 1, L] scores

    for cls in (ContentBasedAttention, LocationAwareAttention, KeyValueAttention):
        cls.__module__ = __name__
        cls.__qualname__ = "SpeechBrain" + cls.__name__
    return {module.ContentBasedAttention: ContentBasedAttention,
            module.LocationAwareAttention: LocationAwareAttention,
            module.KeyValueAttention: KeyValueAttention}


def swaps() -> dict:
    """{original class: fastseq's subclass} for the packages already imported."""
    found = {}
    if _OPENNMT in sys.modules:
        found[sys.modules[_OPENNMT].GlobalAttention] = _opennmt_class()
    if _SPEECHBRAIN in sys.modules:
        found.update(_speechbrain_classes())
    return found


def refusal(module) -> str | None:
    """Why a module of a swappable class keeps its own forward, or None."""
    if getattr(module, "attn_func", "softmax") != "softmax":
        return (f"attn_func {module.attn_func!r}: fastseq's fused attention normalises with "
                f"softmax")
    return None
