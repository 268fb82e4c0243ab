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

from .. import ops
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
        # The backend passes through: fastseq.ops.layer_norm_rnn_layer declares and chooses.
        self._check_input(input)
        lengths = self._checked_lengths(input, lengths)
        return self._sequence_forward(input, hx, lengths, self.backend)

    def _run_both_directions(self, mode, layer, x, states, lengths, backend):
        """The two directions one after the other (the layer-normalized kernel runs one)."""
        results = []
        for d, sfx in enumerate((f"_l{layer}", f"_l{layer}_reverse")):
            state = (states[0][d], states[1][d]) if mode == "lstm" else states[d]
            results.append(self._run_layer(mode, sfx, x, state, lengths, d == 1, backend))
        out = torch.cat([r[0] for r in results], dim=-1)
        if mode == "lstm":
            return out, tuple(torch.stack([r[1][i] for r in results]) for i in range(2))
        return out, torch.stack([r[1] for r in results])

    def _run_layer(self, mode, sfx, x, state, lengths, reverse, backend):
        p = lambda name: getattr(self, name + sfx, None)  # noqa: E731
        biases = (p("bias_ih"), p("bias_hh")) if self.bias else (None, None)
        return ops.layer_norm_rnn_layer(
            mode, x, state, p("weight_ih"), p("weight_hh"), *biases, p("ln_ih_weight"),
            p("ln_hh_weight"), p("ln_c_weight"), p("ln_c_bias"), lengths=lengths, reverse=reverse,
            eps=self.eps, backend=backend)


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
