"""Test set-up: Triton's interpreter where there is no GPU, poisoned outputs everywhere.

Both variables must be set before fastseq (and so its kernels) is imported.

tests/ has one folder per family (fastseq.families) and one per cross-cutting concern. The
helpers beside this file (numerics, recurrent_cases, triton_aot) and a family's test modules
are imported by name from any folder (tests/across_ops runs the families' own runners under
other inputs), so every folder is on sys.path whichever files pytest was given.
"""
import os
import pathlib
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTSEQ_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

_TESTS = pathlib.Path(__file__).resolve().parent
for _folder in [_TESTS, *sorted(p for p in _TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py")))]:
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

import fastseq  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Where the Triton tests of the attention families run: the GPU when there is one, else the CPU
# through the interpreter.
TRITON_TEST_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def on_triton_test_device():
    """Tensors made inside the test are created on TRITON_TEST_DEVICE (torch's default-device
    context), so one test body runs under the interpreter in CI and on CUDA in the GPU run."""
    with TRITON_TEST_DEVICE:
        yield


def backends_for(device: str) -> list[str]:
    """Every backend that can run on `device` here (the interpreter makes Triton run on CPU)."""
    dev = torch.device(device)
    names = ["torch", "reference"]
    if fastseq.backend.native_unavailable(dev) is None:
        names.insert(0, "native")
    if fastseq.backend.triton_unavailable(dev) is None:
        names.insert(0, "triton")
    return names


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_addoption(parser):
    parser.addoption(
        "--each-test-once", action="store_true",
        help="run every test function once, with its first parameters (CI's second leg: the "
             "oldest supported torch and Triton run each test's code, the newest every case)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--each-test-once"):
        return
    seen, kept, dropped = set(), [], []
    for item in items:
        key = (item.nodeid.split("::")[0], getattr(item, "originalname", item.name))
        (dropped if key in seen else kept).append(item)
        seen.add(key)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def pytest_runtest_teardown(item):
    _drop_speechbrains_unloaded_lazy_modules()


def _drop_speechbrains_unloaded_lazy_modules():
    """SpeechBrain puts lazy stand-ins in sys.modules (deprecation redirects such as
    speechbrain.wordemb, its numba transducer loss); reading any attribute of one imports its
    target, and one whose optional package (numba, flair, k2) is missing raises ImportError
    where getattr(module, "__file__", None) expects AttributeError. Hypothesis reads `__file__`
    of every module in sys.modules before each example, so once a SpeechBrain test has run in a
    worker, every property test after it failed (CI, stop 39: ten of tests/across_ops). An
    unloaded stand-in is no module yet: dropping it from sys.modules after each test leaves the
    attribute on its SpeechBrain package untouched."""
    lazy = getattr(sys.modules.get("speechbrain.utils.importutils"), "LazyModule", None)
    if lazy is None:
        return
    for name in [n for n, m in sys.modules.items() if isinstance(m, lazy) and m.lazy_module is None]:
        del sys.modules[name]
