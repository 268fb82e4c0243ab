"""A whole multi-layer, optionally bidirectional LSTM/GRU/RNN in one call: fastseq.ops.rnn_stack,
the functional form of fastseq.nn.LSTM/GRU/RNN (as torch.lstm/gru/rnn_tanh/rnn_relu are of
torch's modules), and the per-layer loop LayerNormLSTM/GRU share.

The stack is its own op so that the layers make no backend decision: the choice between torch's
own stacked forward (cuDNN on GPUs, aten on CPUs: every layer and direction in one call) and
fastseq's per-layer path (fastseq.ops.rnn_layer / rnn_bidirectional_layer per layer, each
pinned to the backend chosen here) is this op's declaration, and `fastseq.explain` shows it.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import backend as _backends
from ..kernels.recurrent_layout import GATES
from ._checks import InputError, checked_lengths, fail
from ._sharding import shards
from ._sharding_rules import rnn_stack_axes

OP = "fastseq.ops.rnn_stack"
TORCH_HAS_NO_ZONEOUT = "torch's RNNs have no zoneout (fastseq's backends have)"
TORCH_REFUSES_EMPTY = "torch's RNNs refuse zero-length sequences (fastseq's backends keep h0)"
_TORCH_STACKS = {"lstm": torch.lstm, "gru": torch.gru, "rnn_tanh": torch.rnn_tanh,
                 "rnn_relu": torch.rnn_relu}


@shards(rnn_stack_axes)
def rnn_stack(mode: str, input, hx, weights: Sequence[Tensor], *, num_layers: int = 1,
              bias: bool = True, bidirectional: bool = False, batch_first: bool = False,
              dropout: float = 0.0, training: bool = False, lengths=None,
              zoneout: tuple[float, float] = (0.0, 0.0), backend: Optional[str] = None):
    """Run `num_layers` layers of an LSTM ("lstm"), GRU ("gru") or Elman RNN ("rnn_tanh",
    "rnn_relu"), as torch.nn.LSTM/GRU/RNN.forward does, with fastseq's backends.

    input: [T, B, I] ([B, T, I] with batch_first), unbatched [T, I], or a PackedSequence.
    hx: None (zeros), h0 [L*D, B, H] (or [L*D, H] unbatched), or (h0, c0) for the LSTM.
    weights: torch's flat parameter list (a module's `_flat_weights`): per layer and direction
    w_ih, w_hh, then b_ih, b_hh when `bias`, then the projection w_hr when the LSTM has one.
    dropout: on every layer's output but the last, in training (torch's). lengths: one per
    batch row, for padded input (fastseq's; a PackedSequence carries its own).
    zoneout: (p_h, p_c) (Krueger et al., 2016): in training each unit keeps its previous h (and
    c, LSTM) with probability p; in evaluation h_t = p h_{t-1} + (1 - p) h~_t. torch has none.
    Returns (output, h_n), h_n = (h_n, c_n) for the LSTM, shaped and packed as torch's.
    """
    if mode not in GATES:
        fail(OP, f"mode must be one of {', '.join(GATES)}, got {mode!r}")
    packed = isinstance(input, PackedSequence)
    if lengths is not None and packed:
        fail(OP, "lengths is for padded input; a PackedSequence carries its own")
    data = input.data if packed else input
    if not isinstance(data, Tensor):
        fail(OP, f"input must be a Tensor or a PackedSequence, got {type(input).__name__}")
    if not packed and data.dim() not in (2, 3):
        fail(OP, f"input must be 3-D or 2-D unbatched [steps, input_size], got shape "
                 f"{list(data.shape)}")
    directions = 2 if bidirectional else 1
    for index, weight in enumerate(weights):
        if not isinstance(weight, Tensor):
            fail(OP, f"weights[{index}] must be a Tensor, got {type(weight).__name__}")
    shape = StackShape.of(mode, weights, num_layers, directions, bias)
    if lengths is not None:
        if data.dim() != 3:
            fail(OP, "lengths is for a padded batch (3-D input)")
        batch, steps = (data.shape[0], data.shape[1]) if batch_first else \
            (data.shape[1], data.shape[0])
        lengths = checked_lengths(OP, lengths, steps, batch)
    p_h, p_c = (float(p) for p in zoneout)
    if not (0 <= p_h <= 1 and 0 <= p_c <= 1) or (mode != "lstm" and p_c) or \
            (mode.startswith("rnn") and p_h):
        fail(OP, f"zoneout must be (p_h, p_c) in [0, 1], p_c for the lstm only and neither for the "
                 f"plain RNN; got {tuple(zoneout)} for {mode}")
    empty = not packed and data.shape[1 if batch_first and data.dim() == 3 else 0] == 0  # no steps
    compiling = torch.compiler.is_compiling()
    # Whether any row has length 0 reads the lengths: skipped under compile, where torch's
    # stacked forward is never `auto`'s choice anyway.
    zero_lengths = lengths is not None and not compiling and bool((lengths == 0).any())
    return BACKENDS.run(
        {"op": OP, "device": data.device, "zoneout": bool(p_h or p_c), "empty": empty,
         "zero_lengths": zero_lengths, "compiling": compiling, "mode": mode, "input": input,
         "hx": hx, "weights": list(weights), "shape": shape, "batch_first": batch_first,
         "dropout": dropout, "training": training, "lengths": lengths, "zoneout_p": (p_h, p_c)},
        backend)


class StackShape:
    """What a flat weight list says about the stack: layers, directions, hidden and state
    widths, and where each layer-direction's weights start."""

    def __init__(self, num_layers, directions, bias, per_group, hidden, proj):
        self.num_layers, self.directions, self.bias = num_layers, directions, bias
        self.per_group, self.hidden, self.proj = per_group, hidden, proj

    @classmethod
    def of(cls, mode, weights, num_layers, directions, bias) -> "StackShape":
        groups = num_layers * directions
        plain = 2 + 2 * bool(bias)
        count = len(weights)
        if count == groups * plain:
            per_group, proj = plain, 0
        elif mode == "lstm" and count == groups * (plain + 1):
            per_group, proj = plain + 1, weights[plain].shape[0]
        else:
            extra = " (5 with w_hr, for a projected lstm)" if mode == "lstm" else ""
            fail(OP, f"weights must hold {plain} tensors{extra} for each of the {groups} layers and "
                     f"directions, {groups * plain} in all, got {count}")
        hidden = weights[0].shape[0] // GATES[mode]
        return cls(num_layers, directions, bias, per_group, hidden, proj)

    def group(self, weights, layer: int, direction: int):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction (None where absent)."""
        own = weights[(layer * self.directions + direction) * self.per_group:][:self.per_group]
        biases = (own[2], own[3]) if self.bias else (None, None)
        return own[0], own[1], *biases, (own[-1] if self.proj else None)


def initial_states(op: str, hx, x: Tensor, unbatched: bool, lstm: bool, num_layers: int,
                   directions: int, hidden: int, proj: int):
    """(h0 [L*D, B, P or H], c0 [L*D, B, H] or None) for time-major x [T, B, I]: zeros where hx
    gives none, checked against the stack's shape."""
    if lstm and hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
        raise InputError(f"{op}: hx must be a tuple (h0, c0) or None for the LSTM, got "
                         f"{type(hx).__name__}")
    if not lstm and hx is not None and not isinstance(hx, Tensor):
        raise InputError(f"{op}: hx must be a Tensor h0 or None, got {type(hx).__name__}")
    cell_shape = (num_layers * directions, x.shape[1], hidden)
    shape = (*cell_shape[:2], proj or hidden)
    h0, c0 = (hx if hx is not None else (None, None)) if lstm else (hx, None)
    for name, state in (("h0", h0), ("c0", c0)):
        if state is not None and not isinstance(state, Tensor):
            raise InputError(f"{op}: hx's {name} must be a Tensor, got {type(state).__name__}")
    if unbatched:
        h0 = h0.unsqueeze(1) if h0 is not None else None
        c0 = c0.unsqueeze(1) if c0 is not None else None
    h0 = h0 if h0 is not None else x.new_zeros(shape)
    c0 = (c0 if c0 is not None else x.new_zeros(cell_shape)) if lstm else None
    size = "proj_size" if proj else "hidden_size"
    for name, state, want, size_name in (("h0", h0, shape, size), ("c0", c0, cell_shape, "hidden_size")):
        if state is not None and tuple(state.shape) != want:
            raise InputError(
                f"{op}: {name} must have shape [num_layers*num_directions, batch, {size_name}] = "
                f"{list(want)}, got {list(state.shape)}")
    return h0, c0


# One layer over time-major x [T, B, I]: (layer, x, state, lengths) -> (out, final state), and
# both directions of one layer: (layer, x, states [2, ...], lengths) -> (out [T, B, 2H], finals).
RunLayer = Callable[[int, Tensor, object, Optional[Tensor]], tuple]


def run_layers(op: str, mode: str, input, hx, lengths, *, num_layers: int, directions: int,
               hidden: int, proj: int, batch_first: bool, dropout: float, training: bool,
               run_layer: RunLayer, run_both: RunLayer):
    """The stack as fastseq runs it, one layer (and both its directions) at a time: torch's
    layouts in and out (padded, batch-first, unbatched, packed), dropout between layers."""
    lstm = mode == "lstm"
    packed = isinstance(input, PackedSequence)
    if packed:
        x, lengths = pad_packed_sequence(input)  # [T, B, I], rows in the caller's order
        unbatched = False
    else:
        unbatched, x = input.dim() == 2, _time_major(input, batch_first)
    h0, c0 = initial_states(op, hx, x, unbatched, lstm, num_layers, directions, hidden, proj)
    layer_input = x
    h_n, c_n = [], []
    for layer in range(num_layers):
        k = layer * directions
        states = (h0[k:k + directions], c0[k:k + directions]) if lstm else h0[k:k + directions]
        if directions == 2:
            layer_input, final = run_both(layer, layer_input, states, lengths)
        else:
            state = (states[0][0], states[1][0]) if lstm else states[0]
            layer_input, final = run_layer(layer, layer_input, state, lengths)
            final = (final[0].unsqueeze(0), final[1].unsqueeze(0)) if lstm else final.unsqueeze(0)
        h_n.append(final[0] if lstm else final)
        if lstm:
            c_n.append(final[1])
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, p=dropout, training=True)
    h_n = torch.cat(h_n)
    c_n = torch.cat(c_n) if lstm else None
    out = layer_input
    if packed:
        out = _pack_like(out, input)
    elif unbatched:
        out, h_n = out.squeeze(1), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if lstm else None
    elif batch_first:
        out = out.transpose(0, 1).contiguous()  # torch returns a contiguous batch-first output
    return out, ((h_n, c_n) if lstm else h_n)


def _time_major(input: Tensor, batch_first: bool) -> Tensor:
    """A padded input as [T, B, I] (an unbatched [T, I] as one row): a view, no copy."""
    if input.dim() == 2:
        return input.unsqueeze(1)
    return input.transpose(0, 1) if batch_first else input


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


def zoneout_weights(x: Tensor, hidden: int, p: float, training: bool) -> Optional[Tensor]:
    """Per-step zoneout weights [T, B, H] of one layer and direction: a fresh Bernoulli(p) mask
    in training, p everywhere in evaluation; None where p is 0."""
    if p == 0:
        return None
    shape = (x.shape[0], x.shape[1], hidden)
    if training:
        return (torch.rand(shape, device=x.device) < p).to(x.dtype)
    return torch.full(shape, p, device=x.device, dtype=x.dtype)


def _per_layer(backend: str):
    """fastseq's path: rnn_layer (rnn_bidirectional_layer for both directions) per layer, each
    pinned to `backend`."""
    def run(mode, input, hx, weights, shape, batch_first, dropout, training, lengths, zoneout_p,
            **_):
        from .rnn import rnn_bidirectional_layer, rnn_layer  # ops/rnn.py imports this module
        p_h, p_c = zoneout_p

        def one(layer, x, state, lengths):
            w_ih, w_hh, b_ih, b_hh, w_hr = shape.group(weights, layer, 0)
            return rnn_layer(mode, x, state, w_ih, w_hh, b_ih, b_hh, w_hr=w_hr, lengths=lengths,
                             zoneout_h=zoneout_weights(x, shape.hidden, p_h, training),
                             zoneout_c=zoneout_weights(x, shape.hidden, p_c, training),
                             backend=backend)

        def both(layer, x, states, lengths):
            masks = [(zoneout_weights(x, shape.hidden, p_h, training),
                      zoneout_weights(x, shape.hidden, p_c, training)) for _ in range(2)]
            zoneout_h, zoneout_c = (torch.stack([m[i] for m in masks]) if masks[0][i] is not None
                                    else None for i in range(2))
            return rnn_bidirectional_layer(mode, x, states, shape.group(weights, layer, 0),
                                           shape.group(weights, layer, 1), lengths=lengths,
                                           zoneout_h=zoneout_h, zoneout_c=zoneout_c,
                                           backend=backend)

        return run_layers(OP, mode, input, hx, lengths, num_layers=shape.num_layers,
                          directions=shape.directions, hidden=shape.hidden, proj=shape.proj,
                          batch_first=batch_first, dropout=dropout, training=training,
                          run_layer=one, run_both=both)
    return run


def _torch_stack(mode, input, hx, weights, shape, batch_first, dropout, training, lengths, **_):
    """torch's own stacked forward (torch.nn.LSTM.forward's calls, functionally): padded rows
    with lengths packed first, the states put in the packed row order and back, every layer and
    direction in one call."""
    lstm = mode == "lstm"
    run = _TORCH_STACKS[mode]
    if lengths is not None:
        steps = input.shape[1 if batch_first else 0]
        packed = pack_padded_sequence(input, lengths.cpu(), batch_first=batch_first,
                                      enforce_sorted=False)
        out, final = _torch_stack(mode, packed, hx, weights, shape, batch_first, dropout, training,
                                  None)
        return pad_packed_sequence(out, batch_first=batch_first, total_length=steps)[0], final
    if isinstance(input, PackedSequence):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        rows = data.new_empty(0, int(batch_sizes[0]), 0)  # the batch width for the states
        h0, c0 = initial_states(OP, hx, rows, False, lstm, shape.num_layers, shape.directions,
                                shape.hidden, shape.proj)
        states = _rows((h0, c0) if lstm else h0, sorted_indices)
        out, *final = run(data, batch_sizes, states, weights, shape.bias, shape.num_layers,
                          float(dropout), training, shape.directions == 2)
        final = _rows(tuple(final) if lstm else final[0], unsorted_indices)
        return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), final
    unbatched = input.dim() == 2
    h0, c0 = initial_states(OP, hx, _time_major(input, batch_first), unbatched, lstm, shape.num_layers, shape.directions,
                            shape.hidden, shape.proj)
    batched = input.unsqueeze(0 if batch_first else 1) if unbatched else input
    out, *final = run(batched, (h0, c0) if lstm else h0, weights, shape.bias, shape.num_layers,
                      float(dropout), training, shape.directions == 2, batch_first)
    final = tuple(final) if lstm else final[0]
    if unbatched:
        out = out.squeeze(0 if batch_first else 1)
        final = (final[0].squeeze(1), final[1].squeeze(1)) if lstm else final.squeeze(1)
    return out, final


def _rows(states, order: Optional[Tensor]):
    """The states' batch rows (dim 1) in `order` (torch's permute_hidden)."""
    if order is None:
        return states
    if isinstance(states, tuple):
        return tuple(s.index_select(1, order) for s in states)
    return states.index_select(1, order)


def _torch_refusal(call: dict) -> Optional[str]:
    if call["zoneout"]:
        return TORCH_HAS_NO_ZONEOUT
    if call["empty"]:
        return TORCH_REFUSES_EMPTY
    if call["zero_lengths"]:
        return "torch's packed sequences refuse zero lengths (fastseq's backends take them)"
    return None


def _order(call: dict, eager: tuple[str, ...]) -> tuple[str, ...]:
    # torch's stacked RNN forward does not compile with fullgraph=True; fastseq's per-layer path
    # does.
    return ("triton", "native", "reference") if call["compiling"] else eager


# torch's stacked forward first in eager mode: a drop-in user on a GPU or a CPU must not get
# slower, and fastseq's persistent kernel (backend "native" on GPUs), the one meant to beat
# cuDNN, has not been timed against it yet. Else fastseq's per-layer path on the chosen backend
# (each rnn_layer call reports its own, pinned, choice).
_PER_LAYER = "fastseq.ops.rnn_layer (rnn_bidirectional_layer) per layer, pinned to this backend"
BACKENDS = _backends.OpBackends(
    OP,
    backends={
        "torch": _backends.serves(_torch_refusal, _torch_stack,
                                  "torch's stacked forward, every layer and direction in one call"),
        "triton": _backends.serves(_backends.triton_refuses, _per_layer("triton"), _PER_LAYER),
        "native": _backends.serves(_backends.native_refuses, _per_layer("native"), _PER_LAYER),
        "reference": _backends.serves(_backends.serves_every_call, _per_layer("reference"),
                                      _PER_LAYER)},
    preference={"cuda": lambda call: _order(call, ("torch", "triton", "native", "reference")),
                "cpu": lambda call: _order(call, ("torch", "native", "reference"))})
