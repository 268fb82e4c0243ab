"""Helpers shared by fastseq's Triton kernels."""
import inspect
import os

import torch
import triton
import triton.language as tl

from .limits import accumulator_dtype  # noqa: F401  (the launchers' name for it)

# Read once at import: Triton decides interpretation when the kernels are defined.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tests fill every output with NaN before a kernel runs, so an element a kernel forgets to
# write shows up as NaN instead of passing on whatever the allocator left there.
POISON_OUTPUTS = os.environ.get("FASTSEQ_POISON_OUTPUTS", "0") == "1"


def new_output(shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised output tensor with `like`'s dtype and device (NaN-filled when poisoning)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for `dtype`: exact fp32 unless torch allows TF32 for matmuls,
    so fp32 results stay within 2x of torch's fp32 error (TF32 alone costs ~3e-4 relative)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def tl_accumulator_dtype(dtype: torch.dtype):
    """The kernels' ACC_DTYPE constexpr for inputs of `dtype` (fp64 stays fp64, else fp32)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def dot_acc(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST converts the operands to the accumulator's dtype first: needed under
    the interpreter, whose bf16 tl.dot returns garbage (measured: error 7.6e9 on a 5x7x3 product
    with triton 3.8), and never on a GPU, where bf16/fp16 operands feed the tensor cores.
    out_dtype is explicit: triton 3.6's tl.dot defaults to an fp32 result and asserts that an
    fp64 accumulator matches it (3.8 infers it from acc)."""
    if UPCAST:
        return tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, input_precision=PRECISION,
                      out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    """tanh through exp of a non-positive argument (never overflows): (1-e)/(1+e), e=exp(-2|x|).
    The recurrent cells' gates: cheap, and its cancellation near zero (tanh_accurate) stays inside
    their tolerance tests; the polynomial branch made the layer-normalized LSTM's bf16 forward
    spill under triton 3.6's sm_90 compile."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def tanh_accurate(x):
    """tanh without the cancellation of 1 - exp(-2|x|) near zero in fp32 (44,000 ulp at |x| =
    6e-6, ~3 ulp at 0.1): soft-capping's tanh(q.k * scale / cap) has arguments that small, and
    the KV-cache smoke's fp32 error reached 5x plain PyTorch's. Below |x| = 0.625 a minimax odd
    polynomial (Cephes' tanhf coefficients) takes over: 1.8 ulp at most over [-3, 3] (measured
    against float64 tanh). fp64 keeps the exp form (1e-16 / |x| relative, inside the float64
    tests' bounds); the dtype test resolves when the kernel compiles."""
    t = tanh(x)
    if x.dtype != tl.float64:
        z = x * x
        p = (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
             + 1.33314422036e-1) * z - 3.33332819422e-1
        t = tl.where(tl.abs(x) < 0.625, p * z * x + x, t)
    return t


def strided(pointer: str, tensor: torch.Tensor, strides: str) -> dict:
    """One tensor's launch arguments by name: `pointer` -> the tensor, and each of the
    space-separated `strides` names -> its stride along that dimension. Launchers pass these as
    keywords, so a wrong name fails at the launch instead of shifting every later positional
    argument; an absent tensor is `pointer=None` beside its kernel's flag."""
    names = strides.split()
    if len(names) != tensor.dim():
        raise ValueError(f"{pointer}: {len(names)} stride names for a {tensor.dim()}-d tensor")
    return {pointer: tensor, **dict(zip(names, tensor.stride()))}


# Launch specs: one compilation of a kernel as its launcher runs it on a GPU, as data. Each
# launcher module's launch_specs() lists the ones it can produce, built by the same function
# that builds its launch arguments, so the sm_90 compile test (tests/gpu/test_triton_gpu_compile.py)
# checks exactly what runs and a new kernel or configuration is checked without editing it.
AOT_ARCH = 90  # the H100/H200
POINTER_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                  torch.float64: "fp64"}
GPU_DOT = {"PRECISION": "ieee", "UPCAST": False}  # fp32 without TF32, no interpreter upcast


def _json_constexpr(value):
    return f"tl.{value.name}" if isinstance(value, tl.dtype) else value


def launch_spec(kernel, dtype: torch.dtype, launch: dict, *, pointers: dict | None = None,
                scalars: dict | None = None, gemm: bool = False, absent=()) -> dict:
    """`kernel` compiled with `launch` (its constexprs plus num_warps/num_stages) for pointers
    to `dtype`; `pointers` and `scalars` name arguments of other types (pointers default to
    `dtype`, scalars to int32). gemm: its half-precision GEMMs must run on the tensor cores.
    absent: pointer arguments the launcher passes as None (a tensor the call has not: Triton
    specializes None as a constexpr, which the kernel reads only under its HAS_ flag)."""
    fn = kernel.fn
    constexprs = {k: _json_constexpr(v) for k, v in launch.items()
                  if k not in ("num_warps", "num_stages")}
    unknown = set(absent) - set(inspect.signature(fn).parameters)
    if unknown:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(unknown)}")
    constexprs.update({name: None for name in absent})
    return {"module": fn.__module__.removeprefix("fastseq.kernels."), "kernel": fn.__name__,
            "arch": AOT_ARCH, "pointer_dtype": POINTER_DTYPES[dtype],
            "pointer_overrides": {k: POINTER_DTYPES.get(v, v) for k, v in (pointers or {}).items()},
            "scalar_overrides": dict(scalars or {}), "num_warps": launch.get("num_warps", 4),
            "num_stages": launch.get("num_stages", 3), "constexprs": constexprs, "gemm": gemm}
