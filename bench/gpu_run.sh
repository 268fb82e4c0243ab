#!/usr/bin/env bash
# The GPU run, in stages that each fit one call of the device tool (under 8 minutes; the device
# allows 10 a command and 15 in all, start-up included). Each stage writes its results under
# $OUT as it goes, so a stage killed at its limit still returns what it wrote (at most 8 files a
# call come back). Commit what comes back under bench/results/<date>-h200-<stage>/.
#
#   bash bench/gpu_run.sh 1          build (16 cores), fastseq.backends(), correctness smoke of
#                                    every family on CUDA against float64 (bench/gpu_smoke.py)
#   bash bench/gpu_run.sh 2          the headline benchmarks (fastseq-bench --headline), suite by
#                                    suite: LSTM/GRU vs cuDNN, attention vs SDPA, rel attention
#   bash bench/gpu_run.sh 3 CHUNK    the CUDA test suite, one chunk a call, in this order:
#                                    runtime, recurrent, loop, attention, rest
#   bash bench/gpu_run.sh 4          compute-sanitizer (memcheck, racecheck, synccheck) on the
#                                    persistent recurrence, small cases
#   bash bench/gpu_run.sh 5          the inference benchmarks (headline cases): decode steps
#                                    against a KV cache vs SDPA, the split-KV rule's crossover,
#                                    the rel-attention decode step, Transformer-XL generation
#   bash bench/gpu_run.sh --dry all  every stage on this CPU with tiny shapes (Triton through the
#                                    interpreter; chunks collected, not run): a typo costs no
#                                    GPU minutes. CI runs it (tests/gpu/test_gpu_run_script.py).
#
# Every stage builds first if this tree is not yet installed (a fresh machine: ~1.5 min), so
# any stage can be a machine's first call. The device copy has no .git: pass GIT_COMMIT=...
# Nothing here needs a package the GPU machine lacks (no network, no expecttest, no matplotlib).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY=0
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--dry" ]; then DRY=1; else ARGS+=("$arg"); fi
done
STAGE=${ARGS[0]:-}
CHUNK=${ARGS[1]:-}
if [ $DRY -eq 1 ]; then
  PYTHON=${PYTHON:-$REPO/.venv/bin/python}
  OUT=${OUT:-$REPO/bench/out/gpu-dry}
else
  PYTHON=${PYTHON:-python3}
  OUT=${OUT:-$REPO/bench/out/gpu}
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FASTSEQ_REQUIRE_EXTENSION=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Seconds each piece may take before it is interrupted (SIGINT: pytest and fastseq-bench still
# write what they have). Sized so a stage ends inside 8 minutes on a warm machine. The dry run
# (CI's test of this script, on a loaded 2-core machine) has no limits: `timeout 0` never
# fires, and a stage that hit 120 s under load there had failed a test for no bug.
if [ $DRY -eq 1 ]; then
  for limit in SMOKE_S BENCH_RNN_S BENCH_ATTENTION_S BENCH_REL_S BENCH_DECODE_S BENCH_TXL_GEN_S \
      BENCH_HF_S CHUNK_S SANITIZER_S; do
    export "$limit=${!limit:-0}"
  done
fi
SMOKE_S=${SMOKE_S:-300}
BENCH_RNN_S=${BENCH_RNN_S:-120}
BENCH_ATTENTION_S=${BENCH_ATTENTION_S:-240}
BENCH_REL_S=${BENCH_REL_S:-100}
BENCH_DECODE_S=${BENCH_DECODE_S:-240}
BENCH_HF_S=${BENCH_HF_S:-90}
BENCH_TXL_GEN_S=${BENCH_TXL_GEN_S:-90}
CHUNK_S=${CHUNK_S:-420}
SANITIZER_S=${SANITIZER_S:-140}

# The test chunks, runtime first: the CUDA runtime and persistent-kernel tests; the recurrent
# and the attention families' test folders (from fastseq/families.py, so a new family is never
# left out); the rnn family's layer tests again with the persistent kernel off (loop); "rest",
# every other test file, found at run time, but for CPU_ONLY: tests/project/test_packaging.py
# builds wheels from `git ls-files` (the device copy has no .git) and
# tests/gpu/test_gpu_run_script.py is this script's dry run on the CPU; CI runs both.
CHUNKS="runtime recurrent loop attention rest"
RUNTIME="tests/across_ops/test_cuda_runtime.py tests/rnn/test_rnn_persistent.py"
CPU_ONLY="tests/project/test_packaging.py tests/gpu/test_gpu_run_script.py"
# FILES... less those in the space-separated list $1.
files_except() {
  local skip=" $1 " f; shift
  for f in "$@"; do case "$skip" in *" $f "*) ;; *) printf '%s ' "$f" ;; esac; done; echo
}
chunk_files() {
  local folders
  case "$1" in
    runtime) echo $RUNTIME ;;
    recurrent|attention)
      folders=$("$PYTHON" "$REPO/fastseq/families.py" --test-folders "$1") || return 1
      # shellcheck disable=SC2086
      files_except "$RUNTIME" $(for d in $folders; do echo "$d"/test_*.py; done) ;;
    loop) echo tests/rnn/test_rnn.py tests/rnn/test_rnn_nn.py ;;  # FASTSEQ_PERSISTENT=0
    rest)
      # shellcheck disable=SC2046
      files_except "$(for c in runtime recurrent attention; do chunk_files $c; done | tr '\n' ' ') $CPU_ONLY" \
        tests/*/test_*.py ;;
    *) return 1 ;;
  esac
}

say() { echo "== $*" | tee -a "$OUT/stage.log"; }

write_env() {
  {
    date -u; echo "commit ${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    echo "stage $STAGE $CHUNK dry=$DRY"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
    "$PYTHON" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
  } > "$OUT/env.txt" 2>&1
}

# Install this tree unless it is installed already (a warm machine's second stage): the stamp
# is a hash of the sources. The dry run uses the checkout's own editable install.
ensure_built() {
  if [ $DRY -eq 1 ]; then
    (cd /tmp && "$PYTHON" -c "import fastseq._C") || { echo "dry run: run 'make install' first"; return 1; }
    return 0
  fi
  local stamp
  stamp=$(find csrc kernels fastseq setup.py CMakeLists.txt pyproject.toml -type f \
            -not -name '*.so' -not -path '*/__pycache__/*' | sort | xargs md5sum | md5sum | cut -c1-32)
  if [ "$(cat /tmp/fastseq-build-stamp 2>/dev/null)" = "$stamp" ]; then return 0; fi
  say "build (MAX_JOBS=$MAX_JOBS)"
  local began=$SECONDS
  if ! "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index . > "$OUT/build.log" 2>&1; then
    tail -50 "$OUT/build.log"; echo "BUILD FAILED"; return 1
  fi
  echo "$stamp" > /tmp/fastseq-build-stamp
  say "built in $((SECONDS - began)) s"
}

# SIGINT at the limit: pytest and fastseq-bench finish their reports; KILL 20 s later if not.
limited() { local s=$1; shift; timeout -s INT -k 20 "$s" "$@"; }
# pytest from /tmp, so that `python -m pytest` imports the installed fastseq (fastseq.kernels
# and _C exist only there), not the source tree that `-m` would put first on sys.path.
run_pytest() {
  local limit=$1; shift
  (cd /tmp && limited "$limit" "$PYTHON" -m pytest -c "$REPO/pyproject.toml" --rootdir="$REPO" \
     -p no:cacheprovider "$@")
}

stage1() {
  say "backends"
  (cd /tmp && "$PYTHON" -c "import fastseq, json; print(json.dumps(fastseq.backends(), indent=1))") \
    > "$OUT/backends.json" 2>&1 || return 1
  say "smoke (limit ${SMOKE_S} s)"
  local dry=(); [ $DRY -eq 1 ] && dry=(--dry)
  (cd /tmp && limited "$SMOKE_S" "$PYTHON" "$REPO/bench/gpu_smoke.py" "$OUT/smoke.jsonl" "${dry[@]}") \
    2>&1 | tee "$OUT/smoke.log" | grep -E "FAIL|gpu_smoke"
  return "${PIPESTATUS[0]}"
}

# bench_suites TABLES SUITE:LIMIT ...: each suite's headline cases (fastseq-bench --headline),
# its JSON as bench-SUITE.json and its table appended to TABLES.
bench_suites() {
  local tables=$1 status=0 suite limit entry; shift
  : > "$OUT/$tables"
  for entry in "$@"; do
    suite=${entry%%:*}; limit=${entry##*:}
    say "fastseq-bench --headline --ops $suite (limit $limit s)"
    rm -rf "/tmp/fastseq-bench-$suite"
    (cd /tmp && limited "$limit" "$PYTHON" -m fastseq.benchmark.cli --headline --ops "$suite" \
       --no-plots --out "/tmp/fastseq-bench-$suite") >> "$OUT/bench.log" 2>&1 || status=1
    if [ -f "/tmp/fastseq-bench-$suite/bench.json" ]; then
      cp "/tmp/fastseq-bench-$suite/bench.json" "$OUT/bench-$suite.json"
      { echo "## $suite"; cat "/tmp/fastseq-bench-$suite/table.md"; echo; } >> "$OUT/$tables"
    else
      echo "## $suite: no results (see bench.log)" >> "$OUT/$tables"; status=1
    fi
  done
  tail -5 "$OUT/bench.log"
  return $status
}

stage2() {
  bench_suites tables.md "rnn:$BENCH_RNN_S" "attention:$BENCH_ATTENTION_S" "rel_attention:$BENCH_REL_S"
}

stage5() {
  local suites=("kv_cache:$BENCH_DECODE_S" "txl_generation:$BENCH_TXL_GEN_S")
  # hf_transformers needs transformers, which the lent machine (no network) may lack: said, not run
  if "$PYTHON" -c "import transformers" > /dev/null 2>&1; then
    suites+=("hf_transformers:$BENCH_HF_S")
  else
    say "hf_transformers: skipped (transformers is not installed here)"
  fi
  bench_suites tables-inference.md "${suites[@]}"
}

stage3() {
  local chunk=$1 files
  files=$(chunk_files "$chunk")  # checked with the arguments
  local mode=(-q --durations=10); [ $DRY -eq 1 ] && mode=(-q --collect-only)
  # The loop chunk turns the persistent kernel off; the others keep the default rule (CUDA:
  # the kernel where it fits; CPU tests: the loop, not the kernel's slow C++ twin).
  local persistent=; [ "$chunk" = loop ] && persistent=0
  say "tests, chunk $chunk (limit ${CHUNK_S} s): $files"
  # shellcheck disable=SC2046
  FASTSEQ_PERSISTENT=$persistent run_pytest "$CHUNK_S" "${mode[@]}" \
    --junitxml="$OUT/tests-$chunk.xml" $(for f in $files; do echo "$REPO/$f"; done) \
    > "$OUT/tests-$chunk.log" 2>&1
  local status=$?
  tail -3 "$OUT/tests-$chunk.log"
  return $status
}

stage4() {
  local sanitizer status=0 tool
  sanitizer=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  for tool in memcheck racecheck synccheck; do
    say "compute-sanitizer --tool $tool (limit ${SANITIZER_S} s)"
    if [ $DRY -eq 1 ]; then  # no GPU: the script alone (its CPU twin), once
      [ $tool = memcheck ] || continue
      (cd /tmp && limited "$SANITIZER_S" "$PYTHON" "$REPO/bench/sanitize_persistent.py") >> "$OUT/sanitizer.log" 2>&1 || status=1
    else
      (cd /tmp && limited "$SANITIZER_S" "$sanitizer" --tool $tool --error-exitcode 9 \
         "$PYTHON" "$REPO/bench/sanitize_persistent.py") >> "$OUT/sanitizer.log" 2>&1 || status=1
    fi
    echo "exit status so far $status" >> "$OUT/sanitizer.log"
  done
  grep -E "ERROR SUMMARY|persistent vs loop|exit status" "$OUT/sanitizer.log"
  return $status
}

run_stage() {
  local stage=$1 chunk=${2:-} began=$SECONDS status
  case "$stage" in
    1) stage1 ;;
    2) stage2 ;;
    3) stage3 "$chunk" ;;
    4) stage4 ;;
    5) stage5 ;;
  esac
  status=$?
  say "stage $stage $chunk: exit $status in $((SECONDS - began)) s"
  return $status
}

# Arguments first: a typo costs no build.
case "$STAGE" in
  1|2|4|5|all) ;;
  3) chunk_files "$CHUNK" > /dev/null || { echo "unknown chunk '$CHUNK'; one of: $CHUNKS"; exit 2; } ;;
  *) echo "usage: bash bench/gpu_run.sh [--dry] 1|2|3 CHUNK|4|5|all (all: --dry only)"; exit 2 ;;
esac
write_env
ensure_built || exit 1
if [ "$STAGE" = all ]; then
  [ $DRY -eq 1 ] || { echo "'all' is for --dry: on the GPU run one stage a call"; exit 2; }
  status=0
  run_stage 1 || status=1
  run_stage 2 || status=1
  for c in $CHUNKS; do run_stage 3 "$c" || status=1; done
  run_stage 4 || status=1
  run_stage 5 || status=1
  exit $status
fi
run_stage "$STAGE" "$CHUNK"
