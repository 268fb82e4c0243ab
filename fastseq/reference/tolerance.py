"""The tolerance rule of fastseq's tests and GPU smoke checks (flash-attention's): against a
float64 reference, fastseq's error may be at most 2x the error of plain PyTorch in the same
dtype, plus a small absolute slack for values that happen to be exact in PyTorch's evaluation
order."""
import math

import torch

# Slack per dtype, relative to the reference's largest magnitude: ~2 ulps of each format
# (fp32 2^-23, fp16 2^-10, bf16 2^-7 per ulp).
SLACK = {torch.float64: 1e-12, torch.float32: 2.5e-7, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference.double()).abs().max().item() if value.numel() else 0.0


def rule_check(fast: torch.Tensor, plain: torch.Tensor, reference: torch.Tensor, *,
               terms: int = 1) -> tuple[bool, float, float, float]:
    """(within the rule, fastseq's error, plain PyTorch's error, the bound) for one quantity.

    fast and plain: the same quantity from fastseq and plain PyTorch in the tested dtype;
    reference: the float64 ground truth. terms: how many products each element sums (a weight
    gradient: every step of every row). Two correct summation orders of n terms differ by
    ~sqrt(n) ulps (the random-walk rounding bound), and plain PyTorch's order may be the lucky
    one: measured on an Intel Xeon, a [20 x 111] x [111 x 6] fp32 gradient GEMM was 6 ulps off
    where the step-by-step reference was 1.3 ulps, so the slack grows with sqrt(terms).
    Non-finite values (an unwritten, poisoned element reads NaN) are never within the rule."""
    scale = max(reference.abs().max().item(), 1.0) if reference.numel() else 1.0
    err_fast, err_plain = max_error(fast, reference), max_error(plain, reference)
    bound = 2 * err_plain + SLACK[fast.dtype] * scale * math.sqrt(terms)
    finite = bool(torch.isfinite(fast).all())
    return finite and err_fast <= bound, err_fast, err_plain, bound
