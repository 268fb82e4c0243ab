"""Every public op of fastseq.ops, once: its function, its kernel family (the subpackage of
fastseq.kernels with its Triton kernels) and the fastseq-bench suite that times it.

Derived checks read this list instead of keeping their own: tests/test_registry.py fails when a
public op is missing here, when an op's suite or kernel family does not exist, and when a
cross-cutting test file (autocast, numerics, properties, strided inputs, CUDA runtime) neither
covers an op nor names it as an exclusion with a reason.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .attention import attention
from .kv_cache import attention_with_kv_cache
from .layer_norm_rnn_layer import layer_norm_rnn_layer
from .rel_attention import rel_attention
from .rnn_cell import gru_cell, lstm_cell, rnn_relu_cell, rnn_tanh_cell
from .rnn_layer import rnn_bidirectional_layer, rnn_layer


@dataclasses.dataclass(frozen=True)
class PublicOp:
    name: str
    function: Callable
    kernels: str  # fastseq.kernels.<kernels>
    suite: str    # fastseq-bench's suite (bench/bench_<suite>.py)


PUBLIC_OPS = {op.name: op for op in (
    PublicOp("lstm_cell", lstm_cell, "recurrent.cell", "rnn_cell"),
    PublicOp("gru_cell", gru_cell, "recurrent.cell", "rnn_cell"),
    PublicOp("rnn_tanh_cell", rnn_tanh_cell, "recurrent.cell", "rnn_cell"),
    PublicOp("rnn_relu_cell", rnn_relu_cell, "recurrent.cell", "rnn_cell"),
    PublicOp("rnn_layer", rnn_layer, "recurrent.layer", "rnn"),
    PublicOp("rnn_bidirectional_layer", rnn_bidirectional_layer, "recurrent.layer", "rnn"),
    PublicOp("layer_norm_rnn_layer", layer_norm_rnn_layer, "recurrent.layer_norm_layer",
             "layer_norm_rnn"),
    PublicOp("attention", attention, "attention.launch", "attention"),
    PublicOp("attention_with_kv_cache", attention_with_kv_cache, "attention.decode_launch",
             "decode"),
    PublicOp("rel_attention", rel_attention, "rel_attention.launch", "rel_attention"),
)}

# fastseq-bench suites that time layers rather than one op (their name -> what they time).
LAYER_SUITES = {"adaptive_softmax": "fastseq.nn.ProjectedAdaptiveLogSoftmax, the head of "
                                    "fastseq.nn.TransformerXLLM",
                "txl_generation": "fastseq.nn.TransformerXLDecodingState against the model's "
                                  "memory forward and recomputing the context, per token"}
