"""Backend choice: the report, the overrides (keyword, context manager, FASTSEQ_BACKEND) and
the errors naming a backend and its reason."""
import importlib.util

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
    def never():
        return "nope"

    with pytest.raises(fastseq.BackendError, match="no backend can run this call .*a: nope; b: nope"):
        backend_module.choose("op", "auto", ["a", "b"], {"a": never, "b": never})


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
