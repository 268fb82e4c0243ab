"""Launcher of the relative-attention decode kernel (kernels/rel_attention/decode.py): the key
ranges as the attention decode splits them (kernels/kv_cache/launch.py: 2 programs per
SM, >= 256 keys a range, a shape-only plan), its combine kernel for the partials.

Tiles: one per dtype and head-dim class, the query rows padded to 16 (the step has at most
DECODE_MAX_ROWS), the band BAND = next_power_of_two(16 + BLOCK_N - 1) distances. Chosen from
the configurations that compiled for sm_90 without spills under triton 3.6 and 3.8 (bench/
NOTES.md); unmeasured for speed.
"""
import torch
import triton

from ..kv_cache.launch import SMALL_TILE, combine_partials, partials, split_plan
from ..attention.launch import LOG2E, head_block
from ..common import (GPU_DOT, INTERPRETED, accumulator_dtype, dot_precision, launch_spec,
                      tl_accumulator_dtype)
from ..limits import DECODE_MAX_QUERY_ROWS as DECODE_MAX_ROWS
from .decode import rel_attention_decode_split_kernel
from .launch import input_arguments


def gpu_tile(dtype: torch.dtype, block_d: int) -> dict:
    """64 keys a block up to head dim 64, 32 above (at 128: 64 keys spilled under triton 3.8,
    32 keys at 4 warps under both), 8 warps, 3 stages, in every dtype."""
    return {"BLOCK_N": 64 if block_d <= 64 else 32, "num_warps": 8, "num_stages": 3}


def tile(dtype: torch.dtype, block_d: int) -> dict:
    if INTERPRETED or dtype == torch.float64:
        return dict(SMALL_TILE)
    return gpu_tile(dtype, block_d)


def _constexprs(dtype, block_n, block_d, block_dv, is_causal, has_window, precision,
                upcast) -> dict:
    return {"BLOCK_M": DECODE_MAX_ROWS, "BAND": triton.next_power_of_2(DECODE_MAX_ROWS + block_n - 1),
            "BLOCK_D": block_d, "BLOCK_DV": block_dv, "IS_CAUSAL": is_causal,
            "HAS_WINDOW": has_window, "PRECISION": precision, "UPCAST": upcast,
            "ACC_DTYPE": tl_accumulator_dtype(dtype)}


def rel_attention_decode(qu, qv, k, v, pos, is_causal: bool, window, pos_offset: int,
                         scale: float):
    """qu, qv [B, H, Lq <= 16, E] (same strides), k [B, H, Lk, E], v [B, H, Lk, EV], pos
    [P, H, E]. Returns (out [B, H, Lq, EV], lse [B, H, Lq])."""
    B, H, LQ, E = qu.shape
    S, EV, P = k.shape[2], v.shape[3], pos.shape[0]
    block_d, block_dv = head_block(E), head_block(EV)
    launch = tile(qu.dtype, max(block_d, block_dv))
    splits, split_size = split_plan(B, H, 1, S, launch["BLOCK_N"], qu.device)
    part_out, part_lse = partials(B, H, LQ, splits, EV, qu)
    rel_attention_decode_split_kernel[(splits, B * H)](
        **input_arguments(qu, qv, k, v, pos), part_out_ptr=part_out, part_lse_ptr=part_lse, H=H, LQ=LQ,
        S=S, E=E, EV=EV, P=P, MEM=S - LQ, window=int(window or 0), pos_offset=int(pos_offset),
        SPLITS=splits, split_size=split_size, qk_scale2=float(scale) * LOG2E,
        **_constexprs(qu.dtype, launch["BLOCK_N"], block_d, block_dv, is_causal,
                      window is not None, dot_precision(qu.dtype), INTERPRETED), **launch)
    return combine_partials(part_out, part_lse, qu)


def launch_specs() -> list[dict]:
    """The split kernel per dtype and head dim, causal with a window (the longest path); the
    combine kernel's specs are the attention decode's."""
    specs = []
    for dtype, head_dims in ((torch.bfloat16, (64, 128)), (torch.float16, (128,)),
                             (torch.float32, (64, 128))):
        acc = accumulator_dtype(dtype)
        for d in head_dims:
            gpu = gpu_tile(dtype, d)
            launch = dict(_constexprs(dtype, gpu["BLOCK_N"], d, d, True, True,
                                      GPU_DOT["PRECISION"], GPU_DOT["UPCAST"]), **gpu)
            specs.append(launch_spec(rel_attention_decode_split_kernel, dtype, launch,
                                     pointers={"part_out_ptr": acc, "part_lse_ptr": acc},
                                     scalars={"qk_scale2": "fp32"},
                                     gemm=dtype != torch.float32))
    return specs
