"""The registered decode ops (torch.ops.fastseq.attention_decode_triton and
kv_cache_append_triton): custom ops around kernels/kv_cache/launch.py and their fakes.
Forward only: a decode step has no backward (fastseq.ops.attention_with_kv_cache refuses
inputs that require grad; fastseq.ops.attention takes this path only when none does), and the
vmap rule runs the op per slice as the other ops' do.

Tensors here are in the kernels' layout: q [B, Hq, Lq, E], caches [B, Hk, S_max, E|EV] (paged:
the pool [pages, Hk, page_size, E|EV] with block_table int32 [rows, pages per row]),
kv_len / cache_len / key_start / batch_index / rotary_pos int32 [B] on the same device,
alibi_slopes fp32 [Hq] or [B, Hq], sinks fp32 [Hq], rotary_cos/sin fp32
[positions, rotary_dim / 2]. The public functions validate.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.limits import accumulator_dtype
from ._registration import triton_custom_op, vmap_by_slices

DECODE = "fastseq::attention_decode_triton"
APPEND = "fastseq::kv_cache_append_triton"


@triton_custom_op(DECODE)
def attention_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor,
                            is_causal: bool, causal_offset: int, window: int, scale: float,
                            key_start: Optional[Tensor] = None,
                            batch_index: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None,
                            alibi_slopes: Optional[Tensor] = None,
                            sinks: Optional[Tensor] = None, rotary_pos: Optional[Tensor] = None,
                            rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, softcap: float = 0.0,
                            rotary_interleaved: bool = False) -> tuple[Tensor, Tensor]:
    from ..kernels.kv_cache import launch as decode_launch  # Triton is imported with the first launch

    extras = decode_launch.DecodeExtras(
        key_start=key_start, batch_index=batch_index, block_table=block_table, softcap=softcap,
        alibi=alibi_slopes, sinks=sinks, rotary_pos=rotary_pos, cos=rotary_cos, sin=rotary_sin,
        interleaved=rotary_interleaved)
    return decode_launch.attention_decode(q, k_cache, v_cache, kv_len, is_causal,
                                          causal_offset, window, scale, extras)


@triton_custom_op(APPEND, mutates_args=("k_cache", "v_cache"))
def kv_cache_append_triton(k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor,
                           cache_len: Tensor, batch_index: Optional[Tensor] = None,
                           block_table: Optional[Tensor] = None,
                           rotary_cos: Optional[Tensor] = None,
                           rotary_sin: Optional[Tensor] = None,
                           rotary_interleaved: bool = False) -> None:
    from ..kernels.kv_cache import launch as decode_launch  # Triton is imported with the first launch

    extras = decode_launch.DecodeExtras(batch_index=batch_index, block_table=block_table,
                                        cos=rotary_cos, sin=rotary_sin,
                                        interleaved=rotary_interleaved)
    decode_launch.kv_cache_append(k_cache, v_cache, key, value, cache_len, extras)


@torch.library.register_fake(DECODE)
def _decode_fake(q, k_cache, v_cache, kv_len, is_causal, causal_offset, window, scale,
                 *extras, **options):
    B, H, L, _ = q.shape
    return (q.new_empty(B, H, L, v_cache.shape[3]),
            q.new_empty(B, H, L, dtype=accumulator_dtype(q.dtype)))


@torch.library.register_fake(APPEND)
def _append_fake(k_cache, v_cache, key, value, cache_len, *extras, **options):
    return None


torch.library.register_vmap(DECODE, vmap_by_slices(DECODE))
