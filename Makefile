# Two set-up commands for a fresh machine: `make bench` (the main job) and `make test`.
# Each creates .venv (reused when present), installs torch first, then builds and installs
# fastseq with --no-build-isolation (an isolated build would fetch a second torch).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CUDA build of torch: its headers let CI compile every .cu file on a CPU-only machine.
TORCH_SPEC ?= torch==2.14.1
DEV_DEPS := numpy pytest pytest-benchmark matplotlib hypothesis expecttest build "cmake>=3.26" ninja setuptools wheel
# torch's cpp_extension would otherwise guess /usr/local, which has nvcc but no libcudart.
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME

.PHONY: test bench install clean

$(VENV)/.deps-installed: Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(DEV_DEPS)
	touch $@

# An editable install: fastseq/ and kernels/ (as fastseq.kernels) are used in place, and
# fastseq._C is built through setup.py -> CMake/Ninja into fastseq/ (incremental: build/ is kept).
install: $(VENV)/.deps-installed
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import fastseq, json; print(json.dumps(fastseq.backends(), indent=1))"

test: install
	$(VENV)/bin/pytest tests -q

# The kernel benchmarks: the device's default cases (on a CPU the CPU suite); results in
# bench/out (bench.json, table.md, PNG plots). BENCH_ARGS passes options, e.g. --quick.
bench: install
	$(VENV)/bin/fastseq-bench --out bench/out $(BENCH_ARGS)

clean:
	rm -rf build bench/out *.egg-info
