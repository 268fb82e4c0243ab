"""Tiles and launchers of the global-attention kernels (kernel.py).

One program per (batch row, query): a decoding step has B of them (B = 64 beams x sentences
is OpenNMT's default batch), a teacher-forced decoder without input feeding B x T. Each program
streams its row's keys in BLOCK_S tiles and the attention and value dims in chunks, so registers
hold [BLOCK_S, BLOCK_A] at a time whatever A and Dv are (OpenNMT's default H = 1024). Tiles are
fixed; they compiled for sm_90 without spills (tests/gpu/test_triton_gpu_compile.py); speed
unmeasured (no GPU lent). Under the interpreter small tiles, so CI's odd shapes cross several.
"""
import torch
import triton

from ..common import (INTERPRETED, accumulator_dtype, launch_spec, new_output, strided,
                      tl_accumulator_dtype)
from .kernel import (global_attention_backward_key_kernel,
                     global_attention_backward_query_kernel, global_attention_forward_kernel)

# (BLOCK_S, BLOCK_A = BLOCK_DV, warps) per kernel: 32 keys by 128 features is 4096 fp32 values
# a tile, 32 a thread at 4 warps. The backward kernels hold more a tile (the additive score's
# tanh, its derivative, d(keys) accumulated across the queries): at 32 x 128 the key kernel
# spilled under triton 3.6 and 3.8 and the query kernel's additive path under 3.6, and the key
# kernel still spilled in bf16 at 32 x 64 under one of them: 64 and 32 features a chunk.
GPU_TILES = {"forward": (32, 128, 4), "backward_query": (32, 64, 4),
             "backward_key": (32, 32, 4)}
INTERPRETER_TILE = (8, 16, 4)

Q_STRIDES = "stride_qb stride_qt stride_qa"
K_STRIDES = "stride_kb stride_ks stride_ka"
V_STRIDES = "stride_vb stride_vs stride_vd"
E_STRIDES = "stride_eb stride_et stride_es stride_ea"


def _tile(kernel: str, interpreted: bool = INTERPRETED) -> tuple[int, int, int]:
    return INTERPRETER_TILE if interpreted else GPU_TILES[kernel]


def _constexprs(kernel: str, dtype, additive: bool, has_extra: bool, has_lengths: bool,
                interpreted: bool = INTERPRETED) -> dict:
    block_s, block_a, warps = _tile(kernel, interpreted)
    return {"ADDITIVE": additive, "HAS_EXTRA": has_extra, "HAS_LENGTHS": has_lengths,
            "BLOCK_S": block_s, "BLOCK_A": block_a, "ACC_DTYPE": tl_accumulator_dtype(dtype),
            "num_warps": warps, "num_stages": 1}


def _inputs(query, keys, vec, extra, lengths) -> dict:
    """The tensors every kernel reads, by name; absent ones as stand-ins never read (their
    flags are off)."""
    extra_args = (strided("e_ptr", extra, E_STRIDES) if extra is not None else
                  dict(e_ptr=query, stride_eb=0, stride_et=0, stride_es=0, stride_ea=0))
    return dict(**strided("q_ptr", query, Q_STRIDES), **strided("k_ptr", keys, K_STRIDES),
                **extra_args, vec_ptr=vec if vec is not None else query,
                len_ptr=lengths if lengths is not None else query)


def global_attention_forward(query, keys, values, vec, extra, lengths, scale: float):
    """(context [B, T, Dv], alignments [B, T, S], lse [B, T] in base 2), contiguous; the
    alignments and lse in the accumulator dtype: the first pass parks raw scores in the
    alignment row, and an fp16 row would overflow at scores past 65504 (the caller casts)."""
    B, T, A = query.shape
    S, DV = keys.shape[1], values.shape[2]
    out = new_output((B, T, DV), query)
    align = new_output((B, T, S), query.new_empty(0, dtype=accumulator_dtype(query.dtype)))
    lse = new_output((B, T), query.new_empty(0, dtype=accumulator_dtype(query.dtype)))
    if B * T == 0:
        return out, align, lse
    constexprs = _constexprs("forward", query.dtype, vec is not None, extra is not None,
                             lengths is not None)
    global_attention_forward_kernel[(B, T)](
        **_inputs(query, keys, vec, extra, lengths), **strided("val_ptr", values, V_STRIDES),
        out_ptr=out, align_ptr=align, lse_ptr=lse, T=T, S=S, A=A, DV=DV, scale=float(scale),
        BLOCK_DV=constexprs["BLOCK_A"], **constexprs)
    return out, align, lse


def global_attention_backward(dout, dalign, query, keys, values, vec, extra, lengths, align,
                              scale: float):
    """(d query, d keys, d values, d vec (or empty), d extra (or empty)); dout [B, T, Dv] and
    dalign [B, T, S] (or None) contiguous; align the forward's alignments."""
    B, T, A = query.shape
    S, DV = keys.shape[1], values.shape[2]
    additive = vec is not None
    acc = accumulator_dtype(query.dtype)
    dscore = new_output((B, T, S), query.new_empty(0, dtype=acc))
    dq = new_output((B, T, A), query)
    dvec_parts = new_output((B * T, A) if additive else (0,), query.new_empty(0, dtype=acc))
    dextra = new_output(extra.shape, extra) if extra is not None else query.new_empty(0)
    if B * T == 0:
        dk = torch.zeros_like(keys)
        return (dq, dk, torch.zeros_like(values),
                torch.zeros_like(vec) if additive else query.new_empty(0), dextra)
    constexprs = _constexprs("backward_query", query.dtype, additive, extra is not None,
                             lengths is not None)
    shared = dict(**_inputs(query, keys, vec, extra, lengths), T=T, S=S, A=A)
    global_attention_backward_query_kernel[(B, T)](
        **shared, **strided("val_ptr", values, V_STRIDES), align_ptr=align, dout_ptr=dout,
        dalign_ptr=dalign if dalign is not None else dout, dscore_ptr=dscore, dq_ptr=dq,
        dvec_ptr=dvec_parts if additive else dscore, de_ptr=dextra if extra is not None else dq,
        DV=DV, scale=float(scale), HAS_DALIGN=dalign is not None,
        BLOCK_DV=constexprs["BLOCK_A"], **constexprs)
    # d(values) = p^T d(context): a GEMM per batch row.
    dvalues = (align.transpose(1, 2) @ dout.to(acc)).to(values.dtype)
    if additive:
        dk = new_output(keys.shape, keys)
        key_constexprs = _constexprs("backward_key", query.dtype, True, extra is not None,
                                     lengths is not None)
        del key_constexprs["ADDITIVE"]
        global_attention_backward_key_kernel[(B, triton.cdiv(S, key_constexprs["BLOCK_S"]))](
            **shared, dscore_ptr=dscore, dk_ptr=dk, **key_constexprs)
        dvec = dvec_parts.sum(0).to(vec.dtype)
    else:
        dk = (dscore.transpose(1, 2) @ query.to(acc)).to(keys.dtype)  # dscore^T q
        dvec = query.new_empty(0)
    return dq, dk, dvalues, dvec, dextra


def launch_specs() -> list[dict]:
    """Every kernel with both scores (the key kernel: additive only), with lengths and the
    extra term, bf16 and fp32 (no GEMM: tile reductions, never tl.dot)."""
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        acc = accumulator_dtype(dtype)
        pointers = {"len_ptr": "i64", "lse_ptr": acc, "dscore_ptr": acc, "dvec_ptr": acc}
        for additive in (False, True):
            for kernel, fn, more in (("forward", global_attention_forward_kernel, {}),
                                     ("backward_query", global_attention_backward_query_kernel,
                                      {"HAS_DALIGN": True})):
                launch = _constexprs(kernel, dtype, additive, additive, True, interpreted=False)
                specs.append(launch_spec(fn, dtype, dict(launch, BLOCK_DV=launch["BLOCK_A"],
                                                         **more),
                                         pointers=pointers, scalars={"scale": "fp32"}))
        launch = _constexprs("backward_key", dtype, True, True, True, interpreted=False)
        del launch["ADDITIVE"]
        specs.append(launch_spec(global_attention_backward_key_kernel, dtype, launch,
                                 pointers=pointers))
    return specs
