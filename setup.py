"""Build and install fastseq.

The C++/CUDA extension fastseq._C is described once, in CMakeLists.txt; this file only
decides the CMake inputs and runs CMake with Ninja (vLLM's arrangement):

  FASTSEQ_SKIP_EXTENSION=1   install without the extension (Triton and reference backends only)
  FASTSEQ_CUDA_ARCHS="80;90a" CUDA architectures (default: the visible GPU's, else 90a)
  CUDA_HOME                  where nvcc lives (default /usr/local/cuda); CUDA kernels are built
                             when nvcc is there and torch is a CUDA build
  FASTSEQ_REQUIRE_EXTENSION=1 fail instead of installing without the extension when no C++
                             compiler or CMake is found

Triton kernels live in kernels/ and install as the subpackage fastseq.kernels.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_tool(name: str) -> str | None:
    """A build tool from beside this interpreter (a venv's pip-installed cmake/ninja) first."""
    here = str(Path(sys.executable).parent)
    return shutil.which(name, path=here + os.pathsep + os.environ.get("PATH", ""))


def find_cuda_home() -> Path | None:
    """CUDA_HOME if set, else /usr/local/cuda; None when it has no nvcc."""
    home = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")
    return home if (home / "bin" / "nvcc").exists() else None


def default_cuda_archs() -> str:
    """The visible GPU's architecture, else sm_90a (the H100 the benchmarks run on)."""
    requested = os.environ.get("FASTSEQ_CUDA_ARCHS", "").strip()
    if requested:
        return requested
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        # 'a' targets unlock wgmma/setmaxnreg on Hopper; plain for every other chip.
        return f"{major}{minor}a" if (major, minor) == (9, 0) else f"{major}{minor}"
    return "90a"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt with Ninja into the extension's output directory."""

    def run(self) -> None:
        missing = self._missing_tools()
        if missing:
            message = f"fastseq: building without the _C extension ({missing})"
            if env_flag("FASTSEQ_REQUIRE_EXTENSION"):
                raise RuntimeError(message)
            print(f"WARNING: {message}; the triton and reference backends still work", file=sys.stderr)
            return
        super().run()

    @staticmethod
    def _missing_tools() -> str:
        if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
            return "no C++ compiler found"
        if not find_tool("cmake") or not find_tool("ninja"):
            return "no cmake or ninja found (pip install cmake ninja)"
        return ""

    def build_extension(self, ext: Extension) -> None:
        import torch

        output_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # A fixed directory (not build_temp, which editable installs make anew each time), so
        # that rebuilding after an edit only recompiles what changed.
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir.mkdir(parents=True, exist_ok=True)

        cuda_home = find_cuda_home()
        with_cuda = cuda_home is not None and torch.version.cuda is not None
        env = dict(os.environ)
        cmake = find_tool("cmake")
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={find_tool('ninja')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFASTSEQ_OUTPUT_DIR={output_dir}",
            f"-DFASTSEQ_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('FASTSEQ_BUILD_TYPE', 'Release')}",
        ]
        if with_cuda:
            # torch's cpp_extension guesses CUDA_HOME from the nvcc on PATH (/usr/local here,
            # which has no libcudart): pin it to the toolkit we found.
            env["CUDA_HOME"] = str(cuda_home)
            args += [
                f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
                f"-DFASTSEQ_CUDA_ARCHS={default_cuda_archs()}",
            ]
        print("fastseq:", " ".join(args), flush=True)
        subprocess.run(args, check=True, env=env)
        jobs = os.environ.get("MAX_JOBS")
        subprocess.run(
            [cmake, "--build", str(build_dir)] + (["-j", jobs] if jobs else []), check=True, env=env
        )


ext_modules = [] if env_flag("FASTSEQ_SKIP_EXTENSION") else [CMakeExtension("fastseq._C")]

setup(
    # kernels/ and bench/ (the benchmark suites fastseq-bench runs) install inside fastseq.
    # kernels/ has one subpackage per kernel family (found, not listed).
    packages=find_packages(include=["fastseq", "fastseq.*"])
    + ["fastseq.kernels"] + [f"fastseq.kernels.{name}" for name in find_packages("kernels")]
    + ["fastseq.bench_suites"],
    package_dir={"fastseq.kernels": "kernels", "fastseq.bench_suites": "bench"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)

