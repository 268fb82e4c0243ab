"""The package builds and installs without the extension (FASTSEQ_SKIP_EXTENSION=1): Triton
kernels land in fastseq.kernels, and nothing compiled is in the wheel."""
import os
import pathlib
import subprocess
import sys
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
