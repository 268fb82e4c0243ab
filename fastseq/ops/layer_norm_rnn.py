"""One layer-normalized LSTM or GRU layer, one direction, over a whole sequence:
fastseq.ops.layer_norm_rnn_layer (the math: fastseq.reference.layer_norm_rnn).

The input's share of the gates is one GEMM and one layer norm over all steps; the recurrence,
with the layer norms of the recurrent projection and (LSTM) of the cell state fused into it, is
one Triton launch (kernels/layer_norm_rnn/launch.py); its backward one launch plus sums over all
steps for the parameters. cuDNN has no layer-normalized RNN, so there is no torch backend.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from .. import backend as _backends
from ..reference import layer_norm_rnn as _reference
from . import layer_norm_rnn_registration as _registered_ops  # noqa: F401  (registers the ops)
from ._autocast import autocast_op, recurrent_mode
from ._registration import fused
from ._checks import check_same_dtype_device, check_shape, check_tensor, fail, needs_grad
from .rnn import _checked_lengths, _validate
from ._sharding import shards
from ._sharding_rules import rnn_layer_axes

OP = "fastseq.ops.layer_norm_rnn_layer"


@shards(rnn_layer_axes)
@autocast_op(recurrent_mode)  # as the mode's plain layer: torch has no layer-norm RNN
def layer_norm_rnn_layer(mode: str, input: Tensor, hx, w_ih: Tensor, w_hh: Tensor,
                         b_ih: Optional[Tensor], b_hh: Optional[Tensor], ln_ih_weight: Tensor,
                         ln_hh_weight: Tensor, ln_c_weight: Optional[Tensor] = None,
                         ln_c_bias: Optional[Tensor] = None, *,
                         lengths: Optional[Union[Tensor, Sequence[int]]] = None,
                         reverse: bool = False, eps: float = _reference.EPS,
                         backend: Optional[str] = None):
    """Run one layer of a layer-normalized LSTM ("lstm") or GRU ("gru") over input [T, B, I]
    (time-major) in one direction.

    Weights and biases as fastseq.ops.rnn_layer's (biases: both or neither). ln_ih_weight and
    ln_hh_weight [G*H]: the gains of the layer norms of x W_ih^T and h W_hh^T (over all G*H
    gate columns of a row; the biases b_ih, b_hh are their shifts); the LSTM's ln_c_weight and
    ln_c_bias [H]: the gain and shift of its cell state's layer norm. hx, lengths and reverse
    as fastseq.ops.rnn_layer's. Returns (output [T, B, H], h_n), h_n = (h_n, c_n) for the LSTM.
    """
    if mode not in _reference.MODES:
        fail(OP, f"mode must be one of {', '.join(_reference.MODES)}, got {mode!r}")
    lstm = mode == "lstm"
    if lstm and hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
        fail(OP, f"hx must be a tuple (h0, c0) or None for the lstm, got {type(hx).__name__}")
    h0, c0 = (hx if hx is not None else (None, None)) if lstm else (hx, None)
    _, hidden = _validate(mode, input, h0, c0, w_ih, w_hh, b_ih, b_hh, None)
    _validate_layer_norm(mode, input, hidden, w_hh.shape[0], ln_ih_weight, ln_hh_weight,
                         ln_c_weight, ln_c_bias)
    if not isinstance(eps, (int, float)) or not eps > 0:
        fail(OP, f"eps must be a positive number, got {eps!r}")
    steps, batch = input.shape[0], input.shape[1]
    lengths = _checked_lengths(lengths, steps, batch, input.device)
    if h0 is None:
        h0 = input.new_zeros(batch, hidden)
    if lstm and c0 is None:
        c0 = input.new_zeros(batch, hidden)
    weights = _reference.LayerNormWeights(w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight,
                                          ln_c_weight, ln_c_bias)
    y, h_n, c_n = BACKENDS.run({"device": input.device, "mode": mode, "input": input, "h0": h0,
                                "c0": c0, "weights": weights, "lengths": lengths,
                                "reverse": reverse, "eps": eps}, backend)
    return (y, (h_n, c_n)) if lstm else (y, h_n)


def _reference_layer(mode, input, h0, c0, weights, lengths, reverse, eps, **_):
    return _reference.layer_norm_run_direction(mode, input, h0, c0, weights, lengths, reverse,
                                               eps)


def _triton_layer(mode, input, h0, c0, weights, lengths, reverse, eps, **_):
    w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight, ln_c_weight, ln_c_bias = weights
    gates_x = _reference.input_gates(input, w_ih, b_ih, ln_ih_weight, eps)  # every step at once
    y, h_n, c_n, _workspace, _stats = fused("fastseq::layer_norm_rnn_layer_forward_triton")(
        mode, gates_x, h0, c0, w_hh, b_hh, ln_hh_weight, ln_c_weight, ln_c_bias, lengths,
        float(eps), reverse, needs_grad(input, h0, c0, *weights))
    return y, h_n, c_n


def _refused(reason: str) -> _backends.Backend:
    """A backend that serves no call of this op (its run is never reached)."""
    def run(**_):
        raise AssertionError(reason)
    return _backends.serves(lambda call: reason, run)


# Neither torch nor cuDNN has a layer-normalized recurrence; the reference (plain PyTorch, a
# Python loop over steps) is auto's choice on CPUs, where Triton is only the interpreter.
BACKENDS = _backends.OpBackends(
    OP,
    backends={
        "triton": _backends.serves(
            _backends.triton_refuses, _triton_layer,
            "one launch forward, one backward: the recurrent and cell-state layer norms inside "
            "the recurrence"),
        "reference": _backends.serves(_backends.serves_every_call, _reference_layer,
                                      "fastseq.reference.layer_norm_rnn, a loop over steps"),
        "torch": _refused("torch and cuDNN have no layer-normalized RNN"),
        "native": _refused("fastseq has no C++/CUDA layer-normalized recurrence (its kernel is "
                           "Triton's)")},
    preference={"cuda": ("triton", "reference"), "cpu": ("reference",)})


def _validate_layer_norm(mode, input, hidden, columns, ln_ih_weight, ln_hh_weight, ln_c_weight,
                         ln_c_bias) -> None:
    gates = (("ln_ih_weight", ln_ih_weight), ("ln_hh_weight", ln_hh_weight))
    cell = (("ln_c_weight", ln_c_weight), ("ln_c_bias", ln_c_bias))
    for name, gain in gates:
        check_tensor(OP, name, gain, ndims=(1,))
        check_shape(OP, name, gain, (columns,), "[{g}*hidden_size]", g=columns // max(hidden, 1))
    if mode == "lstm":
        for name, value in cell:
            if value is None:
                fail(OP, f"{name} is required for the lstm (its cell state's layer norm)")
            check_tensor(OP, name, value, ndims=(1,))
            check_shape(OP, name, value, (hidden,), "[hidden_size]")
    else:
        for name, value in cell:
            if value is not None:
                fail(OP, f"{name} is for the lstm's cell state; the gru has none")
    check_same_dtype_device(OP, ("input", input), gates + cell)
