"""Drop-in replacements for torch.nn.LSTM, GRU and RNN.

Same constructor arguments, parameter names (weight_ih_l0, weight_hh_l0_reverse, weight_hr_l0,
...), initialisation, state_dict and flatten_parameters as torch's: the classes derive from
torch.nn.RNNBase, which creates all of that. They do not derive from torch.nn.LSTM/GRU/RNN
themselves, because torch.compile refuses to trace any instance of those (dynamo's
"Attempted to wrap RNN, GRU, or LSTM", torch 2.14); each borrows the few helpers torch's own
forward calls, so that forward runs unchanged on the `auto` path. forward takes what torch's
takes (padded or packed input, optional h0/c0, unbatched input) and one more argument,
`lengths`, for padded variable-length batches without a PackedSequence.

Zoneout (LSTM and GRU, beyond torch): `zoneout=p` (or `(p_h, p_c)` for the LSTM) keeps each
unit's previous h (and c) with probability p at every step in training, and mixes
h_t = p h_{t-1} + (1 - p) h~_t in evaluation (Krueger et al., 2016). It runs on every fastseq
backend (`auto`: fastseq.ops.rnn_layer's own choice); torch's RNNs have none.

Backends: in eager mode `auto` runs torch's own forward (cuDNN on GPUs, aten on CPUs):
fastseq's persistent recurrence kernel (backend "native" on GPUs), the one meant to beat
cuDNN, has not been timed on a GPU yet, and nothing slower is chosen for you. Under
torch.compile `auto` takes fastseq's sequence path (Triton, else native, else the reference),
since torch's functional RNNs do not compile with fullgraph=True. `backend="triton"` (or
"native", "reference") runs fastseq.ops.rnn_layer over the layers and directions; proj_size
runs on every backend (the fused ones fold the projection into the recurrent weights).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import backend as _backends
from .. import ops
from ..ops._checks import InputError, check_features, check_like_parameters, checked_lengths
from ..ops.rnn import TORCH_HAS_NO_ZONEOUT, TORCH_REFUSES_EMPTY
from .scripting import RefusesTorchScript
from .streaming import RecurrentSteps

_MODULE_NAMES = {"LSTM": "fastseq.nn.LSTM", "GRU": "fastseq.nn.GRU", "RNN_TANH": "fastseq.nn.RNN",
                 "RNN_RELU": "fastseq.nn.RNN"}
_OP_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


def _torch_module_refusal(call: dict) -> Optional[str]:
    if call["zoneout"]:
        return TORCH_HAS_NO_ZONEOUT
    if call["empty"]:
        return TORCH_REFUSES_EMPTY
    if call["zero_lengths"]:
        return "torch's packed sequences refuse zero lengths (fastseq's backends take them)"
    return None


def _order(call: dict, eager: tuple[str, ...]) -> tuple[str, ...]:
    # torch's own RNN forward does not compile with fullgraph=True; fastseq's sequence path does.
    return ("triton", "native", "reference") if call["compiling"] else eager


def _torch_module_forward(module, input, hx, lengths, **_):
    return module._torch_forward(input, hx, lengths)


def _per_layer(backend: str):
    def run(module, input, hx, lengths, **_):
        return module._sequence_forward(input, hx, lengths, backend)
    return run


# The layers' choice: torch's own module forward (cuDNN on GPUs, aten on CPUs: all layers and
# directions in one call) first in eager mode, as a drop-in user on either must not get slower
# (fastseq's persistent kernel has not been timed against cuDNN yet); else fastseq.ops.rnn_layer
# per layer and direction on the chosen backend (each op call reports its own choice).
_PER_LAYER = "fastseq.ops.rnn_layer per layer and direction"
LAYER_BACKENDS = _backends.OpBackends(
    "fastseq.nn.LSTM/GRU/RNN",
    backends={
        "torch": _backends.serves(_torch_module_refusal, _torch_module_forward,
                                  "torch's own module forward, every layer and direction"),
        "triton": _backends.serves(_backends.triton_refuses,
                                   _per_layer("triton"), _PER_LAYER),
        "native": _backends.serves(_backends.native_refuses,
                                   _per_layer("native"), _PER_LAYER),
        "reference": _backends.serves(_backends.serves_every_call, _per_layer("reference"),
                                      _PER_LAYER)},
    preference={"cuda": lambda call: _order(call, ("torch", "triton", "native", "reference")),
                "cpu": lambda call: _order(call, ("torch", "native", "reference"))})


class _FastRNNBase(RefusesTorchScript, RecurrentSteps, torch.nn.RNNBase):
    """torch.nn.RNNBase with fastseq's forward; `self.backend` pins a backend."""

    _torch_class: type  # the torch module this one replaces, whose forward `auto` runs

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
        op = self._display_name()
        if lengths is not None and isinstance(input, PackedSequence):
            raise InputError(f"{op}: lengths is for padded input; a PackedSequence carries its own")
        self._check_input(input)
        lengths = self._checked_lengths(input, lengths)
        zoneout = self.zoneout_h > 0 or self.zoneout_c > 0
        empty = not isinstance(input, PackedSequence) and \
            input.shape[1 if self.batch_first and input.dim() == 3 else 0] == 0
        compiling = torch.compiler.is_compiling()
        # Whether any row has length 0 reads the lengths: skipped under compile, where torch's
        # forward is never auto's choice anyway.
        zero_lengths = lengths is not None and not compiling and bool((lengths == 0).any())
        return LAYER_BACKENDS.run(
            {"op": op, "device": _device_of(input), "zoneout": zoneout, "empty": empty,
             "zero_lengths": zero_lengths, "compiling": compiling, "module": self,
             "input": input, "hx": hx, "lengths": lengths}, self.backend)

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

    def _torch_forward(self, input, hx, lengths):
        if lengths is None:
            return self._torch_class.forward(self, input, hx)
        time_dim = 1 if self.batch_first else 0
        packed = pack_padded_sequence(input, lengths.cpu(),
                                      batch_first=self.batch_first, enforce_sorted=False)
        out, state = self._torch_class.forward(self, packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=self.batch_first,
                                     total_length=input.shape[time_dim])
        return out, state

    def _sequence_forward(self, input, hx, lengths, backend):
        mode = _OP_MODES[self.mode]
        lstm = mode == "lstm"
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input)  # [T, B, I], rows in the caller's order
            unbatched = False
        else:
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        directions = 2 if self.bidirectional else 1
        h0, c0 = self._initial_states(hx, x, unbatched, lstm)
        layer_input = x
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            k = layer * directions
            states = (h0[k:k + directions], c0[k:k + directions]) if lstm else h0[k:k + directions]
            if directions == 2:
                layer_input, final = self._run_both_directions(mode, layer, layer_input, states,
                                                               lengths, backend)
            else:
                state = (states[0][0], states[1][0]) if lstm else states[0]
                layer_input, final = self._run_layer(mode, f"_l{layer}", layer_input, state,
                                                     lengths, False, backend)
                final = (final[0].unsqueeze(0), final[1].unsqueeze(0)) if lstm else final.unsqueeze(0)
            h_n.append(final[0] if lstm else final)
            if lstm:
                c_n.append(final[1])
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        h_n = torch.cat(h_n)
        c_n = torch.cat(c_n) if lstm else None
        out = layer_input
        if packed:
            out = _pack_like(out, input)
        elif unbatched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if lstm else None
        elif self.batch_first:
            out = out.transpose(0, 1).contiguous()  # torch returns a contiguous batch-first output
        return out, ((h_n, c_n) if lstm else h_n)

    def _run_layer(self, mode, sfx, x, state, lengths, reverse, backend):
        """One layer and direction (parameter suffix `sfx`, e.g. "_l1_reverse") over x [T, B, I]."""
        w_ih, w_hh = getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx)
        b_ih = getattr(self, "bias_ih" + sfx) if self.bias else None
        b_hh = getattr(self, "bias_hh" + sfx) if self.bias else None
        w_hr = getattr(self, "weight_hr" + sfx) if getattr(self, "proj_size", 0) > 0 else None
        zoneout_h, zoneout_c = self._zoneout_weights(x)
        return ops.rnn_layer(mode, x, state, w_ih, w_hh, b_ih, b_hh, w_hr=w_hr, lengths=lengths,
                             reverse=reverse, zoneout_h=zoneout_h, zoneout_c=zoneout_c,
                             backend=backend)

    def _run_both_directions(self, mode, layer, x, states, lengths, backend):
        """Both directions of layer `layer`: (output [T, B, 2H], final states [2, B, H] (a pair
        for the LSTM)), through fastseq.ops.rnn_bidirectional_layer (one launch for both on
        Triton)."""
        weights = []
        for sfx in (f"_l{layer}", f"_l{layer}_reverse"):
            biases = (getattr(self, "bias_ih" + sfx), getattr(self, "bias_hh" + sfx)) if self.bias \
                else (None, None)
            w_hr = getattr(self, "weight_hr" + sfx) if getattr(self, "proj_size", 0) > 0 else None
            weights.append((getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx),
                            *biases, w_hr))
        masks = [self._zoneout_weights(x) for _ in range(2)]
        zoneout_h, zoneout_c = (torch.stack([m[i] for m in masks]) if masks[0][i] is not None
                                else None for i in range(2))
        return ops.rnn_bidirectional_layer(mode, x, states, weights[0], weights[1], lengths=lengths,
                                           zoneout_h=zoneout_h, zoneout_c=zoneout_c, backend=backend)

    def _zoneout_weights(self, x):
        """Per-step weights of one layer and direction: fresh Bernoulli(p) masks in training,
        p everywhere in evaluation; None where p is 0."""
        shape = (x.shape[0], x.shape[1], self.hidden_size)

        def weights(p):
            if p == 0:
                return None
            if self.training:
                return (torch.rand(shape, device=x.device) < p).to(x.dtype)
            return torch.full(shape, p, device=x.device, dtype=x.dtype)

        return weights(self.zoneout_h), weights(self.zoneout_c)

    def _initial_states(self, hx, x, unbatched, lstm):
        directions = 2 if self.bidirectional else 1
        cell_shape = (self.num_layers * directions, x.shape[1], self.hidden_size)
        shape = (*cell_shape[:2], getattr(self, "proj_size", 0) or self.hidden_size)
        h0, c0 = (hx if hx is not None else (None, None)) if lstm else (hx, None)
        if unbatched:
            h0 = h0.unsqueeze(1) if h0 is not None else None
            c0 = c0.unsqueeze(1) if c0 is not None else None
        h0 = h0 if h0 is not None else x.new_zeros(shape)
        c0 = (c0 if c0 is not None else x.new_zeros(cell_shape)) if lstm else None
        size = "proj_size" if shape != cell_shape else "hidden_size"
        for name, state, want, size_name in (("h0", h0, shape, size), ("c0", c0, cell_shape, "hidden_size")):
            if state is not None and tuple(state.shape) != want:
                raise InputError(
                    f"{self._display_name()}: {name} must have shape [num_layers*num_directions, "
                    f"batch, {size_name}] = {list(want)}, got {list(state.shape)}")
        return h0, c0


def _pack_like(padded: Tensor, like: PackedSequence) -> PackedSequence:
    """padded [T, B, H] (rows in the caller's order) packed exactly as `like` is: the same
    batch_sizes and row order, so sorted_indices/unsorted_indices carry over unchanged."""
    order = like.sorted_indices if like.sorted_indices is not None else \
        torch.arange(padded.shape[1], device=padded.device)
    steps = [torch.full((int(n),), t, dtype=torch.long) for t, n in enumerate(like.batch_sizes)]
    rows = [order[: int(n)].cpu() for n in like.batch_sizes]
    t_index = torch.cat(steps).to(padded.device)
    b_index = torch.cat(rows).to(padded.device)
    return PackedSequence(padded[t_index, b_index], like.batch_sizes, like.sorted_indices,
                          like.unsorted_indices)


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


def _device_of(input) -> torch.device:
    return input.data.device if isinstance(input, PackedSequence) else input.device


class LSTM(_FastRNNBase):
    _torch_class = torch.nn.LSTM
    # Helpers torch.nn.LSTM.forward calls on self, beyond RNNBase's.
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
