"""The registered decode ops (torch.ops.fastseq.attention_decode_triton and
kv_cache_append_triton): custom ops around kernels/kv_cache/launch.py and their fakes.
Forward only: a decode step has no backward (fastseq.ops.attention_with_kv_cache refuses
inputs that require grad; fastseq.ops.attention takes this path only when none does), and the
vmap rule runs the op per slice as the other ops' do.

Tensors here are in the kernels' layout: q [B, Hq, Lq, E], caches [B, Hk, S_max, E|EV],
kv_len / cache_len int32 [B] on the same device. The public functions validate.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.limits import accumulator_dtype
from ._registration import triton_custom_op, vmap_by_slices

DECODE = "fastseq::attention_decode_triton"
APPEND = "fastseq::kv_cache_append_triton"


@triton_custom_op(DECODE)
def attention_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor,
                            is_causal: bool, causal_offset: int, window: int, scale: float
                            ) -> tuple[Tensor, Tensor]:
    from ..kernels.kv_cache import launch as decode_launch  # Triton is imported with the first launch

    return decode_launch.attention_decode(q, k_cache, v_cache, kv_len, is_causal,
                                          causal_offset, window, scale)


@triton_custom_op(APPEND, mutates_args=("k_cache", "v_cache"))
def kv_cache_append_triton(k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor,
                           cache_len: Tensor) -> None:
    from ..kernels.kv_cache import launch as decode_launch  # Triton is imported with the first launch

    decode_launch.kv_cache_append(k_cache, v_cache, key, value, cache_len)


@torch.library.register_fake(DECODE)
def _decode_fake(q, k_cache, v_cache, kv_len, is_causal, causal_offset, window, scale):
    B, H, L, _ = q.shape
    return (q.new_empty(B, H, L, v_cache.shape[3]),
            q.new_empty(B, H, L, dtype=accumulator_dtype(q.dtype)))


@torch.library.register_fake(APPEND)
def _append_fake(k_cache, v_cache, key, value, cache_len):
    return None


torch.library.register_vmap(DECODE, vmap_by_slices(DECODE))
