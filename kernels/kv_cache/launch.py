"""Launchers of the split-KV decode kernels and of the cache append (kernels/kv_cache/kernel.py).

How the keys are split: enough ranges that the step fills the GPU about twice over (2 programs
per SM) but no range shorter than MIN_SPLIT_KEYS keys, so each program streams at least
256 x 128 x 2 B x 2 = 128 KB of K and V (bf16, head dim 128) against a few KB of partials;
at most MAX_SPLITS ranges (the combine kernel holds them all in one tile). The split depends only
on shapes (the cache's capacity, not its filled length), so a CUDA graph captured for one
shape stays valid for every step. Under the interpreter ranges are 2 key blocks long, so CI's
short caches cross several ranges and the combine.

Tiles: one configuration per dtype, head-dim class and row count, not autotuned (a decode step
is bound by reading the cache; autotuning each new cache length would cost more than it could
win): the rows of a program are the G x Lq query rows of a key/value head, padded to >= 16
(tl.dot's smallest M), at most 64 per program (16 for the widest heads). The configurations compiled for sm_90 without spills
(tests/gpu/test_triton_gpu_compile.py); their speed is unmeasured (bench/NOTES.md).
"""
import dataclasses
from typing import Optional

import torch
import triton

from ..attention.launch import (K_STRIDES, LOG2E, OUT_STRIDES, Q_STRIDES, V_STRIDES,
                                head_block)
from ..common import (GPU_DOT, INTERPRETED, accumulator_dtype, dot_precision, launch_spec,
                      new_output, strided, tl_accumulator_dtype)
from .kernel import (attention_decode_combine_kernel, attention_decode_split_kernel,
                     kv_cache_append_kernel)

MIN_SPLIT_KEYS = 256
MAX_SPLITS = 128
MAX_ROWS = 64  # query rows (G x Lq) one program holds; more take several row blocks
INTERPRETER_SPLIT_BLOCKS = 2
COMBINE_CHUNK = 16  # ranges the combine reads at a time: 16 x 256 fp32 = 32 registers/thread


def max_rows(dtype: torch.dtype, block_d: int, featured: bool = False) -> int:
    """Query rows one program may hold: 64, but 16 where 64 rows spilled on sm_90 at every
    tile tried (bf16/fp16 at head dim 256, fp32 above 64; the sweep is in bench/NOTES.md), and
    32 for a step with extras (rotary, pages, ALiBi...) above head dim 64 (64 rows spilled
    under triton 3.6 at head dim 128, 2026-12-06)."""
    wide = block_d > (64 if dtype == torch.float32 else 128)
    if wide:
        return 16
    return 32 if featured and block_d > 64 else MAX_ROWS


def gpu_tile(dtype: torch.dtype, block_d: int, block_m: int) -> dict:
    """(BLOCK_N, warps, stages) of the split kernel on a GPU: the widest key block that
    compiled without spills under triton 3.6 and 3.8 for this dtype, head dim and row count
    (64 keys x 128 dims x 2 B = 16 KB of K a stage, three stages in flight)."""
    if dtype == torch.float32:  # operands on the FMA units
        return {"BLOCK_N": 32, "num_warps": 8, "num_stages": 3 if block_m <= 16 else 2}
    if block_d <= 64:
        return {"BLOCK_N": 64, "num_warps": 4 if block_m <= 16 else 8, "num_stages": 3}
    if block_d <= 128 and block_m <= 16:
        return {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_N": 32, "num_warps": 8, "num_stages": 3}


# Under the interpreter and for fp64 (gradcheck-sized work only): 16-key blocks, so CI's short
# caches cross several blocks and ranges. Relative attention's decode takes the same.
SMALL_TILE = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def tile(dtype: torch.dtype, block_d: int, block_m: int) -> dict:
    if INTERPRETED or dtype == torch.float64:
        return dict(SMALL_TILE)
    return gpu_tile(dtype, block_d, block_m)


def row_block(rows: int, limit: int = MAX_ROWS) -> int:
    return min(max(16, triton.next_power_of_2(rows)), limit)


def _sm_count(device: torch.device) -> int:
    # Dynamo folds get_device_properties to a constant; torch caches it per device.
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(batch: int, kv_heads: int, row_blocks: int, capacity: int, block_n: int,
               device: torch.device) -> tuple[int, int]:
    """(number of key ranges, keys per range) for a cache of `capacity` positions."""
    if INTERPRETED or device.type != "cuda":
        split_size = INTERPRETER_SPLIT_BLOCKS * block_n
    else:
        programs = batch * kv_heads * row_blocks
        wanted = max(1, triton.cdiv(2 * _sm_count(device), programs))
        splits = max(1, min(wanted, triton.cdiv(capacity, MIN_SPLIT_KEYS), MAX_SPLITS))
        split_size = triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n
    split_size = max(split_size, block_n)
    splits = max(1, triton.cdiv(capacity, split_size))
    if splits > MAX_SPLITS:  # interpreter on a long cache: widen the ranges instead
        split_size = triton.cdiv(triton.cdiv(capacity, MAX_SPLITS), block_n) * block_n
        splits = triton.cdiv(capacity, split_size)
    return splits, split_size


@dataclasses.dataclass(frozen=True)
class DecodeExtras:
    """What a step adds to a plain contiguous cache: left padding (key_start int32 [B]), a cache
    row per batch row (batch_index int32 [B]), a paged cache (block_table int32 [B or the
    cache's rows, pages per row] over a pool [pages, Hk, page_size, E]), soft-capping (0:
    off), ALiBi slopes [B or 1, Hq] fp32 (strides 0 over the batch for [Hq]), sinks [Hq], and
    rotary embedding of the new rows (cos/sin [positions, rotary_dim / 2], rotary_pos int32 [B]:
    the row's first new position)."""
    key_start: Optional[torch.Tensor] = None
    batch_index: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None
    softcap: float = 0.0
    alibi: Optional[torch.Tensor] = None
    sinks: Optional[torch.Tensor] = None
    rotary_pos: Optional[torch.Tensor] = None
    cos: Optional[torch.Tensor] = None
    sin: Optional[torch.Tensor] = None
    interleaved: bool = False

    @property
    def capacity_per_row(self):
        return None if self.block_table is None else self.block_table.shape[1]


def _constexprs(dtype: torch.dtype, block_m: int, block_d: int, block_dv: int, is_causal: bool,
                has_window: bool, precision: str, upcast: bool,
                extras: "DecodeExtras" = None) -> dict:
    extras = extras or DecodeExtras()
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "BLOCK_DV": block_dv,
            "IS_CAUSAL": is_causal, "HAS_WINDOW": has_window,
            "LEFTPAD": extras.key_start is not None,
            "BATCH_INDEX": extras.batch_index is not None,
            "PAGED": extras.block_table is not None, "SOFTCAP": extras.softcap > 0,
            "ALIBI": extras.alibi is not None, "ROTARY": extras.cos is not None,
            "INTERLEAVED": bool(extras.interleaved), "PRECISION": precision,
            "UPCAST": upcast, "ACC_DTYPE": tl_accumulator_dtype(dtype)}


def cache_geometry(k_cache, extras: "DecodeExtras") -> dict:
    """(positions per row, page size, pages in the pool): a contiguous cache [B, Hk, S, E] is
    one page of S positions per row."""
    if extras.block_table is None:
        return {"capacity": k_cache.shape[2], "PAGE_SIZE": 1, "NUM_PAGES": 1}
    page = k_cache.shape[2]
    return {"capacity": extras.block_table.shape[1] * page, "PAGE_SIZE": page,
            "NUM_PAGES": k_cache.shape[0]}


def _rotary_arguments(extras: "DecodeExtras") -> dict:
    if extras.cos is None:
        return {"cos_ptr": None, "sin_ptr": None, "stride_ro": 0, "ROTARY_DIM": 0,
                "ROTARY_LEN": 1}
    return {"cos_ptr": extras.cos, "sin_ptr": extras.sin, "stride_ro": extras.cos.stride(0),
            "ROTARY_DIM": 2 * extras.cos.shape[1], "ROTARY_LEN": extras.cos.shape[0]}


def attention_decode(q, k_cache, v_cache, kv_len, is_causal: bool, causal_offset: int,
                     window: int, scale: float, extras: DecodeExtras = DecodeExtras()):
    """q [B, Hq, Lq, E], caches [B, Hk, S_max, E|EV] (any strides; paged: the pool
    [pages, Hk, page_size, E|EV]), kv_len int32 [B] on q's device (the filled length of each
    row's cache). Returns (out [B, Hq, Lq, EV] in q's dtype, lse [B, Hq, Lq] in the accumulator
    dtype)."""
    B, HQ, LQ, E = q.shape
    HK, EV = k_cache.shape[1], v_cache.shape[3]
    geometry = cache_geometry(k_cache, extras)
    capacity = geometry.pop("capacity")
    group = HQ // HK
    block_d, block_dv = head_block(E), head_block(EV)
    featured = any(t is not None for t in (extras.key_start, extras.batch_index,
                                           extras.block_table, extras.alibi, extras.cos)) \
        or extras.softcap > 0
    block_m = row_block(group * LQ, max_rows(q.dtype, max(block_d, block_dv), featured))
    row_blocks = triton.cdiv(group * LQ, block_m)
    launch = tile(q.dtype, max(block_d, block_dv), block_m)
    splits, split_size = split_plan(B, HK, row_blocks, capacity, launch["BLOCK_N"], q.device)
    part_out, part_lse = partials(B, HQ, LQ, splits, EV, q)
    alibi = extras.alibi
    softcap = float(extras.softcap)
    attention_decode_split_kernel[(splits, B * HK, row_blocks)](
        **strided("q_ptr", q, Q_STRIDES), **strided("k_ptr", k_cache, K_STRIDES),
        **strided("v_ptr", v_cache, V_STRIDES), kv_len_ptr=kv_len, part_out_ptr=part_out,
        part_lse_ptr=part_lse, key_start_ptr=extras.key_start,
        batch_index_ptr=extras.batch_index, block_table_ptr=extras.block_table,
        stride_tb=0 if extras.block_table is None else extras.block_table.stride(0),
        alibi_ptr=alibi, stride_ab=0 if alibi is None or alibi.dim() == 1 else alibi.stride(0),
        stride_ah=0 if alibi is None else alibi.stride(-1), rotary_pos_ptr=extras.rotary_pos,
        **_rotary_arguments(extras), **geometry, HQ=HQ, GROUP=group, LQ=LQ, E=E, EV=EV,
        SPLITS=splits, split_size=split_size,
        qk_scale2=(softcap if softcap > 0 else float(scale)) * LOG2E,
        softcap_scale=float(scale) / softcap if softcap > 0 else 0.0,
        causal_offset=int(causal_offset), window=int(window),
        **_constexprs(q.dtype, block_m, block_d, block_dv, is_causal, window > 0,
                      dot_precision(q.dtype), INTERPRETED, extras), **launch)
    return combine_partials(part_out, part_lse, q, extras.sinks)


def partials(B: int, H: int, LQ: int, splits: int, EV: int, like: torch.Tensor):
    """The split kernels' outputs: (out [B, H, LQ, splits, EV], lse2 [B, H, LQ, splits]) in the
    accumulator dtype."""
    part_out = new_output((B, H, LQ, splits, EV),
                          like.new_empty(0, dtype=accumulator_dtype(like.dtype)))
    return part_out, new_output((B, H, LQ, splits), part_out)


def combine_partials(part_out: torch.Tensor, part_lse: torch.Tensor, like: torch.Tensor,
                     sinks: Optional[torch.Tensor] = None):
    """(out [B, H, LQ, EV] in like's dtype, lse [B, H, LQ]) from the ranges' partials (and the
    heads' sink logits [H], which join every row's denominator)."""
    B, H, LQ, splits, EV = part_out.shape
    out = new_output((B, H, LQ, EV), like)
    lse = new_output((B, H, LQ), part_out)
    attention_decode_combine_kernel[(B * H * LQ,)](
        part_out_ptr=part_out, part_lse_ptr=part_lse, **strided("out_ptr", out, OUT_STRIDES),
        lse_ptr=lse, sinks_ptr=sinks, HQ=H, LQ=LQ, EV=EV, SPLITS=splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)), CHUNK_S=COMBINE_CHUNK,
        BLOCK_DV=head_block(EV), SINKS=sinks is not None, num_warps=4)
    return out, lse


def kv_cache_append(k_cache, v_cache, key, value, cache_len,
                    extras: DecodeExtras = DecodeExtras()) -> None:
    """Writes key/value [B, Hk, Lq, E|EV] into the caches [B, Hk, S_max, E|EV] (or the paged
    pool) at positions cache_len[b] + i (int32 [B] on the caches' device), in place; the keys
    rotated at those positions when extras has rotary tables."""
    B, HK, LQ, E = key.shape
    EV = value.shape[3]
    if B * HK * LQ == 0:
        return
    geometry = cache_geometry(k_cache, extras)
    kv_cache_append_kernel[(B * HK, LQ)](
        **strided("k_cache_ptr", k_cache, "stride_cb stride_ch stride_cn stride_cd"),
        **strided("v_cache_ptr", v_cache, "stride_wb stride_wh stride_wn stride_wd"),
        **strided("k_ptr", key, K_STRIDES), **strided("v_ptr", value, V_STRIDES),
        cache_len_ptr=cache_len, batch_index_ptr=extras.batch_index,
        block_table_ptr=extras.block_table,
        stride_tb=0 if extras.block_table is None else extras.block_table.stride(0),
        **_rotary_arguments(extras), HK=HK, S_MAX=geometry["capacity"],
        PAGE_SIZE=geometry["PAGE_SIZE"], NUM_PAGES=geometry["NUM_PAGES"], E=E, EV=EV,
        BLOCK_D=triton.next_power_of_2(E), BLOCK_DV=triton.next_power_of_2(EV),
        BATCH_INDEX=extras.batch_index is not None, PAGED=extras.block_table is not None,
        ROTARY=extras.cos is not None, INTERLEAVED=bool(extras.interleaved), num_warps=1)


# What the "everything" compilations turn on (left padding, a batch index, a paged cache,
# soft-capping, ALiBi, rotary), and the pointer arguments each feature passes (None when off).
EVERYTHING = DecodeExtras(key_start=True, batch_index=True, block_table=True, softcap=1.0,
                          alibi=True, cos=True)
SPLIT_POINTERS = {"key_start_ptr": "i32", "batch_index_ptr": "i32", "block_table_ptr": "i32",
                  "alibi_ptr": "fp32", "rotary_pos_ptr": "i32", "cos_ptr": "fp32",
                  "sin_ptr": "fp32"}
APPEND_POINTERS = {"batch_index_ptr": "i32", "block_table_ptr": "i32", "cos_ptr": "fp32",
                   "sin_ptr": "fp32"}


# The launches a GPU runs, per dtype and head dim: the split kernel at every row count it takes
# (16: Lq x G <= 16, a one-token step; 32 and 64: e.g. a 4- or 8-row step with G = 8), causal
# with a window (the longest path), plain and with every step feature (bf16 at 64/128); the
# combine with and without sinks; the append, plain and paged with rotary.
def launch_specs() -> list[dict]:
    specs = []
    scalars = {"qk_scale2": "fp32", "softcap_scale": "fp32"}
    for dtype, head_dims in ((torch.bfloat16, (64, 128, 256)), (torch.float16, (128,)),
                             (torch.float32, (64, 128))):
        acc = accumulator_dtype(dtype)
        featured = (False, True) if dtype == torch.bfloat16 else (False,)
        for d in head_dims:
            for everything in featured if d <= 128 else (False,):
                extras = EVERYTHING if everything else None
                for block_m in (16, 32, 64):
                    if block_m > max_rows(dtype, d, everything):
                        continue
                    launch = dict(_constexprs(dtype, block_m, d, d, True, True,
                                              GPU_DOT["PRECISION"], GPU_DOT["UPCAST"], extras),
                                  **gpu_tile(dtype, d, block_m))
                    specs.append(launch_spec(
                        attention_decode_split_kernel, dtype, launch,
                        pointers={"kv_len_ptr": "i32", "part_out_ptr": acc, "part_lse_ptr": acc,
                                  **(SPLIT_POINTERS if everything else {})},
                        scalars=scalars, gemm=dtype != torch.float32,
                        absent=[] if everything else list(SPLIT_POINTERS)))
                specs.append(launch_spec(
                    attention_decode_combine_kernel, dtype,
                    {"BLOCK_S": MAX_SPLITS, "CHUNK_S": COMBINE_CHUNK, "BLOCK_DV": d,
                     "SINKS": everything, "num_warps": 4},
                    pointers={"part_out_ptr": acc, "part_lse_ptr": acc, "lse_ptr": acc,
                              "sinks_ptr": "fp32"},
                    absent=[] if everything else ["sinks_ptr"]))
                specs.append(launch_spec(
                    kv_cache_append_kernel, dtype,
                    {"BLOCK_D": d, "BLOCK_DV": d, "BATCH_INDEX": everything, "PAGED": everything,
                     "ROTARY": everything, "INTERLEAVED": False, "num_warps": 1},
                    pointers={"cache_len_ptr": "i32", **(APPEND_POINTERS if everything else {})},
                    absent=[] if everything else list(APPEND_POINTERS)))
    return specs
