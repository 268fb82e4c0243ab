"""Which native recurrence runs one pass of fastseq.ops.rnn_layer: the persistent kernel (one
cooperative launch for every step, each SM's slice of W_hh in shared memory for the whole
sequence) or the GEMM-per-step loop (a cuBLAS or MKL GEMM and one fused pointwise kernel per
step). The one place this is decided: the forward (ops/rnn.py, whose backend declaration
reports it as the native variant) and the backward (the autograd formula in
ops/rnn_registration.py) each ask here, separately: the two read and write the same
workspace, and a backward's plan fits at batches where its forward's does not (the forward's
partial sums are G times wider: LSTM H=313 fp32 on the CPU twin's plan fits 49 rows forward,
64 backward).

The plan itself is C++ (csrc/include/fastseq/rnn_persistent.h: plan_persistent, the one the
ops run). This module reads it as a table: the largest batch that fits at each hidden size,
asked once per (mode, pass, dtype, device) and kept. "batch <= table[hidden]" then also holds
under torch.compile with symbolic sizes (Dynamo guards on it), where a call into C++ with a
symbolic size could not be traced.

FASTSEQ_PERSISTENT, read when a call runs (or when torch.compile traces it):
  unset  CUDA tensors take the persistent kernel where its plan fits; CPU tensors the loop
  0      the loop everywhere
  1      the persistent kernel wherever its plan fits, CPU tensors included: there its C++ twin
         runs the CUDA kernel's phases CTA by CTA (slow; it tests the algorithm without a GPU)
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .. import _extension, described_gpu

SETTINGS = ("", "0", "1")


def _switched_off(device: torch.device) -> Optional[str]:
    """Why no call on `device` runs the persistent kernel, whatever its size; None if some can."""
    setting = os.environ.get("FASTSEQ_PERSISTENT", "")
    if setting not in SETTINGS:
        raise ValueError(f"FASTSEQ_PERSISTENT must be unset, 0 or 1; got {setting!r}")
    if setting == "0":
        return "FASTSEQ_PERSISTENT=0 turns the persistent kernel off"
    if not _extension.is_built():
        return f"fastseq._C is not built ({_extension.LOAD_ERROR})"
    if device.type == "cpu" and setting != "1":
        return ("on CPUs the loop runs; the persistent kernel's C++ twin (FASTSEQ_PERSISTENT=1) "
                "is for testing the algorithm")
    if device.type not in ("cpu", "cuda"):
        return f"the persistent kernel runs on CUDA (and its twin on CPU), not {device.type}"
    return None


@functools.lru_cache(maxsize=None)
def _limits(mode: str, backward: bool, dtype: str, target: tuple) -> tuple[int, ...]:
    return _extension._C.persistent_batch_limits(mode, backward, dtype, *target)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _target(device: torch.device) -> tuple:
    """The plan's target as _C's queries take it: (device type, index, multiprocessors, shared
    memory, cooperative launch); a described GPU (fastseq.explain_on_gpu) gives the last three,
    a real device has them read off it."""
    gpu = described_gpu.current()
    if device.type == "cuda" and gpu is not None:
        return ("gpu", -1, gpu.multiprocessors, gpu.shared_memory_per_block_optin,
                gpu.cooperative_launch)
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else -1)
    return (device.type, index, 0, 0, False)


@torch.compiler.assume_constant_result
def batch_limits(mode: str, backward: bool, dtype: torch.dtype,
                 device: torch.device) -> tuple[int, ...]:
    """The largest batch the persistent plan fits at each hidden size 0 .. len-1 (empty: none
    fits on this device and dtype). A constant to torch.compile: it depends only on these
    arguments, which Dynamo guards on already."""
    return _limits(mode, backward, _dtype_name(dtype), _target(device))


def runs_persistent(mode: str, backward: bool, batch, hidden, dtype: torch.dtype,
                    device: torch.device) -> bool:
    """Whether this pass (the forward, or the backward when `backward`) of a layer of `batch`
    rows and `hidden` units runs the persistent kernel; else the GEMM-per-step loop."""
    if _switched_off(device) is not None:
        return False
    limits = batch_limits(mode, backward, dtype, device)
    return 0 < hidden < len(limits) and batch <= limits[hidden]


def refusal(mode: str, backward: bool, batch: int, hidden: int, dtype: torch.dtype,
            device: torch.device) -> Optional[str]:
    """Why this pass runs the loop, in the plan's own words (None when it runs the persistent
    kernel). For reports (fastseq.explain): eager sizes only."""
    off = _switched_off(device)
    if off is not None:
        return off
    if runs_persistent(mode, backward, batch, hidden, dtype, device):
        return None
    if hidden == 0:
        return "a layer of hidden size 0 has nothing to run"
    why = _extension._C.persistent_refusal(mode, backward, batch, hidden, _dtype_name(dtype),
                                           *_target(device))
    if why:
        return why
    # The table keeps the batches up to the first that does not fit (a rule that holds for
    # symbolic sizes); this batch fits alone but a smaller one does not.
    return (f"batch {batch} is past the largest batch that fits with every smaller one "
            f"({batch_limits(mode, backward, dtype, device)[hidden]})")


def describe(mode: str, batch: int, hidden: int, dtype: torch.dtype,
             device: torch.device) -> str:
    """What the native backend runs for a layer's forward and backward, and why (explain's
    words for the native variant)."""
    loop = ("the C++ loop, a GEMM and one fused pointwise pass per step" if device.type == "cpu"
            else "the loop, a cuBLAS GEMM and one fused pointwise kernel per step")
    passes = []
    for backward in (False, True):
        why = refusal(mode, backward, batch, hidden, dtype, device)
        if why is None:
            limit = batch_limits(mode, backward, dtype, device)[hidden]
            passes.append(f"the persistent kernel (its plan fits up to batch {limit} at hidden "
                          f"size {hidden})")
        else:
            passes.append(f"{loop} ({why})")
    if passes[0] == passes[1]:
        return f"forward and backward: {passes[0]}"
    return f"forward: {passes[0]}; backward: {passes[1]}"
