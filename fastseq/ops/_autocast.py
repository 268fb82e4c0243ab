"""Autocast for fastseq's public ops: under torch.autocast an op takes the dtype its torch
equivalent takes there. The decorator casts the op's floating-point tensor arguments (weights
included, as autocast does: their gradients flow back in their own dtype) and runs the op with
autocast off, so that its own internals (a GEMM of the input projection, a softmax in a
reference path) do not mix dtypes behind its back.

On CUDA torch runs all of these in the autocast dtype (scaled_dot_product_attention, the RNN
cells and cuDNN's RNNs are on its lower-precision list). On CPU torch 2.14 is selective,
measured under torch.autocast("cpu", bfloat16) with fp32 inputs: SDPA, nn.LSTM, nn.RNN and
nn.RNNCell give bfloat16; nn.GRU, nn.LSTMCell and nn.GRUCell stay float32. fastseq follows
that table, so a fastseq layer and the torch layer it replaces return the same dtype. The
registered torch.ops.fastseq.* ops themselves do not cast: call them with the dtypes you want.
"""
from __future__ import annotations

import functools
from typing import Callable, Union

import torch
from torch.nn.attention.bias import CausalBias

# Policy names (an op, or a recurrent mode) whose torch equivalent autocast leaves alone on CPU.
_FULL_PRECISION_ON_CPU = frozenset({"gru", "lstm_cell", "gru_cell"})
# Device types torch.autocast knows (asking about another, e.g. "meta", raises).
_AUTOCAST_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu"})


def _first_tensor(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, (tuple, list)):
            found = _first_tensor(v)
            if found is not None:
                return found
    return None


def _cast(value, dtype):
    if isinstance(value, CausalBias):  # a mask that says where, not a value to cast
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def autocast_op(policy: Union[str, Callable[..., str]]):
    """Decorate a public op: `policy` names the op in the table above (or computes the name
    from the op's arguments, e.g. its recurrent mode)."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            first = _first_tensor(list(args) + list(kwargs.values()))
            if (first is None or first.device.type not in _AUTOCAST_DEVICES
                    or not torch.is_autocast_enabled(first.device.type)):
                return fn(*args, **kwargs)
            device_type = first.device.type
            name = policy(*args, **kwargs) if callable(policy) else policy
            if not (device_type == "cpu" and name in _FULL_PRECISION_ON_CPU):
                dtype = torch.get_autocast_dtype(device_type)
                args = _cast(args, dtype)
                kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)
        return wrapper
    return decorate


def recurrent_mode(mode, *args, **kwargs) -> str:
    """The policy name of the layer ops: their mode ("lstm", "gru", "rnn_tanh", "rnn_relu")."""
    return mode
