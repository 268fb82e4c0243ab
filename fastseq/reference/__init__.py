"""Plain-PyTorch implementations: the ground truth of fastseq's tests (run them in float64) and
the baseline of its benchmarks. Readable first; autograd is PyTorch's own."""
from . import attention, kv_cache, layer_norm_rnn, rel_attention, rnn_cell
from .attention import scaled_dot_product_attention
from .rnn import rnn, weights_of  # fastseq.reference.rnn is this function; the module: sys.modules
from .rnn_cell import gru_cell, lstm_cell, rnn_relu_cell, rnn_tanh_cell
from .rel_attention import rel_attention as relative_attention
from .rel_attention import rel_attention_original

__all__ = [
    "attention", "kv_cache", "layer_norm_rnn", "rnn_cell", "rel_attention",
    "scaled_dot_product_attention", "relative_attention", "rel_attention_original",
    "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "rnn", "weights_of",
]
