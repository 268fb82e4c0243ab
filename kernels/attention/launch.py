"""Block sizes and launchers of the attention kernels (kernels/attention/kernel.py).

On a GPU each kernel is autotuned (triton.autotune) over a few configurations chosen by dtype,
head dim and feature set, keyed on the power-of-two bucket of the longest length, so a new
length in the same bucket reuses the choice instead of benchmarking again. The candidates are
the configurations that compiled for sm_90 without register spills; their speed has not been
measured (no GPU has been lent to this project): bench/NOTES.md records what to measure.
Under the interpreter one fixed 16 x 16 configuration, so CI's small odd shapes cross several
blocks and the causal diagonal.
"""
import torch
import triton

from ..common import (GPU_DOT, INTERPRETED, accumulator_dtype, dot_precision, launch_spec,
                      new_output, strided, tl_accumulator_dtype)
from .kernel import (BOOL_KEY_MASK, BOOL_MASK, FLOAT_KEY_MASK, FLOAT_MASK, NO_MASK,
                     attention_backward_key_kernel, attention_backward_query_kernel,
                     attention_forward_kernel)

LOG2E = 1.4426950408889634


def head_block(dim: int) -> int:
    """Head dims pad to a power of two (>= 16, tl.dot's smallest K): 40 -> 64, 80/96 -> 128."""
    return max(16, triton.next_power_of_2(dim))


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


# (BLOCK_M, BLOCK_N, warps) candidates per kernel, head-dim class (<= 64, <= 128, <= 256) and
# whether the launch reads a mask tile or draws dropout ("heavy": a [L, S] mask's per-element
# pointers or the Philox state cost registers). Every entry compiled for sm_90 without
# register spills on its own feature set under triton 3.6 and 3.8 alike
# (tests/gpu/test_triton_gpu_compile.py, run by both CI legs; the sweeps that chose them are in
# bench/NOTES.md, 2026-12-01 and -02); most larger tiles spilled, and 3.6 spilled six 4-warp
# entries that 3.8 kept clean, which now take 8 warps or a narrower tile. For the dK/dV
# kernel BLOCK_N is the key block a program owns and BLOCK_M the query rows it streams.
HALF_CANDIDATES = {
    ("forward", 64, False): [(128, 64, 8), (64, 64, 4)],
    ("forward", 64, True): [(128, 32, 8), (64, 32, 4)],
    ("forward", 128, False): [(128, 32, 8), (64, 32, 8)],
    ("forward", 128, True): [(64, 32, 8)],
    ("forward", 256, False): [(32, 32, 8)],
    ("forward", 256, True): [(32, 16, 8)],
    ("backward_key", 64, False): [(32, 128, 8), (64, 64, 8)],
    ("backward_key", 64, True): [(32, 32, 4), (16, 64, 4)],
    ("backward_key", 128, False): [(32, 32, 8), (16, 32, 4)],
    ("backward_key", 128, True): [(32, 32, 8), (32, 16, 8)],
    ("backward_key", 256, False): [(16, 16, 4)],
    ("backward_key", 256, True): [(16, 16, 8)],
    ("backward_query", 64, False): [(128, 32, 8), (64, 64, 8), (64, 32, 4)],
    ("backward_query", 64, True): [(128, 32, 8)],
    ("backward_query", 128, False): [(32, 32, 8), (32, 16, 4), (16, 32, 4)],
    ("backward_query", 128, True): [(32, 32, 8), (32, 16, 4)],
    ("backward_query", 256, False): [(16, 32, 8)],
    ("backward_query", 256, True): [(16, 16, 8)],
}
# fp32 dots run on FMA units (exact fp32) or as TF32: operands stay in registers, so tiles are
# smaller still.
FP32_CANDIDATES = {
    ("forward", 64): [(32, 32, 8)],
    ("forward", 128): [(16, 16, 4)],
    ("backward_key", 64): [(16, 16, 4)],
    ("backward_key", 128): [(16, 16, 8)],
    ("backward_query", 64): [(32, 16, 4)],
    ("backward_query", 128): [(16, 16, 4)],
}


def head_class(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def candidate_configs(kernel: str, dtype: torch.dtype, block_d: int, heavy: bool) -> list:
    """The autotuner's candidates for this kernel, dtype, padded head dim and feature set."""
    if dtype == torch.float64:  # gradcheck-sized work only
        return _configs([(16, 16, 4, 1)])
    if dtype == torch.float32:  # head dims above 128 reuse the 128 list (not AOT-checked)
        shapes = FP32_CANDIDATES[(kernel, min(head_class(block_d), 128))]
        return _configs([(m, n, w, 2) for m, n, w in shapes])
    shapes = HALF_CANDIDATES[(kernel, head_class(block_d), heavy)]
    return _configs([(m, n, w, 3) for m, n, w in shapes])


INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}
_tuned: dict = {}


def _kernel_for(kernel: str, fn, dtype: torch.dtype, block_d: int, heavy: bool):
    """The interpreter's plain kernel, or on a GPU the autotuned wrapper for this dtype,
    head-dim class and feature set (built once per combination)."""
    if INTERPRETED:
        return fn, dict(INTERPRETER_CONFIG, num_warps=4)
    key = (kernel, dtype, block_d, heavy)
    if key not in _tuned:
        # The key names the constexprs that change the work per tile (triton.autotune keys on
        # the listed arguments and the tensors' dtypes only).
        _tuned[key] = triton.autotune(
            candidate_configs(kernel, dtype, block_d, heavy),
            key=["length_bucket", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "SHIFTED", "MASK_KIND",
                 "DROPOUT"])(fn)
    return _tuned[key], {}


def heavy_launch(mask_kind: int, dropout_p: float) -> bool:
    """A mask tile or dropout: the launches that need the smaller candidate tiles."""
    return mask_kind in (BOOL_MASK, FLOAT_MASK) or dropout_p > 0.0


def length_bucket(*lengths: int) -> int:
    return triton.next_power_of_2(max(lengths))


MASK_STRIDES = "stride_mb stride_mh stride_mm stride_mn"
Q_STRIDES = "stride_qb stride_qh stride_qm stride_qd"
K_STRIDES = "stride_kb stride_kh stride_kn stride_kd"
V_STRIDES = "stride_vb stride_vh stride_vn stride_vd"
OUT_STRIDES = "stride_ob stride_oh stride_om stride_od"
DOUT_STRIDES = "stride_dob stride_doh stride_dom stride_dod"


def mask_arguments(mask) -> tuple[dict, int]:
    """(the mask's launch arguments by name, its kind) of a [B, H, L, S] mask view or None (a
    None pointer and NO_MASK); bool masks as uint8. A mask broadcast over the query rows
    (stride 0, e.g. key padding) is read as one row."""
    if mask is None:
        return {"mask_ptr": None, **dict.fromkeys(MASK_STRIDES.split(), 0)}, NO_MASK
    one_row = mask.stride(2) == 0 or mask.shape[2] == 1
    if mask.dtype == torch.bool:
        return (strided("mask_ptr", mask.view(torch.uint8), MASK_STRIDES),
                BOOL_KEY_MASK if one_row else BOOL_MASK)
    return strided("mask_ptr", mask, MASK_STRIDES), FLOAT_KEY_MASK if one_row else FLOAT_MASK


def feature_constexprs(dtype, block_d, block_dv, is_causal, shifted, dropout, PRECISION,
                       UPCAST) -> dict:
    """The constexprs every attention kernel takes (the launch and its specs). A shifted
    diagonal (bottom-right causal) is its own compilation, so the common unshifted one keeps
    its registers (the runtime shift alone made 4-5 sm_90 candidates spill)."""
    return {"BLOCK_D": block_d, "BLOCK_DV": block_dv, "IS_CAUSAL": is_causal,
            "SHIFTED": shifted, "DROPOUT": dropout, "PRECISION": PRECISION, "UPCAST": UPCAST,
            "ACC_DTYPE": tl_accumulator_dtype(dtype)}


def _common(q, k, v, scale, is_causal, causal_shift, dropout_p):
    B, H, L, E = q.shape
    S, EV = k.shape[2], v.shape[3]
    constexprs = feature_constexprs(q.dtype, head_block(E), head_block(EV), is_causal,
                                    bool(is_causal and causal_shift != 0), dropout_p > 0.0,
                                    dot_precision(q.dtype), INTERPRETED)
    scalars = dict(H=H, GROUP=H // k.shape[1], L=L, S=S, E=E, EV=EV)
    return B, H, L, S, E, EV, constexprs, scalars, float(scale) * LOG2E


def attention_forward(q, k, v, mask, seed, dropout_p: float, is_causal: bool, causal_shift: int,
                      scale: float):
    """q [B, H, L, E], k [B, Hk, S, E], v [B, Hk, S, EV] (any strides), mask a [B, H, L, S] view
    or None, seed an int64 [1] tensor (read when dropout_p > 0); is_causal: query i sees keys
    j <= i + causal_shift (0: top-left, S - L: bottom-right). Returns (out [B, H, L, EV],
    lse [B, H, L] in fp32, fp64 for fp64 inputs)."""
    B, H, L, S, E, EV, constexprs, scalars, qk_scale2 = _common(q, k, v, scale, is_causal,
                                                                 causal_shift, dropout_p)
    out = new_output((B, H, L, EV), q)
    lse = new_output((B, H, L), q.new_empty(0, dtype=accumulator_dtype(q.dtype)))
    mask_args, mask_kind = mask_arguments(mask)
    kernel, launch = _kernel_for("forward", attention_forward_kernel, q.dtype,
                                 constexprs["BLOCK_D"], heavy_launch(mask_kind, dropout_p))
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](**strided("q_ptr", q, Q_STRIDES), **strided("k_ptr", k, K_STRIDES),
                 **strided("v_ptr", v, V_STRIDES), **strided("out_ptr", out, OUT_STRIDES),
                 **mask_args, lse_ptr=lse, seed_ptr=seed if dropout_p > 0.0 else None,
                 **scalars, qk_scale2=qk_scale2, dropout_p=float(dropout_p),
                 causal_shift=int(causal_shift), length_bucket=length_bucket(L, S),
                 MASK_KIND=mask_kind, **constexprs, **launch)
    return out, lse


def attention_backward(dout, q, k, v, lse, delta, mask, mask_grad: bool, seed,
                       dropout_p: float, is_causal: bool, causal_shift: int, scale: float):
    """Gradients of attention_forward: dout [B, H, L, EV] (any strides), lse and delta
    (rowsum(dout * out) - dlse) [B, H, L] contiguous in the accumulator dtype. Returns (dq, dk,
    dv, dmask): dmask [B, H, L, S] in the mask's dtype when mask_grad, else an empty tensor."""
    B, H, L, S, E, EV, constexprs, scalars, qk_scale2 = _common(q, k, v, scale, is_causal,
                                                                 causal_shift, dropout_p)
    dq = new_output(q.shape, q)
    # Per query head; summed over each group of G heads below (GQA). Accumulated in fp32 when
    # there is a sum to do, so the group's sum rounds once.
    group = H // k.shape[1]
    wide = q.new_empty(0, dtype=accumulator_dtype(q.dtype)) if group > 1 else q
    dk = new_output((B, H, S, E), wide)
    dv = new_output((B, H, S, EV), wide)
    # Entries no program visits (keys hidden by the causal rule) have gradient 0: zeros.
    dmask = (torch.zeros((B, H, L, S), dtype=mask.dtype, device=q.device) if mask_grad
             else q.new_empty(0))
    mask_args, mask_kind = mask_arguments(mask)
    # What both backward kernels read, by name.
    shared = dict(**strided("q_ptr", q, Q_STRIDES), **strided("k_ptr", k, K_STRIDES),
                  **strided("v_ptr", v, V_STRIDES), **strided("do_ptr", dout, DOUT_STRIDES),
                  **mask_args, lse_ptr=lse, delta_ptr=delta,
                  seed_ptr=seed if dropout_p > 0.0 else None, **scalars, qk_scale2=qk_scale2,
                  scale=float(scale), dropout_p=float(dropout_p), causal_shift=int(causal_shift),
                  length_bucket=length_bucket(L, S), MASK_KIND=mask_kind, **constexprs)
    heavy = heavy_launch(mask_kind, dropout_p)
    kernel, launch = _kernel_for("backward_key", attention_backward_key_kernel, q.dtype,
                                 constexprs["BLOCK_D"], heavy)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * H)  # noqa: E731
    kernel[grid](**shared, dk_ptr=dk, dv_ptr=dv, dmask_ptr=dmask if mask_grad else None,
                 MASK_GRAD=mask_grad, **launch)
    kernel, launch = _kernel_for("backward_query", attention_backward_query_kernel, q.dtype,
                                 constexprs["BLOCK_D"], heavy)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](**shared, dq_ptr=dq, **launch)
    if group > 1:
        dk = dk.view(B, k.shape[1], group, S, E).sum(2).to(k.dtype)
        dv = dv.view(B, k.shape[1], group, S, EV).sum(2).to(v.dtype)
    return dq, dk, dv, dmask


KERNELS = {"forward": attention_forward_kernel, "backward_key": attention_backward_key_kernel,
           "backward_query": attention_backward_query_kernel}


def spec_types(dtype: torch.dtype, heavy: bool) -> tuple[dict, dict]:
    """(pointer, scalar) argument types the attention kernels (and relative attention's) share
    beyond the input dtype's pointers and int32 scalars: row statistics in the accumulator
    dtype, the int64 seed, the mask as the input dtype (heavy: a float tile) or uint8."""
    acc = accumulator_dtype(dtype)
    pointers = {"lse_ptr": acc, "delta_ptr": acc, "seed_ptr": "i64",
                "mask_ptr": dtype if heavy else "u8"}
    return pointers, {"qk_scale2": "fp32", "scale": "fp32", "dropout_p": "fp32"}


def kernel_specs(kernel: str, dtype: torch.dtype, head_dim: int, heavy: bool,
                 shifted: bool = False) -> list[dict]:
    """Every autotuning candidate of one kernel for a dtype, head dim and feature set, causal,
    on the longest path of that set: heavy = a float mask tile with its gradient and dropout;
    light = a key-padding mask (one row of S keys); shifted = the bottom-right diagonal."""
    pointers, scalars = spec_types(dtype, heavy)
    if kernel == "backward_key":  # per-head dK/dV in fp32 (summed over GQA groups after)
        acc = accumulator_dtype(dtype)
        pointers.update(dk_ptr=acc, dv_ptr=acc)
    specs = []
    for config in candidate_configs(kernel, dtype, head_dim, heavy):
        launch = dict(config.kwargs, MASK_KIND=FLOAT_MASK if heavy else BOOL_KEY_MASK,
                      num_warps=config.num_warps, num_stages=config.num_stages,
                      **feature_constexprs(dtype, head_dim, head_dim, True, shifted, heavy,
                                           **GPU_DOT))
        if kernel == "backward_key":
            launch["MASK_GRAD"] = heavy
        # Light launches pass no seed (no dropout) and no mask gradient: None, as the launchers.
        absent = [] if heavy else ["seed_ptr"] + (["dmask_ptr"] if kernel == "backward_key" else [])
        specs.append(launch_spec(KERNELS[kernel], dtype, launch, pointers=pointers,
                                 scalars=scalars, gemm=True, absent=absent))
    return specs


def launch_specs() -> list[dict]:
    """What the compile test checks: every candidate of the three kernels in bf16 at head dims
    64/128/256, light and heavy, and in fp32 at 64/128; the bottom-right causal compilation of
    the light bf16 ones at 64/128."""
    return ([spec for kernel in KERNELS for d in (64, 128, 256) for heavy in (False, True)
             for spec in kernel_specs(kernel, torch.bfloat16, d, heavy)]
            + [spec for kernel in KERNELS for d in (64, 128)
               for spec in kernel_specs(kernel, torch.float32, d, False)]
            + [spec for kernel in KERNELS for d in (64, 128)
               for spec in kernel_specs(kernel, torch.bfloat16, d, False, shifted=True)])
