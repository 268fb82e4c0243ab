"""Block sizes and launchers of the relative-position attention kernels
(kernels/rel_attention/forward.py, kernels/rel_attention/backward.py).

The forward, dK/dV and dQ kernels are autotuned on a GPU like the attention kernels (same key:
the length bucket and the constexprs that change the work per tile), over configurations that
compiled for sm_90 without register spills (tests/gpu/test_triton_gpu_compile.py); their speed is
unmeasured (no GPU has been lent to this project). The band of pos rows a tile reads is
BAND = next_power_of_two(BLOCK_M + BLOCK_N - 1) rows in the backward kernels (the forward
computes it in chunks of BLOCK_N). The d(pos) kernel runs one fixed square
tile per dtype: its workspace is sized by the tile, so it is chosen before the launch.
Under the interpreter one 16 x 16 configuration, as for attention.
"""
import torch
import triton

from ..attention.kernel import BOOL_KEY_MASK, FLOAT_MASK
from ..attention.launch import (DOUT_STRIDES, K_STRIDES, OUT_STRIDES, Q_STRIDES, V_STRIDES,
                                head_block, heavy_launch, length_bucket, mask_arguments,
                                spec_types)
from ..common import (GPU_DOT, INTERPRETED, accumulator_dtype, dot_precision, launch_spec,
                      new_output, strided, tl_accumulator_dtype)
from .backward import (rel_attention_backward_key_kernel, rel_attention_backward_pos_kernel,
                       rel_attention_backward_query_kernel)
from .forward import rel_attention_forward_kernel

LOG2E = 1.4426950408889634


def _config(kernel: str, block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    """A launch configuration; the backward kernels also take their band's row count (the
    forward computes its band in chunks of BLOCK_N rows and needs none)."""
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    if kernel != "forward":
        blocks["BAND"] = triton.next_power_of_2(block_m + block_n - 1)
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, warps) per kernel, head-dim class (<= 64, <= 128) and whether a mask tile or
# dropout is present ("heavy"), for bf16/fp16; all compiled spill-free for sm_90 on the longest
# path of their set (bench/NOTES.md, 2026-12-01, fifth session), the checked ones marked (the
# others were not compiled yet). The position term's gathers and the carried band chunks make
# these kernels hungrier for registers than plain attention's: the forward spilled at every
# 64 x 64 tile and at 128 x 64; it runs BLOCK_M = BLOCK_N or 2 BLOCK_N (its band chunks), and
# 64 x 32 at 8 warps is the one wgmma-sized tile that stayed clean. Both backward kernels
# spilled at 32 x 32 and were clean at 16 x 16.
HALF_CANDIDATES = {
    ("forward", 64, False): [(64, 32, 8), (32, 32, 8), (32, 16, 4)],  # checked
    ("forward", 64, True): [(32, 32, 4), (32, 32, 8), (32, 16, 4)],   # checked
    ("forward", 128, False): [(32, 32, 8), (16, 16, 4)],              # checked
    ("forward", 128, True): [(16, 16, 4)],                            # checked
    ("backward_key", 64, False): [(16, 16, 4)],                        # checked
    ("backward_key", 64, True): [(16, 16, 4)],                         # checked
    ("backward_key", 128, False): [(16, 16, 8)],                       # checked (3.6: 4 warps spill)
    ("backward_key", 128, True): [(16, 16, 8)],                        # 4 warps spilled
    ("backward_query", 64, False): [(16, 16, 4)],                      # checked
    ("backward_query", 64, True): [(16, 16, 4)],                       # checked
    ("backward_query", 128, False): [(16, 16, 8)],                     # 3.6: 4 warps spilled
    ("backward_query", 128, True): [(16, 16, 8)],                      # 3.6: 4 warps spilled
}
# fp32: the backward kernels spilled at 4 warps (dQ under both Tritons, dK/dV under 3.6).
FP32_CANDIDATES = {"forward": [(16, 16, 4)], "backward_key": [(16, 16, 8)],
                   "backward_query": [(16, 16, 8)]}
# The d(pos) kernel's square tile, warps and pipeline stages per dtype class and head-dim
# class: at 4 warps the half-precision one spilled at head dim 128 under triton 3.6; the fp32
# one spilled at 4 and 8 warps with 2 or 3 stages under both Tritons, and is clean at 8 warps
# with 1 stage (16 warps broke Triton's gather lowering: an assertion in
# OptimizeThreadLocality).
POS_TILE = {("half", 64): (16, 4, 3), ("half", 128): (16, 8, 3), ("fp32", 64): (16, 8, 1),
            ("fp32", 128): (16, 8, 1)}
INTERPRETER_BLOCK = 16
_tuned: dict = {}


def candidate_configs(kernel: str, dtype: torch.dtype, block_d: int, heavy: bool) -> list:
    """The autotuner's candidates for this kernel, dtype, padded head dim and feature set."""
    if dtype == torch.float64:
        return [_config(kernel, 16, 16, 4, 1)]
    if dtype == torch.float32:
        return [_config(kernel, m, n, w, 2) for m, n, w in FP32_CANDIDATES[kernel]]
    shapes = HALF_CANDIDATES[(kernel, 64 if block_d <= 64 else 128, heavy)]
    return [_config(kernel, m, n, w, 3) for m, n, w in shapes]


def pos_tile(dtype: torch.dtype, block_d: int, interpreted: bool = INTERPRETED
             ) -> tuple[int, int, int]:
    """(BLOCK, warps, stages) of the d(pos) kernel."""
    if interpreted:
        return INTERPRETER_BLOCK, 4, 1
    return POS_TILE[("half" if dtype in (torch.float16, torch.bfloat16) else "fp32",
                     64 if block_d <= 64 else 128)]


# The interpreter's forward tile (BLOCK_M, BLOCK_N); a test sets (32, 16) to run the forward's
# three-chunk path (BLOCK_M = 2 BLOCK_N).
INTERPRETER_FORWARD_TILE = (INTERPRETER_BLOCK, INTERPRETER_BLOCK)


def _kernel_for(kernel: str, fn, dtype: torch.dtype, block_d: int, heavy: bool):
    if INTERPRETED:
        tile = INTERPRETER_FORWARD_TILE if kernel == "forward" else (INTERPRETER_BLOCK,) * 2
        return fn, dict(_config(kernel, *tile, 4, 1).kwargs, num_warps=4)
    key = (kernel, dtype, block_d, heavy)
    if key not in _tuned:
        _tuned[key] = triton.autotune(
            candidate_configs(kernel, dtype, block_d, heavy),
            key=["length_bucket", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_WINDOW", "MASK_KIND",
                 "DROPOUT"])(fn)
    return _tuned[key], {}


def feature_constexprs(dtype, block_d, block_dv, is_causal, has_window, dropout, PRECISION,
                       UPCAST) -> dict:
    """The constexprs every relative-attention kernel takes (the launch and its specs)."""
    return {"BLOCK_D": block_d, "BLOCK_DV": block_dv, "IS_CAUSAL": is_causal,
            "HAS_WINDOW": has_window, "DROPOUT": dropout, "PRECISION": PRECISION,
            "UPCAST": UPCAST, "ACC_DTYPE": tl_accumulator_dtype(dtype)}


def _common(qu, k, v, pos, is_causal, window, dropout_p):
    B, H, L, E = qu.shape
    S, EV = k.shape[2], v.shape[3]
    constexprs = feature_constexprs(qu.dtype, head_block(E), head_block(EV), is_causal,
                                    window is not None, dropout_p > 0.0,
                                    dot_precision(qu.dtype), INTERPRETED)
    return B, H, L, S, E, EV, pos.shape[0], constexprs


def rel_attention_forward(qu, qv, k, v, pos, mask, seed, dropout_p: float, is_causal: bool,
                          window, pos_offset: int, scale: float):
    """qu, qv [B, H, L, E] (same strides), k [B, H, S, E], v [B, H, S, EV], pos [P, H, E], mask
    a [B, H, L, S] view or None, seed int64 [1] (read when dropout_p > 0), window an int or
    None. Returns (out [B, H, L, EV], lse [B, H, L] in the accumulator dtype)."""
    B, H, L, S, E, EV, P, constexprs = _common(qu, k, v, pos, is_causal, window, dropout_p)
    out = new_output((B, H, L, EV), qu)
    lse = new_output((B, H, L), qu.new_empty(0, dtype=accumulator_dtype(qu.dtype)))
    mask_args, mask_kind = mask_arguments(mask)
    kernel, launch = _kernel_for("forward", rel_attention_forward_kernel, qu.dtype,
                                 constexprs["BLOCK_D"], heavy_launch(mask_kind, dropout_p))
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](**input_arguments(qu, qv, k, v, pos), **strided("out_ptr", out, OUT_STRIDES),
                 **mask_args, lse_ptr=lse, seed_ptr=seed if dropout_p > 0.0 else None,
                 H=H, L=L, S=S, E=E, EV=EV, P=P, pos_offset=int(pos_offset),
                 window=int(window) if window is not None else 0,
                 qk_scale2=float(scale) * LOG2E, dropout_p=float(dropout_p),
                 length_bucket=length_bucket(L, S), MASK_KIND=mask_kind, **constexprs, **launch)
    return out, lse


def input_arguments(qu, qv, k, v, pos) -> dict:
    """The inputs every relative-attention kernel reads, by name (qv shares qu's strides)."""
    return dict(**strided("qu_ptr", qu, Q_STRIDES), qv_ptr=qv, **strided("k_ptr", k, K_STRIDES),
                **strided("v_ptr", v, V_STRIDES),
                **strided("pos_ptr", pos, "stride_pp stride_ph stride_pd"))


def rel_attention_backward(dout, qu, qv, k, v, pos, lse, delta, mask, mask_grad: bool, seed,
                           dropout_p: float, is_causal: bool, window, pos_offset: int,
                           scale: float):
    """Gradients of rel_attention_forward: (d(qu), d(qv), dk, dv, dpos, dmask), dmask
    [B, H, L, S] in the mask's dtype when mask_grad, else an empty tensor. lse and delta
    (rowsum(dout * out) - dlse) [B, H, L] contiguous in the accumulator dtype."""
    B, H, L, S, E, EV, P, constexprs = _common(qu, k, v, pos, is_causal, window, dropout_p)
    dqu = new_output(qu.shape, qu)
    dqv = new_output(qu.shape, qu)
    dk = new_output(k.shape, k)
    dv = new_output(v.shape, v)
    dmask = (torch.zeros((B, H, L, S), dtype=mask.dtype, device=qu.device) if mask_grad
             else qu.new_empty(0))
    mask_args, mask_kind = mask_arguments(mask)
    heavy = heavy_launch(mask_kind, dropout_p)
    # What the three backward kernels read, by name.
    shared = dict(**input_arguments(qu, qv, k, v, pos), **strided("do_ptr", dout, DOUT_STRIDES),
                  **mask_args, lse_ptr=lse, delta_ptr=delta,
                  seed_ptr=seed if dropout_p > 0.0 else None, H=H, L=L, S=S, E=E, EV=EV, P=P,
                  pos_offset=int(pos_offset), window=int(window) if window is not None else 0,
                  qk_scale2=float(scale) * LOG2E, scale=float(scale), dropout_p=float(dropout_p),
                  length_bucket=length_bucket(L, S), MASK_KIND=mask_kind, **constexprs)

    kernel, launch = _kernel_for("backward_key", rel_attention_backward_key_kernel, qu.dtype,
                                 constexprs["BLOCK_D"], heavy)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * H)  # noqa: E731
    kernel[grid](**shared, dk_ptr=dk, dv_ptr=dv, dmask_ptr=dmask if mask_grad else None,
                 MASK_GRAD=mask_grad, **launch)

    kernel, launch = _kernel_for("backward_query", rel_attention_backward_query_kernel,
                                 qu.dtype, constexprs["BLOCK_D"], heavy)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](**shared, dqu_ptr=dqu, dqv_ptr=dqv, **launch)

    block, warps, stages = pos_tile(qu.dtype, constexprs["BLOCK_D"])
    diagonals = triton.cdiv(L, block) + triton.cdiv(S, block) - 1
    dband = new_output((H, diagonals, 2 * block, E),
                       qu.new_empty(0, dtype=accumulator_dtype(qu.dtype)))
    rel_attention_backward_pos_kernel[(diagonals, H)](
        **shared, dband_ptr=dband, B=B, **pos_launch(block, warps, stages))
    dpos = fold_band_gradient(dband, L, S, P, block, int(pos_offset)).to(pos.dtype)
    return dqu, dqv, dk, dv, dpos, dmask


def pos_launch(block: int, warps: int, stages: int) -> dict:
    """The d(pos) kernel's tile: square, its band two blocks of rows."""
    return {"BLOCK": block, "BAND": 2 * block, "num_warps": warps, "num_stages": stages}


KERNELS = {"forward": rel_attention_forward_kernel,
           "backward_key": rel_attention_backward_key_kernel,
           "backward_query": rel_attention_backward_query_kernel}


def kernel_specs(kernel: str, dtype: torch.dtype, head_dim: int, heavy: bool) -> list[dict]:
    """Every candidate of one kernel (the d(pos) kernel: its one tile) for a dtype, head dim
    and feature set, causal with a window (the longest path); heavy = a float mask tile with
    its gradient and dropout, light = a key-padding mask."""
    pointers, scalars = spec_types(dtype, heavy)
    if kernel == "backward_pos":
        pointers["dband_ptr"] = accumulator_dtype(dtype)
    features = dict(MASK_KIND=FLOAT_MASK if heavy else BOOL_KEY_MASK,
                    **feature_constexprs(dtype, head_dim, head_dim, True, True, heavy, **GPU_DOT))
    # Light launches pass no seed (no dropout) and no mask gradient: None, as the launchers.
    absent = [] if heavy else ["seed_ptr"] + (["dmask_ptr"] if kernel == "backward_key" else [])
    if kernel == "backward_pos":
        return [launch_spec(rel_attention_backward_pos_kernel, dtype,
                            dict(features, **pos_launch(*pos_tile(dtype, head_dim, False))),
                            pointers=pointers, scalars=scalars, gemm=True, absent=absent)]
    specs = []
    for config in candidate_configs(kernel, dtype, head_dim, heavy):
        launch = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages,
                      **features)
        if kernel == "backward_key":
            launch["MASK_GRAD"] = heavy
        specs.append(launch_spec(KERNELS[kernel], dtype, launch, pointers=pointers,
                                 scalars=scalars, gemm=True, absent=absent))
    return specs


def launch_specs() -> list[dict]:
    """What the compile test checks: every bf16 candidate of the four kernels at head dims 64
    and 128, light and heavy, and the fp32 ones at 64 (and the d(pos) kernel's at 128). Not
    checked: fp32 dQ at head dim 128, whose 16 x 16 tile spilled under one Triton or the other
    at every warps/stages tried (8 warps: 2 stages spill under 3.6, 1 stage under 3.8);
    relative attention trains in bf16 on GPUs, and fp32 there runs, slower."""
    kernels = (*KERNELS, "backward_pos")
    return ([spec for kernel in kernels for d in (64, 128) for heavy in (False, True)
             for spec in kernel_specs(kernel, torch.bfloat16, d, heavy)]
            + [spec for kernel in kernels
               for spec in kernel_specs(kernel, torch.float32, 64, False)]
            + kernel_specs("backward_pos", torch.float32, 128, False))


def fold_band_gradient(dband, L: int, S: int, P: int, block: int, pos_offset: int):
    """d(pos) [P, H, E] from the per-diagonal bands [H, T, 2 * block, E] of the d(pos) kernel.

    Band t covers the distances first + t * block + [0, 2 * block) with
    first = (S - L) - (key blocks - 1) * block - (block - 1): its upper half and the lower half
    of band t + 1 are the same distances, so the sum by distance is the bands' halves added
    with a shift of one block. Distance d reads row clamp(d + pos_offset, 0, P - 1): the rows
    in between take one distance each, rows 0 and P - 1 the sums of everything clamped onto
    them. Plain torch sums in a fixed order (deterministic)."""
    H, T, _, E = dband.shape
    first = (S - L) - (triton.cdiv(S, block) - 1) * block - (block - 1)
    by_block = dband.new_zeros(H, T + 1, block, E)
    by_block[:, :T] += dband[:, :, :block]
    by_block[:, 1:] += dband[:, :, block:]
    by_distance = by_block.reshape(H, (T + 1) * block, E)
    count = by_distance.shape[1]
    row0 = first + pos_offset  # the unclamped row of by_distance[:, 0]
    dpos = dband.new_zeros(P, H, E)
    if P == 1:
        dpos[0] = by_distance.sum(1)
        return dpos
    low_end = min(max(1 - row0, 0), count)        # entries whose row clamps to 0
    high_start = min(max(P - 1 - row0, 0), count)  # entries whose row clamps to P - 1
    dpos[0] += by_distance[:, :low_end].sum(1)
    dpos[P - 1] += by_distance[:, high_start:].sum(1)
    if high_start > low_end:
        dpos[row0 + low_end:row0 + high_start] += by_distance[:, low_end:high_start].transpose(0, 1)
    return dpos
