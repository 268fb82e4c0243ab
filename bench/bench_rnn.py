"""Whole-sequence recurrent layers: fastseq.nn.LSTM/GRU on fastseq's sequence path (Triton)
against torch.nn.LSTM/GRU (cuDNN). GPU only: on a CPU, fastseq's layers run torch's own forward
(auto) and its Triton path is the interpreter, so there is nothing to compare."""
import pytest
import torch

import fastseq

from conftest import DEVICE, run_timed

GATES = {"lstm": 4, "gru": 3}
TORCH_LAYERS = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
FAST_LAYERS = {"lstm": fastseq.nn.LSTM, "gru": fastseq.nn.GRU}
# The cuDNN-persistent case (B=16, H=768, bf16) and where cuDNN falls off it (fp32,
# bidirectional, H not a multiple of 128).
CASES = [(16, 768, 256, 1, False, torch.bfloat16), (64, 512, 256, 1, False, torch.bfloat16),
         (16, 768, 256, 1, False, torch.float32), (64, 300, 256, 2, True, torch.float32)]

pytestmark = pytest.mark.skipif(DEVICE.type != "cuda", reason="sequence-layer benchmark: GPU only")


def gflop(mode, batch, hidden, steps, layers, directions, passes):
    per_step = 2 * batch * 2 * hidden * GATES[mode] * hidden  # input + recurrent GEMMs (I = H)
    total = per_step * steps * layers * directions
    return total * (3 if passes == "fwd+bwd" else 1) / 1e9


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_H{}_T{}_L{}_{}_{}".format(
    c[0], c[1], c[2], c[3], "bi" if c[4] else "uni", str(c[5]).split(".")[1]))
@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("provider", ["fastseq-triton", "torch"])
def bench_layer(benchmark, provider, mode, case, passes):
    batch, hidden, steps, layers, bidirectional, dtype = case
    cls = TORCH_LAYERS[mode] if provider == "torch" else FAST_LAYERS[mode]
    kwargs = {} if provider == "torch" else {"backend": "triton"}
    layer = cls(hidden, hidden, num_layers=layers, bidirectional=bidirectional, device=DEVICE,
                dtype=dtype, **kwargs)
    x = torch.randn(steps, batch, hidden, device=DEVICE, dtype=dtype, requires_grad=passes != "fwd")

    if passes == "fwd":
        def step():
            with torch.no_grad():
                return layer(x)
    else:
        def step():
            layer(x)[0].sum().backward()

    # A whole sequence is milliseconds: 3 calls per synchronized round suffice.
    run_timed(benchmark, step, calls_per_round=3, op="rnn_layer", cell=mode, provider=provider,
              shape=f"B={batch} H={hidden} T={steps} L={layers}{' bi' if bidirectional else ''}",
              dtype=str(dtype).split(".")[1], passes=passes,
              gflop=gflop(mode, batch, hidden, steps, layers, 2 if bidirectional else 1, passes))
