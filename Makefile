# Two set-up commands for a fresh machine: `make bench` (the main job) and `make test`.
# Each creates .venv (reused when present), installs torch first, then builds and installs
# fastseq with --no-build-isolation (an isolated build would fetch a second torch).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CUDA build of torch: its headers let CI compile every .cu file on a CPU-only machine.
TORCH_SPEC ?= torch==2.14.1
DEV_DEPS := numpy pytest pytest-xdist pytest-benchmark matplotlib hypothesis expecttest build "cmake>=3.26" ninja setuptools wheel
# torch's cpp_extension would otherwise guess /usr/local, which has nvcc but no libcudart.
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME

# The lowest stack fastseq supports, which is the lent GPU machine's (Python 3.12, torch 2.11,
# triton 3.6; it has no expecttest): CI's second leg, `make test-min-stack`, in its own venv.
# numpy < 2.4 only here: triton 3.6's interpreter takes int() of 1-element arrays, which numpy
# 2.4 refuses (the GPU machine's numpy 2.5 is fine there: no interpreter on a GPU).
# Python 3.12: pyenv's (this machine kind's images carry it, not on PATH while 3.11 is the
# global version), else a python3.12 on PATH.
MIN_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
MIN_VENV := .venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_TORCH := torch==2.11.0
# torch 2.11's own requirements but its CUDA libraries (nvidia-*, cuda-toolkit: 2.7 GB), which
# the leg takes from .venv instead (below).
MIN_TORCH_DEPS := triton==3.6.0 filelock "typing-extensions>=4.10" "setuptools<82" "sympy>=1.13.3" \
	"networkx>=2.5.1" jinja2 "fsspec>=0.8.5" "cuda-bindings>=13.0.3,<14"
MIN_DEV_DEPS := "numpy<2.4" pytest pytest-xdist pytest-benchmark hypothesis "cmake>=3.26" ninja setuptools wheel
# What the second leg runs: every test folder but the ones fastseq/families.py leaves to the
# newest stack (NEWEST_STACK_ONLY): each family's tests (Triton through the interpreter), the
# dispatch and step-protocol tests, the torch APIs fastseq hooks into (compile, export, double
# backward, vmap, TorchScript, weights_only loads) and the sm_90 compile and GPU-script dry run.
MIN_STACK_TESTS = $(shell $(PYTHON) fastseq/families.py --min-stack-tests)

.PHONY: test test-min-stack bench docs install install-min-stack min-stack-packages clean

# The third-party packages tests/integrations proves fastseq inside (transformers' attention
# interface; fastseq.patch on torchvision, torchaudio, SpeechBrain and OpenNMT-py models). Only
# the newest stack's venv has them. torchaudio 2.11 (the newest release; its models are plain
# Python and run on torch 2.14), SpeechBrain and OpenNMT-py (which pins torch < 2.3) go in without
# their declared dependencies, which would replace torch: what their imports need is listed.
THIRD_PARTY := "transformers>=5.0,<6" torchvision==0.29.1 \
	hyperpyyaml joblib scipy sentencepiece soundfile requests \
	configargparse pyyaml six pyonmttok spacy rapidfuzz pyahocorasick sacrebleu fasttext-wheel
THIRD_PARTY_NO_DEPS := torchaudio==2.11.1 speechbrain==1.1.2 OpenNMT-py==3.5.1

$(VENV)/.deps-installed: Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(DEV_DEPS)
	$(PY) -m pip install -q $(THIRD_PARTY)
	$(PY) -m pip install -q --no-deps $(THIRD_PARTY_NO_DEPS)
	touch $@

# An editable install: fastseq/ and kernels/ (as fastseq.kernels) are used in place, and
# fastseq._C is built through setup.py -> CMake/Ninja into fastseq/ (incremental: build/ is kept).
install: $(VENV)/.deps-installed
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import fastseq, json; print(json.dumps(fastseq.backends(), indent=1))"

# The suite runs in one pytest-xdist worker per core (at most 8: each holds torch, ~1.5 GB),
# a test file per worker at a time (module fixtures such as the multi-rank test's process group
# start once). TEST_JOBS=1 runs it in one process.
TEST_JOBS ?= $(shell n=$$(nproc); echo $$(( n < 8 ? n : 8 )))
PYTEST_JOBS = $(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

test: install
	$(VENV)/bin/pytest tests -q --durations=15 $(PYTEST_JOBS)

# Disk: a CI run with both stacks complete needed 10.5 GB (.venv 5.7, .venv-min 4.8) plus the
# downloaded wheels, and one CI machine ran out during this install. Both torch builds are CUDA
# 13 (cu130) with the same library sonames and layout, so .venv-min links .venv's nvidia/ folder
# (torch finds it beside its own site-packages) instead of installing its 2.7 GB copy; on a
# CPU-only machine these libraries are only loaded, never called.
# The packages alone (no .venv needed: CI downloads them while .venv builds the extension).
$(MIN_VENV)/.packages-installed: Makefile pyproject.toml
	test -x $(MIN_PY) || $(MIN_PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install -q --no-cache-dir --no-deps $(MIN_TORCH)
	$(MIN_PY) -m pip install -q --no-cache-dir $(MIN_TORCH_DEPS)
	$(MIN_PY) -m pip install -q --no-cache-dir $(MIN_DEV_DEPS)
	touch $@

$(MIN_VENV)/.deps-installed: $(MIN_VENV)/.packages-installed $(VENV)/.deps-installed
	ln -sfn "$$($(PY) -c 'import pathlib, sysconfig; print(pathlib.Path(sysconfig.get_path("purelib")) / "nvidia")')" \
		"$$($(MIN_PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/nvidia"
	$(MIN_PY) -c "import torch; assert torch.__version__.startswith('2.11.'), torch.__version__"
	touch $@

min-stack-packages: $(MIN_VENV)/.packages-installed

install-min-stack: $(MIN_VENV)/.deps-installed
	$(MIN_PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(MIN_PY) -c "import fastseq, json; print(json.dumps(fastseq.backends(), indent=1))"

# Triton 3.6's interpreter warns at every tensor index under numpy 2.3 (~70,000 warnings a run,
# each recorded by pytest): ignored here by its text.
# --each-test-once: every test function with its first parameters (tests/conftest.py); the
# newest stack runs every case. The sm_90 compile of every kernel configuration and the GPU
# script's dry run run here in full: this is the stack the lent GPU machine runs.
test-min-stack: install-min-stack
	PYTHON=$(abspath $(MIN_PY)) $(MIN_VENV)/bin/pytest $(MIN_STACK_TESTS) -q --durations=15 \
		--each-test-once $(PYTEST_JOBS) \
		-W "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"

# The kernel benchmarks: the device's default cases (on a CPU the CPU suite); results in
# bench/out (bench.json, table.md, PNG plots). BENCH_ARGS passes options, e.g. --quick.
bench: install
	$(VENV)/bin/fastseq-bench --out bench/out $(BENCH_ARGS)

# The documentation (mkdocs.yml, docs/) into build/docs, warnings as errors. Its own small venv:
# mkdocstrings reads the API from the sources statically, so neither torch nor the extension is
# needed. CI builds it.
DOCS_VENV := .venv-docs
DOCS_DEPS := "mkdocs>=1.6,<2" "mkdocs-material>=9.5,<10" "mkdocstrings[python]>=0.26"
$(DOCS_VENV)/.deps-installed: Makefile
	test -x $(DOCS_VENV)/bin/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q $(DOCS_DEPS)
	touch $@

docs: $(DOCS_VENV)/.deps-installed
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict

clean:
	rm -rf build bench/out *.egg-info
