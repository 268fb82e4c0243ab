"""SpeechBrain's attentional RNN decoder (speechbrain/nnet/RNN.py AttentionalRNNDecoder, its
attention modules in speechbrain/nnet/attention.py) on fastseq's fused cells and fused global
attention: the same constructor arguments, the same parameter names (a SpeechBrain decoder's
state_dict loads as it is: `AttentionalRNNDecoder.from_speechbrain`), the same forward
(inp_tensor, enc_states, wav_len) -> (outputs, attn), plus the step protocol, so fastseq's
beam_search decodes it.

SpeechBrain's step is not OpenNMT-py's (fastseq.nn.AttentionDecoder):
    cell_in = dropout([input; c_{t-1}])      c: the previous step's attention output (attn_dim)
    h_t     = stacked cells(cell_in)         SpeechBrain's LSTMCell/GRUCell/RNNCell stacks
    c_t, a_t = attention(enc_states, h_t)    content (Bahdanau), location-aware (Chorowski et al.:
                                             a 1-D convolution of a_{t-1} added inside the tanh),
                                             or key-value (scaled dot product)
    out_t   = proj([c_t; h_t])               a linear layer, no tanh
The decoder's steps read the attention's keys and last alignment from the decoding state
(fastseq.nn.AttentionDecoderState), not from the attention module as SpeechBrain's do, so beams
share each sentence's encoder states and a decoding step captures in a CUDA graph. Called on
their own, the attention modules cache as SpeechBrain's do (until reset()).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops._checks import InputError
from ..ops.attention_decoder import global_attention
from .attention_decoder import AttentionDecoderState
from .rnn_cell import GRUCell, LSTMCell, RNNCell
from .scripting import RefusesTorchScript

ATTN_TYPES = ("content", "location", "keyvalue")
RNN_TYPES = ("rnn", "gru", "lstm")


class ContentBasedAttention(nn.Module):
    """SpeechBrain's content-based (Bahdanau) attention: scores v . tanh(W_enc h_s + W_dec q),
    times `scaling`, softmax over the valid frames, context mlp_out(sum_s a_s h_s)."""

    def __init__(self, enc_dim: int, dec_dim: int, attn_dim: int, output_dim: int,
                 scaling: float = 1.0, *, backend: Optional[str] = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.mlp_enc = nn.Linear(enc_dim, attn_dim, **factory)
        self.mlp_dec = nn.Linear(dec_dim, attn_dim, **factory)
        self.mlp_attn = nn.Linear(attn_dim, 1, bias=False, **factory)
        self.mlp_out = nn.Linear(enc_dim, output_dim, **factory)
        self.scaling, self.backend = scaling, backend

    def memory(self, enc_states: Tensor) -> tuple[Tensor, Tensor]:
        """(keys, values) each query attends, computed once per sequence."""
        return self.mlp_enc(enc_states), enc_states

    def location(self, previous: Tensor) -> Optional[Tensor]:
        return None

    def attend(self, dec_states: Tensor, keys: Tensor, values: Tensor, enc_len: Tensor,
               previous: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """dec_states [B, T, dec_dim] (T: a step's beams) -> (context [B, T, output_dim],
        alignment [B, T, S]); previous [B, T, S]: the last alignments (location-aware only)."""
        context, align = global_attention(
            self.mlp_dec(dec_states), keys, values, score="additive", v=self.mlp_attn.weight[0],
            extra=self.location(previous), lengths=enc_len, scale=float(self.scaling),
            backend=self.backend)
        return self.mlp_out(context), align

    def reset(self) -> None:
        """Forget the sequence: SpeechBrain's module keeps its keys (and, location-aware, the
        last alignment) from the first forward until reset(); so does this one."""
        self.cache = None

    def forward(self, enc_states: Tensor, enc_len: Tensor, dec_states: Tensor
                ) -> tuple[Tensor, Tensor]:
        """SpeechBrain's call, one step: dec_states [B, dec_dim] -> (context [B, output_dim],
        alignment [B, S]), the keys and last alignment kept between calls until reset()."""
        if getattr(self, "cache", None) is None:
            self.cache = (*self.memory(enc_states),
                          first_alignment(enc_len.long(), enc_states)[:, None])
        keys, values, previous = self.cache
        context, align = self.attend(dec_states[:, None], keys, values, enc_len.long(),
                                     previous)
        self.cache = (keys, values, align.detach())
        return context[:, 0], align[:, 0]


class LocationAwareAttention(ContentBasedAttention):
    """SpeechBrain's location-aware attention (Chorowski et al. 2015): the content score plus
    mlp_loc(conv_loc(previous alignment)) inside the tanh, the fused kernel's `extra` term."""

    def __init__(self, enc_dim: int, dec_dim: int, attn_dim: int, output_dim: int,
                 conv_channels: int, kernel_size: int, scaling: float = 1.0, *,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__(enc_dim, dec_dim, attn_dim, output_dim, scaling, backend=backend,
                         device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.conv_loc = nn.Conv1d(1, conv_channels, kernel_size=2 * kernel_size + 1,
                                  padding=kernel_size, bias=False, **factory)
        self.mlp_loc = nn.Linear(conv_channels, attn_dim, **factory)
        # SpeechBrain registers mlp_out last: the same parameter order, which an optimizer's
        # state_dict indexes by.
        self.mlp_out = self._modules.pop("mlp_out")

    def location(self, previous: Tensor) -> Tensor:
        """[B, T, S] alignments -> [B, T, S, attn_dim] location features."""
        B, T, S = previous.shape
        features = self.conv_loc(previous.reshape(B * T, 1, S)).transpose(1, 2)
        return self.mlp_loc(features).view(B, T, S, -1)


class KeyValueAttention(nn.Module):
    """SpeechBrain's key-value attention: scores (W_q q) . (W_k h_s) / sqrt(attn_dim), context
    sum_s a_s W_v h_s."""

    def __init__(self, enc_dim: int, dec_dim: int, attn_dim: int, output_dim: int, *,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.key_linear = nn.Linear(enc_dim, attn_dim, **factory)
        self.query_linear = nn.Linear(dec_dim, attn_dim, **factory)
        self.value_linear = nn.Linear(enc_dim, output_dim, **factory)
        # SpeechBrain divides by sqrt(attn_dim) taken in float32.
        self.scaling = float(torch.tensor(attn_dim, dtype=torch.float32).sqrt())
        self.backend = backend

    def memory(self, enc_states: Tensor) -> tuple[Tensor, Tensor]:
        return self.key_linear(enc_states), self.value_linear(enc_states)

    def attend(self, dec_states: Tensor, keys: Tensor, values: Tensor, enc_len: Tensor,
               previous: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        return global_attention(self.query_linear(dec_states), keys, values, lengths=enc_len,
                                scale=1.0 / self.scaling, backend=self.backend)

    def reset(self) -> None:
        """Forget the sequence (SpeechBrain's module keeps its keys until reset())."""
        self.cache = None

    def forward(self, enc_states: Tensor, enc_len: Tensor, dec_states: Tensor
                ) -> tuple[Tensor, Tensor]:
        """As SpeechBrain's: (context [B, output_dim], alignment [B, 1, S])."""
        if getattr(self, "cache", None) is None:
            self.cache = self.memory(enc_states)
        context, align = self.attend(dec_states[:, None], *self.cache, enc_len.long())
        return context[:, 0], align


def first_alignment(enc_len: Tensor, enc_states: Tensor) -> Tensor:
    """SpeechBrain's alignment before the first step: uniform over each sequence's valid frames
    (1 / length; taken in the states' dtype, where SpeechBrain takes float32)."""
    S = enc_states.shape[1]
    valid = torch.arange(S, device=enc_states.device)[None, :] < enc_len[:, None]
    return valid.to(enc_states.dtype) / enc_len[:, None].to(enc_states.dtype)


class CellStack(nn.Module):
    """SpeechBrain's LSTMCell / GRUCell / RNNCell stacks (speechbrain.nnet.RNN): `rnn_cells`
    (torch cells' parameter names), dropout between layers (`dropout_layers`)."""

    def __init__(self, rnn_type: str, input_size: int, hidden_size: int, num_layers: int,
                 bias: bool, dropout: float, nonlinearity: str, re_init: bool,
                 backend: Optional[str], factory: dict) -> None:
        super().__init__()
        self.lstm = rnn_type == "lstm"
        self.rnn_cells = nn.ModuleList()
        for layer in range(num_layers):
            size = input_size if layer == 0 else hidden_size
            if rnn_type == "rnn":
                cell = RNNCell(size, hidden_size, bias, nonlinearity, backend=backend, **factory)
            else:
                cell = (LSTMCell if self.lstm else GRUCell)(size, hidden_size, bias,
                                                            backend=backend, **factory)
            self.rnn_cells.append(cell)
        self.dropout_layers = nn.ModuleList([nn.Dropout(p=dropout)
                                             for _ in range(num_layers - 1)])
        if re_init:  # SpeechBrain's rnn_init: orthogonal recurrent weights
            for name, param in self.rnn_cells.named_parameters():
                if "weight_hh" in name:
                    nn.init.orthogonal_(param)

    def forward(self, x: Tensor, hidden: tuple) -> tuple[Tensor, tuple]:
        """x [B, input_size], hidden (h [layers, B, H],) or (h, c) -> (last h, new hidden)."""
        new = [[] for _ in hidden]
        for i, cell in enumerate(self.rnn_cells):
            if i > 0:
                x = self.dropout_layers[i - 1](x)
            if self.lstm:
                x, c = cell(x, (hidden[0][i], hidden[1][i]))
                new[1].append(c)
            else:
                x = cell(x, hidden[0][i])
            new[0].append(x)
        return x, tuple(torch.stack(layers) for layers in new)


class AttentionalRNNDecoder(RefusesTorchScript, nn.Module):
    """SpeechBrain's AttentionalRNNDecoder (same arguments, parameter names and forward) on
    fastseq's fused cells and attention.

    decoder(inp_tensor [B, T, input_size], enc_states [B, S, enc_dim], wav_len [B] (relative
    lengths)) -> (outputs [B, T, hidden_size], attn [B, T, S]; [B, T, 1, S] for "keyvalue", as
    SpeechBrain's). Step protocol: state = decoder.init_state(enc_states, enc_len) (absolute
    lengths); out_t, state = decoder.step(inp_t [B, input_size], state).
    `normalization` (SpeechBrain's, for its Li-GRU) is accepted and unused, as there.
    """

    def __init__(self, rnn_type: str, attn_type: str, hidden_size: int, attn_dim: int,
                 num_layers: int, enc_dim: int, input_size: int, nonlinearity: str = "relu",
                 re_init: bool = True, normalization: str = "batchnorm", scaling: float = 1.0,
                 channels: Optional[int] = None, kernel_size: Optional[int] = None,
                 bias: bool = True, dropout: float = 0.0, *, backend: Optional[str] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        rnn_type, attn_type = rnn_type.lower(), attn_type.lower()
        if rnn_type not in RNN_TYPES:
            raise InputError(f"fastseq.nn.AttentionalRNNDecoder: rnn_type must be one of "
                             f"{RNN_TYPES}, got {rnn_type!r}")
        if attn_type not in ATTN_TYPES:
            raise InputError(f"fastseq.nn.AttentionalRNNDecoder: attn_type must be one of "
                             f"{ATTN_TYPES}, got {attn_type!r}")
        if attn_type == "location" and (channels is None or kernel_size is None):
            raise InputError("fastseq.nn.AttentionalRNNDecoder: attn_type 'location' needs "
                             f"channels and kernel_size, got {channels}, {kernel_size}")
        factory = {"device": device, "dtype": dtype}
        self.rnn_type, self.attn_type, self.hidden_size = rnn_type, attn_type, hidden_size
        self.attn_dim, self.num_layers, self.scaling = attn_dim, num_layers, scaling
        self.bias, self.dropout, self.normalization = bias, dropout, normalization
        self.re_init, self.nonlinearity = re_init, nonlinearity
        self.channels, self.kernel_size = channels, kernel_size
        self.proj = nn.Linear(hidden_size + attn_dim, hidden_size, **factory)
        shared = dict(backend=backend, **factory)
        if attn_type == "content":
            self.attn = ContentBasedAttention(enc_dim, hidden_size, attn_dim, attn_dim, scaling,
                                              **shared)
        elif attn_type == "location":
            self.attn = LocationAwareAttention(enc_dim, hidden_size, attn_dim, attn_dim,
                                               channels, kernel_size, scaling, **shared)
        else:
            self.attn = KeyValueAttention(enc_dim, hidden_size, attn_dim, attn_dim, **shared)
        self.drop = nn.Dropout(p=dropout)
        self.rnn = CellStack(rnn_type, input_size + attn_dim, hidden_size, num_layers, bias,
                             0.0 if num_layers == 1 else dropout, nonlinearity, re_init,
                             backend, factory)

    @classmethod
    def from_speechbrain(cls, decoder: nn.Module, *, backend: Optional[str] = None
                         ) -> "AttentionalRNNDecoder":
        """The same decoder built from a SpeechBrain AttentionalRNNDecoder (weights copied)."""
        if type(decoder).__name__ != "AttentionalRNNDecoder" or not hasattr(decoder, "rnn"):
            raise InputError(f"fastseq.nn.AttentionalRNNDecoder.from_speechbrain: a SpeechBrain "
                             f"AttentionalRNNDecoder, got {type(decoder).__name__}")
        attn = decoder.attn
        enc_dim = (attn.key_linear if decoder.attn_type == "keyvalue" else attn.mlp_enc
                   ).in_features
        weight = decoder.proj.weight
        fast = cls(decoder.rnn_type, decoder.attn_type, decoder.hidden_size, decoder.attn_dim,
                   decoder.num_layers, enc_dim,
                   decoder.rnn.rnn_cells[0].input_size - decoder.attn_dim,
                   decoder.nonlinearity, False, decoder.normalization, decoder.scaling,
                   decoder.channels, decoder.kernel_size, decoder.bias, decoder.dropout,
                   backend=backend, device=weight.device, dtype=weight.dtype)
        fast.load_state_dict(decoder.state_dict())
        return fast

    def init_state(self, enc_states: Tensor, enc_len: Optional[Tensor] = None
                   ) -> AttentionDecoderState:
        """The start of a decoding: enc_states [B, S, enc_dim], enc_len [B] the valid frames
        (None: all S). The attention's keys and values are computed here, once per sequence."""
        if not isinstance(enc_states, Tensor) or enc_states.dim() != 3:
            got = (list(enc_states.shape) if isinstance(enc_states, Tensor)
                   else type(enc_states).__name__)
            raise InputError(f"fastseq.nn.AttentionalRNNDecoder: enc_states must be "
                             f"[B, S, enc_dim], got {got}")
        B, S = enc_states.shape[:2]
        if enc_len is None:
            enc_len = torch.full((B,), S, device=enc_states.device)
        enc_len = enc_len.long()
        keys, values = self.attn.memory(enc_states)
        like = self.proj.weight
        hidden = tuple(like.new_zeros(self.num_layers, B, self.hidden_size)
                       for _ in range(2 if self.rnn_type == "lstm" else 1))
        return AttentionDecoderState(values, keys, enc_len, hidden,
                                     like.new_zeros(B, self.attn_dim), None,
                                     first_alignment(enc_len, enc_states))

    def forward(self, inp_tensor: Tensor, enc_states: Tensor, wav_len: Tensor
                ) -> tuple[Tensor, Tensor]:
        """SpeechBrain's: wav_len the relative lengths (enc_len = round(S * wav_len))."""
        enc_len = torch.round(enc_states.shape[1] * wav_len).long()
        state = self.init_state(enc_states, enc_len)
        outputs, alignments = [], []
        for inp in inp_tensor.unbind(1):
            out, align = self._step(inp, state)
            outputs.append(out)
            alignments.append(align)
        attn = torch.stack(alignments, 1)
        return torch.stack(outputs, 1), attn.unsqueeze(2) if self.attn_type == "keyvalue" else attn

    def step(self, inp: Tensor, state: AttentionDecoderState
             ) -> tuple[Tensor, AttentionDecoderState]:
        """One step per decoding row: inp [B * beams, input_size] -> (output [B * beams,
        hidden_size], the state, updated in place when decoding)."""
        return self._step(inp, state)[0], state

    def _step(self, inp: Tensor, state: AttentionDecoderState) -> tuple[Tensor, Tensor]:
        cell_out, hidden = self.rnn(self.drop(torch.cat([inp, state.input_feed], -1)),
                                    state.hidden)
        beams, S = state.beams, state.keys.shape[1]
        context, align = self.attn.attend(cell_out.view(-1, beams, self.hidden_size),
                                          state.keys, state.enc_out, state.src_len,
                                          state.alignment.view(-1, beams, S))
        context = context.reshape(-1, self.attn_dim)
        align = align.reshape(-1, S)
        out = self.proj(torch.cat([context, cell_out], -1))
        # SpeechBrain's location term reads the last alignment detached (prev_attn).
        state.advance(hidden, context, align.detach())
        return out, align

