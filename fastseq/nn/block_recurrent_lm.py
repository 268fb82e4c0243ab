"""The Block-Recurrent Transformer language model: embedding, a stack of sliding-window layers
of which some are recurrent (the original's recurrent_layer_indices, (-3,) by default: the
third layer from the top), the original's final T5 LayerNorm, and the Transformer-XL LM's
(adaptive) softmax with its chunked loss.

`forward(tokens [B, T], memory=None, targets=None)` returns (log-probabilities [B, T, V], memory)
or, with targets [B, T], (per-token losses [B, T], memory). The memory (every layer's
BlockRecurrentMemory) comes back detached: training is truncated backpropagation per segment,
as the paper's (and Transformer-XL's memories), the state flowing forward across segments.
Generation is the step protocol: `init_state(batch)`, `step(tokens, state)`, `generate(...)`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops._checks import InputError
from .adaptive import ProjectedAdaptiveLogSoftmax
from .block_recurrent import BlockRecurrentMemory, BlockRecurrentTransformerLayer, T5LayerNorm
from .scripting import RefusesTorchScript
from .transformer_xl_lm import _next_token, check_generation_args


class BlockRecurrentTransformerLM(RefusesTorchScript, nn.Module):
    def __init__(self, n_token: int, n_layer: int, d_model: int, heads: int, head_dim: int,
                 mlp_dim: int, window: int, num_states: int, *,
                 recurrent_layers: Sequence[int] = (-3,), gate: str = "bias",
                 configuration: str = "dual", dropout: float = 0.0,
                 cutoffs: Sequence[int] = (), tie_weight: bool = False,
                 chunk_tokens: Optional[int] = None, backend: Optional[str] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        recurrent = {i % n_layer for i in recurrent_layers} if n_layer else set()
        if any(not -n_layer <= i < n_layer for i in recurrent_layers):
            raise InputError(f"fastseq.nn.BlockRecurrentTransformerLM: recurrent_layers must "
                             f"index the {n_layer} layers, got {tuple(recurrent_layers)}")
        self.n_token, self.d_model, self.window = n_token, d_model, window
        self.recurrent_layers = tuple(sorted(recurrent))
        self.embedding = nn.Embedding(n_token, d_model, **factory)
        nn.init.normal_(self.embedding.weight, std=1.0)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            BlockRecurrentTransformerLayer(d_model, heads, head_dim, mlp_dim, window,
                                           num_states if i in recurrent else 0, gate=gate,
                                           configuration=configuration, dropout=dropout,
                                           backend=backend, **factory)
            for i in range(n_layer))
        self.final_norm = T5LayerNorm(d_model, **factory)
        self.crit = ProjectedAdaptiveLogSoftmax(n_token, d_model, d_model, cutoffs,
                                                chunk_tokens=chunk_tokens, **factory)
        if tie_weight:  # one output layer over the whole vocabulary (div_val 1): [V, d]
            self.crit.out_layers[0].weight = self.embedding.weight

    def init_state(self, batch_size: int) -> list[BlockRecurrentMemory]:
        """The memory at the start of a document (the step protocol's state)."""
        return [layer.init_state(batch_size) for layer in self.layers]

    def forward(self, tokens: Tensor, memory: Optional[list[BlockRecurrentMemory]] = None,
                targets: Optional[Tensor] = None):
        hidden, memory = self._hidden(tokens, memory)
        if targets is not None:
            if targets.shape != tokens.shape:
                raise InputError(f"fastseq.nn.BlockRecurrentTransformerLM: targets must be "
                                 f"[B, T] = {list(tokens.shape)} like tokens, got "
                                 f"{list(targets.shape)}")
            loss = self.crit(hidden.reshape(-1, self.d_model), targets.reshape(-1),
                             keep_order=True)
            return loss.view(targets.shape), memory
        log_probs = self.crit.log_prob(hidden.reshape(-1, self.d_model))
        return log_probs.view(*tokens.shape, self.n_token), memory

    @torch.no_grad()
    def step(self, tokens: Tensor, state: list[BlockRecurrentMemory]):
        """New tokens [B, n] after the memory -> (log-probabilities of the next token at each
        [B, n, V], the memory). Equal to the forward over the whole sequence."""
        return self.forward(tokens, state)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """prompt [B, P >= 1] -> [B, P + max_new_tokens]: the prompt as one segment, then each
        new token (argmax, or a draw at `temperature` from the top_k) as its own; the states
        update as blocks complete."""
        check_generation_args("fastseq.nn.BlockRecurrentTransformerLM.generate", prompt, 1,
                              "[B, P >= 1]", max_new_tokens, do_sample, temperature, top_k)
        tokens = [prompt]
        log_probs, state = self.step(prompt, self.init_state(prompt.shape[0]))
        for t in range(max_new_tokens):
            new = _next_token(log_probs[:, -1], do_sample, temperature, top_k, generator)
            tokens.append(new[:, None])
            if t + 1 < max_new_tokens:
                log_probs, state = self.step(new[:, None], state)
        return torch.cat(tokens, dim=1)

    def _hidden(self, tokens: Tensor, memory):
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise InputError(f"fastseq.nn.BlockRecurrentTransformerLM: tokens must be integer "
                             f"ids [B, T], got {tokens.dtype} of shape {list(tokens.shape)}")
        if memory is not None and len(memory) != len(self.layers):
            raise InputError(f"fastseq.nn.BlockRecurrentTransformerLM: memory must hold one "
                             f"BlockRecurrentMemory per layer ({len(self.layers)}), got "
                             f"{len(memory)}")
        x = self.drop(self.embedding(tokens))
        new_memory = []
        for i, layer in enumerate(self.layers):
            x, carried = layer(x, None if memory is None else memory[i])
            new_memory.append(BlockRecurrentMemory(*(
                t.detach() if t is not None else None for t in carried)))
        return self.drop(self.final_norm(x)), new_memory
