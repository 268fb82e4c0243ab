"""Every Triton kernel configuration compiles for the H100 (sm_90) on this GPU-less machine:
Triton's own ptxas builds the cubin, nvdisasm shows the instructions. Catches what the
interpreter cannot: GPU-only compile errors, local-memory spills, a half-precision GEMM that
misses the tensor cores."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fastseq.kernels import (attention_launch, layer_norm_rnn_layer, rel_attention_launch, rnn_cell,
                             rnn_layer)
from fastseq.kernels.rnn_cell_layout import LN_PROJECTION_COLUMN, LN_STATS, LN_WORKSPACE

HERE = pathlib.Path(__file__).resolve().parent
MODES = {"lstm": (0, 4), "gru": (1, 3), "rnn_tanh": (2, 1), "rnn_relu": (3, 1)}


POINTER_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                  torch.float64: "fp64"}


def launch_options(config: dict) -> tuple[dict, int]:
    constexprs = {k: v for k, v in config.items() if k != "num_warps"}
    return constexprs, config["num_warps"]


def forward_spec(mode, dtype, batch):
    """What kernels.rnn_cell.rnn_cell_forward would launch for this mode, dtype and batch."""
    mode_id, gates = MODES[mode]
    constexprs, num_warps = launch_options(rnn_cell.forward_config(batch, dtype))
    constexprs.update(MODE=mode_id, G=gates, HAS_B_IH=True, HAS_B_HH=True, SAVE_WS=True,
                      PRECISION="ieee", UPCAST=False,
                      ACC_DTYPE="tl.fp64" if dtype == torch.float64 else "tl.fp32")
    return {"module": "rnn_cell", "kernel": "_rnn_cell_forward_kernel", "arch": 90,
            "pointer_dtype": POINTER_DTYPES[dtype], "num_warps": num_warps, "constexprs": constexprs}


def backward_spec(mode, dtype):
    mode_id, gates = MODES[mode]
    constexprs, num_warps = launch_options(rnn_cell.BACKWARD_CONFIG)
    constexprs.update(MODE=mode_id, G=gates, HAS_GRAD_CY=True,
                      ACC_DTYPE="tl.fp64" if dtype == torch.float64 else "tl.fp32")
    return {"module": "rnn_cell", "kernel": "_rnn_cell_backward_kernel", "arch": 90,
            "pointer_dtype": POINTER_DTYPES[dtype], "num_warps": num_warps, "constexprs": constexprs}


def layer_spec(kernel, mode, dtype, batch, zoneout=False, directions=1):
    """What kernels.rnn_layer would launch (reverse direction and lengths: the longest path;
    with zoneout, the masks the mode takes; directions=2: a bidirectional launch)."""
    mode_id, gates = MODES[mode]
    constexprs, num_warps = launch_options(rnn_layer.layer_config(batch, dtype, kernel, zoneout, directions))
    constexprs.update(MODE=mode_id, G=gates, WS=max(rnn_layer.LAYER_WORKSPACE[mode], 1),
                      HAS_LENGTHS=True, REVERSE=True, DIRECTIONS=directions, PRECISION="ieee",
                      UPCAST=False, HAS_ZH=zoneout, HAS_ZC=zoneout and mode == "lstm",
                      ACC_DTYPE="tl.fp64" if dtype == torch.float64 else "tl.fp32")
    if kernel == "forward":
        constexprs.update(HAS_B_HH=True, SAVE_WS=True)
    else:
        constexprs.update(HAS_GRAD_CN=True)
    state = "fp64" if dtype == torch.float64 else "fp32"  # the kernels' scratch state buffers
    overrides = {"len_ptr": "i32", "hbuf_ptr": state, "cbuf_ptr": state, "dhbuf_ptr": state,
                 "dcbuf_ptr": state}
    return {"module": "rnn_layer", "kernel": f"_rnn_layer_{kernel}_kernel", "arch": 90,
            "pointer_dtype": POINTER_DTYPES[dtype], "pointer_overrides": overrides,
            "num_warps": num_warps, "constexprs": constexprs}


def layer_norm_spec(kernel, mode, dtype):
    """What kernels.layer_norm_rnn_layer would launch (reverse, lengths, biases, workspace)."""
    mode_id, gates = MODES[mode]
    constexprs, num_warps = launch_options(layer_norm_rnn_layer.layer_norm_config(dtype, kernel, mode))
    constexprs.update(MODE=mode_id, G=gates, WS=LN_WORKSPACE[mode], NP=LN_PROJECTION_COLUMN[mode],
                      S=LN_STATS[mode], HAS_LENGTHS=True, REVERSE=True, PRECISION="ieee",
                      UPCAST=False, ACC_DTYPE="tl.fp64" if dtype == torch.float64 else "tl.fp32")
    if kernel == "forward":
        constexprs.update(HAS_B_HH=True, SAVE_WS=True)
    else:
        constexprs.update(HAS_GRAD_CN=True)
    state = "fp64" if dtype == torch.float64 else "fp32"
    overrides = {"len_ptr": "i32", "stats_ptr": state, "hbuf_ptr": state, "cbuf_ptr": state,
                 "pbuf_ptr": state, "dhbuf_ptr": state, "dcbuf_ptr": state, "dqbuf_ptr": state}
    return {"module": "layer_norm_rnn_layer", "kernel": f"_ln_rnn_{kernel}_kernel", "arch": 90,
            "pointer_dtype": POINTER_DTYPES[dtype], "pointer_overrides": overrides,
            "scalar_overrides": {"eps": "fp32"}, "num_warps": num_warps, "constexprs": constexprs}


ATTENTION_KERNELS = {"forward": "attention_forward_kernel",
                     "backward_key": "attention_backward_key_kernel",
                     "backward_query": "attention_backward_query_kernel"}


def attention_specs(kernel, dtype, head_dim, heavy, shifted=False):
    """Every autotuning candidate of an attention kernel for one dtype, head dim and feature
    set, causal, compiled on the longest path of that set: heavy = a float mask tile with its
    gradient and dropout; light = a key-padding mask (one row of S keys); shifted = the
    bottom-right causal diagonal (its own compilation)."""
    specs = []
    mask_kind = 2 if heavy else 3
    for config in attention_launch.candidate_configs(kernel, dtype, head_dim, heavy):
        constexprs = dict(config.kwargs, BLOCK_D=head_dim, BLOCK_DV=head_dim, IS_CAUSAL=True,
                          SHIFTED=shifted, MASK_KIND=mask_kind, DROPOUT=heavy, PRECISION="ieee", UPCAST=False,
                          ACC_DTYPE="tl.fp64" if dtype == torch.float64 else "tl.fp32")
        if kernel == "backward_key":
            constexprs["MASK_GRAD"] = heavy
        acc = "fp64" if dtype == torch.float64 else "fp32"
        overrides = {"lse_ptr": acc, "delta_ptr": acc, "seed_ptr": "i64",
                     "mask_ptr": POINTER_DTYPES[dtype] if heavy else "u8"}
        if kernel == "backward_key":  # per-head dK/dV in fp32 (summed over GQA groups after)
            overrides.update(dk_ptr=acc, dv_ptr=acc)
        specs.append({"module": "attention", "kernel": ATTENTION_KERNELS[kernel], "arch": 90,
                      "pointer_dtype": POINTER_DTYPES[dtype], "pointer_overrides": overrides,
                      "scalar_overrides": {"qk_scale2": "fp32", "scale": "fp32",
                                           "dropout_p": "fp32"},
                      "num_warps": config.num_warps, "num_stages": config.num_stages,
                      "constexprs": constexprs})
    return specs


REL_KERNELS = {"forward": ("rel_attention", "rel_attention_forward_kernel"),
               "backward_key": ("rel_attention_backward", "rel_attention_backward_key_kernel"),
               "backward_query": ("rel_attention_backward",
                                  "rel_attention_backward_query_kernel")}


def rel_attention_specs(kernel, head_dim, heavy):
    """The relative-attention candidates checked so far (bf16, causal with a window: the
    longest path; heavy = a float mask tile with its gradient and dropout)."""
    specs = []
    module, name = REL_KERNELS[kernel]
    for config in rel_attention_launch.candidate_configs(kernel, torch.bfloat16, head_dim, heavy):
        constexprs = dict(config.kwargs, BLOCK_D=head_dim, BLOCK_DV=head_dim, IS_CAUSAL=True,
                          HAS_WINDOW=True, MASK_KIND=2 if heavy else 3, DROPOUT=heavy,
                          PRECISION="ieee", UPCAST=False, ACC_DTYPE="tl.fp32")
        if kernel == "backward_key":
            constexprs["MASK_GRAD"] = heavy
        specs.append({"module": module, "kernel": name, "arch": 90, "pointer_dtype": "bf16",
                      "pointer_overrides": {"lse_ptr": "fp32", "delta_ptr": "fp32",
                                            "seed_ptr": "i64",
                                            "mask_ptr": "bf16" if heavy else "u8"},
                      "scalar_overrides": {"qk_scale2": "fp32", "scale": "fp32",
                                           "dropout_p": "fp32"},
                      "num_warps": config.num_warps, "num_stages": config.num_stages,
                      "constexprs": constexprs})
    return specs


# Cell step: every mode in bf16 and fp32 at the three batch-tile sizes (16, 32, 64 rows), fp16
# and fp64 on the largest cell (LSTM), every backward in bf16 and fp32. Sequence layer: forward
# and backward of each mode in bf16 and fp32 (one tile shape at every batch size), and of the
# LSTM and GRU with zoneout, both directions at once (every mode; the LSTM with zoneout); the
# layer-normalized LSTM and GRU, forward and backward. Attention: every autotuning candidate of
# the three kernels in bf16 at head dims 64/128/256, light and heavy, and in fp32 at 64/128;
# the bottom-right causal compilation (SHIFTED) of the light bf16 ones at 64/128.
# Relative attention: the candidates checked so far (head dim 64 each kernel; the forward and
# dK/dV at 128).
SPECS = ([forward_spec(m, d, b) for m in MODES for d in (torch.bfloat16, torch.float32)
          for b in (1, 32, 100)]
         + [forward_spec("lstm", d, b) for d in (torch.float16, torch.float64) for b in (1, 100)]
         + [backward_spec(m, d) for m in MODES for d in (torch.bfloat16, torch.float32)]
         + [layer_spec(k, m, d, 1) for k in ("forward", "backward") for m in MODES
            for d in (torch.bfloat16, torch.float32)]
         + [layer_spec(k, m, d, 1, zoneout=True) for k in ("forward", "backward")
            for m in ("lstm", "gru") for d in (torch.bfloat16, torch.float32)]
         + [layer_spec(k, m, d, 1, zoneout=z, directions=2) for k in ("forward", "backward")
            for m in MODES for d in (torch.bfloat16, torch.float32)
            for z in ((False, True) if m == "lstm" else (False,))]
         + [layer_norm_spec(k, m, d) for k in ("forward", "backward") for m in ("lstm", "gru")
            for d in (torch.bfloat16, torch.float32)]
         + [spec for k in ATTENTION_KERNELS for d in (64, 128, 256) for heavy in (False, True)
            for spec in attention_specs(k, torch.bfloat16, d, heavy)]
         + [spec for k in ATTENTION_KERNELS for d in (64, 128)
            for spec in attention_specs(k, torch.float32, d, False)]
         + [spec for k in ATTENTION_KERNELS for d in (64, 128)
            for spec in attention_specs(k, torch.bfloat16, d, False, shifted=True)]
         + [spec for k, d, heavy in (("forward", 64, False), ("forward", 64, True),
                                     ("forward", 128, False), ("forward", 128, True),
                                     ("backward_key", 64, False), ("backward_key", 64, True),
                                     ("backward_key", 128, False), ("backward_query", 64, False),
                                     ("backward_query", 64, True))
            for spec in rel_attention_specs(k, d, heavy)])


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(HERE / "triton_aot.py"), json.dumps(SPECS)],
                         capture_output=True, text=True, env=env, cwd=HERE, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_every_kernel_compiles_for_sm90_without_spills(compiled):
    assert len(compiled) == len(SPECS)
    for spec, result in zip(SPECS, compiled):
        assert not {"LDL", "STL"} & set(result["opcodes"]), (spec, result)


def test_half_precision_gate_gemms_use_tensor_cores(compiled):
    gemm_kernels = ("_rnn_cell_forward_kernel", "_rnn_layer_forward_kernel", "_rnn_layer_backward_kernel",
                    "_ln_rnn_forward_kernel", "_ln_rnn_backward_kernel", *ATTENTION_KERNELS.values(),
                    *(name for _, name in REL_KERNELS.values()))
    for spec, result in zip(SPECS, compiled):
        if spec["kernel"] in gemm_kernels and spec["pointer_dtype"] in ("bf16", "fp16"):
            assert {"HMMA", "HGMMA"} & set(result["opcodes"]), (spec["constexprs"], result)
