"""Compile fastseq's Triton kernels ahead of time for a CUDA target, without a GPU, and report
the cubin's resources and the PTX's tensor-core instructions. Run as a script (no
TRITON_INTERPRET in its environment):

    python triton_aot.py < KERNEL_SPECS_JSON   ->  prints one JSON line per spec
A spec: {"module": "rnn_cell", "kernel": "_rnn_cell_forward_kernel", "pointer_dtype": "bf16",
         "pointer_overrides": {"len_ptr": "i32"}, "scalar_overrides": {"eps": "fp32"},
         "constexprs": {...}, "arch": 90, "num_warps": 4}
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# The cubin's resource table (cuobjdump -res-usage: 4 ms) rather than its disassembly (nvdisasm:
# 0.8 s of each spec's 1.3 s): a spill or a local array is stack or local memory there, the
# only source of LDL/STL in SASS (checked: a num_warps=1 attention backward shows STACK:9136
# and LDL/STL in its SASS; every shipped configuration STACK:0 LOCAL:0, no LDL/STL).
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# Tensor-core instructions in the PTX: mma.sync (HMMA) and, on sm_90, wgmma.mma_async
# (HGMMA). ptxas lowers them to the tensor cores only, so their presence in the PTX is their
# presence in the SASS.
TENSOR_CORE_PTX = re.compile(r"^\s*(mma\.sync|wgmma\.mma_async)\S*\s", re.MULTILINE)
TL_DTYPES = {"fp32": tl.float32, "fp64": tl.float64}


def compile_spec(spec: dict) -> dict:
    module = importlib.import_module(f"fastseq.kernels.{spec['module']}")
    fn = getattr(module, spec["kernel"])
    values = dict(spec["constexprs"])
    for name, value in values.items():
        if isinstance(value, str) and value.startswith("tl."):
            values[name] = TL_DTYPES[value[3:]]
    signature, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in values:
            signature[name] = "constexpr"
            constexprs[(i,)] = values[name]
        elif name.endswith("_ptr"):
            signature[name] = "*" + spec.get("pointer_overrides", {}).get(name, spec["pointer_dtype"])
        else:
            signature[name] = spec.get("scalar_overrides", {}).get(name, "i32")
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", spec["arch"], 32),
                              options={"num_warps": spec.get("num_warps", 4),
                                       "num_stages": spec.get("num_stages", 3)})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        table = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", table)
    assert usage, table
    registers, stack, local = (int(v) for v in usage.groups())
    return {"kernel": spec["kernel"], "shared": compiled.metadata.shared, "registers": registers,
            "stack": stack, "local": local,
            "tensor_cores": sorted(set(TENSOR_CORE_PTX.findall(compiled.asm["ptx"]))),
            "num_warps": compiled.metadata.num_warps}


if __name__ == "__main__":
    # The specs arrive on stdin: 300+ of them overflow a command line (E2BIG at ~128 KiB).
    for spec in json.loads(sys.stdin.read()):
        print(json.dumps(compile_spec(spec)), flush=True)
