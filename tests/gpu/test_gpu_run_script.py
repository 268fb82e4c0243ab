"""bench/gpu_run.sh, the staged GPU run, end to end on this CPU (--dry: tiny shapes, Triton
through the interpreter, test chunks collected, not run), so that a typo in it cannot burn the
lent GPU's minutes. Checks what each stage leaves under $OUT, and that the test chunks cover
every test file."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import triton

from fastseq._versions import MIN_TORCH, MIN_TRITON, dotted, version_tuple
from fastseq.families import FAMILIES

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_run.sh"
CHUNKS = ["runtime", "recurrent", "loop", "attention", "rest"]
# The GPU run executes under the lent machine's stack (MIN_TORCH, MIN_TRITON: CI's second leg),
# so its dry run runs there, where a difference between stacks would break the real run; on a
# newer stack it is skipped (it takes 220 s of one of CI's cores).
GPU_MACHINE_STACK = (version_tuple(torch.__version__) == MIN_TORCH
                     and version_tuple(triton.__version__) == MIN_TRITON)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if not GPU_MACHINE_STACK:
        pytest.skip(f"the GPU script's dry run runs under the GPU machine's stack (torch "
                    f"{dotted(MIN_TORCH)}, triton {dotted(MIN_TRITON)}: make test-min-stack)")
    out = tmp_path_factory.mktemp("gpu-dry")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env.update(OUT=str(out), PYTHON=sys.executable, GIT_COMMIT="dry-run")
    run = subprocess.run(["bash", str(SCRIPT), "--dry", "all"], capture_output=True, text=True,
                         env=env)
    return run, out


def test_every_stage_passes(dry_run):
    run, out = dry_run
    assert run.returncode == 0, (run.stdout[-4000:], run.stderr[-2000:])
    stage_log = (out / "stage.log").read_text()
    for stage in ["stage 1 : exit 0", "stage 2 : exit 0", "stage 4 : exit 0",
                  "stage 5 : exit 0"] + \
            [f"stage 3 {c}: exit 0" for c in CHUNKS]:
        assert stage in stage_log, stage_log


def test_stage1_smoke_covers_every_family(dry_run):
    _, out = dry_run
    lines = [json.loads(line) for line in (out / "smoke.jsonl").read_text().splitlines()]
    header, rows = lines[0], lines[1:]
    assert header["device"] == "cpu" and "native" in header["backends"]
    cases = [r for r in rows if r["quantity"] == "*"]
    assert {r["family"] for r in cases} == set(FAMILIES)
    assert {r["backend"] for r in cases if r["family"] == "rnn"} == {
        "triton", "native-persistent", "native-loop"}
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    # Every gradient is checked, not only outputs.
    assert {"dx", "dw_hh", "dh0"} <= {r["quantity"] for r in rows if r["family"] == "rnn"}
    assert json.loads((out / "backends.json").read_text())["native"]


def test_stage2_writes_each_headline_suite(dry_run):
    _, out = dry_run
    for suite in ["rnn", "attention", "rel_attention"]:
        data = json.loads((out / f"bench-{suite}.json").read_text())
        assert data["fastseq"]["preset"] == "headline"
        assert data["benchmarks"], suite
        assert all(b["extra_info"]["max_error"] < 1e-3 for b in data["benchmarks"])
    tables = (out / "tables.md").read_text()
    assert "## rnn" in tables and "## rel_attention" in tables


def test_stage5_writes_each_inference_suite(dry_run):
    _, out = dry_run
    for suite in ["kv_cache", "txl_generation"]:
        data = json.loads((out / f"bench-{suite}.json").read_text())
        assert data["fastseq"]["preset"] == "headline"
        assert data["benchmarks"], suite
        assert all(b["extra_info"]["max_error"] < 1e-3 for b in data["benchmarks"])
    assert "## kv_cache" in (out / "tables-inference.md").read_text()


def test_stage3_chunks_collect_tests(dry_run):
    _, out = dry_run
    for chunk in CHUNKS:
        log = (out / f"tests-{chunk}.log").read_text()
        assert " collected" in log or "tests collected" in log, (chunk, log[-1000:])
        assert (out / f"tests-{chunk}.xml").exists()


CPU_ONLY = {"test_packaging.py", "test_gpu_run_script.py"}  # git ls-files; this dry run


def chunk_files(stage_log: str) -> dict:
    """{chunk: [test file names]} from the stage log's "tests, chunk C (...): FILES" lines."""
    found = {}
    for line in stage_log.splitlines():
        if line.startswith("== tests, chunk "):
            chunk = line.split()[3]
            found[chunk] = [pathlib.Path(f).name for f in line.split(": ", 1)[1].split()]
    return found


def test_chunks_cover_every_test_file_once(dry_run):
    _, out = dry_run
    chunks = chunk_files((out / "stage.log").read_text())
    assert list(chunks) == CHUNKS
    everywhere = [name for chunk, names in chunks.items() if chunk != "loop" for name in names]
    assert len(everywhere) == len(set(everywhere)), "a test file in two chunks"
    assert set(chunks["loop"]) <= set(chunks["recurrent"])  # again, with FASTSEQ_PERSISTENT=0
    expected = {p.name for p in (ROOT / "tests").glob("*/test_*.py")} - CPU_ONLY
    assert set(everywhere) == expected


def test_stage4_runs_the_sanitizer_script(dry_run):
    _, out = dry_run
    log = (out / "sanitizer.log").read_text()
    assert "persistent vs loop" in log


def test_unknown_stage_and_chunk_are_refused(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    for args in (["--dry", "9"], ["--dry", "3", "nosuch"]):
        run = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                             env=env)
        assert run.returncode != 0 and ("usage" in run.stdout or "unknown chunk" in run.stdout)
