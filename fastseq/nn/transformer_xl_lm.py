"""fastseq.nn.TransformerXLLM: the original Transformer-XL language model (kimiyoung/
transformer-xl, pytorch/mem_transformer.py, MemTransformerLM with attn_type=0) on fastseq's
relative attention, with its constructor arguments, its state_dict keys (a checkpoint of the
original loads with strict=True) and both call forms:

    loss, *new_mems = model(data, target, *mems)          # the original's: loss [tgt_len, B]
    loss, new_mems = model(tokens, targets=t, mems=m)     # keyword form: loss [tgt_len, B]
    log_probs, new_mems = model(tokens, mems=m)           # no targets: [qlen, B, n_token]

Tensors are sequence first ([len, B]) as the original's. The loss is the NLL of each target
(sum or average it): by token in the keyword form; in the original's form as the original
gives it, grouped by adaptive-softmax cluster unless crit.keep_order (same sum and mean). Memories are the original's n_layer+1
tensors [mlen, B, d_model] (the input of each layer, then the last layer's output, which the
original keeps and nothing reads); init_mems() gives its empty ones. new_mems are detached.

The memory update keeps what the original's _update_mems comment intends: the last mem_len
positions up to ext_len before the end of the segment (end = mlen + max(0, qlen - ext_len)).
The original's code passes qlen and mlen swapped to it, so with ext_len > 0 its memory ends
at qlen + max(0, mlen - ext_len) instead; with ext_len = 0 (every published configuration)
the two agree.

Generation: model.generate(prompt [P, B], max_new_tokens) runs the prompt as one segment, then
one token a step against a preallocated memory of each layer's keys and values
(fastseq.nn.TransformerXLDecodingState: no torch.cat per step, the memory's last mem_len
positions, mem_len= overrides the model's); greedy or sampled (temperature, top_k, a
torch.Generator). With a memory as long as the context it equals the teacher-forced forward.

The head's loss (fastseq.nn.ProjectedAdaptiveLogSoftmax) runs over chunks of tokens, never
the whole [tokens, vocabulary] logits. sample_softmax and attn_type other than 0 are refused.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax
from .scripting import RefusesTorchScript
from .transformer_xl import (PositionalEmbedding, TransformerXLLayer, decode_segment,
                             updated_mems)
from .transformer_xl_decoding import TransformerXLDecodingState, decode_step
from ..ops._checks import InputError


class TransformerXLLM(RefusesTorchScript, nn.Module):
    def __init__(self, n_token: int, n_layer: int, n_head: int, d_model: int, d_head: int,
                 d_inner: int, dropout: float, dropatt: float, tie_weight: bool = True,
                 d_embed: Optional[int] = None, div_val: int = 1,
                 tie_projs: Sequence[bool] = (False,), pre_lnorm: bool = False,
                 tgt_len: Optional[int] = None, ext_len: Optional[int] = None,
                 mem_len: Optional[int] = None, cutoffs: Sequence[int] = (),
                 adapt_inp: bool = False, same_length: bool = False, attn_type: int = 0,
                 clamp_len: int = -1, sample_softmax: int = -1, *,
                 chunk_tokens: Optional[int] = None, device=None, dtype=None) -> None:
        super().__init__()
        if attn_type != 0:
            raise NotImplementedError(
                f"fastseq.nn.TransformerXLLM: attn_type={attn_type} is not implemented; "
                "attn_type=0 (relative positions with learnable biases, the paper's model) is")
        if sample_softmax > 0:
            raise NotImplementedError(
                "fastseq.nn.TransformerXLLM: sample_softmax > 0 is not supported; the full "
                "adaptive softmax (sample_softmax=-1) runs in chunks, never holding all logits")
        factory = {"device": device, "dtype": dtype}
        d_embed = d_model if d_embed is None else d_embed
        self.n_token, self.n_layer, self.n_head = n_token, n_layer, n_head
        self.d_model, self.d_head, self.d_embed = d_model, d_head, d_embed
        self.tgt_len, self.ext_len, self.mem_len = tgt_len, ext_len or 0, mem_len or 0
        self.same_length, self.clamp_len, self.attn_type = same_length, clamp_len, attn_type
        self.sample_softmax = sample_softmax
        self.word_emb = AdaptiveEmbedding(n_token, d_embed, d_model, cutoffs, div_val=div_val,
                                          **factory)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerXLLayer(n_head, d_model, d_head, d_inner, dropout, dropatt, pre_lnorm,
                               **factory) for _ in range(n_layer))
        self.crit = ProjectedAdaptiveLogSoftmax(n_token, d_embed, d_model, cutoffs,
                                                div_val=div_val, chunk_tokens=chunk_tokens,
                                                **factory)
        if tie_weight:
            for i, layer in enumerate(self.crit.out_layers):
                layer.weight = self.word_emb.emb_layers[i].weight
        for i, tie in enumerate(tie_projs):
            if tie and div_val == 1 and d_model != d_embed:
                self.crit.out_projs[i] = self.word_emb.emb_projs[0]
            elif tie and div_val != 1:
                self.crit.out_projs[i] = self.word_emb.emb_projs[i]
        self.pos_emb = PositionalEmbedding(d_model, device=device)
        self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head, **factory))
        self.r_r_bias = nn.Parameter(torch.empty(n_head, d_head, **factory))
        nn.init.normal_(self.r_w_bias, std=0.02)
        nn.init.normal_(self.r_r_bias, std=0.02)

    def init_mems(self) -> Optional[list[Tensor]]:
        """The original's first memories: n_layer + 1 empty tensors (None without memory)."""
        if self.mem_len <= 0:
            return None
        param = self.r_w_bias
        return [param.new_empty(0) for _ in range(self.n_layer + 1)]

    def forward(self, data: Tensor, target: Optional[Tensor] = None, *original_mems: Tensor,
                targets: Optional[Tensor] = None, mems: Optional[Sequence[Tensor]] = None):
        if target is not None or original_mems:  # the original's call form
            if targets is not None or mems is not None:
                raise TypeError("fastseq.nn.TransformerXLLM: pass target and memories "
                                "positionally (the original's form) or targets=/mems= (the "
                                "keyword form), not both")
            if target is None:
                raise TypeError("fastseq.nn.TransformerXLLM: the original's form is "
                                "forward(data, target, *mems)")
            loss, new_mems = self._loss_and_mems(data, target, list(original_mems) or None,
                                                 keep_order=False)
            return [loss] if new_mems is None else [loss, *new_mems]
        if targets is not None:
            return self._loss_and_mems(data, targets, mems, keep_order=True)
        hidden, new_mems = self._hidden(data, mems)
        log_probs = self.crit.log_prob(hidden.reshape(-1, self.d_model))
        return log_probs.view(*hidden.shape[:2], self.n_token), new_mems

    def init_state(self, batch_size: int, *, max_step: int = 1,
                   mem_len: Optional[int] = None) -> TransformerXLDecodingState:
        """The step protocol's state (fastseq.nn.state): every layer's keys and values of the
        last mem_len positions (default the model's), for steps of up to max_step tokens."""
        return TransformerXLDecodingState(self, batch_size, max_step=max_step, mem_len=mem_len)

    decoding_state = init_state  # the name generation code used first

    @torch.no_grad()
    def step(self, tokens: Tensor, state: TransformerXLDecodingState
             ) -> tuple[Tensor, TransformerXLDecodingState]:
        """New tokens [L <= max_step, B] against the memory in `state` -> (log-probabilities of
        the next token at each [L, B, n_token], the state, updated in place)."""
        hidden = decode_step(self, self.word_emb(tokens), state)
        log_probs = self.crit.log_prob(hidden.reshape(-1, self.d_model))
        return log_probs.view(*hidden.shape[:2], self.n_token), state

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None,
                 mem_len: Optional[int] = None) -> Tensor:
        """prompt [P >= 1, B] token ids -> [P + max_new_tokens, B]: the prompt, then each new
        token the argmax of the model's next-token distribution (do_sample=False) or a draw
        from it at `temperature`, restricted to the top_k most likely (do_sample=True; draws
        from `generator`). The prompt runs as one segment, each new token as its own, against
        the last mem_len positions (default: the model's mem_len)."""
        check_generation_args("fastseq.nn.TransformerXLLM.generate", prompt, 0, "[P >= 1, B]",
                              max_new_tokens, do_sample, temperature, top_k)
        state = self.decoding_state(prompt.shape[1], max_step=prompt.shape[0], mem_len=mem_len)
        tokens = torch.empty(prompt.shape[0] + max_new_tokens, prompt.shape[1],
                             dtype=prompt.dtype, device=prompt.device)
        tokens[:prompt.shape[0]] = prompt
        hidden = state.step(self.word_emb(prompt))[-1]
        for t in range(prompt.shape[0], tokens.shape[0]):
            log_probs = self.crit.log_prob(hidden)
            tokens[t] = _next_token(log_probs, do_sample, temperature, top_k, generator)
            if t + 1 < tokens.shape[0]:
                hidden = state.step(self.word_emb(tokens[t:t + 1]))[-1]
        return tokens

    def _loss_and_mems(self, data: Tensor, target: Tensor, mems, keep_order: bool):
        if target.dim() != 2 or target.shape[1] != data.shape[1] or \
                target.shape[0] > data.shape[0]:
            raise ValueError(f"fastseq.nn.TransformerXLLM: target must be [tgt_len <= "
                             f"{data.shape[0]}, B={data.shape[1]}], got {list(target.shape)}")
        hidden, new_mems = self._hidden(data, mems)
        tgt_len = target.shape[0]
        predicted = hidden[-tgt_len:].reshape(-1, self.d_model)
        loss = self.crit(predicted, target.reshape(-1), keep_order=keep_order).view(tgt_len, -1)
        return loss, new_mems

    def _hidden(self, data: Tensor, mems):
        if data.dim() != 2:
            raise ValueError(f"fastseq.nn.TransformerXLLM: data must be [qlen, B], got shape "
                             f"{list(data.shape)}")
        qlen, bsz = data.shape
        mems = self._checked_mems(mems, bsz)
        mlen = mems[0].shape[0] if mems else 0
        core_out, hids = decode_segment(self, self.word_emb(data), mems, self.r_w_bias,
                                        self.r_r_bias, self.r_w_bias.dtype)
        # The original keeps n_layer + 1 memories: every layer's input and the last output.
        return core_out, updated_mems(hids, mems, qlen, mlen, self.mem_len, self.ext_len)

    def _checked_mems(self, mems, bsz: int):
        if mems is None or all(m.numel() == 0 for m in mems):
            return None
        if len(mems) != self.n_layer + 1:
            raise ValueError(f"fastseq.nn.TransformerXLLM: mems must hold n_layer + 1 = "
                             f"{self.n_layer + 1} tensors (the original's format: init_mems()),"
                             f" got {len(mems)}")
        for i, m in enumerate(mems):
            if m.dim() != 3 or m.shape[1:] != (bsz, self.d_model) or \
                    m.shape[0] != mems[0].shape[0]:
                raise ValueError(f"fastseq.nn.TransformerXLLM: mems[{i}] must be [mlen, B={bsz}"
                                 f", d_model={self.d_model}] like mems[0], got {list(m.shape)}")
        return list(mems)


def check_generation_args(owner: str, prompt: Tensor, length_dim: int, spelled: str,
                          max_new_tokens, do_sample: bool, temperature, top_k) -> None:
    """The generate() arguments of fastseq's language models: integer token ids with at least
    one prompt token along length_dim (spelled: the expected shape in words), a count of new
    tokens, and sampling settings that define a distribution."""
    if prompt.dim() != 2 or prompt.shape[length_dim] == 0 or \
            prompt.dtype not in (torch.int32, torch.int64):
        raise InputError(f"{owner}: prompt must be integer token ids {spelled}, got "
                         f"{prompt.dtype} of shape {list(prompt.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 0:
        raise InputError(f"{owner}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and (not temperature > 0 or (top_k is not None and top_k < 1)):
        raise InputError(f"{owner}: sampling needs temperature > 0 and top_k None or >= 1, got "
                         f"{temperature!r}, {top_k!r}")


def _next_token(log_probs: Tensor, do_sample: bool, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> Tensor:
    """[B] token ids from next-token log-probabilities [B, V]."""
    if not do_sample:
        return log_probs.argmax(-1)
    scores = log_probs.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)
