"""fastseq-bench: run fastseq's kernel benchmarks and show them.

    fastseq-bench                      the device's default cases (GPU grids on a GPU)
    fastseq-bench --quick              small cases only: a CPU or smoke run (~1 min on 2 cores)
    fastseq-bench --full               everything, including the cases the default skips
    fastseq-bench --headline           the compass cases only (LSTM/GRU, attention, rel attention)
    fastseq-bench --ops lstm,attention,rel_attention --dtype bf16 --mode fwd
    fastseq-bench --compare bench/results/OLD.json
    fastseq-bench --report RUN.json    redo the table and plots of a saved run

It runs the pytest-benchmark suites (bench/, installed as fastseq.bench_suites) with progress
lines, measures the device's matmul rate and copy bandwidth once, and writes under --out:
bench.json (pytest-benchmark's JSON plus a "fastseq" section: device, versions, git commit,
preset, peaks, the per-case summary), table.md, and PNG plots (with matplotlib). Every case
carries its max error against the float64 reference, so a fast wrong kernel shows as wrong.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import torch

from . import results
from .peaks import measure_peaks
from .plots import write_plots


def suites_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("fastseq.bench_suites")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("fastseq-bench: the benchmark suites (fastseq.bench_suites) are not "
                         "installed with this fastseq")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def discover_suites(directory: pathlib.Path | None = None) -> dict[str, str]:
    """{suite name: file}: every bench_<name>.py of the suites, found, not listed (a new suite
    runs without editing this file)."""
    try:
        directory = directory or suites_dir()
    except SystemExit:
        return {}
    return {path.stem.removeprefix("bench_"): path.name
            for path in sorted(directory.glob("bench_*.py"))}


SUITES = discover_suites()
# The suites of the headline preset (each keeps only its compass cases under it).
HEADLINE_SUITES = ("rnn", "attention", "rel_attention")
# --ops names beyond the suites: a recurrent mode selects its cases in every recurrent suite;
# multihead_attention the layer benchmark of the attention suite.
MODES = ("lstm", "gru", "rnn_tanh")
OP_NAMES = tuple(SUITES) + MODES + ("multihead_attention",)
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32", "fp64": "float64", "float64": "float64"}
PASSES = ("fwd", "bwd", "fwd+bwd")
NO_CASES = 5  # pytest's exit code when nothing was collected or everything was deselected


def _split(value: str | None, allowed, what: str) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"fastseq-bench: unknown {what} {', '.join(bad)}; choose from "
                         f"{', '.join(dict.fromkeys(allowed))}")
    return items


class CaseFilter:
    """A pytest plugin keeping the cases that match --ops, --dtype and --mode."""

    def __init__(self, ops, dtypes, modes):
        self.ops, self.dtypes, self.modes = ops, dtypes, modes

    def keep(self, item) -> bool:
        params = getattr(getattr(item, "callspec", None), "params", {})
        suite = next((name for name, file in SUITES.items() if item.fspath.basename == file), "")
        if self.ops is not None:
            is_layer = item.originalname == "bench_multihead_attention"
            if not (suite in self.ops or params.get("mode") in self.ops
                    or (is_layer and "multihead_attention" in self.ops)):
                return False
        if self.modes is not None and params.get("passes", self.modes[0]) not in self.modes:
            return False
        if self.dtypes is not None:
            found = [str(v).split(".")[1] for v in _flatten(params.values())
                     if isinstance(v, torch.dtype)]
            if found and not set(found) & set(self.dtypes):
                return False
        return True

    def pytest_collection_modifyitems(self, config, items):
        decisions = [(item, self.keep(item)) for item in items]
        kept = [item for item, keep in decisions if keep]
        dropped = [item for item, keep in decisions if not keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _flatten(values):
    for v in values:
        if isinstance(v, (tuple, list)):
            yield from _flatten(v)
        else:
            yield v


class Progress:
    """A pytest plugin printing one line per finished case (pytest's own output is off)."""

    def __init__(self):
        self.total, self.done, self.failed, self.began = 0, 0, [], time.perf_counter()

    def pytest_collection_finish(self, session):
        self.total = len(session.items)
        print(f"{self.total} cases", flush=True)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.done += 1
            name = report.nodeid.split("::")[-1]
            elapsed = time.perf_counter() - self.began
            print(f"[{self.done:3d}/{self.total}] {elapsed:6.0f}s {report.outcome:7s} {name}",
                  flush=True)
            if report.outcome == "failed":
                self.failed.append(report.nodeid)
                print(str(report.longrepr)[-2000:], flush=True)


def run_suites(args, out_dir: pathlib.Path) -> tuple[dict, int]:
    """Run the chosen suites in this process; (pytest-benchmark's JSON, pytest's exit code)."""
    os.environ["FASTSEQ_BENCH_PRESET"] = args.preset
    # Suites whose dtype is not a parameter learn the filter here (conftest.run_timed skips).
    os.environ["FASTSEQ_BENCH_DTYPES"] = ",".join(args.dtypes or [])
    directory = suites_dir()
    wanted = set(HEADLINE_SUITES if args.preset == "headline" else SUITES)
    if args.ops is not None:
        named = [op for op in args.ops if op in SUITES]
        others = [op for op in args.ops if op not in SUITES]
        wanted = set(named)
        if any(op in MODES for op in others):
            wanted |= {"rnn_cell", "rnn", "layer_norm_rnn"}
        if "multihead_attention" in others:
            wanted.add("attention")
    files = [str(directory / SUITES[s]) for s in SUITES if s in wanted]
    raw = out_dir / "pytest-benchmark.json"
    raw.unlink(missing_ok=True)  # an earlier run's would pass for this one's
    # An ini of our own: a project's (e.g. fastseq's pyproject.toml, found by walking up from the
    # suites) must not bring its options (-ra needs the terminal plugin, which is off here).
    ini = out_dir / "pytest-bench.ini"
    ini.write_text("[pytest]\n")
    # --import-mode=append: the suites are a package, so pytest puts the folder above them on
    # sys.path; in a source checkout that is the repository root, whose kernels/ folder would
    # shadow Hugging Face's `kernels` package (which transformers imports) if put first.
    pytest_args = [*files, "-c", str(ini), "-p", "no:cacheprovider", "-p", "no:terminal",
                   "-o", "python_files=bench_*.py", "-o", "python_functions=bench_*",
                   "--import-mode=append", "--rootdir", str(directory),
                   f"--benchmark-json={raw}"]
    if args.k:
        pytest_args += ["-k", args.k]
    try:
        import pytest
        import pytest_benchmark  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"fastseq-bench needs pytest and pytest-benchmark ({error}): "
                         "pip install 'fastseq[bench]'") from error

    progress = Progress()
    # This process runs its own pytest session: a PYTEST_XDIST_WORKER inherited from a test
    # runner above it (fastseq's suite under pytest-xdist) makes pytest-benchmark disable
    # every benchmark ("xdist plugin is active") and the run ends with no case.
    os.environ.pop("PYTEST_XDIST_WORKER", None)
    code = pytest.main(pytest_args,
                       plugins=[CaseFilter(args.ops, args.dtypes, args.modes), progress])
    if progress.failed:
        print(f"fastseq-bench: {len(progress.failed)} case(s) failed: "
              + ", ".join(name.split("::")[-1] for name in progress.failed), flush=True)
    if not raw.exists():
        return {"benchmarks": []}, int(code)
    return results.load(raw), int(code)


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda}
    try:
        import triton
        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = None
    import fastseq
    found["fastseq"] = getattr(fastseq, "__version__", None)
    return found


def git_commit() -> str | None:
    here = pathlib.Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def device_line(device: torch.device, preset: str) -> str:
    if device.type == "cuda":
        return (f"fastseq-bench on {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), "
                f"preset {preset}")
    return (f"fastseq-bench: no GPU found, running the CPU suite (fastseq's CPU paths against "
            f"torch's and the references) on {platform.processor() or platform.machine()} with "
            f"{torch.get_num_threads()} threads, preset {preset}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fastseq-bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:10]))
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="small cases only (CPU or smoke run)")
    preset.add_argument("--full", dest="preset", action="store_const", const="full",
                        help="every case, including those the default skips")
    preset.add_argument("--headline", dest="preset", action="store_const", const="headline",
                        help="the compass cases only: LSTM/GRU B=16 H=768 T=1024 bf16, attention "
                             "hd128 bf16 1k-16k, relative attention 512/2048 (CPU: small cases)")
    parser.set_defaults(preset="default")
    parser.add_argument("--ops", help=f"comma-separated: {', '.join(OP_NAMES)}")
    parser.add_argument("--dtype", help="comma-separated: bf16, fp16, fp32, fp64")
    parser.add_argument("--mode", help="comma-separated: fwd, bwd, fwd+bwd")
    parser.add_argument("-k", help="a pytest -k expression on the case names")
    parser.add_argument("--out", default="bench/out", help="output folder (default bench/out)")
    parser.add_argument("--compare", metavar="OLD_JSON", help="print the change against this run")
    parser.add_argument("--report", metavar="RUN_JSON",
                        help="no run: table, plots and comparison of a saved bench.json")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    args.ops = _split(args.ops, OP_NAMES, "op")
    dtypes = _split(args.dtype, DTYPES, "dtype")
    args.dtypes = None if dtypes is None else [DTYPES[d] for d in dtypes]
    args.modes = _split(args.mode, PASSES, "mode")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report:
        data = results.load(args.report)
        meta = data.get("fastseq", {})
        print(f"fastseq-bench report of {args.report}: {meta.get('device', '?')}, "
              f"commit {meta.get('git_commit')}, preset {meta.get('preset')}")
        code = 0
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(device_line(device, args.preset), flush=True)
        peaks = measure_peaks(device)
        rates = ", ".join(f"{k} {v:.2f}" for k, v in peaks["matmul_tflops"].items())
        print(f"measured peaks: matmul TFLOP/s {rates}; copy {peaks['copy_gbps']:.0f} GB/s",
              flush=True)
        data, code = run_suites(args, out_dir)
        if not data["benchmarks"]:
            print("fastseq-bench: no case matches the filters (--ops, --dtype, --mode, -k)"
                  if code in (0, NO_CASES) else "fastseq-bench: no case ran")
            return 2 if code in (0, NO_CASES) else code
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else
                f"cpu ({platform.processor() or platform.machine()})",
                "device_type": device.type, "versions": versions(), "git_commit": git_commit(),
                "preset": args.preset, "filters": {"ops": args.ops, "dtype": args.dtypes,
                                                   "mode": args.modes, "k": args.k},
                "peaks": peaks, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    summary = results.summarize(data, meta.get("peaks"))
    meta["cases"] = summary
    data["fastseq"] = meta
    if not args.report:
        with open(out_dir / "bench.json", "w") as f:
            json.dump(data, f, indent=1)
    lines = results.table_lines(summary)
    print()
    print(results.render(lines))
    (out_dir / "table.md").write_text(
        f"{meta.get('device')} - commit {meta.get('git_commit')} - {meta.get('date')} - "
        f"preset {meta.get('preset')}\n\n" + results.markdown(lines))
    if args.compare:
        print(f"\nchange against {args.compare} (negative: faster now)")
        print(results.render(results.compare(results.load(args.compare), data)))
    if not args.no_plots:
        title = f"{meta.get('device')}, {meta.get('date')}, {str(meta.get('git_commit'))[:10]}"
        written = write_plots(summary, out_dir, title)
        print(f"\n{len(written)} plots in {out_dir}" if written else
              "\nno plots: matplotlib is not installed (pip install matplotlib)")
    print(f"results: {out_dir / 'bench.json'}, {out_dir / 'table.md'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
