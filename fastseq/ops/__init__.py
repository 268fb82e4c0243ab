"""fastseq's functional API: each function validates its input, picks a backend (its
declaration, chosen through fastseq.backend) and calls a registered op (torch.ops.fastseq.*)
with fake and autograd. PUBLIC_OPS (registry.py) lists them for the derived checks."""
from .attention import attention
from .kv_cache import attention_with_kv_cache
from .rnn_cell import gru_cell, lstm_cell, rnn_relu_cell, rnn_tanh_cell
from .layer_norm_rnn import layer_norm_rnn_layer
from .rel_attention import rel_attention
from .rnn import rnn_bidirectional_layer, rnn_layer, rnn_stack

from .registry import PUBLIC_OPS

__all__ = ["lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "rnn_stack", "rnn_layer",
           "rnn_bidirectional_layer", "layer_norm_rnn_layer", "attention", "attention_with_kv_cache", "rel_attention",
           "PUBLIC_OPS"]
