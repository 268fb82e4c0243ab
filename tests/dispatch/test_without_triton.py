"""fastseq imports and runs without Triton installed (Triton is the triton backend's alone):
in a fresh interpreter where `import triton` fails, every family runs on its other backends
and the triton backend refuses by name."""
import subprocess
import sys

SCRIPT = r"""
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError from here on
import torch
import fastseq

assert not [m for m in sys.modules if m.startswith("triton") and sys.modules[m] is not None]
x = torch.randn(5, 2, 3)
q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8)
fastseq.nn.LSTM(3, 4)(x)[0].sum().backward()
fastseq.nn.GRUCell(3, 4)(x[0])
fastseq.ops.attention(q, k, k, is_causal=True)
fastseq.ops.rel_attention(q, k, k, torch.randn(4, 2, 8), torch.randn(2, 8), torch.randn(2, 8))
fastseq.nn.LayerNormLSTM(3, 4)(x)
if fastseq.backend.native_unavailable(torch.device("cpu")) is None:
    fastseq.ops.rnn_layer("gru", x, None, torch.randn(12, 3), torch.randn(12, 4), backend="native")
try:
    fastseq.ops.attention(q, k, k, backend="triton")
except fastseq.BackendError as error:
    assert "Triton is not installed" in str(error), error
else:
    raise AssertionError("the triton backend ran without Triton")
assert fastseq.backends()["triton"]["available"] is False
print("ok")
"""


def test_fastseq_runs_without_triton():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
