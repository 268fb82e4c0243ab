"""One frame at a time through a multi-layer recurrent layer (streaming inference: speech, time
series), carrying the state between calls: fastseq.nn.LSTM/GRU/RNN.step.

Each layer is one cell step (fastseq.ops.*_cell on the layer's backend: one fused kernel a
layer on GPUs, torch's own cell under auto on CPUs), so a whole multi-layer step is a handful
of launches with no host sync, capturable in a CUDA graph with fixed shapes. The LSTM with a
projection (proj_size) steps in plain PyTorch (the fused cell has no projection): gates from
x and the projected state, then h = W_hr (o * tanh(c)).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..ops import rnn_cell as _cell_ops
from ..ops._checks import InputError, check_features, check_like_parameters

_CELLS = {"LSTM": ops.lstm_cell, "GRU": ops.gru_cell, "RNN_TANH": ops.rnn_tanh_cell,
          "RNN_RELU": ops.rnn_relu_cell}
_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


def recurrent_step(module, input: Tensor, hx=None):
    """module.step(input, hx): input [B, input_size] (or [input_size] unbatched), hx as the
    module's own (h [num_layers, B, H], and c for the LSTM; None: zeros). Returns (output
    [B, H] (the last layer's h), new hx); equal to the module over the frames one by one."""
    name = module._display_name()
    if module.bidirectional:
        raise InputError(f"{name}: step runs one frame forwards; a bidirectional layer needs the "
                         f"whole sequence (call the module on it)")
    if not isinstance(input, Tensor) or input.dim() not in (1, 2):
        raise InputError(f"{name}: step takes one frame [batch, input_size] or [input_size], got "
                         f"{type(input).__name__ if not isinstance(input, Tensor) else list(input.shape)}")
    check_features(name, "input", input, "input_size", module.input_size)
    check_like_parameters(name, "input", input, module.weight_ih_l0)
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    lstm = module.mode == "LSTM"
    h, c = _states(module, hx, x, unbatched, lstm)
    mode = _MODES[module.mode]
    # The layers' weights are the module's own (consistent by construction) and the input and
    # states are checked above: the cells run without the op's per-call checks, on one backend
    # chosen once for the step. Under autocast the public ops cast as torch's cells do.
    autocast = torch.is_autocast_enabled(x.device.type)
    chosen = None if autocast else _cell_ops.choose_cell_backend(mode, x, module.backend)
    # torch's flat list of every layer's parameters, in order: w_ih, w_hh, (b_ih, b_hh),
    # (w_hr) per layer (one lookup instead of an attribute per weight: ~10 us a step at batch 1).
    flat = module._flat_weights
    per_layer = len(flat) // module.num_layers
    projected = getattr(module, "proj_size", 0) > 0
    hs, cs = h.unbind(0), (c.unbind(0) if lstm else [None] * module.num_layers)
    new_h, new_c = [], []
    for layer in range(module.num_layers):
        own = flat[layer * per_layer:(layer + 1) * per_layer]
        weights = own[:4] if module.bias else [own[0], own[1], None, None]
        state = (hs[layer], cs[layer]) if lstm else hs[layer]
        if projected:
            out = _projected_lstm_step(x, state, *weights, own[-1])
        elif autocast:
            out = _CELLS[module.mode](x, state, *weights, backend=module.backend)
        else:
            out = _cell_ops.run_checked_cell(mode, x, hs[layer], cs[layer], *weights, chosen)
            out = out if lstm else out[0]
        h_t, c_t = out if lstm else (out, None)
        h_t, c_t = _zoneout(module, hs[layer], h_t, cs[layer], c_t)
        new_h.append(h_t)
        if lstm:
            new_c.append(c_t)
        x = h_t
        if module.dropout > 0 and module.training and layer < module.num_layers - 1:
            x = F.dropout(x, p=module.dropout, training=True)
    h_n = torch.stack(new_h)
    c_n = torch.stack(new_c) if lstm else None
    if unbatched:
        x, h_n = x.squeeze(0), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if lstm else None
    return x, ((h_n, c_n) if lstm else h_n)


def _states(module, hx, x: Tensor, unbatched: bool, lstm: bool):
    """(h [L, B, H or P], c [L, B, H] or None), zeros where hx gives none, shapes checked."""
    batch, layers = x.shape[0], module.num_layers
    h_size = getattr(module, "proj_size", 0) or module.hidden_size
    h, c = (hx if hx is not None else (None, None)) if lstm else (hx, None)
    if unbatched:
        h = h.unsqueeze(1) if h is not None else None
        c = c.unsqueeze(1) if c is not None else None
    h = x.new_zeros(layers, batch, h_size) if h is None else h
    c = (x.new_zeros(layers, batch, module.hidden_size) if c is None else c) if lstm else None
    for label, state, width in (("h", h, h_size), ("c", c, module.hidden_size)):
        if state is not None and tuple(state.shape) != (layers, batch, width):
            raise InputError(f"{module._display_name()}: the step's {label} state must be "
                             f"[num_layers, batch, {width}] = {[layers, batch, width]}, got "
                             f"{list(state.shape)}")
    return h, c


def _projected_lstm_step(x, state, w_ih, w_hh, b_ih, b_hh, w_hr):
    h, c = state
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return F.linear(torch.sigmoid(o) * torch.tanh(c), w_hr), c


def _zoneout(module, h_prev, h_new, c_prev, c_new):
    """The layer's zoneout (as its sequence path): keep a random (training) or fixed
    (evaluation) share p of the previous state."""
    def mix(p, previous, new):
        if p == 0 or new is None:
            return new
        keep = (torch.rand_like(new) < p).to(new.dtype) if module.training else p
        return keep * previous + (1 - keep) * new
    return mix(module.zoneout_h, h_prev, h_new), mix(module.zoneout_c, c_prev, c_new)


def step_method(self, input: Tensor, hx: Optional[object] = None):
    """One frame through every layer, carrying the state: (output [B, H], new hx).
    fastseq.nn.streaming.recurrent_step says how."""
    return recurrent_step(self, input, hx)
