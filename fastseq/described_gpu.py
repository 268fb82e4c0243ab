"""A GPU described by its properties, standing in for a real device where fastseq's choices
read one (fastseq.explain_on_gpu): the compute capability (which of fastseq._C's CUDA
architectures run on it), the multiprocessors and the opt-in shared memory per block (the
native recurrence's persistent plan), cooperative launch (its grid barrier). Nothing else of
a device enters a choice: Triton's and torch's refusals depend on the device type alone."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional


@dataclasses.dataclass(frozen=True)
class GPUDescription:
    name: str
    capability: tuple[int, int]
    multiprocessors: int
    shared_memory_per_block_optin: int  # bytes
    cooperative_launch: bool = True


# The GPU this project is lent (../shared/ARCHITECTURE.md, device tool): an H200, sm_90,
# 132 SMs; 227 KB of shared memory a block may opt into (Hopper's limit, 232,448 bytes).
H200 = GPUDescription("NVIDIA H200 (described)", (9, 0), 132, 232_448)

# The description in force (innermost describing() block), else None: choices read the device.
_current: list[Optional[GPUDescription]] = [None]


def current() -> Optional[GPUDescription]:
    return _current[0]


@contextlib.contextmanager
def describing(gpu: GPUDescription) -> Iterator[None]:
    """CUDA choices inside the block read `gpu` instead of a device."""
    previous = _current[0]
    _current[0] = gpu
    try:
        yield
    finally:
        _current[0] = previous
