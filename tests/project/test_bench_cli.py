"""The fastseq-bench command on the quick CPU preset: its options, the JSON fields it adds, the
table, the plots, --compare and --report, and its errors. Each run is a subprocess, as a user
runs it (the suites are a pytest session of their own)."""
import json
import subprocess
import sys

import pytest
import torch


def bench(*args, out):
    run = subprocess.run([sys.executable, "-m", "fastseq.benchmark.cli", *args, "--out",
                          str(out)], capture_output=True, text=True)
    return run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run = bench("--quick", "--ops", "rel_attention", out=out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run.stdout


def test_first_line_names_the_device(quick_run):
    _, stdout = quick_run
    first = stdout.splitlines()[0]
    if torch.cuda.is_available():
        assert first.startswith("fastseq-bench on ")
    else:
        assert first.startswith("fastseq-bench: no GPU found, running the CPU suite")
    assert "preset quick" in first
    assert "measured peaks: matmul TFLOP/s" in stdout
    assert "[  4/4]" in stdout, "one progress line per case"


def test_json_has_pytest_benchmarks_and_fastseq_fields(quick_run):
    out, _ = quick_run
    data = json.loads((out / "bench.json").read_text())
    assert len(data["benchmarks"]) == 4 and "machine_info" in data
    meta = data["fastseq"]
    assert meta["preset"] == "quick" and meta["device_type"] in ("cpu", "cuda")
    assert set(meta["versions"]) >= {"python", "torch", "triton", "cuda", "fastseq"}
    assert meta["git_commit"] is None or len(meta["git_commit"]) == 40
    assert meta["peaks"]["copy_gbps"] > 0 and all(v > 0 for v in
                                                   meta["peaks"]["matmul_tflops"].values())
    cases = meta["cases"]
    assert {c["case"]["passes"] for c in cases} == {"fwd", "fwd+bwd"}
    for case in cases:
        assert case["case"]["op"] == "rel_attention" and case["case"]["length"] == 64
        assert set(case["providers"]) == {"fastseq", "original"}
        for entry in case["providers"].values():
            assert entry["median_us"] > 0 and entry["tflops"] > 0
            assert 0 < entry["peak_fraction"] and entry["max_error"] < 1e-4
        assert set(case["speedups"]) == {"original/fastseq"}


def test_table_and_plots(quick_run):
    out, stdout = quick_run
    assert "speed-up vs peers" in stdout and "original " in stdout
    table = (out / "table.md").read_text()
    assert table.count("| rel_attention |") == 4
    for name in ("rel_attention_float32_fwd_vs_length.png",
                 "rel_attention_float32_fwdbwd_vs_length.png", "speedups.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_compare_and_report(quick_run, tmp_path):
    out, _ = quick_run
    run = bench("--report", str(out / "bench.json"), "--compare", str(out / "bench.json"),
                "--no-plots", out=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "report of" in run.stdout.splitlines()[0]
    assert "change against" in run.stdout and "+0.0%" in run.stdout
    assert not list(tmp_path.glob("*.png"))


def test_filters_select_ops_modes_and_dtypes(tmp_path):
    run = bench("--quick", "--ops", "lstm", "--mode", "fwd", "-k", "B64_I256 or B16_H256",
                "--no-plots", out=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cases = json.loads((tmp_path / "bench.json").read_text())["fastseq"]["cases"]
    assert cases and {c["case"]["cell"] for c in cases} == {"lstm"}
    assert {c["case"]["passes"] for c in cases} == {"fwd"}
    # --ops lstm: the LSTM's cases in every recurrent suite (cell, layer, streaming step).
    assert {c["case"]["op"] for c in cases} == {"rnn_cell", "rnn_layer", "stream_step"}
    empty = bench("--quick", "--ops", "rel_attention", "--dtype", "fp16", out=tmp_path)
    assert empty.returncode == 2 and "no case matches the filters" in empty.stdout


def test_unknown_option_values_are_named():
    run = subprocess.run([sys.executable, "-m", "fastseq.benchmark.cli", "--ops", "lstm,conv"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "unknown op conv" in run.stderr
