"""Block sizes and launchers of the attention kernels (kernels/attention/kernel.py).

On a GPU each kernel is autotuned (triton.autotune) over a few configurations chosen by dtype,
head dim and feature set, keyed on the power-of-two bucket of the longest length, so a new
length in the same bucket reuses the choice instead of benchmarking again. The candidates are
the configurations that compiled for sm_90 without register spills; their speed has not been
measured (no GPU has been lent to this project): bench/NOTES.md records what to measure.
Under the interpreter one fixed 16 x 16 configuration, so CI's small odd shapes cross several
blocks and the causal diagonal.
"""
import dataclasses
from typing import Optional

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
# weight: "light", or "heavy" when the launch reads a mask tile or draws dropout (a [L, S]
# mask's per-element pointers or the Philox state cost registers). Every entry compiled for
# sm_90 without register spills on its own feature set under triton 3.6 and 3.8 alike
# (tests/gpu/test_triton_gpu_compile.py, run by both CI legs; the sweeps that chose them are in
# bench/NOTES.md, 2026-12-01, -02 and -06); most larger tiles spilled, and 3.6 spilled six 4-warp
# entries that 3.8 kept clean, which now take 8 warps or a narrower tile. For the dK/dV
# kernel BLOCK_N is the key block a program owns and BLOCK_M the query rows it streams.
HALF_CANDIDATES = {
    ("forward", 64, "light"): [(128, 64, 8), (64, 64, 4)],
    ("forward", 64, "heavy"): [(128, 32, 8), (64, 32, 8)],
    ("forward", 128, "light"): [(128, 32, 8), (64, 32, 8)],
    ("forward", 128, "heavy"): [(64, 16, 8)],
    ("forward", 256, "light"): [(32, 32, 8)],
    ("forward", 256, "heavy"): [(32, 16, 8)],
    ("backward_key", 64, "light"): [(32, 128, 8), (64, 64, 8)],
    ("backward_key", 64, "heavy"): [(32, 32, 4), (16, 64, 4)],
    ("backward_key", 128, "light"): [(32, 32, 8), (16, 32, 4)],
    ("backward_key", 128, "heavy"): [(32, 32, 8), (32, 16, 8)],
    ("backward_key", 256, "light"): [(16, 16, 4)],
    ("backward_key", 256, "heavy"): [(16, 16, 8)],
    ("backward_query", 64, "light"): [(128, 32, 8), (64, 64, 8), (64, 32, 4)],
    ("backward_query", 64, "heavy"): [(128, 32, 8)],
    ("backward_query", 128, "light"): [(32, 32, 8), (32, 16, 4), (16, 32, 4)],
    ("backward_query", 128, "heavy"): [(32, 32, 8), (32, 16, 4)],
    ("backward_query", 256, "light"): [(16, 32, 8)],
    ("backward_query", 256, "heavy"): [(16, 16, 8)],
    # "described": a window's left side, key ranges, soft-capping, ALiBi, sinks or packed
    # sequences (their scalars and the third loop), else the light list; with a mask tile or
    # dropout as well ("heavy+described"), the heavy list. 2026-12-06's sweep: these spilled
    # with the light tiles.
    ("forward", 128, "described"): [(128, 16, 8), (64, 32, 8)],
    ("backward_key", 64, "described"): [(32, 128, 8), (32, 64, 8)],
    ("backward_key", 256, "described"): [(16, 16, 8)],
    ("backward_query", 64, "described"): [(128, 32, 8), (64, 32, 4)],  # 3.6 spilled 64x64
    ("backward_query", 128, "described"): [(32, 32, 8), (16, 32, 4)],
    ("forward", 64, "heavy+described"): [(64, 32, 8), (64, 16, 4)],
    ("backward_query", 128, "heavy+described"): [(32, 32, 8)],
}
FALLBACK_WEIGHT = {"described": "light", "heavy+described": "heavy"}
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


def candidate_configs(kernel: str, dtype: torch.dtype, block_d: int, weight: str) -> list:
    """The autotuner's candidates for this kernel, dtype, padded head dim and feature weight
    (HALF_CANDIDATES)."""
    if dtype == torch.float64:  # gradcheck-sized work only
        return _configs([(16, 16, 4, 1)])
    if dtype == torch.float32:  # head dims above 128 reuse the 128 list (not AOT-checked)
        shapes = FP32_CANDIDATES[(kernel, min(head_class(block_d), 128))]
        return _configs([(m, n, w, 2) for m, n, w in shapes])
    key = (kernel, head_class(block_d), weight)
    if key not in HALF_CANDIDATES:
        key = (kernel, head_class(block_d), FALLBACK_WEIGHT[weight])
    return _configs([(m, n, w, 3) for m, n, w in HALF_CANDIDATES[key]])


INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}
_tuned: dict = {}


def _kernel_for(kernel: str, fn, dtype: torch.dtype, block_d: int, weight: str):
    """The interpreter's plain kernel, or on a GPU the autotuned wrapper for this dtype,
    head-dim class and feature weight (built once per combination)."""
    if INTERPRETED:
        return fn, dict(INTERPRETER_CONFIG, num_warps=4)
    key = (kernel, dtype, block_d, weight)
    if key not in _tuned:
        # The key names the constexprs that change the work per tile (triton.autotune keys on
        # the listed arguments and the tensors' dtypes only).
        _tuned[key] = triton.autotune(
            candidate_configs(kernel, dtype, block_d, weight),
            key=FEATURE_KEYS)(fn)
    return _tuned[key], {}


def heavy_launch(mask_kind: int, dropout_p: float) -> bool:
    """A mask tile or dropout: the launches that need the smaller candidate tiles."""
    return mask_kind in (BOOL_MASK, FLOAT_MASK) or dropout_p > 0.0


DESCRIBED = ("LEFT_BOUND", "KEY_RANGE", "SOFTCAP", "ALIBI", "SINKS", "VARLEN")


def launch_weight(heavy: bool, constexprs: dict) -> str:
    """The candidate list's weight (HALF_CANDIDATES) of a launch."""
    described = any(constexprs[name] for name in DESCRIBED)
    return ("heavy+described" if heavy and described else "heavy" if heavy
            else "described" if described else "light")


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


@dataclasses.dataclass(frozen=True)
class Extras:
    """What a launch adds to plain masked attention (kernel.py's module docstring): packed
    sequences (cu_q/cu_k int32 [N + 1], max_seqlen_q/k their longest), per-row key ranges
    (key_start/key_end int32 [B]), the diagonal's alignment, the window's sides (-1: unbounded;
    causal is window_right = 0), soft-capping (0: off), ALiBi slopes [H] or [B, H] and sinks
    [H] (float tensors)."""
    cu_q: Optional[torch.Tensor] = None
    cu_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    key_start: Optional[torch.Tensor] = None
    key_end: Optional[torch.Tensor] = None
    bottom_right: bool = False
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi: Optional[torch.Tensor] = None
    sinks: Optional[torch.Tensor] = None

    @property
    def varlen(self) -> bool:
        return self.cu_q is not None


def feature_constexprs(dtype, block_d, block_dv, *, left=False, right=False, shifted=False,
                       varlen=False, key_range=False, softcap=False, alibi=False, sinks=False,
                       dropout=False, PRECISION, UPCAST) -> dict:
    """The constexprs every attention kernel takes (the launch and its specs). Each feature is
    its own compilation, so plain attention keeps its registers (a runtime diagonal shift alone
    made 4-5 sm_90 candidates spill: SHIFTED is set only when the shift can be non-zero)."""
    return {"BLOCK_D": block_d, "BLOCK_DV": block_dv, "LEFT_BOUND": left, "RIGHT_BOUND": right,
            "SHIFTED": shifted, "VARLEN": varlen, "KEY_RANGE": key_range, "SOFTCAP": softcap,
            "ALIBI": alibi, "SINKS": sinks, "DROPOUT": dropout, "PRECISION": PRECISION,
            "UPCAST": UPCAST, "ACC_DTYPE": tl_accumulator_dtype(dtype)}


FEATURE_KEYS = ["length_bucket", "BLOCK_D", "BLOCK_DV", "LEFT_BOUND", "RIGHT_BOUND", "SHIFTED",
                "MASK_KIND", "VARLEN", "KEY_RANGE", "SOFTCAP", "ALIBI", "SINKS", "DROPOUT"]


def _geometry(q, k, extras: Extras) -> tuple[int, int, int]:
    """(sequences, the longest one's query rows, its keys) of a launch: dense [B, H, L, E], or
    packed [1, H, T, E] whose sequences come from cu_q."""
    if extras.varlen:
        return extras.cu_q.shape[0] - 1, extras.max_seqlen_q, extras.max_seqlen_k
    return q.shape[0], q.shape[2], k.shape[2]


def _launch_arguments(q, k, v, mask, seed, dropout_p: float, extras: Extras, scale: float):
    """(arguments by name shared by the three kernels, constexprs, sequences, grid rows, grid
    keys) of one launch."""
    B, H, L, E = q.shape
    S, EV = k.shape[2], v.shape[3]
    sequences, rows, keys = _geometry(q, k, extras)
    mask_args, mask_kind = mask_arguments(mask)
    bounded = extras.window_left >= 0 or extras.window_right >= 0
    may_shift = extras.varlen or extras.key_start is not None or L != S
    constexprs = feature_constexprs(
        q.dtype, head_block(E), head_block(v.shape[3]), left=extras.window_left >= 0,
        right=extras.window_right >= 0,
        shifted=bool(extras.bottom_right and may_shift and (bounded or extras.alibi is not None)),
        varlen=extras.varlen, key_range=extras.key_start is not None,
        softcap=extras.softcap > 0, alibi=extras.alibi is not None,
        sinks=extras.sinks is not None, dropout=dropout_p > 0.0,
        PRECISION=dot_precision(q.dtype), UPCAST=INTERPRETED)
    strides = {**strided("q_ptr", q, Q_STRIDES), **strided("k_ptr", k, K_STRIDES),
               **strided("v_ptr", v, V_STRIDES)}
    if extras.varlen:  # one packed "batch": sequences are offsets along the rows
        strides.update(stride_qb=0, stride_kb=0, stride_vb=0)
    alibi = extras.alibi
    alibi_strides = ({"stride_ab": 0, "stride_ah": 0} if alibi is None else
                     {"stride_ab": alibi.stride(0) if alibi.dim() == 2 else 0,
                      "stride_ah": alibi.stride(-1)})
    softcap = float(extras.softcap)
    args = dict(**strides, **mask_args, seed_ptr=seed if dropout_p > 0.0 else None,
                cu_q_ptr=extras.cu_q, cu_k_ptr=extras.cu_k, key_start_ptr=extras.key_start,
                key_end_ptr=extras.key_end, alibi_ptr=alibi, **alibi_strides,
                stride_lb=0 if extras.varlen else H * L, stride_lh=L,
                H=H, GROUP=H // k.shape[1], L=L, S=S, E=E, EV=EV,
                qk_scale2=(softcap if softcap > 0 else float(scale)) * LOG2E,
                softcap_scale=float(scale) / softcap if softcap > 0 else 0.0,
                dropout_p=float(dropout_p), window_left=int(extras.window_left),
                window_right=int(extras.window_right), length_bucket=length_bucket(rows, keys),
                MASK_KIND=mask_kind)
    return args, constexprs, sequences, rows, keys


def attention_forward(q, k, v, mask, seed, dropout_p: float, scale: float,
                      extras: Extras = Extras()):
    """q [B, H, L, E], k [B, Hk, S, E], v [B, Hk, S, EV] (any strides; packed sequences:
    B = 1 and extras.cu_q/cu_k), mask a [B, H, L, S] view or None, seed an int64 [1] tensor
    (read when dropout_p > 0). Returns (out [B, H, L, EV], lse [B, H, L] in fp32, fp64 for
    fp64 inputs; the sinks included)."""
    B, H, L, _ = q.shape
    EV = v.shape[3]
    args, constexprs, sequences, rows, _ = _launch_arguments(q, k, v, mask, seed, dropout_p,
                                                             extras, scale)
    out = new_output((B, H, L, EV), q)
    lse = new_output((B, H, L), q.new_empty(0, dtype=accumulator_dtype(q.dtype)))
    kernel, launch = _kernel_for("forward", attention_forward_kernel, q.dtype,
                                 constexprs["BLOCK_D"], launch_weight(
                                     heavy_launch(args["MASK_KIND"], dropout_p), constexprs))
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), sequences * H)  # noqa: E731
    out_strides = strided("out_ptr", out, OUT_STRIDES)
    if extras.varlen:
        out_strides["stride_ob"] = 0
    kernel[grid](**args, **out_strides, lse_ptr=lse, sinks_ptr=extras.sinks, **constexprs,
                 **launch)
    return out, lse


def attention_backward(dout, q, k, v, lse, delta, mask, mask_grad: bool, seed,
                       dropout_p: float, scale: float, extras: Extras = Extras()):
    """Gradients of attention_forward: dout [B, H, L, EV] (any strides), lse and delta
    (rowsum(dout * out) - dlse) [B, H, L] contiguous in the accumulator dtype. Returns (dq, dk,
    dv, dmask): dmask [B, H, L, S] in the mask's dtype when mask_grad, else an empty tensor.
    The sinks' gradient is the caller's (a sum over rows of lse and delta)."""
    B, H, L, E = q.shape
    S, EV = k.shape[2], v.shape[3]
    args, constexprs, sequences, rows, keys = _launch_arguments(q, k, v, mask, seed, dropout_p,
                                                                extras, scale)
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
    shared = dict(**args, **strided("do_ptr", dout, DOUT_STRIDES), lse_ptr=lse,
                  delta_ptr=delta, scale=float(scale), **constexprs)
    if extras.varlen:
        shared["stride_dob"] = 0
    weight = launch_weight(heavy_launch(args["MASK_KIND"], dropout_p), constexprs)
    kernel, launch = _kernel_for("backward_key", attention_backward_key_kernel, q.dtype,
                                 constexprs["BLOCK_D"], weight)
    grid = lambda meta: (triton.cdiv(keys, meta["BLOCK_N"]), sequences * H)  # noqa: E731
    kernel[grid](**shared, dk_ptr=dk, dv_ptr=dv, dmask_ptr=dmask if mask_grad else None,
                 stride_gb=0 if extras.varlen else H * S, stride_gh=S, MASK_GRAD=mask_grad,
                 **launch)
    kernel, launch = _kernel_for("backward_query", attention_backward_query_kernel, q.dtype,
                                 constexprs["BLOCK_D"], weight)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), sequences * H)  # noqa: E731
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


# The feature sets the compile test checks, beyond plain causal attention with a mask: the
# path with everything a description and the score modifiers add (a window's two sides
# bottom-right, key ranges, soft-capping, ALiBi, sinks), and packed sequences with a window.
FEATURE_SETS = {
    "plain": {},
    "shifted": {"shifted": True},
    "described": {"left": True, "shifted": True, "key_range": True, "softcap": True,
                  "alibi": True, "sinks": True},
    "packed": {"left": True, "shifted": True, "varlen": True, "softcap": True, "alibi": True,
               "sinks": True},
}
# Pointer arguments of each feature (int32 offsets and ranges, fp32 slopes); None when off.
FEATURE_POINTERS = {"varlen": {"cu_q_ptr": "i32", "cu_k_ptr": "i32"},
                    "key_range": {"key_start_ptr": "i32", "key_end_ptr": "i32"},
                    "alibi": {"alibi_ptr": "fp32"}, "sinks": {"sinks_ptr": None}}


def kernel_specs(kernel: str, dtype: torch.dtype, head_dim: int, heavy: bool,
                 features: str = "plain") -> list[dict]:
    """Every autotuning candidate of one kernel for a dtype, head dim and feature set, causal,
    on the longest path of that set: heavy = a float mask tile with its gradient and dropout;
    light = a key-padding mask (one row of S keys); features: a FEATURE_SETS entry."""
    pointers, scalars = spec_types(dtype, heavy)
    scalars["softcap_scale"] = "fp32"
    if kernel == "backward_key":  # per-head dK/dV in fp32 (summed over GQA groups after)
        acc = accumulator_dtype(dtype)
        pointers.update(dk_ptr=acc, dv_ptr=acc)
    flags = dict(FEATURE_SETS[features], right=True)
    absent = [] if heavy else ["seed_ptr"] + (["dmask_ptr"] if kernel == "backward_key" else [])
    for feature, names in FEATURE_POINTERS.items():
        if feature == "sinks" and kernel != "forward":  # the backward kernels take no sinks
            continue
        if flags.get(feature):
            pointers.update({k: v or dtype for k, v in names.items()})
        else:
            absent += list(names)
    specs = []
    constexprs = feature_constexprs(dtype, head_dim, head_dim, dropout=heavy, **flags,
                                    **GPU_DOT)
    for config in candidate_configs(kernel, dtype, head_dim, launch_weight(heavy, constexprs)):
        launch = dict(config.kwargs, MASK_KIND=FLOAT_MASK if heavy else BOOL_KEY_MASK,
                      num_warps=config.num_warps, num_stages=config.num_stages, **constexprs)
        if flags.get("varlen"):
            launch["MASK_KIND"] = NO_MASK  # packed sequences take no mask tensor
            absent = sorted(set(absent) | {"mask_ptr"})
        if kernel == "backward_key":
            launch["MASK_GRAD"] = heavy
        specs.append(launch_spec(KERNELS[kernel], dtype, launch, pointers=pointers,
                                 scalars=scalars, gemm=True, absent=absent))
    return specs


def launch_specs() -> list[dict]:
    """What the compile test checks: every candidate of the three kernels in bf16 at head dims
    64/128/256, light and heavy, plain and described, and in fp32 at 64/128; the bottom-right
    and packed compilations of the light bf16 ones at 64/128."""
    return ([spec for kernel in KERNELS for d in (64, 128, 256) for heavy in (False, True)
             for features in ("plain", "described")
             for spec in kernel_specs(kernel, torch.bfloat16, d, heavy, features)]
            + [spec for kernel in KERNELS for d in (64, 128)
               for spec in kernel_specs(kernel, torch.float32, d, False)]
            + [spec for kernel in KERNELS for d in (64, 128) for features in ("shifted", "packed")
               for spec in kernel_specs(kernel, torch.bfloat16, d, False, features)])
