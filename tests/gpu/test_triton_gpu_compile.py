"""Every Triton kernel configuration compiles for the H100 (sm_90) on this GPU-less machine:
Triton's own ptxas builds the cubin, cuobjdump reads its resources (tests/triton_aot.py).
Catches what the interpreter cannot: GPU-only compile errors, local-memory spills, a
half-precision GEMM that misses the tensor cores."""
import importlib
import json
import math
import os
import pathlib
import pkgutil
import subprocess
import sys

import pytest
import triton

import fastseq.kernels
from fastseq._versions import MIN_TRITON, version_tuple

TESTS = pathlib.Path(__file__).resolve().parents[1]  # triton_aot.py is beside conftest.py


def kernel_modules():
    return [importlib.import_module(info.name) for info in
            pkgutil.walk_packages(fastseq.kernels.__path__, "fastseq.kernels.")]


# Derived from the launchers themselves: each launcher module's launch_specs() lists the
# compilations it produces, built by the same code that builds its launch arguments.
SPECS = [spec for module in kernel_modules() if hasattr(module, "launch_specs")
         for spec in module.launch_specs()]


def longest_paths(specs: list) -> list:
    """Per kernel and pointer dtype, the widest tile with the most features switched on: the
    configuration with the most live registers, so the first to spill."""
    def weight(spec):
        constexprs = spec["constexprs"]
        tile = math.prod(value for name, value in constexprs.items()
                         if name.startswith("BLOCK") and isinstance(value, int))
        return tile, spec["num_warps"], sum(value is True for value in constexprs.values())
    chosen = {}
    for spec in specs:
        key = (spec["module"], spec["kernel"], spec["pointer_dtype"])
        if key not in chosen or weight(spec) > weight(chosen[key]):
            chosen[key] = spec
    return list(chosen.values())


# Every configuration compiles under the lent GPU machine's Triton (MIN_TRITON: what the GPU
# run builds with; CI's second leg). Under a newer Triton, each kernel's longest path in each
# dtype: 56 of 272 compilations (all 272 took 762 s on one of CI's cores with nvdisasm, 2.8 s
# each; 286 s over this machine's two cores with cuobjdump's resource table, an empty cache).
COMPILED = SPECS if version_tuple(triton.__version__) <= MIN_TRITON else longest_paths(SPECS)


def test_every_triton_kernel_has_a_launch_spec():
    """A kernel (a @triton.jit function named *_kernel) no launcher lists would never be
    compile-checked: add its specs to its launcher's launch_specs()."""
    kernels = {(module.__name__.removeprefix("fastseq.kernels."), name)
               for module in kernel_modules() for name, value in vars(module).items()
               if name.endswith("_kernel") and hasattr(value, "fn")
               and value.fn.__module__ == module.__name__}
    specified = {(spec["module"], spec["kernel"]) for spec in SPECS}
    assert len(kernels) >= 11, kernels
    assert kernels - specified == set()
    assert specified - kernels == set()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every spec compiled, in order, by one compiler process per core: the full list is the
    longest single task of CI's second leg, and the other xdist worker finishes its files
    first and leaves its core idle."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    folder = tmp_path_factory.mktemp("aot")
    n = max(1, min(len(COMPILED), os.cpu_count() or 1))
    runs = []
    for i in range(n):
        (folder / f"specs{i}.json").write_text(json.dumps(COMPILED[i::n]))
        with open(folder / f"specs{i}.json") as specs, open(folder / f"out{i}", "w") as out, \
                open(folder / f"err{i}", "w") as err:
            runs.append(subprocess.Popen([sys.executable, str(TESTS / "triton_aot.py")],
                                         stdin=specs, stdout=out, stderr=err, env=env, cwd=TESTS))
    for i, run in enumerate(runs):
        assert run.wait() == 0, (folder / f"err{i}").read_text()[-3000:]
    parts = [[json.loads(line) for line in (folder / f"out{i}").read_text().splitlines()]
             for i in range(n)]
    return [parts[j % n][j // n] for j in range(len(COMPILED))]


def test_every_kernel_compiles_for_sm90_without_spills(compiled):
    """No stack frame and no local memory: where spills (LDL/STL in the SASS) would go."""
    assert len(compiled) == len(COMPILED)
    for spec, result in zip(COMPILED, compiled):
        assert result["stack"] == 0 and result["local"] == 0, (spec, result)


def test_half_precision_gate_gemms_use_tensor_cores(compiled):
    for spec, result in zip(COMPILED, compiled):
        if spec["gemm"] and spec["pointer_dtype"] in ("bf16", "fp16"):
            assert result["tensor_cores"], (spec["constexprs"], result)
