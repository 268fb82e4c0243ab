"""Drop-in replacements for torch.nn.LSTMCell, GRUCell and RNNCell.

They subclass torch's cells, so constructor arguments, parameter names, initialisation and
state_dict keys are torch's own (load_state_dict works both ways, isinstance checks still
pass); only forward changes, to fastseq's fused step. `backend=` pins a backend (default auto).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..ops._checks import InputError, check_features, check_like_parameters
from .scripting import RefusesTorchScript


def _check_input(cell: torch.nn.RNNCellBase, input) -> None:
    """What torch's cells check, named for the layer (the op below would otherwise blame
    weight_ih for an input of the wrong width or dtype)."""
    name = f"fastseq.nn.{type(cell).__name__}"
    if not isinstance(input, Tensor):
        raise InputError(f"{name}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() not in (1, 2):
        raise InputError(f"{name}: input must be 1-D or 2-D, got {input.dim()}-D with shape "
                         f"{list(input.shape)} (want [batch, input_size] or [input_size])")
    check_features(name, "input", input, "input_size", cell.input_size)
    check_like_parameters(name, "input", input, cell.weight_ih)


class LSTMCell(RefusesTorchScript, torch.nn.LSTMCell):
    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: Optional[str] = None) -> None:
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None):
        _check_input(self, input)
        return ops.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih,
                             self.bias_hh, backend=self.backend)


class GRUCell(RefusesTorchScript, torch.nn.GRUCell):
    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: Optional[str] = None) -> None:
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        _check_input(self, input)
        return ops.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih,
                            self.bias_hh, backend=self.backend)


class RNNCell(RefusesTorchScript, torch.nn.RNNCell):
    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__(input_size, hidden_size, bias, nonlinearity, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        _check_input(self, input)
        step = ops.rnn_tanh_cell if self.nonlinearity == "tanh" else ops.rnn_relu_cell
        return step(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                    backend=self.backend)
