"""The recurrent state's gate as one elementwise pass (fastseq.ops.block_recurrent_gate; the
math is fastseq.reference.block_recurrent.block_recurrent_gate), forward and backward.

Plain PyTorch runs the fixed gate as 4 kernels (sigmoid, 1 - g, two products and a sum: the
state and y read, two [N, d] temporaries written and read back) and the LSTM gate as 7; here
each is one launch reading its inputs once and writing the next state (the backward: one
launch writing every input's gradient). Rows of d features, BLOCK elements a program; the
math in fp32 (fp64 for fp64 inputs).
"""
import torch
import triton
import triton.language as tl

from ..common import INTERPRETED, launch_spec, new_output, sigmoid, tl_accumulator_dtype

BLOCK = 1024 if not INTERPRETED else 64  # elements a program (GPU: 8 per thread at 4 warps)


@triton.jit
def block_recurrent_gate_forward_kernel(state_ptr, y_ptr, bias_ptr, forget_ptr, remember_ptr,
                                        out_ptr, N, D, LSTM: tl.constexpr,
                                        BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    state = tl.load(state_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if LSTM:
        keep = sigmoid(tl.load(forget_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE) + 1.0)
        take = sigmoid(tl.load(remember_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE) - 1.0)
    else:
        keep = sigmoid(tl.load(bias_ptr + offs % D, mask=mask, other=0.0).to(ACC_DTYPE))
        take = 1.0 - keep
    tl.store(out_ptr + offs, (state * keep + y * take).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def block_recurrent_gate_backward_kernel(grad_ptr, state_ptr, y_ptr, bias_ptr, forget_ptr,
                                         remember_ptr, dstate_ptr, dy_ptr, dfirst_ptr,
                                         dsecond_ptr, N, D, LSTM: tl.constexpr,
                                         BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """d(state), d(y), and per element d(forget), d(remember) (LSTM) or d(gate_bias)'s terms
    (the fixed gate: summed over rows by the launcher)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    state = tl.load(state_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if LSTM:
        keep = sigmoid(tl.load(forget_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE) + 1.0)
        take = sigmoid(tl.load(remember_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE) - 1.0)
        tl.store(dfirst_ptr + offs, (grad * state * keep * (1.0 - keep)).to(
            dfirst_ptr.dtype.element_ty), mask=mask)
        tl.store(dsecond_ptr + offs, (grad * y * take * (1.0 - take)).to(
            dsecond_ptr.dtype.element_ty), mask=mask)
    else:
        keep = sigmoid(tl.load(bias_ptr + offs % D, mask=mask, other=0.0).to(ACC_DTYPE))
        take = 1.0 - keep
        tl.store(dfirst_ptr + offs, (grad * (state - y) * keep * take).to(
            dfirst_ptr.dtype.element_ty), mask=mask)
    tl.store(dstate_ptr + offs, (grad * keep).to(dstate_ptr.dtype.element_ty), mask=mask)
    tl.store(dy_ptr + offs, (grad * take).to(dy_ptr.dtype.element_ty), mask=mask)


def _flat(t):
    return t.contiguous().view(-1) if t is not None else None


def gate_forward(state, y, bias, forget, remember):
    """next state, shaped and typed like `state` (inputs made contiguous)."""
    lstm = bias is None
    out = new_output(state.shape, state)
    N, D = state.numel(), state.shape[-1]
    if N:
        block_recurrent_gate_forward_kernel[(triton.cdiv(N, BLOCK),)](
            _flat(state), _flat(y), bias if bias is not None else state,
            _flat(forget) if lstm else state, _flat(remember) if lstm else state, out, N, D,
            LSTM=lstm, BLOCK=BLOCK,
            ACC_DTYPE=tl_accumulator_dtype(state.dtype))
    return out


def gate_backward(grad, state, y, bias, forget, remember):
    """(d state, d y, d gate_bias [D] or empty, d forget, d remember (LSTM) or empty)."""
    lstm = bias is None
    N, D = state.numel(), state.shape[-1]
    dstate, dy = new_output(state.shape, state), new_output(y.shape, y)
    dfirst = new_output(state.shape, state)  # d(forget), or d(bias)'s terms per element
    dsecond = new_output(state.shape, state) if lstm else state.new_empty(0)
    if N:
        block_recurrent_gate_backward_kernel[(triton.cdiv(N, BLOCK),)](
            _flat(grad), _flat(state), _flat(y), bias if bias is not None else state,
            _flat(forget) if lstm else state, _flat(remember) if lstm else state, dstate, dy,
            dfirst, dsecond if lstm else dfirst, N, D, LSTM=lstm, BLOCK=BLOCK,
            ACC_DTYPE=tl_accumulator_dtype(state.dtype))
    if lstm:
        return dstate, dy, state.new_empty(0), dfirst, dsecond
    dbias = dfirst.reshape(N // D if D else 0, D).sum(0, dtype=torch.float64 if state.dtype == torch.float64
                                      else torch.float32).to(bias.dtype)
    return dstate, dy, dbias, state.new_empty(0), state.new_empty(0)


def launch_specs() -> list[dict]:
    """Both kernels, both gates, bf16 and fp32 (no GEMM: plain loads, sigmoids, stores)."""
    return [launch_spec(kernel, dtype, {"LSTM": lstm, "BLOCK": 1024, "num_warps": 4,
                                        "num_stages": 1,
                                        "ACC_DTYPE": tl_accumulator_dtype(dtype)})
            for kernel in (block_recurrent_gate_forward_kernel,
                           block_recurrent_gate_backward_kernel)
            for dtype in (torch.bfloat16, torch.float32) for lstm in (False, True)]
