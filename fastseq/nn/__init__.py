"""Drop-in nn.Module layers built on fastseq's ops, and layers torch does not have."""
from .adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax
from .attention import MultiheadAttention
from .kv_cache import KVCache
from .layer_norm_rnn import LayerNormGRU, LayerNormLSTM
from .rnn import GRU, LSTM, RNN
from .rnn_cell import GRUCell, LSTMCell, RNNCell
from .serialization import safe_globals
from .transformer import TransformerDecoderLayer, TransformerEncoderLayer
from .rel_attention import RelPartialLearnableMultiHeadAttn
from .transformer_xl import PositionwiseFF, TransformerXL, TransformerXLLayer
from .transformer_xl_decoding import TransformerXLDecodingState
from .transformer_xl_lm import TransformerXLLM

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM", "LayerNormGRU",
           "MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
           "RelPartialLearnableMultiHeadAttn", "PositionwiseFF", "TransformerXLLayer", "TransformerXL",
           "TransformerXLLM", "TransformerXLDecodingState", "KVCache", "AdaptiveEmbedding", "ProjectedAdaptiveLogSoftmax", "safe_globals"]
