"""fastseq.nn.LayerNormLSTM and LayerNormGRU: layer-normalized recurrent layers (Ba et al.,
2016, in haste's formulation; the math: fastseq.reference.layer_norm_rnn), which cuDNN
and torch do not have.

Constructor and forward as torch.nn.LSTM/GRU's (input_size, hidden_size, num_layers, bias,
batch_first, dropout, bidirectional, device, dtype; padded or packed input, optional h0/c0,
unbatched input, and fastseq's `lengths`), without proj_size. Parameters: torch's
(weight_ih_l0, weight_hh_l0_reverse, bias_ih_l0, ...) plus, per layer and direction,
ln_ih_weight_l0 and ln_hh_weight_l0 [G*H] (the gains of the input and recurrent projections'
layer norms; the biases are their shifts) and, for the LSTM, ln_c_weight_l0 and ln_c_bias_l0
[H] (its cell state's). Gains start at 1 and shifts at 0, so that a freshly built layer
normalizes without rescaling; the other parameters start as torch's.

Backends: `auto` runs the fused Triton recurrence on GPUs and the reference on CPUs (Triton
runs on CPU only through its interpreter); "triton" and "reference" can be asked for.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn.utils.rnn import PackedSequence

from .. import ops
from ..ops._checks import InputError
from ..ops.rnn_stack import run_layers
from ..reference.layer_norm_rnn import EPS
from .rnn import _FastRNNBase
from .streaming import check_frame

_GATES = {"LSTM": 4, "GRU": 3}


class _LayerNormRNNBase(_FastRNNBase):
    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None, *,
                 eps: float = EPS, backend: Optional[str] = None) -> None:
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend=backend)
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        columns = _GATES[mode] * hidden_size
        for sfx in self._suffixes():
            self.register_parameter("ln_ih_weight" + sfx, torch.nn.Parameter(torch.empty(columns, **factory)))
            self.register_parameter("ln_hh_weight" + sfx, torch.nn.Parameter(torch.empty(columns, **factory)))
            if mode == "LSTM":
                self.register_parameter("ln_c_weight" + sfx, torch.nn.Parameter(torch.empty(hidden_size, **factory)))
                self.register_parameter("ln_c_bias" + sfx, torch.nn.Parameter(torch.empty(hidden_size, **factory)))
        self._reset_layer_norms()

    def _suffixes(self) -> list[str]:
        directions = ("", "_reverse") if self.bidirectional else ("",)
        return [f"_l{layer}{d}" for layer in range(self.num_layers) for d in directions]

    def _display_name(self) -> str:
        return f"fastseq.nn.LayerNorm{self.mode}"

    def reset_parameters(self) -> None:
        super().reset_parameters()  # torch's uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter
        self._reset_layer_norms()

    def _reset_layer_norms(self) -> None:
        if not hasattr(self, "eps"):  # RNNBase's constructor resets before the gains exist
            return
        with torch.no_grad():
            for sfx in self._suffixes():
                for name in ("ln_ih_weight", "ln_hh_weight", "ln_c_weight"):
                    gain = getattr(self, name + sfx, None)
                    if gain is not None:
                        gain.fill_(1.0)
                if self.mode == "LSTM":
                    getattr(self, "ln_c_bias" + sfx).zero_()

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", eps={self.eps}" if self.eps != EPS else "")

    def step(self, input, hx=None):
        """One frame (the step protocol, fastseq.nn.state): input [B, input_size] (or
        [input_size]), hx as forward's. The layer's own forward over a one-frame sequence (the
        layer-normalized cell has no kernel of its own; one launch a layer on GPUs)."""
        check_frame(self, input)
        frames = input.unsqueeze(1 if self.batch_first and input.dim() == 2 else 0)
        out, hx = self.forward(frames, hx)
        return out.squeeze(1 if self.batch_first and input.dim() == 2 else 0), hx

    def forward(self, input, hx=None, lengths=None):
        # The layer loop is the stack op's (fastseq.ops.rnn_stack.run_layers); the backend passes
        # through to fastseq.ops.layer_norm_rnn_layer, which declares and chooses per layer.
        if lengths is not None and isinstance(input, PackedSequence):
            raise InputError(f"{self._display_name()}: lengths is for padded input; a "
                             f"PackedSequence carries its own")
        self._check_input(input)
        lengths = self._checked_lengths(input, lengths)
        return run_layers(self._display_name(), self.mode.lower(), input, hx, lengths,
                          num_layers=self.num_layers, directions=2 if self.bidirectional else 1,
                          hidden=self.hidden_size, proj=0, batch_first=self.batch_first,
                          dropout=self.dropout, training=self.training, run_layer=self._run_layer,
                          run_both=self._run_both_directions)

    def _run_both_directions(self, layer, x, states, lengths):
        """The two directions one after the other (the layer-normalized kernel runs one)."""
        lstm = self.mode == "LSTM"
        results = []
        for d in range(2):
            state = (states[0][d], states[1][d]) if lstm else states[d]
            results.append(self._run_layer(layer, x, state, lengths, reverse=d == 1))
        out = torch.cat([r[0] for r in results], dim=-1)
        if lstm:
            return out, tuple(torch.stack([r[1][i] for r in results]) for i in range(2))
        return out, torch.stack([r[1] for r in results])

    def _run_layer(self, layer, x, state, lengths, reverse=False):
        sfx = f"_l{layer}" + ("_reverse" if reverse else "")
        p = lambda name: getattr(self, name + sfx, None)  # noqa: E731
        biases = (p("bias_ih"), p("bias_hh")) if self.bias else (None, None)
        return ops.layer_norm_rnn_layer(
            self.mode.lower(), x, state, p("weight_ih"), p("weight_hh"), *biases,
            p("ln_ih_weight"), p("ln_hh_weight"), p("ln_c_weight"), p("ln_c_bias"),
            lengths=lengths, reverse=reverse, eps=self.eps, backend=self.backend)


class LayerNormLSTM(_LayerNormRNNBase):
    def __init__(self, *args, eps: float = EPS, backend: Optional[str] = None, **kwargs) -> None:
        if kwargs.get("proj_size", 0):
            raise ValueError("fastseq.nn.LayerNormLSTM: proj_size is not supported")
        kwargs.pop("proj_size", None)
        super().__init__("LSTM", *args, eps=eps, backend=backend, **kwargs)


class LayerNormGRU(_LayerNormRNNBase):
    def __init__(self, *args, eps: float = EPS, backend: Optional[str] = None, **kwargs) -> None:
        if "proj_size" in kwargs:  # as torch.nn.GRU
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, eps=eps, backend=backend, **kwargs)
