"""Drop-in nn.Module layers built on fastseq's ops, and layers torch does not have.

Each family's layers are defined in fastseq/nn/<family>.py and exported here as
fastseq/families.py declares them (`Family.layers`), so a new family's layers need no edit in
this file. The models built on the families (`Family.models`, modules of their own) and the
helpers are imported by name below.
"""
import importlib as _importlib

from ..families import FAMILIES as _FAMILIES

for _family in _FAMILIES.values():
    _module = _importlib.import_module(f"{__name__}.{_family.name}")
    globals().update({_layer: getattr(_module, _layer) for _layer in _family.layers})

from .adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax  # noqa: E402
from .attention_decoder import AttentionDecoderState  # noqa: E402
from .attentional_rnn_decoder import AttentionalRNNDecoder  # noqa: E402
from .beam_search import Hypothesis, beam_search, greedy_search  # noqa: E402
from .block_recurrent import BlockRecurrentMemory  # noqa: E402
from .block_recurrent_lm import BlockRecurrentTransformerLM  # noqa: E402
from .serialization import safe_globals  # noqa: E402
from .transformer import TransformerDecoderLayer, TransformerEncoderLayer  # noqa: E402
from .transformer_xl import PositionwiseFF, TransformerXL, TransformerXLLayer  # noqa: E402
from .transformer_xl_decoding import TransformerXLDecodingState  # noqa: E402
from .transformer_xl_lm import TransformerXLLM  # noqa: E402

__all__ = [layer for family in _FAMILIES.values() for layer in family.layers] + [
    "TransformerEncoderLayer", "TransformerDecoderLayer", "PositionwiseFF", "TransformerXLLayer",
    "TransformerXL", "TransformerXLLM", "TransformerXLDecodingState", "AdaptiveEmbedding",
    "ProjectedAdaptiveLogSoftmax", "BlockRecurrentTransformerLM", "BlockRecurrentMemory",
    "AttentionDecoderState", "AttentionalRNNDecoder", "Hypothesis", "beam_search", "greedy_search", "safe_globals"]
