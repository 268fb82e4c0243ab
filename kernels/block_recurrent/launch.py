"""Tiles and launchers of the Block-Recurrent Transformer's attention kernels (kernel.py): one
forward launch and two backward launches (dK/dV, then dQ with d(bias)), each covering both parts
of the call (grid axis 2).

Tiles are fixed per kernel and head-dim class (no autotuning yet: nothing of this family has
run on a GPU); each compiled for sm_90 without register spills (tests/gpu/test_triton_gpu_compile.py
reads launch_specs()). Under the interpreter 16 x 16 tiles, so CI's small odd shapes cross
several tiles, the window's edges and the groups' boundaries.
"""
import torch
import triton

from ..attention.launch import head_block
from ..common import (GPU_DOT, INTERPRETED, accumulator_dtype, dot_precision, launch_spec,
                      new_output, strided, tl_accumulator_dtype)
from .kernel import (block_recurrent_backward_key_kernel, block_recurrent_backward_query_kernel,
                     block_recurrent_forward_kernel)

Q_STRIDES = "stride_qb stride_qh stride_qm stride_qd"
K_STRIDES = "stride_kb stride_kh stride_kn stride_kd"
V_STRIDES = "stride_vb stride_vh stride_vn stride_vd"
Q2_STRIDES = "stride_q2b stride_q2h stride_q2m stride_q2d"
K2_STRIDES = "stride_k2b stride_k2h stride_k2g stride_k2n stride_k2d"
V2_STRIDES = "stride_v2b stride_v2h stride_v2g stride_v2n stride_v2d"

# (BLOCK_M, BLOCK_N, warps, stages) per kernel, dtype class ("half": bf16/fp16, "fp32") and
# padded head dim on a GPU: each the first of its sweep that compiled for sm_90 without register
# spills under both triton 3.6 and 3.8 (bench/NOTES.md, 2026-12-07, sixteenth session; speed
# unmeasured, no GPU lent). The backward kernels hold two head-wide accumulators beside their
# score and probability tiles: at head 128 in bf16 the dQ kernel spilled at 32 x 32 under 3.8
# whatever the warps, and the fp32 dK/dV kernel spilled at every 4-warp tile.
GPU_TILES = {
    ("forward", "half", 64): (64, 64, 4, 2), ("forward", "half", 128): (64, 64, 8, 2),
    ("backward_key", "half", 64): (64, 64, 8, 2), ("backward_key", "half", 128): (32, 32, 8, 2),
    ("backward_query", "half", 64): (64, 32, 8, 2),
    ("backward_query", "half", 128): (16, 32, 8, 2),
    ("forward", "fp32", 64): (32, 32, 4, 2), ("backward_key", "fp32", 64): (16, 16, 8, 2),
    ("backward_query", "fp32", 64): (64, 32, 8, 2),
    ("forward", "fp32", 128): (32, 32, 8, 2), ("backward_query", "fp32", 128): (32, 16, 8, 2),
    # spilled at 16 x 16 with 4 and 8 warps under both Tritons: runs, not compile-checked
    ("backward_key", "fp32", 128): (16, 16, 8, 2),
}
INTERPRETER_TILE = (16, 16, 4, 1)


def tile(kernel: str, dtype: torch.dtype, block_d: int,
         interpreted: bool = INTERPRETED) -> tuple[int, int, int, int]:
    if interpreted:
        return INTERPRETER_TILE
    kind = "fp32" if dtype in (torch.float32, torch.float64) else "half"
    return GPU_TILES[(kernel, kind, 64 if block_d <= 64 else 128)]


def _launch(kernel: str, dtype: torch.dtype, block_d: int, block_dv: int, windowed: bool,
            has_bias: bool, precision: str, upcast: bool) -> dict:
    """A launch's constexprs; upcast is set exactly under the interpreter (its tiles), so the
    launch specs (GPU_DOT: upcast off) get the GPU's tiles even in an interpreted process."""
    block_m, block_n, warps, stages = tile(kernel, dtype, max(block_d, block_dv), upcast)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "BLOCK_DV": block_dv,
            "WINDOWED": windowed, "HAS_BIAS": has_bias,
            "ACC_DTYPE": tl_accumulator_dtype(dtype), "PRECISION": precision, "UPCAST": upcast,
            "num_warps": warps, "num_stages": stages}


class Shape:
    """The call's sizes and each part's tile counts, for the grids."""

    def __init__(self, q, k, v, q2, k2, window, group_size, group_offset):
        self.B, self.H, self.L, self.D = q.shape
        self.S, self.DV = k.shape[2], v.shape[3]
        self.parts = 1 if q2 is None else 2
        self.G, self.S2 = (1, 0) if k2 is None else (k2.shape[2], k2.shape[3])
        self.window = 0 if window is None else int(window)
        self.group_size = self.L if group_size is None else int(group_size)
        self.group_offset = int(group_offset)

    def row_grid(self, block_m: int) -> tuple[int, int, int]:
        """Programs over query tiles: part 1 by tile, part 2 by (group, tile in group)."""
        part2 = self.G * triton.cdiv(self.group_size, block_m) if self.parts == 2 else 0
        return (max(triton.cdiv(self.L, block_m), part2, 1), self.B * self.H, self.parts)

    def key_grid(self, block_n: int) -> tuple[int, int, int]:
        part2 = self.G * triton.cdiv(self.S2, block_n) if self.parts == 2 else 0
        return (max(triton.cdiv(self.S, block_n), part2, 1), self.B * self.H, self.parts)


def _inputs(q, k, v, bias, q2, k2, v2, shape: Shape) -> dict:
    """The tensors every kernel reads, by name. Without part 2 its pointers are part 1's
    tensors viewed as one group (never read: its programs do not exist); without a bias, a
    one-element stand-in (never read: HAS_BIAS is off)."""
    if q2 is None:
        q2, k2, v2 = q, k.unsqueeze(2), v.unsqueeze(2)
    return dict(**strided("q_ptr", q, Q_STRIDES), **strided("k_ptr", k, K_STRIDES),
                **strided("v_ptr", v, V_STRIDES), **strided("q2_ptr", q2, Q2_STRIDES),
                **strided("k2_ptr", k2, K2_STRIDES), **strided("v2_ptr", v2, V2_STRIDES),
                bias_ptr=bias if bias is not None else q.new_zeros(1),
                H=shape.H, L=shape.L, S=shape.S, S2=shape.S2, G=shape.G, D=shape.D,
                DV=shape.DV, window=shape.window, group_size=shape.group_size,
                group_offset=shape.group_offset)


def block_recurrent_forward(q, k, v, bias, q2, k2, v2, window, group_size: int,
                            group_offset: int, scale: float, scale2: float):
    """Returns (out, lse, out2, lse2): out [B, H, L, DV] contiguous, lse [B, H, L] in base 2 in
    the accumulator dtype; out2/lse2 likewise, or empty without part 2."""
    shape = Shape(q, k, v, q2, k2, window, group_size, group_offset)
    acc = q.new_empty(0, dtype=accumulator_dtype(q.dtype))
    B, H, L, DV = shape.B, shape.H, shape.L, shape.DV
    out, lse = new_output((B, H, L, DV), q), new_output((B, H, L), acc)
    out2, lse2 = ((new_output((B, H, L, DV), q), new_output((B, H, L), acc))
                  if q2 is not None else (q.new_empty(0), acc.new_empty(0)))
    launch = _launch("forward", q.dtype, head_block(shape.D), head_block(DV),
                     window is not None, bias is not None, dot_precision(q.dtype), INTERPRETED)
    block_m = launch["BLOCK_M"]
    block_recurrent_forward_kernel[shape.row_grid(block_m)](
        **_inputs(q, k, v, bias, q2, k2, v2, shape), out_ptr=out, lse_ptr=lse,
        out2_ptr=out2 if q2 is not None else out, lse2_ptr=lse2 if q2 is not None else lse,
        tiles_per_group=triton.cdiv(shape.group_size, block_m), qk_scale=float(scale),
        qk_scale2=float(scale2), **launch)
    return out, lse, out2, lse2


def block_recurrent_backward(dout, dout2, q, k, v, bias, q2, k2, v2, lse, lse2, delta, delta2,
                             window, group_size: int, group_offset: int, scale: float,
                             scale2: float):
    """Gradients (dq, dk, dv, dbias, dq2, dk2, dv2), contiguous; dbias [H, window + 1] in the
    bias dtype (empty without a bias), part 2's empty without part 2. dout/dout2 contiguous
    [B, H, L, DV]; lse (base 2, the forward's), delta (rowsum(dout * out)) [B, H, L] in the accumulator dtype."""
    shape = Shape(q, k, v, q2, k2, window, group_size, group_offset)
    acc_dtype = accumulator_dtype(q.dtype)
    dq, dk, dv = new_output(q.shape, q), new_output(k.shape, k), new_output(v.shape, v)
    has_two = q2 is not None
    dq2, dk2, dv2 = ((new_output(q2.shape, q2), new_output(k2.shape, k2), new_output(v2.shape, v2))
                     if has_two else tuple(q.new_empty(0) for _ in range(3)))
    # Atomics add every batch row's score gradients at their distance: zeros first.
    dbias = (torch.zeros(bias.shape, dtype=acc_dtype, device=q.device) if bias is not None
             else q.new_zeros(1, dtype=acc_dtype))
    shared = dict(**_inputs(q, k, v, bias, q2, k2, v2, shape), do_ptr=dout, lse_ptr=lse,
                  delta_ptr=delta, do2_ptr=dout2 if has_two else dout,
                  lse2_ptr=lse2 if has_two else lse, delta2_ptr=delta2 if has_two else delta,
                  qk_scale=float(scale), qk_scale2=float(scale2))
    block_d, block_dv = head_block(shape.D), head_block(shape.DV)
    common = (q.dtype, block_d, block_dv, window is not None, bias is not None,
              dot_precision(q.dtype), INTERPRETED)

    launch = _launch("backward_key", *common)
    block_recurrent_backward_key_kernel[shape.key_grid(launch["BLOCK_N"])](
        **shared, dk_ptr=dk, dv_ptr=dv, dk2_ptr=dk2 if has_two else dk,
        dv2_ptr=dv2 if has_two else dv,
        key_tiles_per_group=max(triton.cdiv(shape.S2, launch["BLOCK_N"]), 1), **launch)

    launch = _launch("backward_query", *common)
    block_recurrent_backward_query_kernel[shape.row_grid(launch["BLOCK_M"])](
        **shared, dq_ptr=dq, dbias_ptr=dbias, dq2_ptr=dq2 if has_two else dq,
        tiles_per_group=triton.cdiv(shape.group_size, launch["BLOCK_M"]), **launch)
    dbias = dbias.to(bias.dtype) if bias is not None else q.new_empty(0)
    return dq, dk, dv, dbias, dq2, dk2, dv2


KERNELS = {"forward": block_recurrent_forward_kernel,
           "backward_key": block_recurrent_backward_key_kernel,
           "backward_query": block_recurrent_backward_query_kernel}


def kernel_specs(kernel: str, dtype: torch.dtype, head_dim: int) -> list[dict]:
    """One kernel's GPU launch for a dtype and head dim, on its longest path: part 1 windowed
    with the bias (the token direction), which also compiles part 2's plain path."""
    acc = accumulator_dtype(dtype)
    block = head_block(head_dim)
    launch = _launch(kernel, dtype, block, block, True, True, "ieee", False)
    launch.update(GPU_DOT)
    pointers = {"lse_ptr": acc, "lse2_ptr": acc, "delta_ptr": acc, "delta2_ptr": acc,
                "dbias_ptr": acc}
    return [launch_spec(KERNELS[kernel], dtype, launch, pointers=pointers,
                        scalars={"qk_scale": "fp32", "qk_scale2": "fp32"}, gemm=True)]


def launch_specs() -> list[dict]:
    """What the compile test checks: the three kernels in bf16 at head dims 64 and 128 (the
    paper's 128) and in fp32 at 64; fp32 at 128 but for the dK/dV kernel, whose every tile
    tried spilled there (the paper's model trains in bf16; fp32 runs, slower)."""
    return ([spec for kernel in KERNELS for d in (64, 128)
             for spec in kernel_specs(kernel, torch.bfloat16, d)]
            + [spec for kernel in KERNELS for spec in kernel_specs(kernel, torch.float32, 64)]
            + [spec for kernel in ("forward", "backward_query")
               for spec in kernel_specs(kernel, torch.float32, 128)])
