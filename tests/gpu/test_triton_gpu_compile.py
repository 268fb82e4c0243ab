"""Every Triton kernel configuration compiles for the H100 (sm_90) on this GPU-less machine:
Triton's own ptxas builds the cubin, nvdisasm shows the instructions. Catches what the
interpreter cannot: GPU-only compile errors, local-memory spills, a half-precision GEMM that
misses the tensor cores."""
import importlib
import json
import os
import pathlib
import pkgutil
import subprocess
import sys

import pytest

import fastseq.kernels

TESTS = pathlib.Path(__file__).resolve().parents[1]  # triton_aot.py is beside conftest.py


def kernel_modules():
    return [importlib.import_module(info.name) for info in
            pkgutil.walk_packages(fastseq.kernels.__path__, "fastseq.kernels.")]


# Derived from the launchers themselves: each launcher module's launch_specs() lists the
# compilations it produces, built by the same code that builds its launch arguments.
SPECS = [spec for module in kernel_modules() if hasattr(module, "launch_specs")
         for spec in module.launch_specs()]


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
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(TESTS / "triton_aot.py")], input=json.dumps(SPECS),
                         capture_output=True, text=True, env=env, cwd=TESTS)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_every_kernel_compiles_for_sm90_without_spills(compiled):
    assert len(compiled) == len(SPECS)
    for spec, result in zip(SPECS, compiled):
        assert not {"LDL", "STL"} & set(result["opcodes"]), (spec, result)


def test_half_precision_gate_gemms_use_tensor_cores(compiled):
    for spec, result in zip(SPECS, compiled):
        if spec["gemm"] and spec["pointer_dtype"] in ("bf16", "fp16"):
            assert {"HMMA", "HGMMA"} & set(result["opcodes"]), (spec["constexprs"], result)
