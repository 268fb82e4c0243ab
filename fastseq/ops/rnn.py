"""One recurrent layer, one direction, over a whole sequence: fastseq.ops.rnn_layer.

The building block of the multi-layer, bidirectional LSTM/GRU/RNN: the input projection of
all steps is one GEMM, the recurrence one fused kernel launch (Triton: a program per batch
tile loops over time), and its backward one launch plus one GEMM for the recurrent weights.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend as _backends
from ..kernels.recurrent_layout import GATES
from ..reference.rnn import LayerWeights, _run_direction
from . import rnn_native
from . import rnn_registration as _registered_ops
from ._autocast import autocast_op, recurrent_mode
from ._registration import fused
# The whole stack (fastseq.nn.LSTM/GRU/RNN's op) is this family's too: exported from here.
from .rnn_stack import TORCH_HAS_NO_ZONEOUT, TORCH_REFUSES_EMPTY, rnn_stack  # noqa: F401
from ._checks import (check_same_dtype_device, check_shape, check_tensor, checked_lengths, fail,
                      needs_grad)
from ._sharding import shards
from ._sharding_rules import rnn_bidirectional_layer_axes, rnn_layer_axes

OP = "fastseq.ops.rnn_layer"
_TORCH_LAYERS = {"lstm": torch.lstm, "gru": torch.gru, "rnn_tanh": torch.rnn_tanh,
                 "rnn_relu": torch.rnn_relu}


@shards(rnn_layer_axes)
@autocast_op(recurrent_mode)
def rnn_layer(mode: str, input: Tensor, hx, w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None, *,
              w_hr: Optional[Tensor] = None,
              lengths: Optional[Union[Tensor, Sequence[int]]] = None, reverse: bool = False,
              zoneout_h: Optional[Tensor] = None, zoneout_c: Optional[Tensor] = None,
              backend: Optional[str] = None):
    """Run one layer of an LSTM ("lstm"), GRU ("gru") or Elman RNN ("rnn_tanh", "rnn_relu")
    over input [T, B, I] (time-major), in one direction.

    hx: None (zeros), h0 [B, H], or (h0, c0) for the LSTM. lengths: one per batch row (0..T),
    for padded input: steps at or past a row's length leave its state unchanged and output
    zeros (torch's packed-sequence semantics; the reverse direction of a row of length n starts
    at step n-1). Returns (output [T, B, H], h_n), with h_n = (h_n, c_n) for the LSTM.

    w_hr: the LSTM's projection [P, H] (torch's proj_size = P): h_t = (o * tanh(c_t)) W_hr^T,
    so w_hh is [4H, P], h0 and the output have P columns, c0 has H. Every backend runs it; the
    fused ones fold the projection into the recurrent weights (_projected_layer says how and
    what it costs).

    zoneout_h, zoneout_c: None, or weights m [T, B, H] in [0, 1] (LSTM: h and c; GRU: h) that
    keep part of the previous state at each step: h_t = m h_{t-1} + (1 - m) h~_t, with h~_t the
    cell's new state (Krueger et al., 2016). Training passes Bernoulli(p) masks, evaluation m = p
    everywhere (fastseq.nn.LSTM/GRU's `zoneout` does both). Not differentiated.
    """
    if mode not in GATES:
        fail(OP, f"mode must be one of {', '.join(GATES)}, got {mode!r}")
    lstm = mode == "lstm"
    if lstm and hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
        fail(OP, f"hx must be a tuple (h0, c0) or None for the lstm, got {type(hx).__name__}")
    h0, c0 = (hx if hx is not None else (None, None)) if lstm else (hx, None)
    cell, hidden = _validate(mode, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    steps, batch = input.shape[0], input.shape[1]
    zoneout = zoneout_h is not None or zoneout_c is not None
    if zoneout and w_hr is not None:
        fail(OP, "zoneout with a projection (w_hr, proj_size > 0) is not supported")
    _validate_zoneout(mode, input, hidden, zoneout_h, zoneout_c)
    lengths = _checked_lengths(lengths, steps, batch, input.device)

    if h0 is None:
        h0 = input.new_zeros(batch, hidden)
    if lstm and c0 is None:
        c0 = input.new_zeros(batch, cell)
    call = {"device": input.device, "mode": mode, "input": input, "h0": h0, "c0": c0,
            "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, "w_hr": w_hr,
            "lengths": lengths, "reverse": reverse, "zoneout_h": zoneout_h,
            "zoneout_c": zoneout_c, "steps": steps, "batch": batch, "cell": cell,
            "dtype": input.dtype, "zoneout": zoneout, "projection": w_hr is not None}
    y, h_n, c_n = BACKENDS.run(call, backend)
    return (y, (h_n, c_n)) if lstm else (y, h_n)


def _reference_layer(mode, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                     zoneout_h, zoneout_c, **_):
    return _run_direction(
        mode, input, h0, c0, LayerWeights(w_ih, w_hh, b_ih, b_hh, w_hr), lengths,
        reverse, zoneout_h, zoneout_c)


def _torch_layer(mode, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, **_):
    lstm = mode == "lstm"
    params = [w_ih, w_hh] + ([b_ih, b_hh] if b_ih is not None else []) + \
        ([w_hr] if w_hr is not None else [])
    state = (h0.unsqueeze(0), c0.unsqueeze(0)) if lstm else h0.unsqueeze(0)
    y, *states = _TORCH_LAYERS[mode](input, state, params, b_ih is not None, 1, 0.0, False,
                                     False, False)
    return y, states[0].squeeze(0), (states[1].squeeze(0) if lstm else None)


def _fused_layer(forward_op: str):
    """A fused recurrence (the registered forward op `forward_op`: Triton's, or the native
    persistent kernel or loop) as a backend's implementation; the input projection of every
    step is one GEMM before it."""
    def run(mode, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, zoneout_h,
            zoneout_c, **_):
        gates_x = F.linear(input, w_ih, b_ih)  # every step's input projection: one GEMM
        grad = needs_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
        forward = fused(forward_op)
        if w_hr is not None:
            return _projected_layer(forward, gates_x, h0, c0, w_hh, b_hh, w_hr, lengths,
                                    reverse, grad)
        y, h_n, c_n, _workspace = forward(mode, gates_x, h0, c0, w_hh, b_hh, lengths,
                                          zoneout_h, zoneout_c, reverse, grad)
        return y, h_n, c_n
    return run


def _projected_layer(forward, gates_x, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, grad):
    """The LSTM with a projection (LSTMP) on a fused kernel, folded: with m_t = o_t * tanh(c_t)
    and h_t = W_hr m_t, the recurrent term W_hh h_{t-1} is (W_hh W_hr) m_{t-1}, so the kernel
    runs a plain LSTM of hidden size H on m with recurrent weights W_hh W_hr [4H, H] from
    m = 0, the first step's W_hh h0 added to its input gates, and every h_t = W_hr m_t comes
    from one GEMM after the loop. Exact in real arithmetic (fp64 equals torch's to ~1e-15);
    autograd carries the gradients through the fold and the output GEMM, so the backward is
    the kernel's own. The cost: the recurrent GEMM is 4H x H per row and step instead of
    4H x P + P x H in the loop (2.5x the FLOPs at the bench case H=1024, P=256); keeping the
    projection inside the loop is the next kernel change (bench/NOTES.md)."""
    steps, batch = gates_x.shape[0], gates_x.shape[1]
    hidden = w_hr.shape[1]
    if steps > 0:
        # The first step of each row: 0 forwards, its last valid step in reverse (a row of
        # length 0 has none; its entry lands on a step it never runs).
        if not reverse:
            first = torch.zeros(batch, dtype=torch.long, device=gates_x.device)
        elif lengths is None:
            first = torch.full((batch,), steps - 1, dtype=torch.long, device=gates_x.device)
        else:
            first = (lengths.long() - 1).clamp(min=0)
        rows = torch.arange(batch, device=gates_x.device)
        gates_x = gates_x.index_put((first, rows), F.linear(h0, w_hh), accumulate=True)
    m0 = h0.new_zeros(batch, hidden)
    m, m_n, c_n, _workspace = forward("lstm", gates_x, m0, c0, w_hh @ w_hr, b_hh, lengths, None,
                                      None, reverse, grad)
    y = F.linear(m, w_hr)  # rows past a length are zero in m, so zero here as torch gives them
    h_n = F.linear(m_n, w_hr)
    if lengths is not None:
        h_n = torch.where((lengths == 0).unsqueeze(1), h0, h_n)
    elif steps == 0:
        h_n = h0.clone()
    return y, h_n, c_n


@shards(rnn_bidirectional_layer_axes)
@autocast_op(recurrent_mode)
def rnn_bidirectional_layer(mode: str, input: Tensor, hx, forward_weights: Sequence[Optional[Tensor]],
                            reverse_weights: Sequence[Optional[Tensor]], *,
                            lengths: Optional[Union[Tensor, Sequence[int]]] = None,
                            zoneout_h: Optional[Tensor] = None, zoneout_c: Optional[Tensor] = None,
                            backend: Optional[str] = None):
    """Both directions of one bidirectional layer over input [T, B, I]: fastseq.ops.rnn_layer
    forwards with forward_weights and reverse=True with reverse_weights, outputs concatenated as
    torch's bidirectional layers do. On the Triton backend both directions run in one launch
    (forward and backward) and their input projections are one GEMM.

    forward_weights, reverse_weights: (w_ih, w_hh, b_ih, b_hh) or (..., w_hr). hx: None, h0
    [2, B, H] or (h0, c0) for the LSTM, direction-major. zoneout_h, zoneout_c: None or [2, T, B,
    H]. Returns (output [T, B, 2H], h_n [2, B, H]), h_n = (h_n, c_n) for the LSTM.
    """
    if mode not in GATES:
        fail(OP, f"mode must be one of {', '.join(GATES)}, got {mode!r}")
    lstm = mode == "lstm"
    if lstm and hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
        fail(OP, f"hx must be a tuple (h0, c0) or None for the lstm, got {type(hx).__name__}")
    h0, c0 = (hx if hx is not None else (None, None)) if lstm else (hx, None)
    for name, state in (("h0", h0), ("c0", c0)):
        if state is not None and (state.dim() != 3 or state.shape[0] != 2):
            fail(OP, f"{name} of a bidirectional layer must be [2, batch, size] (forward, reverse), "
                     f"got shape {list(state.shape)}")
    for name, mask in (("zoneout_h", zoneout_h), ("zoneout_c", zoneout_c)):
        if mask is not None and (mask.dim() != 4 or mask.shape[0] != 2):
            fail(OP, f"{name} of a bidirectional layer must be [2, steps, batch, hidden_size], "
                     f"got shape {list(mask.shape)}")
    weights = [tuple(forward_weights) + (None,) * (5 - len(forward_weights)),
               tuple(reverse_weights) + (None,) * (5 - len(reverse_weights))]
    per_direction = []
    for d in range(2):
        direction_hx = None
        if h0 is not None or c0 is not None:
            direction_hx = (h0[d] if h0 is not None else None, c0[d] if c0 is not None else None) \
                if lstm else h0[d]
        per_direction.append(direction_hx)

    projection = weights[0][4] is not None or weights[1][4] is not None
    call = {"device": input.device, "mode": mode, "input": input, "h0": h0, "c0": c0,
            "per_direction": per_direction, "weights": weights, "lengths": lengths,
            "zoneout_h": zoneout_h, "zoneout_c": zoneout_c, "steps": input.shape[0],
            "reverse": False, "zoneout": zoneout_h is not None or zoneout_c is not None,
            "projection": projection}
    return BIDIRECTIONAL_BACKENDS.run(call, backend)


def _per_direction(backend: str):
    """The two directions as two rnn_layer calls on `backend` (each reports its own choice)."""
    def run(mode, input, per_direction, weights, lengths, zoneout_h, zoneout_c, **_):
        return _joined(mode == "lstm", [
            rnn_layer(mode, input, per_direction[d], *weights[d][:4], w_hr=weights[d][4],
                      lengths=lengths, reverse=d == 1,
                      zoneout_h=zoneout_h[d] if zoneout_h is not None else None,
                      zoneout_c=zoneout_c[d] if zoneout_c is not None else None,
                      backend=backend)
            for d in range(2)])
    return run


def _triton_both_directions(mode, input, h0, c0, per_direction, weights, lengths, zoneout_h,
                            zoneout_c, **_):
    """Both directions in one Triton launch (forward and backward), their input projections
    one GEMM; each direction validated as rnn_layer would."""
    lstm = mode == "lstm"
    device = input.device
    cell_sizes = []
    for d in range(2):
        state_h, state_c = (per_direction[d] if per_direction[d] is not None else (None, None)) \
            if lstm else (per_direction[d], None)
        cell_sizes.append(_validate(mode, input, state_h, state_c, *weights[d]))
        _validate_zoneout(mode, input, cell_sizes[d][1],
                          zoneout_h[d] if zoneout_h is not None else None,
                          zoneout_c[d] if zoneout_c is not None else None)
    if (weights[0][2] is None) != (weights[1][2] is None):
        fail(OP, "both directions must have biases, or neither (torch's layers have both or neither)")
    if cell_sizes[0] != cell_sizes[1]:
        fail(OP, f"both directions must have the same hidden size, got {cell_sizes[0][1]} and "
                 f"{cell_sizes[1][1]}")
    steps, batch = input.shape[0], input.shape[1]
    hidden = cell_sizes[0][1]
    lengths = _checked_lengths(lengths, steps, batch, device)
    (w_ih_f, w_hh_f, b_ih_f, b_hh_f, _), (w_ih_r, w_hh_r, b_ih_r, b_hh_r, _) = weights
    bias = b_ih_f is not None
    h0 = h0 if h0 is not None else input.new_zeros(2, batch, hidden)
    c0 = (c0 if c0 is not None else input.new_zeros(2, batch, hidden)) if lstm else None
    # One GEMM for both directions' input projections, then [2, T, B, G*H] direction-major.
    gates_x = F.linear(input, torch.cat([w_ih_f, w_ih_r]), torch.cat([b_ih_f, b_ih_r]) if bias else None)
    # view, not unflatten: torch 2.11's Dynamo cannot trace unflatten under a device context;
    # an explicit width, as -1 is ambiguous for an empty batch.
    gates_x = gates_x.view(steps, batch, 2, gates_x.shape[-1] // 2).permute(2, 0, 1, 3)
    w_hh = torch.stack([w_hh_f, w_hh_r])
    b_hh = torch.stack([b_hh_f, b_hh_r]) if bias else None
    grad = needs_grad(input, h0, c0, w_ih_f, w_ih_r, w_hh_f, w_hh_r, b_ih_f, b_ih_r, b_hh_f,
                      b_hh_r)
    y, h_n, c_n, _workspace = fused("fastseq::rnn_bidirectional_layer_forward_triton")(
        mode, gates_x, h0, c0, w_hh, b_hh, lengths, zoneout_h, zoneout_c, False, grad)
    out = torch.cat([y[0], y[1]], dim=-1)
    return (out, (h_n, c_n)) if lstm else (out, h_n)


def _joined(lstm: bool, results):
    """Two directions' (output, h_n) joined as torch's bidirectional layers give them."""
    out = torch.cat([results[0][0], results[1][0]], dim=-1)
    if lstm:
        return out, (torch.stack([r[1][0] for r in results]), torch.stack([r[1][1] for r in results]))
    return out, torch.stack([r[1] for r in results])


def _validate(mode, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) -> tuple[int, int]:
    """Checks every argument; returns (cell, hidden): the cell state's and the hidden state's
    (and output's) sizes, equal but with a projection (then hidden = proj_size)."""
    check_tensor(OP, "input", input, ndims=(3,))
    check_tensor(OP, "w_ih", w_ih, ndims=(2,))
    check_tensor(OP, "w_hh", w_hh, ndims=(2,))
    gates = GATES[mode]
    if w_hr is not None:
        if mode != "lstm":
            fail(OP, f"w_hr (a projection) is for the lstm, not {mode}")
        check_tensor(OP, "w_hr", w_hr, ndims=(2,))
        cell, hidden = w_hr.shape[1], w_hr.shape[0]
        check_shape(OP, "w_hh", w_hh, (gates * cell, hidden), "[4*hidden_size, proj_size]")
    else:
        cell = hidden = w_hh.shape[1]
        check_shape(OP, "w_hh", w_hh, (gates * cell, hidden), "[{g}*hidden_size, hidden_size]", g=gates)
    check_shape(OP, "w_ih", w_ih, (gates * cell, input.shape[2]), "[{g}*hidden_size, input_size]",
                g=gates)
    for name, state, size, meaning in (("h0", h0, hidden, "[batch, proj_size]" if w_hr is not None
                                        else "[batch, hidden_size]"),
                                       ("c0", c0, cell, "[batch, hidden_size]")):
        if state is not None:
            check_tensor(OP, name, state, ndims=(2,))
            check_shape(OP, name, state, (input.shape[1], size), meaning)
    if (b_ih is None) != (b_hh is None):
        fail(OP, "b_ih and b_hh must be given together (torch's layers have both or neither)")
    for name, bias in (("b_ih", b_ih), ("b_hh", b_hh)):
        if bias is not None:
            check_tensor(OP, name, bias, ndims=(1,))
            check_shape(OP, name, bias, (gates * cell,), "[{g}*hidden_size]", g=gates)
    check_same_dtype_device(OP, ("input", input), (("h0", h0), ("c0", c0), ("w_ih", w_ih),
                                                   ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh),
                                                   ("w_hr", w_hr)))
    return cell, hidden


def _validate_zoneout(mode, input, hidden, zoneout_h, zoneout_c) -> None:
    for name, mask, modes in (("zoneout_h", zoneout_h, ("lstm", "gru")),
                              ("zoneout_c", zoneout_c, ("lstm",))):
        if mask is None:
            continue
        if mode not in modes:
            fail(OP, f"{name} is for {' and '.join(modes)} layers, not {mode}")
        check_tensor(OP, name, mask, ndims=(3,))
        check_shape(OP, name, mask, (input.shape[0], input.shape[1], hidden),
                    "[steps, batch, hidden_size]")
        check_same_dtype_device(OP, ("input", input), ((name, mask),))


def _checked_lengths(lengths, steps: int, batch: int, device: torch.device) -> Optional[Tensor]:
    """lengths as int32 on the input's device, after checking them where they live."""
    if lengths is None:
        return None
    return checked_lengths(OP, lengths, steps, batch).to(device=device, dtype=torch.int32)


# torch's refusals shared with fastseq.nn's recurrent layers (whose torch backend is torch's
# own module forward).


def _torch_unsupported(call: dict) -> Optional[str]:
    steps, zoneout, reverse, lengths = (call["steps"], call["zoneout"], call["reverse"],
                                        call["lengths"])
    if steps == 0:
        return TORCH_REFUSES_EMPTY
    if zoneout:
        return TORCH_HAS_NO_ZONEOUT
    if reverse:
        return ("torch's functional RNNs run one direction only forwards (reverse=True needs "
                "triton, native or reference)")
    if lengths is not None:
        return ("torch's functional RNNs take lengths only as a PackedSequence (lengths= needs "
                "triton, native or reference)")
    return None


_FOLDED = "; the projection folded into W_hh W_hr"


def _native_variant(call: dict) -> str:
    """The native backend's recurrence for each pass: the persistent kernel or the loop, as
    rnn_native decides it (the forward below, the backward in the autograd formula)."""
    return rnn_native.describe(call["mode"], call["batch"], call["cell"], call["dtype"],
                                      call["device"]) + (_FOLDED if call["projection"] else "")


def _runs_persistent(call: dict) -> bool:
    return rnn_native.runs_persistent(call["mode"], False, call["batch"], call["cell"],
                                             call["dtype"], call["device"])


# torch first where it serves the call: cuDNN on GPUs, aten on CPUs. The Triton path keeps one
# program per 16 batch rows (a handful of SMs at training batch sizes); the native op on GPUs
# is the persistent kernel where W_hh fits on chip (B <= 64 and each SM's slice in shared
# memory), else the GEMM-per-step loop (2 launches a step), and on CPUs the loop's C++ twin;
# forward and backward choose separately (rnn_native: the forward below, the backward
# in the autograd formula). None has been timed on a GPU yet, so none is put before cuDNN;
# they serve the reverse and padded-length calls torch cannot.
BACKENDS = _backends.OpBackends(
    OP,
    backends={
        "triton": _backends.serves(
            _backends.triton_refuses,
            _fused_layer(_registered_ops.TRITON_FORWARD),
            lambda call: "one launch, a program per 16 batch rows" + (
                _FOLDED if call["projection"] else "")),
        "native": _backends.serves(
            _backends.native_refuses,
            _fused_layer(_registered_ops.NATIVE_FORWARD), _native_variant,
            _backends.Variant(_native_variant, _fused_layer(_registered_ops.PERSISTENT_FORWARD),
                              when=_runs_persistent)),
        "torch": _backends.serves(_torch_unsupported, _torch_layer,
                                  "torch's functional layer (torch.lstm & co.)"),
        "reference": _backends.serves(_backends.serves_every_call, _reference_layer,
                                      "fastseq.reference's layer, a Python loop over steps")},
    preference={"cuda": ("torch", "triton", "native", "reference"),
                "cpu": ("torch", "native", "reference")})


def _reverse_direction_refusal(backend: str) -> Callable[[dict], Optional[str]]:
    """What rnn_layer's `backend` refuses for the reverse direction (the forward one asks
    less): a bidirectional layer needs both."""
    return lambda call: BACKENDS.backends[backend].refuse(dict(call, reverse=True))


_ONE_CALL_PER_DIRECTION = "one rnn_layer call per direction (each reports its own choice)"

# Triton runs both directions in one launch (and their input projections as one GEMM); the
# other backends run rnn_layer once per direction. Same order as rnn_layer's: torch, which
# cannot run a reverse direction, is passed over for the Triton launch on GPUs.
BIDIRECTIONAL_BACKENDS = _backends.OpBackends(
    "fastseq.ops.rnn_bidirectional_layer",
    backends={
        "triton": _backends.serves(
            _reverse_direction_refusal("triton"), _triton_both_directions,
            "both directions in one launch",
            _backends.Variant("one folded rnn_layer launch per direction",
                              _per_direction("triton"), when=lambda call: call["projection"])),
        **{name: _backends.serves(_reverse_direction_refusal(name), _per_direction(name),
                                  _ONE_CALL_PER_DIRECTION)
           for name in ("native", "torch", "reference")}},
    preference=BACKENDS.preference)
