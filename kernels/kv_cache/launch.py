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


def max_rows(dtype: torch.dtype, block_d: int) -> int:
    """Query rows one program may hold: 64, but 16 where 64 rows spilled on sm_90 at every
    tile tried (bf16/fp16 at head dim 256, fp32 above 64; the sweep is in bench/NOTES.md)."""
    wide = block_d > (64 if dtype == torch.float32 else 128)
    return 16 if wide else MAX_ROWS


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


def _constexprs(dtype: torch.dtype, block_m: int, block_d: int, block_dv: int, is_causal: bool,
                has_window: bool, precision: str, upcast: bool) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "BLOCK_DV": block_dv,
            "IS_CAUSAL": is_causal, "HAS_WINDOW": has_window, "PRECISION": precision,
            "UPCAST": upcast, "ACC_DTYPE": tl_accumulator_dtype(dtype)}


def attention_decode(q, k_cache, v_cache, kv_len, is_causal: bool, causal_offset: int,
                     window: int, scale: float):
    """q [B, Hq, Lq, E], caches [B, Hk, S_max, E|EV] (any strides), kv_len int32 [B] on q's
    device (the filled length of each row's cache). Returns (out [B, Hq, Lq, EV] in q's dtype,
    lse [B, Hq, Lq] in the accumulator dtype)."""
    B, HQ, LQ, E = q.shape
    HK, capacity, EV = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    group = HQ // HK
    block_d, block_dv = head_block(E), head_block(EV)
    block_m = row_block(group * LQ, max_rows(q.dtype, max(block_d, block_dv)))
    row_blocks = triton.cdiv(group * LQ, block_m)
    launch = tile(q.dtype, max(block_d, block_dv), block_m)
    splits, split_size = split_plan(B, HK, row_blocks, capacity, launch["BLOCK_N"], q.device)
    part_out, part_lse = partials(B, HQ, LQ, splits, EV, q)
    attention_decode_split_kernel[(splits, B * HK, row_blocks)](
        **strided("q_ptr", q, Q_STRIDES), **strided("k_ptr", k_cache, K_STRIDES),
        **strided("v_ptr", v_cache, V_STRIDES), kv_len_ptr=kv_len, part_out_ptr=part_out,
        part_lse_ptr=part_lse, HQ=HQ, GROUP=group, LQ=LQ, E=E, EV=EV, SPLITS=splits,
        split_size=split_size, qk_scale2=float(scale) * LOG2E,
        causal_offset=int(causal_offset), window=int(window),
        **_constexprs(q.dtype, block_m, block_d, block_dv, is_causal, window > 0,
                      dot_precision(q.dtype), INTERPRETED), **launch)
    return combine_partials(part_out, part_lse, q)


def partials(B: int, H: int, LQ: int, splits: int, EV: int, like: torch.Tensor):
    """The split kernels' outputs: (out [B, H, LQ, splits, EV], lse2 [B, H, LQ, splits]) in the
    accumulator dtype."""
    part_out = new_output((B, H, LQ, splits, EV),
                          like.new_empty(0, dtype=accumulator_dtype(like.dtype)))
    return part_out, new_output((B, H, LQ, splits), part_out)


def combine_partials(part_out: torch.Tensor, part_lse: torch.Tensor, like: torch.Tensor):
    """(out [B, H, LQ, EV] in like's dtype, lse [B, H, LQ]) from the ranges' partials."""
    B, H, LQ, splits, EV = part_out.shape
    out = new_output((B, H, LQ, EV), like)
    lse = new_output((B, H, LQ), part_out)
    attention_decode_combine_kernel[(B * H * LQ,)](
        part_out_ptr=part_out, part_lse_ptr=part_lse, **strided("out_ptr", out, OUT_STRIDES),
        lse_ptr=lse, HQ=H, LQ=LQ, EV=EV, SPLITS=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)), CHUNK_S=COMBINE_CHUNK,
        BLOCK_DV=head_block(EV), num_warps=4)
    return out, lse


def kv_cache_append(k_cache, v_cache, key, value, cache_len) -> None:
    """Writes key/value [B, Hk, Lq, E|EV] into the caches [B, Hk, S_max, E|EV] at positions
    cache_len[b] + i (int32 [B] on the caches' device), in place."""
    B, HK, LQ, E = key.shape
    EV = value.shape[3]
    if B * HK * LQ == 0:
        return
    kv_cache_append_kernel[(B * HK, LQ)](
        **strided("k_cache_ptr", k_cache, "stride_cb stride_ch stride_cn stride_cd"),
        **strided("v_cache_ptr", v_cache, "stride_wb stride_wh stride_wn stride_wd"),
        **strided("k_ptr", key, K_STRIDES), **strided("v_ptr", value, V_STRIDES),
        cache_len_ptr=cache_len, HK=HK, S_MAX=k_cache.shape[2], E=E, EV=EV, BLOCK_D=triton.next_power_of_2(E), BLOCK_DV=triton.next_power_of_2(EV), num_warps=1)


# The launches a GPU runs, per dtype and head dim: the split kernel at every row count it takes
# (16: Lq x G <= 16, a one-token step; 32 and 64: e.g. a 4- or 8-row step with G = 8), causal
# with a window (the longest path); the combine and the append.
def launch_specs() -> list[dict]:
    specs = []
    scalars = {"qk_scale2": "fp32"}
    for dtype, head_dims in ((torch.bfloat16, (64, 128, 256)), (torch.float16, (128,)),
                             (torch.float32, (64, 128))):
        acc = accumulator_dtype(dtype)
        for d in head_dims:
            for block_m in (16, 32, 64):
                if block_m > max_rows(dtype, d):
                    continue
                launch = dict(_constexprs(dtype, block_m, d, d, True, True,
                                          GPU_DOT["PRECISION"], GPU_DOT["UPCAST"]),
                              **gpu_tile(dtype, d, block_m))
                specs.append(launch_spec(
                    attention_decode_split_kernel, dtype, launch,
                    pointers={"kv_len_ptr": "i32", "part_out_ptr": acc, "part_lse_ptr": acc},
                    scalars=scalars, gemm=dtype != torch.float32))
            specs.append(launch_spec(
                attention_decode_combine_kernel, dtype,
                {"BLOCK_S": MAX_SPLITS, "CHUNK_S": COMBINE_CHUNK, "BLOCK_DV": d, "num_warps": 4},
                pointers={"part_out_ptr": acc, "part_lse_ptr": acc, "lse_ptr": acc}))
            specs.append(launch_spec(kv_cache_append_kernel, dtype,
                                     {"BLOCK_D": d, "BLOCK_DV": d, "num_warps": 1},
                                     pointers={"cache_len_ptr": "i32"}))
    return specs

