"""Loads the compiled extension fastseq._C, when it was built, and reports how it was built."""
from __future__ import annotations

import re

try:
    from . import _C  # registers torch.ops.fastseq.* C++ ops on import
except ImportError as error:  # built with FASTSEQ_SKIP_EXTENSION=1 or without a compiler
    _C = None
    LOAD_ERROR: str | None = str(error)
else:
    LOAD_ERROR = None


# The CMake CUDA architectures _C's CUDA code was compiled for ("90a", "80;90a"); () without.
CUDA_ARCHS: tuple[str, ...] = tuple(
    a for a in (_C.cuda_archs.split(";") if _C is not None and _C.cuda_archs else ()) if a)

_ARCH = re.compile(r"^(\d+)(\d)([af]?)(?:-(real|virtual))?$")


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code compiled for CMake CUDA architecture `arch` runs on a GPU of compute
    `capability` (major, minor). '90a' (arch-specific features such as wgmma, SASS and PTX
    alike): sm_90 only. '100f' (family): sm_10x with minor >= 0. '80-real' (SASS only): sm_8x
    with minor >= 0. '80' / '80-virtual' (PTX, which the driver compiles forward): any GPU
    from sm_80 on. Anything else ('native', 'all'): assumed to fit, as the build chose it."""
    match = _ARCH.match(arch.strip())
    if match is None:
        return True
    built = (int(match.group(1)), int(match.group(2)))
    suffix, kind = match.group(3), match.group(4)
    if suffix == "a":
        return capability == built
    if suffix == "f" or kind == "real":
        return capability[0] == built[0] and capability[1] >= built[1]
    return capability >= built


def cuda_arch_mismatch(capability: tuple[int, int]) -> str | None:
    """Why _C's CUDA kernels cannot run on a GPU of `capability` (no code for it: the launch
    would fail with 'no kernel image'), or None when one of its architectures fits."""
    if not CUDA_ARCHS or any(arch_runs_on(a, capability) for a in CUDA_ARCHS):
        return None
    major, minor = capability
    return (f"fastseq._C holds CUDA code for {', '.join(CUDA_ARCHS)} only, not this GPU's "
            f"sm_{major}{minor} (rebuild with FASTSEQ_CUDA_ARCHS=\"{major}{minor}\")")


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
        "cuda_archs": list(CUDA_ARCHS),
    }
