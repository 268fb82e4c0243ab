"""Backend choice: the report, the overrides (keyword, context manager, FASTSEQ_BACKEND) and
the errors naming a backend and its reason."""
import importlib.util
import types

import pytest
import torch

import fastseq
from fastseq import backend as backend_module


def lstm_args(device="cpu"):
    return (torch.randn(2, 3, device=device), None, torch.randn(16, 3, device=device),
            torch.randn(16, 4, device=device))


def test_report_tells_the_truth():
    report = fastseq.backends()
    assert set(report) == {"triton", "native", "torch", "reference", "environment"}
    native = report["native"]
    built = importlib.util.find_spec("fastseq._C") is not None
    assert native["build"]["built"] is built and native["cpu"] is built
    if built:
        assert native["build"]["torch_version"] == torch.__version__
        if native["build"]["with_cuda"]:
            assert native["build"]["cuda_archs"]
    cuda = torch.cuda.is_available()
    assert report["triton"]["cuda"] is cuda
    if not cuda:
        assert "no GPU" in report["triton"]["reasons"]["cuda"]
        assert "no GPU" in report["native"]["reasons"]["cuda"]
    assert report["environment"]["device"] == (torch.cuda.get_device_name() if cuda else "cpu")


def test_requested_backend_that_cannot_run_names_itself_and_why():
    with pytest.raises(fastseq.BackendError, match=r"backend 'triton' cannot run this call: "
                                                   r"Triton runs on CUDA tensors .* not meta"):
        fastseq.ops.lstm_cell(*lstm_args("meta"), backend="triton")
    with pytest.raises(fastseq.BackendError, match="backend 'native' cannot run this call: .*meta"):
        fastseq.ops.lstm_cell(*lstm_args("meta"), backend="native")


def test_auto_lists_every_reason_when_nothing_fits():
    never = backend_module.serves(lambda call: "nope", lambda **call: None)
    declared = backend_module.OpBackends("op", backends={"a": never, "b": never},
                                         preference={"cpu": ("a", "b")})
    with pytest.raises(fastseq.BackendError, match="no backend can run this call .*a: nope; b: nope"):
        declared.choose({"device": torch.device("cpu")}, "auto")
    with pytest.raises(fastseq.BackendError, match="backend 'reference' has no implementation"):
        with fastseq.use_backend("reference"):
            declared.choose({"device": torch.device("cpu")}, None)


def test_the_declaration_runs_the_first_variant_that_applies():
    """A backend's variants are tried in order; the chosen one is what runs and what explain
    reports. A backend whose last variant is conditional is refused at declaration."""
    declared = backend_module.OpBackends(
        "op", backends={"a": backend_module.serves(
            backend_module.serves_every_call, lambda x, **_: ("plain", x), "plain",
            backend_module.Variant("small", lambda x, **_: ("small", x), when=lambda c: c["x"] < 2))},
        preference={"cpu": ("a",)})
    cpu = torch.device("cpu")
    assert declared.run({"device": cpu, "x": 1}) == ("small", 1)
    assert declared.run({"device": cpu, "x": 5}) == ("plain", 5)
    (decision,) = fastseq.explain(declared.run, {"device": cpu, "x": 1}).decisions
    assert decision.chosen == "a" and decision.variant == "small"
    with pytest.raises(ValueError, match="last variant must run every call"):
        backend_module.Backend(backend_module.serves_every_call, (
            backend_module.Variant("only some", lambda **_: None, when=lambda c: True),))


def test_override_order(monkeypatch):
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    assert backend_module.requested_backend(None) == "reference"
    with fastseq.use_backend("torch"):
        assert backend_module.requested_backend(None) == "torch"
        with fastseq.use_backend("native"):
            assert backend_module.requested_backend(None) == "native"
            assert backend_module.requested_backend("triton") == "triton"
        assert backend_module.requested_backend(None) == "torch"
    assert backend_module.requested_backend(None) == "reference"
    monkeypatch.setenv("FASTSEQ_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTSEQ_BACKEND: backend must be one of"):
        backend_module.requested_backend(None)
    with pytest.raises(ValueError, match="backend=: backend must be one of"):
        fastseq.ops.lstm_cell(*lstm_args(), backend="cudnn")


def test_context_manager_routes_the_op():
    x, _, w_ih, w_hh = lstm_args()
    with fastseq.use_backend("reference"), torch.profiler.profile() as prof:
        fastseq.ops.lstm_cell(x, None, w_ih, w_hh)
    names = {e.name for e in prof.events()}
    assert "aten::sigmoid" in names and "aten::lstm_cell" not in names


def test_without_the_extension_native_says_why_and_auto_still_works(monkeypatch):
    from fastseq import _extension

    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "LOAD_ERROR", "No module named 'fastseq._C'")
    report = fastseq.backends()["native"]
    assert report["available"] is False and report["build"] == {
        "built": False, "error": "No module named 'fastseq._C'"}
    assert "is not built" in report["reasons"]["cpu"]
    with pytest.raises(fastseq.BackendError, match="backend 'native' cannot run this call: "
                                                   "the extension fastseq._C is not built"):
        fastseq.ops.lstm_cell(*lstm_args(), backend="native")
    h, c = fastseq.ops.lstm_cell(*lstm_args())  # auto: torch's own cell on CPU
    assert h.shape == (2, 4)


@pytest.mark.parametrize("arch,capability,runs", [
    ("90a", (9, 0), True), ("90a", (10, 0), False), ("90a", (8, 9), False),
    ("80", (8, 6), True), ("80", (9, 0), True), ("80", (7, 5), False),
    ("80-real", (8, 9), True), ("80-real", (9, 0), False), ("80-virtual", (12, 0), True),
    ("100f", (10, 3), True), ("100f", (12, 0), False), ("120", (12, 0), True),
    ("native", (7, 0), True),
])
def test_cuda_architecture_rule(arch, capability, runs):
    """SASS runs within its major version, PTX forward from its version, 'a' code on its own
    chip only (a wheel built for the H100, sm_90a, refuses an sm_100 GPU by name)."""
    assert fastseq._extension.arch_runs_on(arch, capability) is runs


def test_native_refuses_a_gpu_its_build_has_no_code_for(monkeypatch):
    """The check native_unavailable makes for a CUDA device, with a build for 80 and 90a: an
    sm_90 or sm_86 GPU is served, an sm_100 one gets the rebuild command instead of CUDA's 'no
    kernel image' at launch (auto then moves on to another backend)."""
    ext = fastseq._extension
    monkeypatch.setattr(ext, "CUDA_ARCHS", ("80-real", "90a"))
    assert ext.cuda_arch_mismatch((9, 0)) is None and ext.cuda_arch_mismatch((8, 6)) is None
    reason = ext.cuda_arch_mismatch((10, 0))
    assert "80-real, 90a only, not this GPU's sm_100" in reason
    assert 'FASTSEQ_CUDA_ARCHS="100"' in reason
    if ext.has_cuda_kernels():  # the backend's own answer for a (pretended) sm_100 device
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: types.SimpleNamespace(major=10, minor=0))
        assert backend_module.native_unavailable(torch.device("cuda")) == reason
    monkeypatch.setattr(ext, "CUDA_ARCHS", ())
    assert ext.cuda_arch_mismatch((10, 0)) is None  # no CUDA code: has_cuda_kernels says so


def test_triton_launches_run_on_their_tensors_device(monkeypatch):
    """Triton launches on the *current* CUDA device: every Triton op's launcher enters its
    tensors' device first (a cuda:1 tensor here is a fake one; the guard is recorded)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastseq.ops._registration import on_tensor_device

    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    launcher = on_tensor_device(lambda mode, x, y=None: (mode, entered[:]))
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_gpu1 = torch.empty(2, device="cuda:1")
    assert launcher("lstm", on_gpu1) == ("lstm", [torch.device("cuda:1")])
    assert entered == [torch.device("cuda:1"), "exit"]
    entered.clear()
    assert launcher("lstm", torch.empty(2)) == ("lstm", [])  # CPU (the interpreter): no guard
    wrapped = torch.ops.fastseq.attention_forward_triton.default._schema
    assert "Tensor q, Tensor k, Tensor v" in str(wrapped)  # the schema survived the wrapper


def test_supported_range_is_declared_once():
    """The oldest torch/triton (fastseq/_versions.py) is what pyproject.toml requires and what
    CI's second leg installs (Makefile MIN_TORCH, and triton among MIN_TORCH_DEPS)."""
    import pathlib
    import re

    from fastseq._versions import MIN_TORCH, MIN_TRITON, dotted, version_tuple

    root = pathlib.Path(__file__).resolve().parents[2]
    pyproject = (root / "pyproject.toml").read_text()
    assert f'"torch>={dotted(MIN_TORCH)}"' in pyproject
    assert f"triton>={dotted(MIN_TRITON)}" in pyproject
    makefile = (root / "Makefile").read_text()
    torch_pin = re.search(r"^MIN_TORCH := (.*)$", makefile, re.M).group(1)
    deps = re.search(r"^MIN_TORCH_DEPS := (.*)$", makefile, re.M).group(1)
    assert torch_pin == f"torch=={dotted(MIN_TORCH)}.0"
    assert f"triton=={dotted(MIN_TRITON)}.0" in deps
    assert version_tuple("2.11.0+cu130") == (2, 11) and version_tuple("3.10.0rc1") == (3, 10)
    assert version_tuple(torch.__version__) >= MIN_TORCH


def test_an_older_triton_is_refused_by_name(monkeypatch):
    assert backend_module.triton_refusal("3.6.0") is None
    assert backend_module.triton_refusal(None) == "Triton is not installed"
    monkeypatch.setattr(backend_module, "_TRITON_REFUSAL", backend_module.triton_refusal("3.5.0"))
    reason = backend_module.triton_unavailable(torch.device("cpu"))
    assert reason is not None and "older than" in reason and "3.6" in reason
    with pytest.raises(fastseq.BackendError, match="3.6"):
        fastseq.ops.lstm_cell(*lstm_args(), backend="triton")


def test_a_choice_per_kind_or_family(monkeypatch):
    """use_backend(recurrent=...) and FASTSEQ_BACKEND_<GROUP>: a model mixing recurrences and
    attention runs native for the one and auto for the other (native has no attention)."""
    monkeypatch.delenv("FASTSEQ_BACKEND", raising=False)
    requested = backend_module.requested_backend
    with fastseq.use_backend(recurrent="reference"):
        assert requested(None, "fastseq.ops.rnn_stack") == "reference"
        assert requested(None, "fastseq.ops.lstm_cell") == "reference"
        assert requested(None, "fastseq.ops.attention") == "auto"
        with fastseq.use_backend("torch", rnn="native"):
            assert requested(None, "fastseq.ops.rnn_stack") == "native"
            assert requested(None, "fastseq.ops.gru_cell") == "torch"
            assert requested("triton", "fastseq.ops.rnn_stack") == "triton"
        with fastseq.use_backend(attention="reference"):  # the kind: kv_cache included
            assert requested(None, "fastseq.ops.attention_with_kv_cache") == "reference"
            assert requested(None, "fastseq.ops.rnn_layer") == "reference"
    monkeypatch.setenv("FASTSEQ_BACKEND_RECURRENT", "native")
    monkeypatch.setenv("FASTSEQ_BACKEND_RNN_CELL", "reference")
    monkeypatch.setenv("FASTSEQ_BACKEND", "torch")
    assert requested(None, "fastseq.ops.rnn_stack") == "native"
    assert requested(None, "fastseq.ops.rnn_tanh_cell") == "reference"
    assert requested(None, "fastseq.ops.attention") == "torch"
    monkeypatch.setenv("FASTSEQ_BACKEND_RECURRENT", "fast")
    with pytest.raises(ValueError, match="FASTSEQ_BACKEND_RECURRENT: backend must be one of"):
        requested(None, "fastseq.ops.rnn_stack")
    with pytest.raises(ValueError, match="neither a kind nor a family"):
        with fastseq.use_backend(recurrence="native"):
            pass


def test_native_recurrences_beside_attention_in_one_model(monkeypatch):
    """The issue's case: FASTSEQ_BACKEND=native stops at the first attention call; the kind's
    variable runs the same model."""
    rnn = fastseq.nn.LSTM(8, 8, batch_first=True)
    attention = fastseq.nn.MultiheadAttention(8, 2, batch_first=True)

    def model(x):
        h, _ = rnn(x)
        return attention(h, h, h, need_weights=False)[0]

    x = torch.randn(2, 5, 8)
    monkeypatch.setenv("FASTSEQ_BACKEND", "native")
    with pytest.raises(fastseq.BackendError, match="native"):
        model(x)
    monkeypatch.delenv("FASTSEQ_BACKEND")
    monkeypatch.setenv("FASTSEQ_BACKEND_RECURRENT", "native")
    report = fastseq.explain(model, x)
    chosen = {d.op: d.chosen for d in report.decisions}
    assert chosen["fastseq.ops.rnn_stack"] == "native" and chosen["fastseq.ops.attention"] == "torch"
    with fastseq.use_backend("reference"):
        expected = model(x)
    torch.testing.assert_close(report.result, expected)
