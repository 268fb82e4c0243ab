"""Compile fastseq's Triton kernels ahead of time for a CUDA target, without a GPU, and report
what the SASS uses. Run as a script (no TRITON_INTERPRET in its environment):

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

NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
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
        sass = subprocess.run([NVDISASM, cubin.name], capture_output=True, text=True, check=True).stdout
    opcodes = sorted(set(re.findall(r"\b(HMMA|HGMMA|FFMA|DFMA|DMMA|LDL|STL)\b", sass)))
    return {"kernel": spec["kernel"], "shared": compiled.metadata.shared, "opcodes": opcodes,
            "num_warps": compiled.metadata.num_warps}


if __name__ == "__main__":
    # The specs arrive on stdin: 300+ of them overflow a command line (E2BIG at ~128 KiB).
    for spec in json.loads(sys.stdin.read()):
        print(json.dumps(compile_spec(spec)), flush=True)
