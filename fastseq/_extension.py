"""Loads the compiled extension fastseq._C, when it was built, and reports how it was built."""
from __future__ import annotations

try:
    from . import _C  # registers torch.ops.fastseq.* C++ ops on import
except ImportError as error:  # built with FASTSEQ_SKIP_EXTENSION=1 or without a compiler
    _C = None
    LOAD_ERROR: str | None = str(error)
else:
    LOAD_ERROR = None


def is_built() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.with_cuda)


def build_info() -> dict:
    """How fastseq._C was built: torch and CUDA versions, CUDA architectures."""
    if _C is None:
        return {"built": False, "error": LOAD_ERROR}
    return {
        "built": True,
        "path": _C.__file__,
        "torch_version": _C.torch_version,
        "with_cuda": bool(_C.with_cuda),
        "cuda_version": _C.cuda_version or None,
        "cuda_archs": _C.cuda_archs.split(";") if _C.cuda_archs else [],
    }
