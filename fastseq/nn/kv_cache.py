"""fastseq.nn.KVCache: one attention layer's preallocated keys and values for generation, and
the lengths of its rows, stepped by fastseq.ops.attention_with_kv_cache.

    cache = fastseq.nn.KVCache(batch, kv_heads, capacity, head_dim, dtype=..., device=...)
    out = cache(q_prompt, k_prompt, v_prompt)         # prefill: the prompt's rows, causal
    cache.reset(prompt_lengths)                       # ragged prompts padded on the right
    for step in range(n):
        out = cache(q, k, v)                          # append the step's rows and attend

Overflow is refused on the host with no sync: the cache keeps an upper bound of its rows'
lengths in Python (exact where the lengths came from Python or a CPU tensor; one sync in
reset() when they come as a CUDA tensor, once per prompt). Inside a captured CUDA graph the
Python bookkeeping runs at capture only: a replayed step advances `lengths` on the device (the
in-place add is captured) but not the host bound, so a graph-driven loop keeps its own count;
the kernels never write outside the cache whatever the lengths.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..ops._checks import InputError
from ..ops.kv_cache import attention_with_kv_cache
from .scripting import RefusesTorchScript

OP = "fastseq.nn.KVCache"


class KVCache(RefusesTorchScript, nn.Module):
    """Keys [B, Hk, capacity, head_dim] and values [B, Hk, capacity, value_dim] (buffers, not
    saved in the state_dict; .to() moves them), and `lengths` [B] int32: how many positions of
    each row are filled."""

    def __init__(self, batch_size: int, num_kv_heads: int, capacity: int, head_dim: int,
                 value_dim: Optional[int] = None, *, dtype: Optional[torch.dtype] = None,
                 device=None):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                            ("capacity", capacity), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{OP}: {name} must be a positive int, got {value!r}")
        value_dim = head_dim if value_dim is None else value_dim
        factory = {"dtype": dtype, "device": device}
        self.register_buffer("k", torch.zeros(batch_size, num_kv_heads, capacity, head_dim,
                                              **factory), persistent=False)
        self.register_buffer("v", torch.zeros(batch_size, num_kv_heads, capacity, value_dim,
                                              **factory), persistent=False)
        self.register_buffer("lengths", torch.zeros(batch_size, dtype=torch.int32,
                                                    device=device), persistent=False)
        self.max_length = 0  # host-side upper bound of lengths

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reset(self, lengths: Union[int, Sequence[int], Tensor, None] = None) -> None:
        """Set every row's filled length (0 by default): after a padded prefill, the rows'
        real prompt lengths, so each row's next key lands right after its own prompt."""
        if lengths is None:
            lengths = 0
        if isinstance(lengths, int):
            values = torch.full_like(self.lengths, lengths)
        else:
            values = torch.as_tensor(lengths)
            if values.shape != self.lengths.shape or values.is_floating_point():
                raise InputError(f"{OP}.reset: lengths must be an int or {self.lengths.numel()} "
                                 f"integers (one per row), got {values.dtype} of shape "
                                 f"{list(values.shape)}")
        bound = int(values.max()) if values.numel() else 0  # one sync for a CUDA tensor
        smallest = int(values.min()) if values.numel() else 0
        if smallest < 0 or bound > self.capacity:
            raise InputError(f"{OP}.reset: lengths must lie in [0, {self.capacity}], got "
                             f"{values.tolist()}")
        self.lengths.copy_(values)
        self.max_length = bound

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *, is_causal: bool = True,
                window: Optional[int] = None, scale: Optional[float] = None,
                backend: Optional[str] = None, **extras) -> Tensor:
        """Append key/value [B, Hk, Lnew, *] at each row's length, attend query
        [B, Hq, Lq, head_dim] to the filled cache, advance the lengths. Returns
        [B, Hq, Lq, value_dim]. extras: attention_with_kv_cache's keyword arguments for the
        step (softcap, alibi_slopes, sinks, cache_leftpad, rotary_cos/rotary_sin...)."""
        new = key.shape[2] if isinstance(key, Tensor) and key.dim() == 4 else 0
        if self.max_length + new > self.capacity:
            raise InputError(f"{OP}: cache overflow: rows hold up to {self.max_length} of "
                             f"{self.capacity} positions, {new} more do not fit (allocate a "
                             f"larger capacity, or reset() to start over)")
        out = attention_with_kv_cache(query, self.k, self.v, self.lengths, key, value,
                                      is_causal=is_causal, window=window, scale=scale,
                                      backend=backend, **extras)
        self.lengths.add_(new)
        self.max_length += new
        return out

    def extra_repr(self) -> str:
        B, H, S, E = self.k.shape
        return (f"batch_size={B}, num_kv_heads={H}, capacity={S}, head_dim={E}, "
                f"value_dim={self.v.shape[3]}, dtype={self.k.dtype}")
