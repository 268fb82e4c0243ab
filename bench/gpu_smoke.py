"""Stage 1 of bench/gpu_run.sh: a correctness smoke of every kernel family against the float64
reference, forward and every gradient, under the tolerance rule (fastseq/reference/tolerance.py:
at most 2x plain PyTorch's error in the same dtype, plus a small slack).

    python3 bench/gpu_smoke.py OUT.jsonl          on CUDA: GPU-sized shapes, fp32 and bf16
    python3 bench/gpu_smoke.py OUT.jsonl --dry    on the CPU: tiny shapes, Triton interpreted

Each family's case is `gpu_smoke(out)` in its own bench/bench_<family>.py (the families are
fastseq/families.py's; a family without one stops the run), built from bench/smoke_checks.py.
One JSON line per (case, quantity) is written and flushed as it is checked, so a run killed at
its limit still leaves what it checked. "plain" is fastseq's reference backend run in the tested
dtype (plain PyTorch); "truth" the same in float64. Exits 1 if any quantity breaks the rule or
any case raises.
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import sys

DRY = "--dry" in sys.argv
if DRY:  # before fastseq (and so its kernels) is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTSEQ_POISON_OUTPUTS", "1")  # an unwritten element reads NaN
# `bench` as a package, for the families' bench/bench_<family>.py. Appended, not prepended: the
# GPU run installs fastseq (pip install .), and the source tree must not shadow that install.
sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import fastseq  # noqa: E402
from fastseq.families import FAMILIES  # noqa: E402


def family_cases() -> dict:
    """{family: its gpu_smoke(out)}, from bench/bench_<family>.py; every family must have one."""
    cases = {name: getattr(importlib.import_module(f"bench.bench_{name}"), "gpu_smoke", None)
             for name in FAMILIES}
    missing = [name for name, case in cases.items() if case is None]
    if missing:
        raise SystemExit(f"gpu_smoke: no gpu_smoke(out) in bench/bench_<family>.py for {missing}")
    return cases


def main() -> int:
    from bench.smoke_checks import DEVICE

    if not DRY and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (use --dry to run on the CPU)", file=sys.stderr)
        return 2
    path = next((a for a in sys.argv[1:] if not a.startswith("--")), "smoke.jsonl")
    cases = family_cases()
    torch.manual_seed(0)
    with open(path, "w") as out:
        out.write(json.dumps({"backends": fastseq.backends(), "device": str(DEVICE),
                              "torch": torch.__version__}) + "\n")
        results = [cases[name](out) for name in FAMILIES]
    print("gpu_smoke:", "every case within the rule" if all(results) else "FAILURES", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
