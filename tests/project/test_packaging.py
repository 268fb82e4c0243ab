"""The package builds and installs without the extension (FASTSEQ_SKIP_EXTENSION=1): Triton
kernels land in fastseq.kernels, the benchmark suites in fastseq.bench_suites with the
fastseq-bench command, and nothing compiled is in the wheel. The sdist carries every source a
build needs (the C++/CUDA sources, CMakeLists.txt) and builds a wheel itself."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from fastseq.families import FAMILIES

ROOT = pathlib.Path(__file__).resolve().parents[2]


def clear_staging() -> None:
    """setuptools stages a wheel's files in build/lib* and never deletes what a source tree no
    longer has, so a wheel built in place would carry stale files; build/cmake-py* (the
    extension's objects) stays."""
    for staging in list(ROOT.glob("build/lib*")) + list(ROOT.glob("build/bdist*")):
        shutil.rmtree(staging)


def test_wheel_without_extension(tmp_path):
    clear_staging()
    env = dict(os.environ, FASTSEQ_SKIP_EXTENSION="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    "-w", str(tmp_path), str(ROOT)], check=True, env=env, cwd=tmp_path)
    (wheel,) = tmp_path.glob("fastseq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    expected = [path for family in FAMILIES
                for path in (f"fastseq/kernels/{family}/launch.py", f"fastseq/ops/{family}.py")]
    missing = [path for path in expected if path not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert not [n for n in names if n.endswith(".so")]
    assert not [n for n in names if n.startswith("kernels/")], "kernels/ must not be a top-level package"
    assert "fastseq/bench_suites/bench_rel_attention.py" in names
    assert "fastseq/bench_suites/conftest.py" in names
    assert "fastseq/bench_suites/NOTES.md" not in names  # the sdist's, not the installed suites'
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "fastseq-bench = fastseq.benchmark.cli:main" in \
        zipfile.ZipFile(wheel).read(entry_points).decode()


def test_sdist_has_every_source_and_builds(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o",
                    str(tmp_path), str(ROOT)], check=True, cwd=tmp_path, capture_output=True)
    (sdist,) = tmp_path.glob("fastseq-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        archive.extractall(tmp_path / "unpacked", filter="data")
    prefix = sdist.name[:-len(".tar.gz")]
    tracked = subprocess.run(["git", "ls-files", "csrc", "kernels", "bench/*.py", "fastseq",
                              "CMakeLists.txt", "setup.py", "pyproject.toml"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    missing = [f for f in tracked if f"{prefix}/{f}" not in names]
    assert tracked and not missing, missing
    assert not [n for n in names if "/bench/results/" in n or "/build/" in n]
    env = dict(os.environ, FASTSEQ_SKIP_EXTENSION="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                    "--no-deps", "-w", str(tmp_path / "wheels"),
                    str(tmp_path / "unpacked" / prefix)], check=True, env=env, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("fastseq-*.whl")
    assert "fastseq/kernels/rel_attention/forward.py" in zipfile.ZipFile(wheel).namelist()


WHEEL_CHECK = r"""
import json, sys
import torch, fastseq
info = fastseq.build_info()
torch.manual_seed(0)
x, h, c = torch.randn(3, 5), torch.randn(3, 4), torch.randn(3, 4)
w_ih, w_hh, b_ih, b_hh = torch.randn(16, 5), torch.randn(16, 4), torch.randn(16), torch.randn(16)
ours = fastseq.ops.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh, backend="native")
theirs = torch._VF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
libraries = sorted({line.split()[-1] for line in open("/proc/self/maps")
                    if ".so" in line.split()[-1]})
print(json.dumps({"file": fastseq.__file__, "info": info, "libraries": libraries,
                  "error": max((a - b).abs().max().item() for a, b in zip(ours, theirs))}))
"""


def test_wheel_with_the_extension_runs_without_the_toolkit(tmp_path):
    """A wheel built here with the extension (nvcc's CUDA kernels included when torch is a CUDA
    build), installed apart from the source tree, imports and runs its C++ op in a process that
    has no CUDA toolkit on its paths: _C finds torch's libraries through its $ORIGIN rpath and
    takes libcudart from torch's own wheel, nothing from /usr/local/cuda or the build tree."""
    if not fastseq_extension_built():
        pytest.skip("fastseq._C is not built here (no compiler or CMake at install time)")
    # The wheel reuses build/cmake-py*: only the module is linked again (~7 s here).
    clear_staging()
    env = dict(os.environ, FASTSEQ_REQUIRE_EXTENSION="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    "-w", str(tmp_path / "wheels"), str(ROOT)], check=True, env=env, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("fastseq-*.whl")
    assert [n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("fastseq/_C.")]
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, cwd=tmp_path)
    bare = {k: v for k, v in os.environ.items()
            if k not in ("CUDA_HOME", "CUDA_PATH", "LD_LIBRARY_PATH", "TRITON_INTERPRET")}
    bare.update(PATH="/usr/bin:/bin", PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, "-c", WHEEL_CHECK], cwd=tmp_path, env=bare,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(site)), report["file"]
    assert report["info"]["built"] and report["info"]["path"].startswith(str(site))
    assert report["error"] < 1e-5
    foreign = [lib for lib in report["libraries"] if lib.startswith("/usr/local/cuda")
               or (lib.startswith(str(ROOT)) and not lib.startswith(sys.prefix))]
    assert not foreign, foreign
    if report["info"]["with_cuda"]:
        cudart = [lib for lib in report["libraries"] if "libcudart" in lib]
        assert cudart and all("site-packages" in lib for lib in cudart), cudart


def fastseq_extension_built() -> bool:
    check = subprocess.run([sys.executable, "-c", "import fastseq; print(fastseq.build_info()['built'])"],
                           capture_output=True, text=True, cwd=ROOT)
    return check.stdout.strip().endswith("True")
