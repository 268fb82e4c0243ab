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
    assert first.op == "fastseq.ops.rnn_stack" and first.chosen != "torch"
    assert "zero lengths" in first.verdicts["torch"]
    assert {d.op for d in below} >= {"fastseq.ops.rnn_bidirectional_layer"}
    assert all(d.requested == first.chosen for d in below)


@pytest.mark.skipif(fastseq.backend.native_unavailable(torch.device("cpu")) is not None,
                    reason="the extension is not built")
def test_the_rnn_native_names_its_variant():
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
    assert first.op == "fastseq.ops.rnn_stack" and len(layers) == 2
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
    silent = fastseq.backend.Explanation([], error=RuntimeError())  # an error without text
    assert str(silent).endswith("raised RuntimeError: ")


# fastseq.explain_on_gpu: the choices a GPU would make, on fake CUDA tensors (no GPU needed).
needs_cuda_kernels = pytest.mark.skipif(not fastseq._extension.has_cuda_kernels(),
                                        reason="fastseq._C was built without CUDA kernels")
needs_triton = pytest.mark.skipif(fastseq.backend.TRITON_VERSION is None, reason="no Triton")


def test_an_lstm_layer_on_the_described_gpu_takes_cudnn():
    """auto in eager mode runs torch's own module on CUDA (cuDNN). In fp32, cuDNN's weight
    flattening needs the real device: the described run stops there, after the choice, and
    says so; in bf16 (torch 2.14) it runs through on fake tensors."""
    lstm = fastseq.nn.LSTM(16, 32)
    report = fastseq.explain_on_gpu(lstm, torch.randn(10, 4, 16))
    first = report.decisions[0]
    assert first.op == "fastseq.ops.rnn_stack" and first.device == "cuda:0" and first.chosen == "torch"
    text = str(report)
    assert text.startswith("on NVIDIA H200 (described): sm_90, 132 multiprocessors")
    assert report.described is fastseq.H200
    if report.error is not None:
        assert text.splitlines()[-1].startswith(f"stopped at {type(report.error).__name__}")
    else:
        assert report.result[0].device.type == "cuda"


@needs_cuda_kernels
def test_the_rnn_native_on_the_described_gpu_names_its_plan():
    """nn.LSTM(backend="native") at the headline size (B=16, H=768, bf16) fits the persistent
    plan on an H200 for both passes; a batch of 128 and an fp64 layer take the loop, each with
    the plan's reason; H=2048's slice of W_hh does not fit 132 x 227 KB."""
    def variant(hidden, batch, dtype):
        lstm = fastseq.nn.LSTM(hidden, hidden, backend="native", dtype=dtype)
        report = fastseq.explain_on_gpu(lstm, torch.randn(3, batch, hidden, dtype=dtype))
        assert report.error is None, report.error
        (layer,) = [d for d in report.decisions if d.op == "fastseq.ops.rnn_layer"]
        assert layer.chosen == "native"
        return layer.variant

    assert variant(768, 16, torch.bfloat16).startswith(
        "forward and backward: the persistent kernel (its plan fits up to batch 64 at hidden size 768)")
    assert "batch 128 is more than the 64 rows it runs" in variant(768, 128, torch.bfloat16)
    assert "fp64 runs the GEMM-per-step loop" in variant(64, 4, torch.float64)
    wide = variant(2048, 16, torch.bfloat16)
    assert wide.startswith("forward: the loop, a cuBLAS GEMM") and "backward: the loop" in wide
    assert wide.count("bytes of shared memory") == 2
    custom = fastseq.GPUDescription("a GPU without cooperative launch", (9, 0), 132, 232_448,
                                    cooperative_launch=False)
    lstm = fastseq.nn.LSTM(64, 64, backend="native")
    layer = [d for d in fastseq.explain_on_gpu(lstm, torch.randn(3, 4, 64), gpu=custom).decisions
             if d.op == "fastseq.ops.rnn_layer"][0]
    assert "no cooperative launch" in layer.variant


@needs_triton
def test_attention_on_the_described_gpu_takes_triton_within_its_head_dims():
    q = torch.randn(2, 8, 128, 128, dtype=torch.bfloat16)
    report = fastseq.explain_on_gpu(fastseq.ops.attention, q, q, q, is_causal=True)
    assert report.error is None and report.decisions[0].chosen == "triton"
    assert report.result.device.type == "cuda" and report.result.shape == q.shape
    wide = torch.randn(1, 2, 16, 512, dtype=torch.bfloat16)
    passed_over = fastseq.explain_on_gpu(fastseq.ops.attention, wide, wide, wide).decisions[0]
    assert passed_over.chosen == "torch" and "head dims up to" in passed_over.verdicts["triton"]


@needs_triton
def test_a_transformer_xl_layer_on_the_described_gpu():
    layer = fastseq.nn.TransformerXLLayer(4, 64, 16, 128, dropout=0.0, own_biases=True)
    x, pos = torch.randn(12, 2, 64), torch.randn(20, 64)  # 8 positions of memory + 12
    mems = torch.randn(8, 2, 64)
    report = fastseq.explain_on_gpu(layer, x, pos, mems=mems, is_causal=True)
    assert report.error is None, report.error
    (rel,) = [d for d in report.decisions if d.op == "fastseq.ops.rel_attention"]
    assert rel.chosen == "triton" and rel.device == "cuda:0"
    # The same layer and input on this machine's CPU: torch's kernels, as explain shows.
    on_cpu = [d for d in fastseq.explain(layer, x, pos, mems=mems, is_causal=True).decisions
              if d.op == "fastseq.ops.rel_attention"]
    assert on_cpu[0].device == "cpu" and on_cpu[0].chosen != "triton"


def test_the_described_gpu_leaves_no_trace():
    fastseq.explain_on_gpu(fastseq.ops.gru_cell, torch.randn(2, 3), None, torch.randn(12, 3),
                           torch.randn(12, 4))
    assert fastseq.described_gpu.current() is None and fastseq.backend._explanations == []


def test_paths_without_a_backend_choice_are_reported_too():
    """Every path that runs code is in the report: MultiheadAttention's need_weights=True
    (plain PyTorch whatever the backend), the fused kernels' empty-shape path, and the
    projected LSTM's step."""
    mha = fastseq.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    weighted = fastseq.explain(mha, x, x, x)
    (path,) = weighted.decisions
    assert path.op.endswith("(need_weights=True)") and path.chosen == "plain PyTorch"
    assert "need_weights=False runs fastseq.ops.attention" in str(weighted)
    fused = fastseq.explain(mha, x, x, x, need_weights=False)
    assert [d.op for d in fused.decisions] == ["fastseq.ops.attention"]
    if fastseq.backend.triton_unavailable(torch.device("cpu")) is None:
        empty, keys = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 3, 8)
        (decision,) = fastseq.explain(fastseq.ops.attention, empty, keys, keys,
                                      backend="triton").decisions
        assert decision.chosen == "triton" and "nothing to launch" in decision.variant
    lstmp = fastseq.nn.LSTM(3, 4, proj_size=2)
    (step,) = fastseq.explain(lstmp.step, torch.randn(2, 3)).decisions
    assert step.chosen == "plain PyTorch" and "proj_size" in step.variant


def test_a_transformer_xl_layer_reports_its_attention():
    layer = fastseq.nn.TransformerXLLayer(2, 8, 4, 16, 0.0, own_biases=True)
    x, r = torch.randn(3, 2, 8), torch.randn(5, 8)
    report = fastseq.explain(layer, x, r, mems=torch.randn(2, 2, 8), is_causal=True)
    (decision,) = report.decisions
    assert decision.op == "fastseq.ops.rel_attention" and decision.variant
