"""The tolerance rule of fastseq's tests (fastseq/reference/tolerance.py): against a float64
reference, fastseq's error may be at most 2x the error of plain PyTorch in the same dtype, plus
a small absolute slack."""
import torch

from fastseq.reference.tolerance import max_error, rule_check  # noqa: F401 (max_error: re-exported)


def assert_within_rule(name: str, fast: torch.Tensor, plain: torch.Tensor, reference: torch.Tensor,
                       *, terms: int = 1):
    """fast and plain: the same quantity from fastseq and plain PyTorch in the tested dtype;
    reference: the float64 ground truth; terms: products summed per element (rule_check)."""
    assert fast.shape == reference.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values (an unwritten element reads NaN)"
    ok, err_fast, err_plain, bound = rule_check(fast, plain, reference, terms=terms)
    assert ok, (
        f"{name}: fastseq error {err_fast:.3g} > 2 x plain-PyTorch error {err_plain:.3g} "
        f"+ slack (bound {bound:.3g}) in {fast.dtype}")
