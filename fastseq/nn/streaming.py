"""One frame at a time through a multi-layer recurrent layer (streaming inference: speech, time
series), carrying the state between calls: the step protocol (fastseq.nn.state) of
fastseq.nn.LSTM/GRU/RNN, a base class of theirs (RecurrentSteps).

Each layer is one cell step (fastseq.ops.*_cell on the layer's backend: one fused kernel a
layer on GPUs, torch's own cell under auto on CPUs), so a whole multi-layer step is a handful
of launches with no host sync, capturable in a CUDA graph with fixed shapes. The LSTM with a
projection (proj_size) steps in plain PyTorch (the fused cell has no projection): gates from
x and the projected state, then h = W_hr (o * tanh(c)); fastseq.explain reports it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend as _backends
from .. import ops
from ..ops import rnn_cell as _cell_ops
from ..ops._checks import InputError, check_features, check_like_parameters


class RecurrentSteps:
    """init_state and step for torch.nn.RNNBase-shaped layers (fastseq.nn.LSTM/GRU/RNN)."""

    def init_state(self, batch_size: Optional[int] = None):
        """Zeros in the layer's hx form: h [num_layers, batch_size, H] (and c for the LSTM);
        batch_size None: unbatched ([num_layers, H]). `None` as hx means the same."""
        lstm = self.mode == "LSTM"
        batch = () if batch_size is None else (batch_size,)
        param = self.weight_hh_l0
        h = param.new_zeros(self.num_layers, *batch, getattr(self, "proj_size", 0) or self.hidden_size)
        return (h, param.new_zeros(self.num_layers, *batch, self.hidden_size)) if lstm else h

    def step(self, input: Tensor, hx=None):
        """One frame: input [B, input_size] (or [input_size] unbatched), hx as the layer's own
        (h [num_layers, B, H], and c for the LSTM; None: zeros). Returns (output [B, H] (the
        last layer's h), new hx); equal to the layer over the frames one by one."""
        return recurrent_step(self, input, hx)


def check_frame(module, input) -> None:
    """What a recurrent layer's step refuses before it runs: a bidirectional layer, and
    anything but one frame [batch, input_size] or [input_size]."""
    name = module._display_name()
    if module.bidirectional:
        raise InputError(f"{name}: step runs one frame forwards; a bidirectional layer needs the "
                         f"whole sequence (call the module on it)")
    if not isinstance(input, Tensor) or input.dim() not in (1, 2):
        got = list(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise InputError(f"{name}: step takes one frame [batch, input_size] or [input_size], got "
                         f"{got}")


def recurrent_step(module, input: Tensor, hx=None):
    name = module._display_name()
    check_frame(module, input)
    check_features(name, "input", input, "input_size", module.input_size)
    check_like_parameters(name, "input", input, module.weight_ih_l0)
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    lstm = module.mode == "LSTM"
    # The sequence path's own initial states and checks, on the frame as a one-step sequence.
    h, c = module._initial_states(hx, x.unsqueeze(0), unbatched, lstm)
    mode = module.mode.lower()  # LSTM -> lstm, RNN_TANH -> rnn_tanh: the ops' mode names
    # The layers' weights are the module's own (consistent by construction) and the input and
    # states are checked above: the cells run without the op's per-call checks, on one backend
    # chosen once for the step. Under autocast the public ops cast as torch's cells do.
    autocast = torch.is_autocast_enabled(x.device.type)
    projected = getattr(module, "proj_size", 0) > 0  # plain PyTorch, no cell op to choose
    chosen = None if autocast or projected else _cell_ops.choose_cell_backend(mode, x,
                                                                              module.backend)
    # torch's flat list of every layer's parameters, in order: w_ih, w_hh, (b_ih, b_hh),
    # (w_hr) per layer (one lookup instead of an attribute per weight: ~10 us a step at batch 1).
    flat = module._flat_weights
    per_layer = len(flat) // module.num_layers
    hs, cs = h.unbind(0), (c.unbind(0) if lstm else [None] * module.num_layers)
    new_h, new_c = [], []
    for layer in range(module.num_layers):
        own = flat[layer * per_layer:(layer + 1) * per_layer]
        weights = own[:4] if module.bias else [own[0], own[1], None, None]
        state = (hs[layer], cs[layer]) if lstm else hs[layer]
        if projected:
            _backends.report_path(name + ".step", x.device, "the projected LSTM cell "
                                  "(proj_size) in plain PyTorch: the fused cell has no projection")
            out = _projected_lstm_step(x, state, *weights, own[-1])
        elif autocast:
            out = getattr(ops, f"{mode}_cell")(x, state, *weights, backend=module.backend)
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
