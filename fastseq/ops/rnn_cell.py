"""One recurrent cell step: lstm_cell, gru_cell, rnn_tanh_cell, rnn_relu_cell.

Same math and arguments as torch's cells (torch.nn.LSTMCell & co.): input [B, I] or unbatched
[I], states [B, H] or [H] (None: zeros), w_ih [G*H, I], w_hh [G*H, H], optional biases [G*H],
gate order LSTM i,f,g,o and GRU r,z,n. One fused kernel per step; see fastseq.backend for how
the backend is chosen.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backends
from ..kernels.recurrent_layout import GATES
from ..reference import rnn_cell as _reference
from . import rnn_cell_registration as _registered_ops  # noqa: F401  (registers the ops)
from ._autocast import autocast_op
from ._registration import fused
from ._checks import check_same_dtype_device, check_shape, check_tensor, fail, needs_grad
from ._sharding import shards
from ._sharding_rules import cell_axes

_CELL_NAMES = {
    "lstm": "fastseq.ops.lstm_cell",
    "gru": "fastseq.ops.gru_cell",
    "rnn_tanh": "fastseq.ops.rnn_tanh_cell",
    "rnn_relu": "fastseq.ops.rnn_relu_cell",
}
_TORCH_CELLS = {
    "lstm": torch.lstm_cell,
    "gru": torch.gru_cell,
    "rnn_tanh": torch.rnn_tanh_cell,
    "rnn_relu": torch.rnn_relu_cell,
}
_REFERENCE_CELLS = {
    "lstm": _reference.lstm_cell,
    "gru": _reference.gru_cell,
    "rnn_tanh": _reference.rnn_tanh_cell,
    "rnn_relu": _reference.rnn_relu_cell,
}


@shards(cell_axes(2))
@autocast_op("lstm_cell")
def lstm_cell(input: Tensor, hx: Optional[tuple[Tensor, Tensor]], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None, *,
              backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """One LSTM step: returns (h', c'). hx is (h, c) or None for zeros."""
    if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
        fail(_CELL_NAMES["lstm"], f"hx must be a tuple (h, c) or None, got {type(hx).__name__}")
    h, c = (None, None) if hx is None else hx
    return _cell("lstm", input, h, c, w_ih, w_hh, b_ih, b_hh, backend)


@shards(cell_axes(1))
@autocast_op("gru_cell")
def gru_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None, *,
             backend: Optional[str] = None) -> Tensor:
    """One GRU step: returns h'."""
    return _cell("gru", input, hx, None, w_ih, w_hh, b_ih, b_hh, backend)[0]


@shards(cell_axes(1))
@autocast_op("rnn_tanh_cell")
def rnn_tanh_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                  b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None, *,
                  backend: Optional[str] = None) -> Tensor:
    """One Elman RNN step with tanh: returns h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)."""
    return _cell("rnn_tanh", input, hx, None, w_ih, w_hh, b_ih, b_hh, backend)[0]


@shards(cell_axes(1))
@autocast_op("rnn_relu_cell")
def rnn_relu_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                  b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None, *,
                  backend: Optional[str] = None) -> Tensor:
    """One Elman RNN step with relu: returns h' = relu(x W_ih^T + b_ih + h W_hh^T + b_hh)."""
    return _cell("rnn_relu", input, hx, None, w_ih, w_hh, b_ih, b_hh, backend)[0]


def _validate(mode, input, h, c, w_ih, w_hh, b_ih, b_hh) -> None:
    op = _CELL_NAMES[mode]
    check_tensor(op, "input", input, ndims=(1, 2))
    check_tensor(op, "w_ih", w_ih, ndims=(2,))
    check_tensor(op, "w_hh", w_hh, ndims=(2,))
    gates = GATES[mode]
    hidden = w_hh.shape[1]
    batched = input.dim() == 2
    check_shape(op, "w_hh", w_hh, (gates * hidden, hidden), "[{g}*hidden_size, hidden_size]", g=gates)
    check_shape(op, "w_ih", w_ih, (gates * hidden, input.shape[-1]), "[{g}*hidden_size, input_size]",
                g=gates)
    state_shape = (input.shape[0], hidden) if batched else (hidden,)
    states = (("hx[0]", h), ("hx[1]", c)) if mode == "lstm" else (("hx", h),)
    for name, state in states:
        if state is not None:
            check_tensor(op, name, state)
            if state.dim() != input.dim():
                fail(op, f"{name} must be {input.dim()}-D like input "
                         f"({'[batch, hidden_size]' if batched else '[hidden_size]: input is unbatched'}), "
                         f"got {state.dim()}-D with shape {list(state.shape)}")
            check_shape(op, name, state, state_shape, "[batch, hidden_size]")
    for name, bias in (("b_ih", b_ih), ("b_hh", b_hh)):
        if bias is not None:
            check_tensor(op, name, bias, ndims=(1,))
            check_shape(op, name, bias, (gates * hidden,), "[{g}*hidden_size]", g=gates)
    check_same_dtype_device(op, ("input", input), (
        ("hx[0]" if mode == "lstm" else "hx", h), ("hx[1]", c), ("w_ih", w_ih), ("w_hh", w_hh),
        ("b_ih", b_ih), ("b_hh", b_hh)))


def _cuda_order(call: dict) -> tuple[str, ...]:
    # Half precision: Triton's tl.dot uses the tensor cores; the CUDA kernel is an fp32-FMA
    # tiled GEMM, kept first for fp32/fp64. To be settled by the H100 benchmark.
    if call["dtype"] in (torch.float16, torch.bfloat16):
        return ("triton", "native", "torch")
    return ("native", "triton", "torch")


def _torch_cell(mode, input, h, c, w_ih, w_hh, b_ih, b_hh, **_):
    return _TORCH_CELLS[mode](input, (h, c) if mode == "lstm" else h, w_ih, w_hh, b_ih, b_hh)


def _reference_cell(mode, input, h, c, w_ih, w_hh, b_ih, b_hh, **_):
    return _REFERENCE_CELLS[mode](input, (h, c) if mode == "lstm" else h, w_ih, w_hh, b_ih, b_hh)


def _fused_cell(op_name: str):
    """The registered forward op `op_name` as a backend's implementation."""
    def run(mode, input, h, c, w_ih, w_hh, b_ih, b_hh, **_):
        grad = needs_grad(input, h, c, w_ih, w_hh, b_ih, b_hh)
        hy, cy, _workspace = fused(op_name)(mode, input, h, c, w_ih, w_hh, b_ih, b_hh, grad)
        return (hy, cy) if mode == "lstm" else hy
    return run


# CPU: torch's own cells. The C++ kernel (BLAS GEMMs + one fused SIMD pass) measured
# 0.75x-1.07x of torch's cells forward and 0.64x-0.98x for a training step on 2 cores
# (bench/NOTES.md): never faster by a margin, so a drop-in CPU user keeps torch's speed. It
# stays selectable as "native" and is the CI-tested twin of the CUDA math. Triton's
# interpreter is never chosen automatically. Each backend runs on batched [B, *] tensors with
# the states given (run_checked_cell adds the batch dim and the zeros).
BACKENDS = _backends.OpBackends(
    "fastseq.ops.*_cell",
    backends={
        "triton": _backends.serves(
            _backends.triton_refuses,
            _fused_cell("fastseq::rnn_cell_forward_triton"),
            "one fused kernel: both gate GEMMs, biases, update"),
        "native": _backends.serves(
            _backends.native_refuses,
            _fused_cell("fastseq::rnn_cell_forward"), "GEMMs, then one fused pointwise kernel"),
        "torch": _backends.serves(_backends.serves_every_call, _torch_cell,
                                  "torch's own cell (torch.lstm_cell & co.)"),
        "reference": _backends.serves(_backends.serves_every_call, _reference_cell,
                                      "fastseq.reference's cell")},
    preference={"cuda": _cuda_order, "cpu": ("torch", "native")})


def _cell(mode, input, h, c, w_ih, w_hh, b_ih, b_hh, backend):
    _validate(mode, input, h, c, w_ih, w_hh, b_ih, b_hh)
    return run_checked_cell(mode, input, h, c, w_ih, w_hh, b_ih, b_hh,
                            choose_cell_backend(mode, input, backend))


def cell_call(mode: str, input: Tensor) -> dict:
    """What the cells' declaration reads to choose (the device and dtype of a frame)."""
    return {"op": _CELL_NAMES[mode], "device": input.device, "dtype": input.dtype}


def choose_cell_backend(mode: str, input: Tensor, backend: Optional[str]) -> str:
    return BACKENDS.choose(cell_call(mode, input), backend)


def run_checked_cell(mode, input, h, c, w_ih, w_hh, b_ih, b_hh, chosen: str):
    """One cell step on the chosen backend, for callers that checked the arguments and chose
    already (a multi-layer streaming step chooses once and checks its own state: at batch 1
    on CPU the per-call checks cost ~13 us against torch's ~44 us cell). Returns (h', c') for
    the LSTM, (h',) for the others."""
    batched = input.dim() == 2
    if not batched:
        input = input.unsqueeze(0)
        h = h.unsqueeze(0) if h is not None else None
        c = c.unsqueeze(0) if c is not None else None
    hidden = w_hh.shape[1]
    if h is None:
        h = input.new_zeros(input.shape[0], hidden)
    if mode == "lstm" and c is None:
        c = input.new_zeros(input.shape[0], hidden)
    out = BACKENDS.run_chosen(chosen, dict(cell_call(mode, input), mode=mode, input=input, h=h,
                                           c=c, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh))
    outs = out if mode == "lstm" else (out,)
    if not batched:
        outs = tuple(t.squeeze(0) for t in outs)
    return outs
