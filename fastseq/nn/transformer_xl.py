"""Transformer-XL (Dai et al. 2019) on fastseq's fused relative-position attention.

RelPartialLearnableMultiHeadAttn, PositionwiseFF and TransformerXLLayer keep the original code's
(kimiyoung/transformer-xl, pytorch/mem_transformer.py) constructor arguments, submodule names
(qkv_net, r_net, o_net, layer_norm, drop, dropatt; pos_ff.CoreNet, pos_ff.layer_norm;
dec_attn, pos_ff), tensor layout (sequence first: [len, batch, d_model]) and forward arguments,
so weights trained with the original load into them and give the same output. The attention
runs as fastseq.ops.rel_attention: the Lq x Lk score tensors (AC, BD and its _rel_shift copy)
are never materialised.

Differences from the original, all deliberate:
  * the mask: the original's attn_mask (True = hidden, [qlen, klen] or [qlen, klen, batch])
    is accepted and read by the kernel; passing is_causal=True (and window=mem_len for
    same_length) instead describes the usual decoder mask with no mask tensor at all (the fast
    path TransformerXL uses);
  * relative distances with no r row: r holds the embeddings of distances rlen-1 ... 0 (the
    original requires rlen = klen); a negative distance (a key after the query, only visible
    without the causal mask) reads the row of distance 0, where the original reads whatever
    its shift left there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .rel_attention import RelPartialLearnableMultiHeadAttn
from .scripting import RefusesTorchScript
from .state import SlidingKV
from .transformer_xl_decoding import TransformerXLDecodingState, decode_step, position_rows


class PositionwiseFF(nn.Module):
    """The original's feed-forward block: Linear, ReLU, Dropout, Linear, Dropout (CoreNet), with
    a residual connection and layer norm after (or before, pre_lnorm)."""

    def __init__(self, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool = False, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_inner, self.dropout = d_model, d_inner, dropout
        self.CoreNet = nn.Sequential(
            nn.Linear(d_model, d_inner, **factory), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(d_inner, d_model, **factory), nn.Dropout(dropout))
        self.layer_norm = nn.LayerNorm(d_model, **factory)
        self.pre_lnorm = pre_lnorm

    def forward(self, inp: Tensor) -> Tensor:
        if self.pre_lnorm:
            return self.CoreNet(self.layer_norm(inp)) + inp
        return self.layer_norm(inp + self.CoreNet(inp))


class TransformerXLLayer(RefusesTorchScript, nn.Module):
    """The original's RelPartialLearnableDecoderLayer: dec_attn then pos_ff."""

    def __init__(self, n_head: int, d_model: int, d_head: int, d_inner: int, dropout: float,
                 dropatt: float = 0.0, pre_lnorm: bool = False, *, own_biases: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dec_attn = RelPartialLearnableMultiHeadAttn(
            n_head, d_model, d_head, dropout, dropatt, pre_lnorm=pre_lnorm,
            own_biases=own_biases, **factory)
        self.pos_ff = PositionwiseFF(d_model, d_inner, dropout, pre_lnorm, **factory)

    def forward(self, dec_inp: Tensor, r: Tensor, r_w_bias: Optional[Tensor] = None,
                r_r_bias: Optional[Tensor] = None, dec_attn_mask: Optional[Tensor] = None,
                mems: Optional[Tensor] = None, *, is_causal: bool = False,
                window: Optional[int] = None) -> Tensor:
        out = self.dec_attn(dec_inp, r, r_w_bias, r_r_bias, attn_mask=dec_attn_mask, mems=mems,
                            is_causal=is_causal, window=window)
        return self.pos_ff(out)

    def init_state(self, batch_size: int, *, mem_len: int, max_step: int = 1) -> SlidingKV:
        """The step protocol's state: its attention's (RelPartialLearnableMultiHeadAttn)."""
        return self.dec_attn.init_state(batch_size, mem_len=mem_len, max_step=max_step)

    def step(self, dec_inp: Tensor, state: SlidingKV, pos: Tensor,
             r_w_bias: Optional[Tensor] = None, r_r_bias: Optional[Tensor] = None, *,
             window: Optional[int] = None) -> tuple[Tensor, SlidingKV]:
        """forward for new positions against the memory in `state` (see dec_attn.step)."""
        out, state = self.dec_attn.step(dec_inp, state, pos, r_w_bias, r_r_bias, window=window)
        return self.pos_ff(out), state


def decode_segment(model, embedded: Tensor, mems, r_w_bias, r_r_bias, dtype, *, relay=None):
    """One segment through `model`'s decoder stack (its layers, pos_emb, drop, mem_len,
    clamp_len, same_length): embedded [qlen, B, d_model] (before dropout) -> (the last layer's
    output after dropout, hids: the input of every layer, then the last layer's output).
    relay (fastseq.distributed's MemoryRelay, a segment split across ranks): gives each
    layer's memory from its input (relay(i, layer_input)) instead of mems, and its length."""
    qlen = embedded.shape[0]
    mlen = relay.mlen if relay is not None else (mems[0].shape[0] if mems else 0)
    klen = mlen + qlen
    positions = position_rows(klen, model.clamp_len)
    pos_seq = torch.arange(positions - 1, -1, -1.0, device=embedded.device)
    # Rows ordered by distance positions-1 ... 0, as the layers' r (the original's order;
    # distances past clamp_len read the last row, as its clamped pos_seq does).
    pos_emb = model.drop(model.pos_emb(pos_seq).to(dtype))
    core_out = model.drop(embedded)
    window = model.mem_len if model.same_length and model.mem_len > 0 else None
    hids = [core_out]
    for i, layer in enumerate(model.layers):
        memory = relay(i, core_out) if relay is not None else (mems[i] if mems else None)
        core_out = layer(core_out, pos_emb, r_w_bias, r_r_bias, mems=memory, is_causal=True,
                         window=window)
        hids.append(core_out)
    return model.drop(core_out), hids


def updated_mems(hids: list[Tensor], mems, qlen: int, mlen: int, mem_len: int, ext_len: int):
    """The next segment's memories (None without memory): each of hids appended to its memory,
    the last mem_len positions ending ext_len before the segment's end, detached."""
    if mem_len <= 0:
        return None
    end = mlen + max(0, qlen - ext_len)
    begin = max(0, end - mem_len)
    with torch.no_grad():
        return [(torch.cat([mems[i], h], 0) if mems else h)[begin:end].detach()
                for i, h in enumerate(hids)]


class PositionalEmbedding(nn.Module):
    """Sinusoidal embeddings of distances (the original's: [sin | cos] of pos * inv_freq)."""

    def __init__(self, demb: int, device=None) -> None:
        super().__init__()
        self.demb = demb
        inv_freq = 1 / (10000 ** (torch.arange(0.0, demb, 2.0, device=device) / demb))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, pos_seq: Tensor) -> Tensor:
        # In fp32 (fp64 for an fp64 model) whatever the model's dtype: bf16 positions are exact
        # only up to 256.
        dtype = torch.float64 if self.inv_freq.dtype == torch.float64 else torch.float32
        sinusoid = torch.outer(pos_seq.to(dtype), self.inv_freq.to(dtype))
        return torch.cat([sinusoid.sin(), sinusoid.cos()], dim=-1)


class TransformerXL(RefusesTorchScript, nn.Module):
    """Token embedding, sinusoidal relative positions, n_layer TransformerXLLayers, and a
    memory of earlier segments.

    forward(tokens, mems=None) -> (hidden, new_mems). tokens [qlen, B] (or [B, qlen] with
    batch_first=True); hidden [qlen, B, d_model] (or [B, qlen, d_model]). mems: None (no
    memory: the first segment) or the new_mems of the previous call: a list of n_layer tensors,
    the input of each layer over the last mem_len positions, [mlen, B, d_model] (batch first:
    [B, mlen, d_model]), detached: no gradient flows into earlier segments. With mem_len = 0
    new_mems is None. The memory is updated as the original's _update_mems comment intends:
    the last mem_len positions, leaving out the segment's last ext_len (end = mlen +
    max(0, qlen - ext_len)); the original's code passes qlen and mlen swapped to it, so with
    ext_len > 0 its memory ends at qlen + max(0, mlen - ext_len) instead (ext_len = 0, every
    published configuration, gives the same memory both ways).

    Masks: causal over memory and segment, and with same_length=True every query sees the same
    number of keys (a window of mem_len distances). clamp_len > 0 makes distances beyond it
    share the embedding of clamp_len (the op reads clamped rows, so only clamp_len + 1
    position rows are ever embedded and projected).

    A batch whose size differs from the memory's raises ValueError: the memory of stream b
    belongs to stream b, and no rule can guess which streams a smaller last batch continues
    (the original fails with a shape error deep inside torch.cat). Slice the memory yourself
    (mems = [m[:, :B] for m in mems]) when the first B streams continue.

    untie_r: each layer has its own r_w_bias and r_r_bias (else one pair shared by all layers).
    Dropout on the position embeddings acts per distance row (the original draws it per key
    position, so clamped distances there draw separate masks).
    """

    def __init__(self, n_token: int, n_layer: int, n_head: int, d_model: int, d_head: int,
                 d_inner: int, dropout: float = 0.0, dropatt: float = 0.0, mem_len: int = 0,
                 ext_len: int = 0, clamp_len: int = -1, same_length: bool = False,
                 untie_r: bool = False, pre_lnorm: bool = False, batch_first: bool = False, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.n_token, self.n_layer, self.n_head = n_token, n_layer, n_head
        self.d_model, self.d_head = d_model, d_head
        self.mem_len, self.ext_len, self.clamp_len = mem_len, ext_len, clamp_len
        self.same_length, self.untie_r, self.batch_first = same_length, untie_r, batch_first
        self.word_emb = nn.Embedding(n_token, d_model, **factory)
        self.emb_scale = d_model ** 0.5
        self.drop = nn.Dropout(dropout)
        self.pos_emb = PositionalEmbedding(d_model, device=device)
        self.layers = nn.ModuleList(
            TransformerXLLayer(n_head, d_model, d_head, d_inner, dropout, dropatt, pre_lnorm,
                               own_biases=untie_r, **factory) for _ in range(n_layer))
        if not untie_r:
            self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head, **factory))
            self.r_r_bias = nn.Parameter(torch.empty(n_head, d_head, **factory))
            nn.init.normal_(self.r_w_bias, std=0.02)
            nn.init.normal_(self.r_r_bias, std=0.02)

    def forward(self, tokens: Tensor, mems: Optional[list[Tensor]] = None):
        if tokens.dim() != 2:
            raise ValueError(f"TransformerXL: tokens must be 2-D "
                             f"{'[B, qlen]' if self.batch_first else '[qlen, B]'}, got shape "
                             f"{list(tokens.shape)}")
        if self.batch_first:
            tokens = tokens.t()
            mems = None if mems is None else [m.transpose(0, 1) for m in mems]
        qlen, bsz = tokens.shape
        self._check_mems(mems, bsz)
        mlen = mems[0].shape[0] if mems else 0
        # Untied: each layer's own biases (None here makes the layer use them).
        r_w_bias = None if self.untie_r else self.r_w_bias
        r_r_bias = None if self.untie_r else self.r_r_bias
        core_out, hids = decode_segment(self, self.word_emb(tokens) * self.emb_scale, mems,
                                        r_w_bias, r_r_bias, self.word_emb.weight.dtype)
        new_mems = updated_mems(hids[:-1], mems, qlen, mlen, self.mem_len, self.ext_len)
        if self.batch_first:
            core_out = core_out.transpose(0, 1)
            new_mems = None if new_mems is None else [m.transpose(0, 1) for m in new_mems]
        return core_out, new_mems

    def _check_mems(self, mems, bsz: int) -> None:
        if mems is None:
            return
        if len(mems) != self.n_layer:
            raise ValueError(f"TransformerXL: mems must hold one tensor per layer "
                             f"({self.n_layer}), got {len(mems)}")
        for i, m in enumerate(mems):
            if m.dim() != 3 or m.shape[2] != self.d_model:
                raise ValueError(f"TransformerXL: mems[{i}] must be [mlen, B, d_model="
                                 f"{self.d_model}] (batch first: [B, mlen, d_model]), got "
                                 f"{list(m.shape)}")
            if m.shape[0] and m.shape[1] != bsz:
                raise ValueError(
                    f"TransformerXL: mems[{i}] holds {m.shape[1]} streams but tokens have "
                    f"{bsz}: the memory of stream b belongs to stream b. If the first {bsz} "
                    f"streams continue, pass mems = [m[:, :{bsz}] for m in mems] "
                    f"([m[:{bsz}] ...] with batch_first); to start afresh pass mems=None")

    def init_state(self, batch_size: int, *, max_step: int = 1,
                   mem_len: Optional[int] = None) -> TransformerXLDecodingState:
        """The step protocol's state (fastseq.nn.state): every layer's keys and values of the
        last mem_len positions (default the model's), for steps of up to max_step tokens."""
        return TransformerXLDecodingState(self, batch_size, max_step=max_step, mem_len=mem_len)

    decoding_state = init_state  # the name generation code used first

    @torch.no_grad()
    def step(self, tokens: Tensor, state: TransformerXLDecodingState
             ) -> tuple[Tensor, TransformerXLDecodingState]:
        """forward for new tokens [L <= max_step, B] ([B, L] with batch_first) against the
        memory kept in `state`: the hidden states of those positions, and the state (updated
        in place)."""
        if self.batch_first:
            tokens = tokens.t()
        hidden = decode_step(self, self.word_emb(tokens) * self.emb_scale, state)
        return (hidden.transpose(0, 1) if self.batch_first else hidden), state

    def init_mems(self) -> None:
        """The first segment's memory: none (the original returns empty tensors; None reads the
        same here)."""
        return None
