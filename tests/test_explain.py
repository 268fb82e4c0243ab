"""fastseq.explain: for a call of an op, a layer or a model, what each fastseq call ran and
why every other backend was passed over (persistent kernel vs loop named for the native
recurrence), as the choice really happened."""
import pytest
import torch

import fastseq


def test_an_op_call_names_the_choice_and_every_refusal():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8)
    report = fastseq.explain(fastseq.ops.attention, q, k, k, return_lse=True)
    (decision,) = report.decisions
    assert decision.op == "fastseq.ops.attention" and decision.requested == "auto"
    assert decision.chosen == "reference"  # torch's SDPA has no log-sum-exp
    assert "does not return the log-sum-exp" in decision.verdicts["torch"]
    torch.testing.assert_close(report.result[0], fastseq.ops.attention(q, k, k))
    text = str(report)
    assert "runs reference" in text and "torch: passed over" in text


def test_a_layer_reports_its_choice_and_the_ops_below_it():
    lstm = fastseq.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    plain = fastseq.explain(lstm, x)
    assert [d.chosen for d in plain.decisions] == ["torch"]  # torch's own module, eagerly
    padded = fastseq.explain(lstm, x, lengths=[5, 0])  # torch refuses a zero length
    first, *below = padded.decisions
    assert first.op == "fastseq.nn.LSTM" and first.chosen != "torch"
    assert "zero lengths" in first.verdicts["torch"]
    assert {d.op for d in below} >= {"fastseq.ops.rnn_bidirectional_layer"}
    assert all(d.requested == first.chosen for d in below)


@pytest.mark.skipif(fastseq.backend.native_unavailable(torch.device("cpu")) is not None,
                    reason="the extension is not built")
def test_the_native_recurrence_names_its_variant():
    w = [torch.randn(12, 3), torch.randn(12, 4)]
    report = fastseq.explain(fastseq.ops.rnn_layer, "gru", torch.randn(5, 2, 3), None, *w,
                             backend="native")
    assert "forward and backward: the C++ loop" in report.decisions[0].variant


@pytest.mark.skipif(fastseq.backend.native_unavailable(torch.device("cpu")) is not None,
                    reason="the extension is not built")
def test_an_lstm_layer_names_the_persistent_kernel_for_each_pass(monkeypatch):
    """nn.LSTM on the native backend with the persistent kernel allowed on CPU (its C++ twin):
    each rnn_layer call below the layer says which recurrence each pass runs and why; a batch
    past the plan's 64 rows takes the loop, in the plan's words."""
    monkeypatch.setenv("FASTSEQ_PERSISTENT", "1")
    lstm = fastseq.nn.LSTM(3, 8, num_layers=2, backend="native")
    first, *layers = fastseq.explain(lstm, torch.randn(4, 2, 3)).decisions
    assert first.op == "fastseq.nn.LSTM" and len(layers) == 2
    assert all(d.variant.startswith("forward and backward: the persistent kernel") for d in layers)
    wide = fastseq.explain(lstm, torch.randn(2, 65, 3)).decisions[1]
    assert "batch 65 is more than the 64 rows it runs" in wide.variant


def test_a_refused_backend_returns_the_error_with_the_reasons():
    layer = fastseq.nn.LayerNormGRU(3, 4, backend="native")
    report = fastseq.explain(layer, torch.randn(5, 2, 3))
    assert isinstance(report.error, fastseq.BackendError)
    assert report.decisions[-1].chosen is None
    assert "raised BackendError" in str(report)


def test_decisions_are_recorded_only_inside_explain():
    fastseq.ops.gru_cell(torch.randn(2, 3), None, torch.randn(12, 3), torch.randn(12, 4))
    assert fastseq.backend._explanations == []
    empty = fastseq.explain(lambda: None)
    assert empty.decisions == [] and "no fastseq op chose" in str(empty)
