"""RelPartialLearnableMultiHeadAttn: Transformer-XL's relative-position attention layer (Dai et al.
2019) on fastseq.ops.rel_attention, with the original code's (kimiyoung/transformer-xl,
pytorch/mem_transformer.py) constructor arguments, submodule names (qkv_net, r_net, o_net,
layer_norm, drop, dropatt), sequence-first layout and forward arguments, so its weights load
unchanged. The models built on it (TransformerXLLayer, TransformerXL) are in transformer_xl.py;
what differs from the original is listed there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops._checks import InputError, check_like_parameters
from ..ops.rel_attention import rel_attention
from .scripting import RefusesTorchScript
from .state import SlidingKV


class RelPartialLearnableMultiHeadAttn(RefusesTorchScript, nn.Module):
    """Relative multi-head attention with the learnable biases u (r_w_bias) and v (r_r_bias).

    forward(w [qlen, B, d_model], r [rlen, (1,) d_model], r_w_bias, r_r_bias [n_head, d_head],
    attn_mask=None, mems [mlen, B, d_model] or None) -> [qlen, B, d_model]. With
    own_biases=True the module holds its own r_w_bias and r_r_bias (the untied variant) and
    uses them when forward gets None. tgt_len, ext_len and mem_len are accepted for the
    original's signature and unused (as there)."""

    def __init__(self, n_head: int, d_model: int, d_head: int, dropout: float,
                 dropatt: float = 0.0, tgt_len=None, ext_len=None, mem_len=None,
                 pre_lnorm: bool = False, *, own_biases: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.n_head, self.d_model, self.d_head = n_head, d_model, d_head
        self.dropout = dropout
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False, **factory)
        self.drop = nn.Dropout(dropout)
        self.dropatt = nn.Dropout(dropatt)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False, **factory)
        self.layer_norm = nn.LayerNorm(d_model, **factory)
        self.scale = 1 / (d_head ** 0.5)
        self.pre_lnorm = pre_lnorm
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False, **factory)
        if own_biases:
            self.r_w_bias = nn.Parameter(torch.zeros(n_head, d_head, **factory))
            self.r_r_bias = nn.Parameter(torch.zeros(n_head, d_head, **factory))
            nn.init.normal_(self.r_w_bias, std=0.02)
            nn.init.normal_(self.r_r_bias, std=0.02)

    def forward(self, w: Tensor, r: Tensor, r_w_bias: Optional[Tensor] = None,
                r_r_bias: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                mems: Optional[Tensor] = None, *, is_causal: bool = False,
                window: Optional[int] = None) -> Tensor:
        qlen = w.shape[0]
        if r_w_bias is None or r_r_bias is None:
            if not hasattr(self, "r_w_bias"):
                raise ValueError("RelPartialLearnableMultiHeadAttn: r_w_bias and r_r_bias are "
                                 "needed (or construct the module with own_biases=True)")
            r_w_bias, r_r_bias = self.r_w_bias, self.r_r_bias
        self._check_inputs(w, r, r_w_bias, r_r_bias, attn_mask, mems)
        cat = w if mems is None or mems.shape[0] == 0 else torch.cat([mems, w], 0)
        heads = self._heads(cat)
        # [len, B, H, D] buffers seen as [B, H, len, D] (strided views: the kernel takes strides)
        query = heads[-qlen:, :, 0].permute(1, 2, 0, 3)
        key = heads[:, :, 1].permute(1, 2, 0, 3)
        value = heads[:, :, 2].permute(1, 2, 0, 3)
        # r is ordered by distance rlen-1 ... 0; the op's pos by distance 0 ... P-1.
        pos = self.position_rows(r.reshape(r.shape[0], self.d_model)).flip(0)
        attn_vec = rel_attention(
            query, key, value, pos, r_w_bias, r_r_bias, attn_mask=_visible(attn_mask),
            is_causal=is_causal, window=window,
            dropout_p=self.dropatt.p if self.training else 0.0, scale=self.scale)
        return self._output(w, attn_vec)

    def _heads(self, x: Tensor) -> Tensor:
        """q, k and v of every position of x [len, B, d_model]: [len, B, 3, n_head, d_head]."""
        heads = self.qkv_net(self.layer_norm(x) if self.pre_lnorm else x)
        return heads.view(x.shape[0], x.shape[1], 3, self.n_head, self.d_head)

    def position_rows(self, embedded: Tensor) -> Tensor:
        """r_net of position embeddings [P, d_model]: the attention's pos rows [P, n_head,
        d_head], in the order given."""
        return self.r_net(embedded).view(embedded.shape[0], self.n_head, self.d_head)

    def _output(self, w: Tensor, attn_vec: Tensor) -> Tensor:
        """The block after the attention: heads [B, H, qlen, D] joined, o_net, dropout, the
        residual and layer norm (after, or before in pre_lnorm)."""
        qlen, bsz = w.shape[0], w.shape[1]
        attn_vec = attn_vec.permute(2, 0, 1, 3).reshape(qlen, bsz, self.n_head * self.d_head)
        attn_out = self.drop(self.o_net(attn_vec))
        return w + attn_out if self.pre_lnorm else self.layer_norm(w + attn_out)

    def init_state(self, batch_size: int, *, mem_len: int, max_step: int = 1) -> SlidingKV:
        """The step protocol's state (fastseq.nn.state): this layer's keys and values of the
        last mem_len positions, preallocated for steps of up to max_step positions."""
        like = self.qkv_net.weight
        return SlidingKV(like, batch_size, self.n_head, self.d_head, self.d_head, mem_len,
                         max_step)

    def step(self, w: Tensor, state: SlidingKV, pos: Tensor, r_w_bias: Optional[Tensor] = None,
             r_r_bias: Optional[Tensor] = None, *, window: Optional[int] = None
             ) -> tuple[Tensor, SlidingKV]:
        """forward for the new positions w [rows, B, d_model] against the memory kept in
        `state` (their keys and values are appended to it): causal, pos the attention's rows
        [P >= kept + rows, n_head, d_head] by distance 0 ... P-1 (position_rows of the
        embeddings)."""
        if r_w_bias is None or r_r_bias is None:
            r_w_bias, r_r_bias = self.r_w_bias, self.r_r_bias
        heads = self._heads(w)
        keys, values = state.append(heads[:, :, 1].permute(1, 2, 0, 3),
                                    heads[:, :, 2].permute(1, 2, 0, 3))
        attn_vec = rel_attention(heads[:, :, 0].permute(1, 2, 0, 3), keys, values,
                                 pos[:keys.shape[2]], r_w_bias, r_r_bias, is_causal=True,
                                 window=window, scale=self.scale)
        return self._output(w, attn_vec), state

    def _check_inputs(self, w, r, r_w_bias, r_r_bias, attn_mask, mems) -> None:
        """Shapes, dtypes and devices in the layer's own terms (otherwise a wrong width fails
        inside a GEMM, a wrong memory batch inside torch.cat)."""
        name, d_model = type(self).__name__, self.d_model
        if w.dim() != 3 or w.shape[-1] != d_model:
            raise InputError(f"{name}: w must be [qlen, batch, d_model={d_model}], got shape "
                             f"{list(w.shape)}")
        if r.dim() not in (2, 3) or r.shape[0] == 0 or r.shape[-1] != d_model or \
                (r.dim() == 3 and r.shape[1] != 1):
            raise InputError(f"{name}: r must be [rlen >= 1, d_model={d_model}] or [rlen, 1, "
                             f"d_model], got shape {list(r.shape)}")
        if mems is not None and mems.numel() and (mems.dim() != 3 or mems.shape[1:] != w.shape[1:]):
            raise InputError(f"{name}: mems must be [mlen, batch={w.shape[1]}, "
                             f"d_model={d_model}], got shape {list(mems.shape)}")
        heads = (self.n_head, self.d_head)
        for bias_name, bias in (("r_w_bias", r_w_bias), ("r_r_bias", r_r_bias)):
            if bias.shape != heads:
                raise InputError(f"{name}: {bias_name} must be [n_head, d_head] = {list(heads)}, "
                                 f"got {list(bias.shape)}")
        klen = w.shape[0] + (mems.shape[0] if mems is not None and mems.numel() else 0)
        if attn_mask is not None and (attn_mask.dim() not in (2, 3) or
                                      attn_mask.shape[:2] != (w.shape[0], klen) or
                                      (attn_mask.dim() == 3 and attn_mask.shape[2] not in
                                       (1, w.shape[1]))):
            raise InputError(f"{name}: attn_mask must be [qlen, klen] = {[w.shape[0], klen]} or "
                             f"[qlen, klen, batch] (nonzero hides), got {list(attn_mask.shape)}")
        for arg_name, t in (("w", w), ("r", r), ("mems", mems)):
            if t is not None:
                check_like_parameters(name, arg_name, t, self.qkv_net.weight)


def _visible(attn_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The original's mask (nonzero = hidden; [qlen, klen] or [qlen, klen, batch]) as the op's
    bool mask (True = visible), broadcastable to [B, H, qlen, klen]."""
    if attn_mask is None:
        return None
    visible = attn_mask == 0
    if visible.dim() == 3:
        visible = visible.permute(2, 0, 1).unsqueeze(1)
    return visible
