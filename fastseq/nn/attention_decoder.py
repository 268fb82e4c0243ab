"""RNN decoders with global attention, as OpenNMT-py runs them (onmt/decoders/decoder.py,
onmt/modules/global_attention.py, onmt/modules/stacked_rnn.py), on fastseq's fused cells and
its fused attention (fastseq.ops.global_attention).

`GlobalAttention` keeps OpenNMT-py's arguments, parameter names and forward: (attn_h, align)
with attn_h = linear_out([c; h]) (tanh for "dot" and "general"; "mlp", Bahdanau's, has a biased
linear_out and no tanh). `AttentionDecoder` is its InputFeedRNNDecoder (input_feed=True: each
step's cell reads [embedding; previous attn_h], a stack of LSTM/GRU cells with dropout between
them) and StdRNNDecoder (input_feed=False: one multi-layer RNN over the whole target, then one
attention launch for every step) without the embeddings: it takes embedded targets, so an
OpenNMT-py decoder's state_dict loads into it once its "embeddings." entries are dropped
(`AttentionDecoder.from_opennmt`).

Per step (input feeding), fastseq runs each layer's cell as one fused launch and the attention
(score, softmax and context) as one; the encoder side of the additive score (U h_j) is computed
once per sequence, in `init_state`. The decoding state (`AttentionDecoderState`) holds the
encoder states and their precomputed keys, shared across beams without copies (a beam search's
queries are the attention op's T dimension).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._checks import InputError
from ..ops.attention_decoder import global_attention
from .rnn import GRU, LSTM
from .rnn_cell import GRUCell, LSTMCell
from .scripting import RefusesTorchScript

ATTN_TYPES = ("dot", "general", "mlp")


class GlobalAttention(RefusesTorchScript, nn.Module):
    """OpenNMT-py's GlobalAttention(dim, coverage, attn_type, attn_func): "dot" (h_t . h_s),
    "general" (h_t W_a . h_s), "mlp" (v . tanh(W q + b + U h_s)); softmax only (attn_func
    "sparsemax" is refused by name)."""

    def __init__(self, dim: int, coverage: bool = False, attn_type: str = "dot",
                 attn_func: str = "softmax", *, backend: Optional[str] = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        if attn_type not in ATTN_TYPES:
            raise InputError(f"fastseq.nn.GlobalAttention: attn_type must be one of {ATTN_TYPES}"
                             f", got {attn_type!r}")
        if attn_func != "softmax":
            raise InputError(f"fastseq.nn.GlobalAttention: attn_func {attn_func!r} is not "
                             f"supported; the fused attention normalises with softmax")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.attn_type, self.attn_func, self.backend = dim, attn_type, attn_func, backend
        if attn_type == "general":
            self.linear_in = nn.Linear(dim, dim, bias=False, **factory)
        elif attn_type == "mlp":
            self.linear_context = nn.Linear(dim, dim, bias=False, **factory)
            self.linear_query = nn.Linear(dim, dim, bias=True, **factory)
            self.v = nn.Linear(dim, 1, bias=False, **factory)
        self.linear_out = nn.Linear(dim * 2, dim, bias=attn_type == "mlp", **factory)
        if coverage:
            self.linear_cover = nn.Linear(1, dim, bias=False, **factory)

    def keys(self, enc_out: Tensor) -> Tensor:
        """What each query scores against, computed once per sequence: the encoder states
        (dot, general) or their projection U h_s (mlp)."""
        return self.linear_context(enc_out) if self.attn_type == "mlp" else enc_out

    def attend(self, h: Tensor, enc_out: Tensor, keys: Tensor, src_len: Optional[Tensor]
               ) -> tuple[Tensor, Tensor]:
        """h [B, T, dim] against precomputed keys -> (attn_h [B, T, dim], align [B, T, S])."""
        if self.attn_type == "mlp":
            context, align = global_attention(self.linear_query(h), keys, enc_out,
                                              score="additive", v=self.v.weight[0],
                                              lengths=src_len, backend=self.backend)
        else:
            query = self.linear_in(h) if self.attn_type == "general" else h
            context, align = global_attention(query, keys, enc_out, lengths=src_len,
                                              backend=self.backend)
        attn_h = self.linear_out(torch.cat([context, h], dim=-1))
        return (torch.tanh(attn_h) if self.attn_type != "mlp" else attn_h), align

    def forward(self, src: Tensor, enc_out: Tensor, src_len: Optional[Tensor] = None,
                coverage: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """OpenNMT-py's: src [B, T, dim] or one step [B, dim], enc_out [B, S, dim], src_len [B],
        coverage [B, S] (added to the encoder states through linear_cover, then tanh)."""
        one_step = src.dim() == 2
        h = src.unsqueeze(1) if one_step else src
        if coverage is not None:
            enc_out = torch.tanh(enc_out + self.linear_cover(coverage.reshape(-1, 1)).view_as(
                enc_out))
        attn_h, align = self.attend(h, enc_out, self.keys(enc_out), src_len)
        return (attn_h.squeeze(1), align.squeeze(1)) if one_step else (attn_h, align)


class StackedCells(nn.Module):
    """OpenNMT-py's StackedLSTM / StackedGRU on fastseq's cells: `layers` (same names), dropout
    between layers."""

    def __init__(self, rnn_type: str, num_layers: int, input_size: int, hidden_size: int,
                 dropout: float, backend: Optional[str], factory: dict) -> None:
        super().__init__()
        cell = LSTMCell if rnn_type == "LSTM" else GRUCell
        self.lstm = rnn_type == "LSTM"
        self.dropout = nn.Dropout(dropout)
        self.num_layers = num_layers
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            self.layers.append(cell(input_size, hidden_size, backend=backend, **factory))
            input_size = hidden_size

    def forward(self, x: Tensor, hidden: tuple) -> tuple[Tensor, tuple]:
        new_h, new_c = [], []
        for i, layer in enumerate(self.layers):
            if self.lstm:
                h, c = layer(x, (hidden[0][i], hidden[1][i]))
                new_c.append(c)
            else:
                h = layer(x, hidden[0][i])
            new_h.append(h)
            x = self.dropout(h) if i + 1 != self.num_layers else h
        return x, ((torch.stack(new_h), torch.stack(new_c)) if self.lstm
                   else (torch.stack(new_h),))


def _update(buffer: Optional[Tensor], value: Tensor) -> Tensor:
    """The state's new value for one of its tensors. Decoding (no autograd, a buffer of the same
    shape and dtype) copies it into the buffer, whose address stays fixed: a step captured in a
    CUDA graph then reads and writes the same memory at every replay. Under autograd (the
    teacher-forced forward trains through the steps) the value is taken as it is: an in-place
    write would overwrite what the backward saved."""
    if (buffer is None or torch.is_grad_enabled() or buffer.requires_grad
            or buffer.shape != value.shape or buffer.dtype != value.dtype):
        return value
    return buffer.copy_(value)


@dataclasses.dataclass
class AttentionDecoderState:
    """A decoding's state: the encoder states (enc_out [B, S, H]), their precomputed keys and
    lengths, the recurrent hidden (a tuple: (h, c) [layers, B, H] for the LSTM, (h,) for the GRU),
    the input feed [B, H], the coverage [B, S] (sum of the alignments so far, or None) and the
    last step's alignment [B, S]. `beams` > 1: rows are (sentence, beam) pairs, sentence-major,
    while the encoder tensors keep one row per sentence."""
    enc_out: Tensor
    keys: Tensor
    src_len: Optional[Tensor]
    hidden: tuple
    input_feed: Tensor
    coverage: Optional[Tensor] = None
    alignment: Optional[Tensor] = None
    beams: int = 1

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (of the B x beams decoding rows) of the recurrent part: a beam
        search's survivors. Without autograd (decoding) each buffer is overwritten in place, so
        its address stays fixed; the encoder tensors are not touched."""
        self.hidden = tuple(_update(h, h.index_select(1, index)) for h in self.hidden)
        self.input_feed = _update(self.input_feed, self.input_feed.index_select(0, index))
        if self.coverage is not None:
            self.coverage = _update(self.coverage, self.coverage.index_select(0, index))
        if self.alignment is not None:
            self.alignment = _update(self.alignment, self.alignment.index_select(0, index))

    def advance(self, hidden: tuple, input_feed: Tensor, alignment: Tensor) -> None:
        """One step's results into the state (in place when decoding: see `_update`); the
        coverage, when kept, adds the alignment."""
        self.hidden = tuple(_update(old, new) for old, new in zip(self.hidden, hidden))
        self.input_feed = _update(self.input_feed, input_feed)
        self.alignment = _update(self.alignment, alignment)
        if self.coverage is not None:
            self.coverage = _update(self.coverage, self.coverage + alignment)

    def expand_beams(self, beams: int) -> "AttentionDecoderState":
        """The same decoding with each sentence's recurrent state repeated `beams` times
        (sentence-major); the encoder states stay one copy per sentence."""
        repeat = lambda t, dim: t.repeat_interleave(beams, dim)  # noqa: E731
        return AttentionDecoderState(
            self.enc_out, self.keys, self.src_len, tuple(repeat(h, 1) for h in self.hidden),
            repeat(self.input_feed, 0),
            repeat(self.coverage, 0) if self.coverage is not None else None,
            repeat(self.alignment, 0) if self.alignment is not None else None, beams)


class AttentionDecoder(RefusesTorchScript, nn.Module):
    """OpenNMT-py's RNN decoder with global attention, on embedded targets.

    rnn_type "LSTM" or "GRU"; input_size: the target embedding size; input_feed=True is
    InputFeedRNNDecoder (cells, each step's input [embedding; previous attn_h]), False is
    StdRNNDecoder (one RNN over the sequence, then attention); attn_type "dot", "general",
    "mlp"; coverage_attn keeps the running sum of alignments (OpenNMT-py's, for its coverage
    loss and penalty; its score does not read it). bidirectional_encoder: the encoder's final
    states are joined per layer (OpenNMT-py's _fix_enc_hidden).

    state = decoder.init_state(enc_out, src_len, enc_final); outputs, alignments, state =
    decoder(emb [B, T, E], state); out_t, state = decoder.step(emb_t [B, E], state).
    """

    def __init__(self, rnn_type: str, input_size: int, hidden_size: int, num_layers: int = 1, *,
                 attn_type: str = "general", input_feed: bool = True, dropout: float = 0.0,
                 bidirectional_encoder: bool = False, coverage_attn: bool = False,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        if rnn_type not in ("LSTM", "GRU"):
            raise InputError(f"fastseq.nn.AttentionDecoder: rnn_type must be 'LSTM' or 'GRU', "
                             f"got {rnn_type!r}")
        if coverage_attn and not input_feed:
            raise InputError("fastseq.nn.AttentionDecoder: coverage_attn needs input_feed=True "
                             "(OpenNMT-py's StdRNNDecoder has no coverage either)")
        factory = {"device": device, "dtype": dtype}
        self.rnn_type, self.hidden_size, self.num_layers = rnn_type, hidden_size, num_layers
        self.input_feed, self.bidirectional_encoder = input_feed, bidirectional_encoder
        self.coverage_attn = coverage_attn
        if input_feed:
            self.rnn = StackedCells(rnn_type, num_layers, input_size + hidden_size, hidden_size,
                                    dropout, backend, factory)
        else:
            layer = LSTM if rnn_type == "LSTM" else GRU
            self.rnn = layer(input_size, hidden_size, num_layers=num_layers,
                             dropout=dropout if num_layers > 1 else 0.0, batch_first=True,
                             backend=backend, **factory)
        self.attn = GlobalAttention(hidden_size, coverage=coverage_attn, attn_type=attn_type,
                                    backend=backend, **factory)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_opennmt(cls, decoder: nn.Module, *, backend: Optional[str] = None
                     ) -> "AttentionDecoder":
        """The same decoder built from an OpenNMT-py InputFeedRNNDecoder or StdRNNDecoder (its
        weights copied; its embeddings stay with the caller)."""
        name = type(decoder).__name__
        if name not in ("InputFeedRNNDecoder", "StdRNNDecoder"):
            raise InputError(f"fastseq.nn.AttentionDecoder.from_opennmt: an OpenNMT-py "
                             f"InputFeedRNNDecoder or StdRNNDecoder, got {name}")
        if getattr(decoder, "context_gate", None) is not None or decoder.copy_attn is not None:
            raise InputError("fastseq.nn.AttentionDecoder.from_opennmt: context gates and copy "
                             "attention are not supported")
        input_feed = name == "InputFeedRNNDecoder"
        cells = decoder.rnn.layers if input_feed else None
        rnn_type = ("LSTM" if isinstance((cells[0] if input_feed else decoder.rnn),
                                         (nn.LSTMCell, nn.LSTM)) else "GRU")
        weight = next(decoder.parameters())
        input_size = decoder.embeddings.embedding_size
        fast = cls(rnn_type, input_size, decoder.hidden_size, decoder.num_layers,
                   attn_type=decoder.attn.attn_type, input_feed=input_feed,
                   dropout=decoder.dropout.p,
                   bidirectional_encoder=decoder.bidirectional_encoder,
                   coverage_attn=decoder._coverage, backend=backend, device=weight.device,
                   dtype=weight.dtype)
        fast.load_state_dict({k: v for k, v in decoder.state_dict().items()
                              if not k.startswith("embeddings.")})
        return fast

    def init_state(self, enc_out: Tensor, src_len: Optional[Tensor] = None,
                   enc_final=None) -> AttentionDecoderState:
        """The start of a decoding: enc_out [B, S, H] (batch-first), src_len [B], enc_final the
        encoder's final hidden (h [layers * directions, B, H'] or (h, c)), or None for zeros.
        The attention keys are computed here, once per sequence."""
        if not isinstance(enc_out, Tensor) or enc_out.dim() != 3 or \
                enc_out.shape[-1] != self.hidden_size:
            got = list(enc_out.shape) if isinstance(enc_out, Tensor) else type(enc_out).__name__
            raise InputError(f"fastseq.nn.AttentionDecoder: enc_out must be [B, S, hidden_size="
                             f"{self.hidden_size}], got {got}")
        B = enc_out.shape[0]
        lstm = self.rnn_type == "LSTM"
        # The state's own buffers (decoding overwrites them in place): never the caller's
        # tensors, and h and c never one tensor.
        if enc_final is None:
            hidden = tuple(enc_out.new_zeros(self.num_layers, B, self.hidden_size)
                           for _ in range(2 if lstm else 1))
        else:
            finals = enc_final if isinstance(enc_final, tuple) else (enc_final,)
            hidden = tuple(self._joined(h).clone() for h in finals)
            if len(hidden) != (2 if lstm else 1) or any(
                    h.shape != (self.num_layers, B, self.hidden_size) for h in hidden):
                raise InputError(
                    f"fastseq.nn.AttentionDecoder: enc_final must give "
                    f"{'(h, c)' if lstm else 'h'} of [num_layers={self.num_layers}, B={B}, "
                    f"hidden_size={self.hidden_size}] (after joining directions), got "
                    f"{[list(h.shape) for h in hidden]}")
        coverage = enc_out.new_zeros(B, enc_out.shape[1]) if self.coverage_attn else None
        return AttentionDecoderState(enc_out, self.attn.keys(enc_out), src_len, hidden,
                                     enc_out.new_zeros(B, self.hidden_size), coverage,
                                     enc_out.new_zeros(B, enc_out.shape[1]))

    def _joined(self, hidden: Tensor) -> Tensor:
        if self.bidirectional_encoder:
            return torch.cat([hidden[0::2], hidden[1::2]], 2)
        return hidden

    def forward(self, emb: Tensor, state: AttentionDecoderState
                ) -> tuple[Tensor, Tensor, AttentionDecoderState]:
        """emb [B, T, E] (teacher-forced targets, embedded) -> (outputs [B, T, H],
        alignments [B, T, S], the state after the last step)."""
        if not self.input_feed:
            if state.beams != 1:
                raise InputError("fastseq.nn.AttentionDecoder: a beam state steps one token at "
                                 "a time (step)")
            hidden = state.hidden if self.rnn_type == "LSTM" else state.hidden[0]
            rnn_out, hidden = self.rnn(emb, hidden)
            attn_h, align = self.attn.attend(rnn_out, state.enc_out, state.keys, state.src_len)
            outputs = self.dropout(attn_h)
            state.advance(hidden if self.rnn_type == "LSTM" else (hidden,), outputs[:, -1],
                          align[:, -1])
            return outputs, align, state
        outputs, alignments = [], []
        for emb_t in emb.unbind(1):
            out, align = self._step(emb_t, state)
            outputs.append(out)
            alignments.append(align)
        return torch.stack(outputs, 1), torch.stack(alignments, 1), state

    def step(self, emb_t: Tensor, state: AttentionDecoderState
             ) -> tuple[Tensor, AttentionDecoderState]:
        """One target token per decoding row: emb_t [B * beams, E] -> (attn_h [B * beams, H],
        the state, updated in place: without autograd its tensors keep their addresses, so a
        step of fixed shape captures in a CUDA graph)."""
        return self._step(emb_t, state)[0], state

    def _step(self, emb_t: Tensor, state: AttentionDecoderState) -> tuple[Tensor, Tensor]:
        """(attn_h [rows, H], alignment [rows, S]) of one step, fresh tensors (the forward keeps
        each step's), with the state advanced."""
        if self.input_feed:
            rnn_out, hidden = self.rnn(torch.cat([emb_t, state.input_feed], 1), state.hidden)
        else:
            hidden = state.hidden if self.rnn_type == "LSTM" else state.hidden[0]
            rnn_out, hidden = self.rnn(emb_t.unsqueeze(1), hidden)
            rnn_out = rnn_out.squeeze(1)
            hidden = hidden if self.rnn_type == "LSTM" else (hidden,)
        # One query per beam: [B, beams, H] against one copy of each sentence's keys.
        query = rnn_out.view(-1, state.beams, self.hidden_size)
        attn_h, align = self.attn.attend(query, state.enc_out, state.keys, state.src_len)
        attn_h = self.dropout(attn_h.reshape(-1, self.hidden_size))
        align = align.reshape(-1, align.shape[-1])
        state.advance(hidden, attn_h, align)
        return attn_h, align
