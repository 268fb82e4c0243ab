#!/usr/bin/env bash
# One call on a lent GPU machine (device tool): build fastseq in place with that machine's
# python3 (torch, triton, cmake, ninja, pytest-benchmark preinstalled; no network), run the
# whole test suite on CUDA, run the benchmarks (fastseq-bench), and leave logs, JSON and tables
# under $OUT. Commit what comes back under bench/results/.
#
#   device run: bash bench/gpu_run.sh            (OUT is set by the device tool)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FASTSEQ_REQUIRE_EXTENSION=1

{
  date -u; git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

status=0
python3 -m pip install -q --no-build-isolation --no-deps --no-index . > "$OUT/build.log" 2>&1 || status=1
if [ $status -ne 0 ]; then tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; fi
(cd /tmp && python3 -c "import fastseq, json; print(json.dumps(fastseq.backends(), indent=1))") >> "$OUT/env.txt" 2>&1

# From /tmp, so that `python3 -m pytest` imports the installed fastseq (fastseq.kernels and _C
# exist only there), not the source tree that `-m` would put first on sys.path.
run_pytest() { (cd /tmp && python3 -m pytest -c "$REPO/pyproject.toml" --rootdir="$REPO" -p no:cacheprovider "$@"); }

# The persistent kernel first, small, under compute-sanitizer (out-of-bounds, shared-memory
# races, barrier misuse), then against the loop at full speed.
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
{
  for tool in memcheck racecheck synccheck; do
    echo "== compute-sanitizer --tool $tool"
    (cd /tmp && timeout 300 "$SANITIZER" --tool $tool --error-exitcode 9 python3 "$REPO/bench/sanitize_persistent.py") 2>&1 | tail -15
    echo "exit ${PIPESTATUS[0]}"
  done
} > "$OUT/sanitizer.log" 2>&1
grep -E "^== |^exit|ERROR SUMMARY|persistent vs loop" "$OUT/sanitizer.log"

run_pytest "$REPO/tests" -q --maxfail=25 --durations=15 --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log"
# The CUDA sequence op's GEMM-per-step loop, which the run above skips where the persistent
# kernel fits.
echo "== FASTSEQ_PERSISTENT=0 tests/test_rnn_layer_ops.py" >> "$OUT/tests.log"
FASTSEQ_PERSISTENT=0 run_pytest "$REPO/tests/test_rnn_layer_ops.py" -q -x >> "$OUT/tests.log" 2>&1 || status=1
tail -2 "$OUT/tests.log"

# The benchmarks through the installed command (its suites are fastseq.bench_suites): bench.json
# (pytest-benchmark's JSON + fastseq's fields), table.md; plots only where matplotlib exists
# (redo them here with `fastseq-bench --report bench/results/<run>/bench.json --out ...`).
(cd /tmp && python3 -m fastseq.benchmark.cli --out "$OUT/bench") > "$OUT/bench.log" 2>&1 || status=1
tail -40 "$OUT/bench.log"
exit $status
