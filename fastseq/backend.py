"""Backends and how an op chooses one.

  triton     fastseq's Triton kernels (CUDA GPUs; CPU tensors through TRITON_INTERPRET=1)
  native     the C++/CUDA extension fastseq._C: CUDA kernels for GPU tensors, C++ for CPU ones
  torch      PyTorch's own kernels for the same computation (aten/cuDNN), where torch has them
  reference  fastseq.reference: plain, readable PyTorch; the ground truth

`auto` (the default) takes, per call, the first backend of the op's preference order for that
device that can serve the call; each backend states why it cannot (not built, no GPU, dtype),
and an explicitly requested backend that cannot serve a call raises BackendError with that
reason instead of silently running something else. Override order: an op's `backend=`
keyword, then the innermost `use_backend(...)` block, then the FASTSEQ_BACKEND variable.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Mapping, Sequence

import torch

from . import _extension
from ._versions import MIN_TRITON, dotted, version_tuple

BACKENDS = ("triton", "native", "torch", "reference")
CHOICES = ("auto",) + BACKENDS

try:
    import triton

    TRITON_VERSION: str | None = triton.__version__
except ImportError:
    TRITON_VERSION = None


def triton_refusal(version: str | None) -> str | None:
    """Why a Triton of this version (None: not installed) cannot serve any call, or None."""
    if version is None:
        return "Triton is not installed"
    if version_tuple(version) < MIN_TRITON:
        return f"Triton {version} is older than fastseq's kernels support (>= {dotted(MIN_TRITON)})"
    return None


# Decided once, at import (a module constant: nothing to look up in a traced call).
_TRITON_REFUSAL = triton_refusal(TRITON_VERSION)

# The innermost use_backend() name; a plain module global, which torch.compile guards on.
_forced_backend: list[str | None] = [None]


class BackendError(RuntimeError):
    """The requested backend cannot run this call, or no backend can."""


def _check_choice(name: str, where: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{where}: backend must be one of {', '.join(CHOICES)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the fastseq ops inside the block on backend `name` ("auto" restores the choice)."""
    _check_choice(name, "fastseq.use_backend")
    previous = _forced_backend[0]
    _forced_backend[0] = name
    try:
        yield
    finally:
        _forced_backend[0] = previous


def requested_backend(keyword: str | None) -> str:
    if keyword is not None:
        return _check_choice(keyword, "backend=")
    if _forced_backend[0] is not None:
        return _forced_backend[0]
    return _check_choice(os.environ.get("FASTSEQ_BACKEND", "auto") or "auto", "FASTSEQ_BACKEND")


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on `device`, or None if it can."""
    if _TRITON_REFUSAL is not None:
        return _TRITON_REFUSAL
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _interpreter_on():
            return None
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before importing fastseq)"
    return f"Triton runs on CUDA tensors (and CPU ones through its interpreter), not {device.type}"


def triton_attention_unavailable(query: torch.Tensor, value: torch.Tensor,
                                 max_head_dim: int) -> str | None:
    """Why a Triton attention kernel cannot take these tensors: the device, or a head dim above
    the kernel's limit (its accumulators hold a block of rows x head dim in registers)."""
    reason = triton_unavailable(query.device)
    if reason is not None:
        return reason
    if max(query.shape[-1], value.shape[-1]) > max_head_dim:
        return (f"head dims up to {max_head_dim} (got query {query.shape[-1]}, "
                f"value {value.shape[-1]})")
    return None


def native_unavailable(device: torch.device) -> str | None:
    """Why the native (C++/CUDA) backend cannot run on `device`, or None if it can."""
    if not _extension.is_built():
        return f"the extension fastseq._C is not built ({_extension.LOAD_ERROR})"
    if device.type == "cuda":
        if not _extension.has_cuda_kernels():
            return "fastseq._C was built without CUDA kernels (no nvcc at build time)"
        # Dynamo folds get_device_properties to a constant; torch caches it per device.
        properties = torch.cuda.get_device_properties(device)
        return _extension.cuda_arch_mismatch((properties.major, properties.minor))
    if device.type not in ("cpu", "cuda"):
        return f"fastseq._C has kernels for CPU and CUDA tensors, not {device.type}"
    return None


def choose(
    op: str,
    requested: str,
    preference: Sequence[str],
    unsupported: Mapping[str, Callable[[], str | None]],
) -> str:
    """The backend that runs this call of `op`.

    `unsupported[name]()` returns why backend `name` cannot serve the call (None: it can);
    `preference` is the order `auto` tries, best first. Never falls back silently from a
    backend the user asked for.
    """
    if requested != "auto":
        if requested not in unsupported:
            raise BackendError(
                f"{op}: backend {requested!r} has no implementation of this op "
                f"(it has: {', '.join(unsupported)})"
            )
        reason = unsupported[requested]()
        if reason is not None:
            raise BackendError(f"{op}: backend {requested!r} cannot run this call: {reason}")
        return requested
    reasons = []
    for name in preference:
        reason = unsupported[name]()
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    raise BackendError(f"{op}: no backend can run this call ({'; '.join(reasons)})")


def backends() -> dict:
    """What each backend can do on this machine, and why not where it cannot."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None

    def per_device(unavailable: Callable[[torch.device], str | None]) -> dict:
        report = {"cpu": unavailable(cpu) is None}
        cuda_reason = unavailable(cuda) if gpu else "no GPU (torch.cuda.is_available() is False)"
        report["cuda"] = cuda_reason is None
        reasons = {"cpu": unavailable(cpu), "cuda": cuda_reason}
        report["available"] = report["cpu"] or report["cuda"]
        report["reasons"] = {k: v for k, v in reasons.items() if v is not None}
        return report

    everywhere = {"available": True, "cpu": True, "cuda": gpu is not None, "reasons": {}}
    return {
        "triton": dict(per_device(triton_unavailable), version=TRITON_VERSION,
                       interpreter=_interpreter_on()),
        "native": dict(per_device(native_unavailable), build=_extension.build_info()),
        "torch": dict(everywhere),
        "reference": dict(everywhere),
        "environment": {"device": gpu or "cpu", "torch": torch.__version__,
                        "triton": TRITON_VERSION},
    }
