"""The package builds and installs without the extension (FASTSEQ_SKIP_EXTENSION=1): Triton
kernels land in fastseq.kernels, the benchmark suites in fastseq.bench_suites with the
fastseq-bench command, and nothing compiled is in the wheel. The sdist carries every source a
build needs (the C++/CUDA sources, CMakeLists.txt) and builds a wheel itself."""
import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_wheel_without_extension(tmp_path):
    env = dict(os.environ, FASTSEQ_SKIP_EXTENSION="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    "-w", str(tmp_path), str(ROOT)], check=True, env=env, cwd=tmp_path)
    (wheel,) = tmp_path.glob("fastseq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastseq/kernels/rnn_cell.py" in names and "fastseq/ops/rnn_cell.py" in names
    assert not [n for n in names if n.endswith(".so")]
    assert not [n for n in names if n.startswith("kernels/")], "kernels/ must not be a top-level package"
    assert "fastseq/bench_suites/bench_rel_attention.py" in names
    assert "fastseq/bench_suites/conftest.py" in names
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
    assert "fastseq/kernels/rel_attention.py" in zipfile.ZipFile(wheel).namelist()
