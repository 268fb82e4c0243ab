"""Reference recurrent sequences (the rnn family's ground truth; run it in float64): a
Python loop over the cells of fastseq.reference.rnn_cell, one step the formula, with torch's
layer semantics (layers, directions, dropout between layers, lengths, the LSTM projection
h' W_hr^T when proj_size > 0).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .rnn_cell import CELLS, MODES  # noqa: F401  (MODES: the layer's modes too)


class LayerWeights(tuple):
    """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction; biases and w_hr may be None."""

    def __new__(cls, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
        return super().__new__(cls, (w_ih, w_hh, b_ih, b_hh, w_hr))


def weights_of(module: torch.nn.Module) -> list[LayerWeights]:
    """The weights of a torch.nn.LSTM/GRU/RNN (or fastseq's), ordered layer by layer, forward
    direction before reverse: the `weights` argument of `rnn`."""
    directions = 2 if module.bidirectional else 1
    out = []
    for layer in range(module.num_layers):
        for direction in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if direction else "")
            out.append(LayerWeights(
                getattr(module, "weight_ih" + sfx), getattr(module, "weight_hh" + sfx),
                getattr(module, "bias_ih" + sfx, None), getattr(module, "bias_hh" + sfx, None),
                getattr(module, "weight_hr" + sfx, None)))
    return out


def _run_direction(mode: str, x: Tensor, h: Tensor, c: Optional[Tensor], weights: LayerWeights,
                   lengths: Optional[Tensor], reverse: bool, zoneout_h: Optional[Tensor] = None,
                   zoneout_c: Optional[Tensor] = None):
    """One layer, one direction over x [T, B, I] (see `scan` for lengths and reverse). Zoneout
    (weights m [T, B, H] for h and, LSTM, c): the new state is m * previous + (1 - m) * the
    cell's, and is also the step's output."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    cell = CELLS[mode]

    def step(t, h, c):
        if mode == "lstm":
            h_new, c_new = cell(x[t], (h, c), w_ih, w_hh, b_ih, b_hh)
            if w_hr is not None:
                h_new = F.linear(h_new, w_hr)
        else:
            h_new, c_new = cell(x[t], h, w_ih, w_hh, b_ih, b_hh), None
        if zoneout_h is not None:
            h_new = zoneout_h[t] * h + (1 - zoneout_h[t]) * h_new
        if zoneout_c is not None:
            c_new = zoneout_c[t] * c + (1 - zoneout_c[t]) * c_new
        return h_new, c_new

    return scan(step, x.shape[0], h, c, lengths, reverse)


def scan(step, steps: int, h: Tensor, c: Optional[Tensor], lengths: Optional[Tensor],
         reverse: bool):
    """Run step(t, h, c) -> (h_new, c_new) over t = 0..steps-1 (reverse: steps-1..0). Steps at or
    past a sequence's length leave its state unchanged and output zeros, so the final state is
    the state at its last valid step (the reverse direction of a sequence of length n starts at
    step n-1), as torch's packed sequences give. Returns (outputs [T, B, H], h, c)."""
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    outputs: list[Optional[Tensor]] = [None] * steps
    for t in order:
        h_new, c_new = step(t, h, c)
        if lengths is None:
            h, c = h_new, c_new
            outputs[t] = h_new
        else:
            valid = (t < lengths).to(h_new.dtype).unsqueeze(1)  # [B, 1]
            h = valid * h_new + (1 - valid) * h
            if c is not None:
                c = valid * c_new + (1 - valid) * c
            outputs[t] = valid * h_new
    if steps == 0:  # nothing to stack: an empty output, the initial state as the final one
        return h.new_empty(0, *h.shape), h, c
    return torch.stack(outputs), h, c


def rnn(mode: str, input: Tensor, hx, weights: Sequence[LayerWeights], *, num_layers: int = 1,
        bidirectional: bool = False, batch_first: bool = False,
        lengths: Optional[Tensor | Sequence[int]] = None, dropout: float = 0.0,
        training: bool = False):
    """A whole multi-layer recurrent network, as torch.nn.LSTM/GRU/RNN compute it.

    input: [T, B, I] ([B, T, I] if batch_first) or unbatched [T, I]; padded when `lengths`
      (one length per batch element, each >= 1) is given: outputs past a sequence's end are zero.
    hx: None (zeros), h0 [L*D, B, H_out], or (h0, c0) for the LSTM (c0 [L*D, B, H]).
    weights: from `weights_of`, L*D entries, layer-major.
    dropout: applied to each layer's output but the last, in training, as torch does.
    Returns (output [T, B, D*H_out], h_n) with h_n = (h_n, c_n) for the LSTM.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    directions = 2 if bidirectional else 1
    unbatched = input.dim() == 2
    if unbatched:
        input = input.unsqueeze(1)
    elif batch_first:
        input = input.transpose(0, 1)
    batch = input.shape[1]
    lstm = mode == "lstm"
    w0 = weights[0]
    hidden = w0[1].shape[1] if not lstm or w0[4] is None else w0[4].shape[1]  # H_out
    cell_size = w0[1].shape[0] // {"lstm": 4, "gru": 3}.get(mode, 1)
    h0, c0 = (hx if hx is not None else (None, None)) if lstm else (hx, None)
    if h0 is None:
        h0 = input.new_zeros(num_layers * directions, batch, hidden)
    elif unbatched:
        h0 = h0.unsqueeze(1)
    if lstm:
        if c0 is None:
            c0 = input.new_zeros(num_layers * directions, batch, cell_size)
        elif unbatched:
            c0 = c0.unsqueeze(1)
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=input.device)

    layer_input = input
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for direction in range(directions):
            k = layer * directions + direction
            out, h, c = _run_direction(mode, layer_input, h0[k], c0[k] if lstm else None,
                                       weights[k], lengths, reverse=direction == 1)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outs, dim=-1) if directions == 2 else outs[0]
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, p=dropout, training=True)

    output = layer_input
    h_n = torch.stack(h_n)
    c_n = torch.stack(c_n) if lstm else None
    if unbatched:
        output, h_n = output.squeeze(1), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if lstm else None
    elif batch_first:
        output = output.transpose(0, 1)
    return output, ((h_n, c_n) if lstm else h_n)
