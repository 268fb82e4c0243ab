"""Input validation shared by the public ops: one clear error naming the op, the argument,
what was expected and what was received, before any kernel sees the input."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class InputError(ValueError, RuntimeError):
    """A fastseq op received an argument of the wrong shape, dtype or device. Both a ValueError
    and a RuntimeError: torch raises RuntimeError for most bad RNN, cell and SDPA inputs (wrong
    widths, batch mismatches, mixed dtypes) and ValueError for others (wrong number of dims,
    input dtype against the weights'), so code written against torch's layers (`except
    RuntimeError`, torch's own tests) catches fastseq's errors where it caught torch's."""


def fail(op: str, message: str, error: type[InputError] = InputError) -> None:
    raise error(f"{op}: {message}")


def check_tensor(op: str, name: str, value, *, ndims: Sequence[int] | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndims is not None and value.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        fail(op, f"{name} must be {want}, got {value.dim()}-D with shape {list(value.shape)}")


def check_shape(op: str, name: str, value: torch.Tensor, shape: tuple, meaning: str, **names) -> None:
    """value.shape == shape; `meaning` spells the shape in words, formatted with `names` only
    when the check fails (messages are not built on the hot path)."""
    if value.shape != shape:
        fail(op, f"{name} must have shape {meaning.format(**names)} = {list(shape)}, "
                 f"got {list(value.shape)}")


def check_same_dtype_device(op: str, reference: tuple[str, torch.Tensor], others) -> None:
    """Every (name, tensor) in `others` (None entries skipped) matches `reference`'s dtype and device."""
    ref_name, ref = reference
    if ref.dtype not in FLOAT_DTYPES:
        fail(op, f"{ref_name} must be a floating-point tensor (float16, bfloat16, float32, "
                 f"float64), got {ref.dtype}")
    for name, value in others:
        if value is None:
            continue
        if value.dtype != ref.dtype:
            fail(op, f"{name} must have dtype {ref.dtype} (the dtype of {ref_name}), got {value.dtype}")
        if value.device != ref.device:
            fail(op, f"{name} must be on device {ref.device} (the device of {ref_name}), "
                     f"got {value.device}")


def check_mask(op: str, attn_mask, query: torch.Tensor, target: tuple, spelled: str) -> None:
    """An attention mask: a bool or query-dtype tensor on the query's device that broadcasts to
    `target` (spelled in words as `spelled`, e.g. "[B, H, Lq, Lk]")."""
    check_tensor(op, "attn_mask", attn_mask)
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        fail(op, f"attn_mask must be bool or the query's dtype {query.dtype}, got "
                 f"{attn_mask.dtype}")
    if attn_mask.device != query.device:
        fail(op, f"attn_mask must be on {query.device} (query's device), got {attn_mask.device}")
    try:
        broadcast = torch.broadcast_shapes(attn_mask.shape, target)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(target):
        fail(op, f"attn_mask must broadcast to {spelled} = {list(target)}, got shape "
                 f"{list(attn_mask.shape)}")


def checked_lengths(op: str, lengths, steps: int, batch: int) -> torch.Tensor:
    """Per-row sequence lengths (a list or an integer tensor) as a tensor where they live, after
    checking one per batch row, each in [0, steps]: a CPU list or tensor costs no GPU sync,
    CUDA lengths are checked with one (not while compiling: no host read in a graph)."""
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        fail(op, f"lengths must be 1-D with one length per batch row [{batch}], got shape "
                 f"{list(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        fail(op, f"lengths must be integers, got {lengths.dtype}")
    if not torch.compiler.is_compiling() and batch > 0:
        low, high = int(lengths.min()), int(lengths.max())
        if low < 0 or high > steps:
            fail(op, f"lengths must lie in [0, {steps}] (the input's steps), got values from "
                     f"{low} to {high}")
    return lengths


def check_like_parameters(module: str, name: str, value: torch.Tensor,
                          parameter: torch.Tensor, error: type[InputError] = InputError) -> None:
    """A module's input `value` has its parameters' dtype and device, as torch's modules ask.
    Under autocast the dtypes may differ: the ops cast inputs and weights themselves (torch's
    RNN check is skipped there too)."""
    other_dtype = value.dtype != parameter.dtype and not torch._C._is_any_autocast_enabled()
    if other_dtype or value.device != parameter.device:
        fail(module, f"{name} is {value.dtype} on {value.device}, the module's parameters are "
                     f"{parameter.dtype} on {parameter.device}: convert one ({name}.to(...) or "
                     "module.to(...))", error)


def check_features(module: str, name: str, value: torch.Tensor, size_name: str, size: int,
                   error: type[InputError] = InputError) -> None:
    """value's last dim is the module's `size_name` (input_size, embed_dim, ...)."""
    if value.shape[-1] != size:
        fail(module, f"{name} must have {size_name} {size} features in its last dim, got shape "
                     f"{list(value.shape)}", error)


def needs_grad(*tensors) -> bool:
    """Whether autograd will want a backward from an op over these tensors (None entries
    skipped): grad mode on and one of them requiring grad. The ops save workspaces for the
    backward, or take forward-only kernels, by it."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
