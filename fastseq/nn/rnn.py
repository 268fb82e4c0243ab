"""Drop-in replacements for torch.nn.LSTM, GRU and RNN.

Same constructor arguments, parameter names (weight_ih_l0, weight_hh_l0_reverse, weight_hr_l0,
...), initialisation, state_dict and flatten_parameters as torch's: the classes derive from
torch.nn.RNNBase, which creates all of that. They do not derive from torch.nn.LSTM/GRU/RNN
themselves, because torch.compile refuses to trace any instance of those (dynamo's
"Attempted to wrap RNN, GRU, or LSTM", torch 2.14), yet isinstance(fastseq.nn.GRU(...),
torch.nn.GRU) holds (fastseq/nn/torch_identity.py says how); each borrows the few helpers
torch's own forward calls, so that code calling them on an LSTM keeps working. forward takes what torch's
takes (padded or packed input, optional h0/c0, unbatched input) and one more argument,
`lengths`, for padded variable-length batches without a PackedSequence.

Zoneout (LSTM and GRU, beyond torch): `zoneout=p` (or `(p_h, p_c)` for the LSTM) keeps each
unit's previous h (and c) with probability p at every step in training, and mixes
h_t = p h_{t-1} + (1 - p) h~_t in evaluation (Krueger et al., 2016). It runs on every fastseq
backend (`auto`: fastseq.ops.rnn_layer's own choice); torch's RNNs have none.

Backends: the layer decides none itself; it calls fastseq.ops.rnn_stack with its parameters,
whose declaration chooses. In eager mode `auto` runs torch's own stacked forward (cuDNN on
GPUs, aten on CPUs): fastseq's persistent recurrence kernel (backend "native" on GPUs), the one
meant to beat cuDNN, has not been timed on a GPU yet, and nothing slower is chosen for you.
Under torch.compile `auto` takes fastseq's per-layer path (Triton, else native, else the
reference), since torch's functional RNNs do not compile with fullgraph=True.
`backend="triton"` (or "native", "reference") runs fastseq.ops.rnn_layer over the layers and
directions; proj_size runs on every backend (the fused ones fold the projection into the
recurrent weights).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .. import ops
from ..ops._checks import InputError, check_features, check_like_parameters, checked_lengths
from ..ops.rnn_stack import initial_states
from .scripting import RefusesTorchScript
from .streaming import RecurrentSteps
from .torch_identity import PresentsAsTorchClass

_MODULE_NAMES = {"LSTM": "fastseq.nn.LSTM", "GRU": "fastseq.nn.GRU", "RNN_TANH": "fastseq.nn.RNN",
                 "RNN_RELU": "fastseq.nn.RNN"}
_OP_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


class _FastRNNBase(PresentsAsTorchClass, RefusesTorchScript, RecurrentSteps, torch.nn.RNNBase):
    """torch.nn.RNNBase with fastseq's forward; `self.backend` pins a backend."""

    def __init__(self, mode: str, *args, backend: Optional[str] = None,
                 zoneout: Union[float, tuple[float, float]] = 0.0, **kwargs) -> None:
        super().__init__(mode, *args, **kwargs)
        self.backend = backend
        self.zoneout_h, self.zoneout_c = _zoneout_probabilities(mode, zoneout)

    def _display_name(self) -> str:
        return _MODULE_NAMES[self.mode]

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.zoneout_h or self.zoneout_c:
            text += f", zoneout=({self.zoneout_h}, {self.zoneout_c})" if self.mode == "LSTM" \
                else f", zoneout={self.zoneout_h}"
        return text

    def forward(self, input, hx=None, lengths=None):
        return self._fastseq_forward(input, hx, lengths)

    def _fastseq_forward(self, input, hx, lengths):
        # The module checks what it knows (its input width, dtype, lengths against the input)
        # and hands its parameters to the stack op, which decides the backend (its declaration:
        # torch's stacked forward or fastseq's per-layer path) and shows it in fastseq.explain.
        if lengths is not None and isinstance(input, PackedSequence):
            raise InputError(f"{self._display_name()}: lengths is for padded input; a "
                             f"PackedSequence carries its own")
        self._check_input(input)
        lengths = self._checked_lengths(input, lengths)
        self._update_flat_weights()  # as torch's forward does (torch 2.11 and 2.14 alike)
        return ops.rnn_stack(
            _OP_MODES[self.mode], input, hx, self._flat_weights, num_layers=self.num_layers,
            bias=self.bias, bidirectional=self.bidirectional, batch_first=self.batch_first,
            dropout=self.dropout, training=self.training, lengths=lengths,
            zoneout=(self.zoneout_h, self.zoneout_c), backend=self.backend)

    def _check_input(self, input) -> None:
        """What torch's own forward checks, named the same way on every backend (the ops below
        would otherwise blame a weight for an input of the wrong width or dtype)."""
        op = self._display_name()
        data = input.data if isinstance(input, PackedSequence) else input
        if not isinstance(data, Tensor):
            raise InputError(f"{op}: input must be a Tensor or a PackedSequence, got "
                             f"{type(input).__name__}")
        if not isinstance(input, PackedSequence) and data.dim() not in (2, 3):
            layout = "[batch, steps, input_size]" if self.batch_first else "[steps, batch, input_size]"
            raise InputError(f"{op}: input must be 3-D {layout} or 2-D unbatched [steps, "
                             f"input_size], got shape {list(data.shape)}")
        check_features(op, "input", data, "input_size", self.input_size)
        check_like_parameters(op, "input", data, self.weight_ih_l0)

    def _checked_lengths(self, input, lengths) -> Optional[Tensor]:
        """lengths checked against the padded input (one per batch row, each in [0, steps]),
        as a tensor where they were (torch's packing moves them to the CPU itself)."""
        if lengths is None:
            return None
        if isinstance(input, PackedSequence) or input.dim() != 3:
            raise InputError(f"{self._display_name()}: lengths is for a padded batch (3-D input)")
        batch, steps = (input.shape[0], input.shape[1]) if self.batch_first else \
            (input.shape[1], input.shape[0])
        return checked_lengths(self._display_name(), lengths, steps, batch)

    def _initial_states(self, hx, x, unbatched, lstm):
        """(h0, c0) for time-major x [T, B, I], checked (the stack op's own; the streaming step
        uses it on a one-frame sequence)."""
        return initial_states(self._display_name(), hx, x, unbatched, lstm, self.num_layers,
                              2 if self.bidirectional else 1, self.hidden_size,
                              getattr(self, "proj_size", 0))


def _zoneout_probabilities(mode: str, zoneout) -> tuple[float, float]:
    """(p_h, p_c) from a constructor's `zoneout`: one p (h, and c for the LSTM) or (p_h, p_c)."""
    name = _MODULE_NAMES[mode]
    pair = tuple(zoneout) if isinstance(zoneout, (tuple, list)) else (zoneout, zoneout)
    if len(pair) != 2 or not all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in pair):
        raise ValueError(f"{name}: zoneout must be a probability in [0, 1] or, for the LSTM, a pair "
                         f"(p_h, p_c) of them, got {zoneout!r}")
    if mode == "LSTM":
        return float(pair[0]), float(pair[1])
    if mode == "GRU":
        if isinstance(zoneout, (tuple, list)):
            raise ValueError(f"{name}: zoneout is one probability for the GRU (it has no cell state), "
                             f"got {zoneout!r}")
        return float(pair[0]), 0.0
    if pair != (0, 0):
        raise ValueError(f"{name}: zoneout is for the LSTM and the GRU, not the plain RNN")
    return 0.0, 0.0


class LSTM(_FastRNNBase):
    _torch_class = torch.nn.LSTM
    # torch.nn.LSTM's helpers beyond RNNBase's, for code that calls them on an LSTM.
    get_expected_cell_size = torch.nn.LSTM.get_expected_cell_size
    check_forward_args = torch.nn.LSTM.check_forward_args
    permute_hidden = torch.nn.LSTM.permute_hidden

    def __init__(self, *args, backend: Optional[str] = None,
                 zoneout: Union[float, tuple[float, float]] = 0.0, **kwargs) -> None:
        super().__init__("LSTM", *args, backend=backend, zoneout=zoneout, **kwargs)


class GRU(_FastRNNBase):
    _torch_class = torch.nn.GRU

    def __init__(self, *args, backend: Optional[str] = None, zoneout: float = 0.0, **kwargs) -> None:
        if "proj_size" in kwargs:  # as torch.nn.GRU
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, backend=backend, zoneout=zoneout, **kwargs)


class RNN(_FastRNNBase):
    _torch_class = torch.nn.RNN

    def __init__(self, *args, backend: Optional[str] = None, **kwargs) -> None:
        # torch.nn.RNN's own argument handling: nonlinearity (4th positional) picks the mode.
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            nonlinearity, args = args[3], args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(modes[nonlinearity], *args, backend=backend, **kwargs)
        self.nonlinearity = nonlinearity
