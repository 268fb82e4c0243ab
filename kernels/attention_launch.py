"""Block sizes and launchers of the attention kernels (kernels/attention.py).

On a GPU each kernel is autotuned (triton.autotune) over a few configurations chosen by dtype
and head dim, keyed on the power-of-two bucket of the longest length, so a new length in the
same bucket reuses the choice instead of benchmarking again (~0.3 s per key). The lists are
starting points in the FlashAttention-2 / Triton-tutorial range, not yet measured on an H100
(no GPU has been lent to this project): bench/NOTES.md records what to measure. Under the
interpreter one fixed 16 x 16 configuration, so CI's small odd shapes cross several blocks and
the causal diagonal.
"""
import torch
import triton

from .attention import (BOOL_KEY_MASK, BOOL_MASK, FLOAT_KEY_MASK, FLOAT_MASK, NO_MASK,
                        attention_backward_key_kernel,
                        attention_backward_query_kernel, attention_forward_kernel)
from .common import INTERPRETED, accumulator_dtype, dot_precision, new_output

LOG2E = 1.4426950408889634
TL_ACC = {torch.float32: "fp32", torch.float64: "fp64"}


def head_block(dim: int) -> int:
    """Head dims pad to a power of two (>= 16, tl.dot's smallest K): 40 -> 64, 80/96 -> 128."""
    return max(16, triton.next_power_of_2(dim))


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


def candidate_configs(kernel: str, dtype: torch.dtype, block_d: int) -> list:
    """(BLOCK_M, BLOCK_N, warps, stages) candidates. Larger head dims and wider dtypes take
    smaller tiles: a 128 x 128 fp32 accumulator alone is 64 KB of registers across 4 warps."""
    if dtype == torch.float64:
        return _configs([(16, 32, 4, 1), (32, 32, 4, 1)])
    wide = dtype == torch.float32
    if kernel == "forward":
        if block_d <= 64 and not wide:
            shapes = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
        elif block_d <= 128 and not wide:
            shapes = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)]
        else:
            shapes = [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)]
    elif kernel == "backward_key":  # BLOCK_N keys owned, BLOCK_M query rows streamed
        if block_d <= 128 and not wide:
            shapes = [(32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2)]
        else:
            shapes = [(32, 64, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2)]
    else:  # backward_query: BLOCK_M rows owned, BLOCK_N keys streamed
        if block_d <= 128 and not wide:
            shapes = [(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
        else:
            shapes = [(64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)]
    return _configs(shapes)


INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}
_tuned: dict = {}


def _kernel_for(kernel: str, fn, dtype: torch.dtype, block_d: int):
    """The interpreter's plain kernel, or on a GPU the autotuned wrapper for this dtype and
    head-dim class (built once per class)."""
    if INTERPRETED:
        return fn, dict(INTERPRETER_CONFIG, num_warps=4)
    key = (kernel, dtype, block_d)
    if key not in _tuned:
        _tuned[key] = triton.autotune(candidate_configs(kernel, dtype, block_d),
                                      key=["length_bucket"])(fn)
    return _tuned[key], {}


def _length_bucket(*lengths: int) -> int:
    return triton.next_power_of_2(max(lengths))


def _mask_arguments(mask, like):
    """(pointer tensor, kind, its 4 strides) of a [B, H, L, S] mask view; bool masks as uint8.
    A mask broadcast over the query rows (stride 0, e.g. key padding) is read as one row."""
    if mask is None:
        return like, NO_MASK, (0, 0, 0, 0)
    one_row = mask.stride(2) == 0 or mask.shape[2] == 1
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), BOOL_KEY_MASK if one_row else BOOL_MASK, mask.stride()
    return mask, FLOAT_KEY_MASK if one_row else FLOAT_MASK, mask.stride()


def _common(q, k, v, scale, is_causal, dropout_p):
    B, H, L, E = q.shape
    S, EV = k.shape[2], v.shape[3]
    constexprs = {"BLOCK_D": head_block(E), "BLOCK_DV": head_block(EV), "IS_CAUSAL": is_causal,
                  "DROPOUT": dropout_p > 0.0, "PRECISION": dot_precision(q.dtype),
                  "UPCAST": INTERPRETED, "ACC_DTYPE": triton.language.float64
                  if q.dtype == torch.float64 else triton.language.float32}
    scalars = (H, H // k.shape[1], L, S, E, EV)
    return B, H, L, S, E, EV, constexprs, scalars, float(scale) * LOG2E


def attention_forward(q, k, v, mask, seed, dropout_p: float, is_causal: bool, scale: float):
    """q [B, H, L, E], k [B, Hk, S, E], v [B, Hk, S, EV] (any strides), mask a [B, H, L, S] view
    or None, seed an int64 [1] tensor (read when dropout_p > 0). Returns (out [B, H, L, EV],
    lse [B, H, L] in fp32, fp64 for fp64 inputs)."""
    B, H, L, S, E, EV, constexprs, scalars, qk_scale2 = _common(q, k, v, scale, is_causal,
                                                                 dropout_p)
    out = new_output((B, H, L, EV), q)
    lse = new_output((B, H, L), q.new_empty(0, dtype=accumulator_dtype(q.dtype)))
    mask_arg, mask_kind, mask_strides = _mask_arguments(mask, q)
    kernel, launch = _kernel_for("forward", attention_forward_kernel, q.dtype,
                                 constexprs["BLOCK_D"])
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](q, k, v, out, lse, mask_arg, seed if seed is not None else lse,
                 *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
                 *scalars, qk_scale2, float(dropout_p), _length_bucket(L, S),
                 MASK_KIND=mask_kind, **constexprs, **launch)
    return out, lse


def attention_backward(dout, q, k, v, lse, delta, mask, mask_grad: bool, seed,
                       dropout_p: float, is_causal: bool, scale: float):
    """Gradients of attention_forward: dout [B, H, L, EV] (any strides), lse and delta
    (rowsum(dout * out) - dlse) [B, H, L] contiguous in the accumulator dtype. Returns (dq, dk,
    dv, dmask): dmask [B, H, L, S] in the mask's dtype when mask_grad, else an empty tensor."""
    B, H, L, S, E, EV, constexprs, scalars, qk_scale2 = _common(q, k, v, scale, is_causal,
                                                                 dropout_p)
    dq = new_output(q.shape, q)
    dk = new_output(k.shape, k)
    dv = new_output(v.shape, v)
    # Entries no program visits (keys hidden by the causal rule) have gradient 0: zeros.
    dmask = (torch.zeros((B, H, L, S), dtype=mask.dtype, device=q.device) if mask_grad
             else q.new_empty(0))
    mask_arg, mask_kind, mask_strides = _mask_arguments(mask, q)
    seed_arg = seed if seed is not None else lse
    bucket = _length_bucket(L, S)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *mask_strides)
    kernel, launch = _kernel_for("backward_key", attention_backward_key_kernel, q.dtype,
                                 constexprs["BLOCK_D"])
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * k.shape[1])  # noqa: E731
    kernel[grid](q, k, v, dout, lse, delta, mask_arg, seed_arg, dk, dv,
                 dmask if mask_grad else q, *strides, *scalars, qk_scale2, float(scale),
                 float(dropout_p), bucket, MASK_KIND=mask_kind, MASK_GRAD=mask_grad,
                 **constexprs, **launch)
    kernel, launch = _kernel_for("backward_query", attention_backward_query_kernel, q.dtype,
                                 constexprs["BLOCK_D"])
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](q, k, v, dout, lse, delta, mask_arg, seed_arg, dq, *strides, *scalars,
                 qk_scale2, float(scale), float(dropout_p), bucket, MASK_KIND=mask_kind,
                 **constexprs, **launch)
    return dq, dk, dv, dmask
