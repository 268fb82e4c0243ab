"""Reference layer-normalized LSTM and GRU (Ba, Kiros and Hinton, 2016): plain PyTorch.

Layer norm (over all G*H gate columns of a row, with a gain and no shift: the biases are the
shift) on the input projection and, separately, on the recurrent projection; the LSTM also
normalizes its cell state (gain and shift, over H) before the output tanh. The cell state
itself stays unnormalized. This is the formulation of haste's LayerNormLSTM/LayerNormGRU:

  LSTM  i, f, g, o = chunks of LN(x W_ih^T; a_ih) + b_ih + LN(h W_hh^T; a_hh) + b_hh
        c' = σ(f) c + σ(i) tanh(g);  h' = σ(o) tanh(LN(c'; a_c, b_c))
  GRU   x_r, x_z, x_n = chunks of LN(x W_ih^T; a_ih) + b_ih
        h_r, h_z, h_n = chunks of LN(h W_hh^T; a_hh) + b_hh
        r = σ(x_r + h_r), z = σ(x_z + h_z), n = tanh(x_n + r h_n), h' = (1 - z) n + z h

LN(v; a, b) = (v - mean(v)) / sqrt(var(v) + eps) * a + b, the biased variance, eps = 1e-5.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .rnn import scan

EPS = 1e-5
MODES = ("lstm", "gru")


class LayerNormWeights(tuple):
    """(w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight, ln_c_weight, ln_c_bias) of one layer
    and direction; the biases may be None, the two cell-state entries are the LSTM's."""

    def __new__(cls, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight, ln_c_weight=None,
                ln_c_bias=None):
        return super().__new__(cls, (w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight,
                                     ln_c_weight, ln_c_bias))


def input_gates(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], ln_ih_weight: Tensor,
                eps: float = EPS) -> Tensor:
    """LN(x W_ih^T; a_ih) + b_ih: the input's share of the gates, for any number of steps."""
    return F.layer_norm(F.linear(x, w_ih), (w_ih.shape[0],), ln_ih_weight, b_ih, eps)


def recurrent_gates(h: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], ln_hh_weight: Tensor,
                    eps: float = EPS) -> Tensor:
    return F.layer_norm(F.linear(h, w_hh), (w_hh.shape[0],), ln_hh_weight, b_hh, eps)


def layer_norm_lstm_cell(input: Tensor, hx: tuple[Tensor, Tensor], weights: LayerNormWeights,
                         eps: float = EPS) -> tuple[Tensor, Tensor]:
    w_ih, w_hh, b_ih, b_hh, a_ih, a_hh, a_c, b_c = weights
    h, c = hx
    gates = input_gates(input, w_ih, b_ih, a_ih, eps) + recurrent_gates(h, w_hh, b_hh, a_hh, eps)
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(F.layer_norm(c_new, (c_new.shape[-1],), a_c, b_c, eps))
    return h_new, c_new


def layer_norm_gru_cell(input: Tensor, hx: Tensor, weights: LayerNormWeights,
                        eps: float = EPS) -> Tensor:
    w_ih, w_hh, b_ih, b_hh, a_ih, a_hh, _, _ = weights
    x_r, x_z, x_n = input_gates(input, w_ih, b_ih, a_ih, eps).chunk(3, dim=-1)
    h_r, h_z, h_n = recurrent_gates(hx, w_hh, b_hh, a_hh, eps).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * hx


def layer_norm_run_direction(mode: str, x: Tensor, h: Tensor, c: Optional[Tensor],
                             weights: LayerNormWeights, lengths: Optional[Tensor], reverse: bool,
                             eps: float = EPS):
    """One layer-normalized layer, one direction over x [T, B, I], with the lengths and reverse
    semantics of fastseq.reference.rnn.scan. Returns (outputs, h_n, c_n)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def step(t, h, c):
        if mode == "lstm":
            return layer_norm_lstm_cell(x[t], (h, c), weights, eps)
        return layer_norm_gru_cell(x[t], h, weights, eps), None

    return scan(step, x.shape[0], h, c, lengths, reverse)
