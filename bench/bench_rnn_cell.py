"""Recurrent cell steps: fastseq (native C++/CUDA, Triton on GPU) against torch's own cells
(torch.nn.LSTMCell & co.: aten on CPU, its fused pointwise CUDA kernel + cuBLAS on GPU)."""
import pytest
import torch

import fastseq

from .conftest import DEVICE, GPU_CASES, record_error, run_timed

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1}
TORCH_CELLS = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn_tanh": torch.nn.RNNCell}
FAST_CELLS = {"lstm": fastseq.nn.LSTMCell, "gru": fastseq.nn.GRUCell, "rnn_tanh": fastseq.nn.RNNCell}

if GPU_CASES:
    # Decoding (B=1), a training batch, a large batch; H=1024 and 2048.
    SHAPES = [(1, 1024, 1024), (64, 1024, 1024), (256, 1024, 1024), (64, 2048, 2048)]
    DTYPES = [torch.float32, torch.bfloat16]
    PROVIDERS = ["fastseq-native", "fastseq-triton", "torch"]
else:
    SHAPES = [(1, 256, 256), (64, 256, 256), (64, 1024, 1024)]
    DTYPES = [torch.float32]
    PROVIDERS = ["fastseq-native", "torch"]  # Triton on CPU is the interpreter: not timed


def make_cell(mode, provider, input_size, hidden, dtype):
    if provider == "torch":
        return TORCH_CELLS[mode](input_size, hidden, device=DEVICE, dtype=dtype)
    backend = provider.split("-")[1]
    return FAST_CELLS[mode](input_size, hidden, device=DEVICE, dtype=dtype, backend=backend)


def gflop(mode, batch, input_size, hidden, passes):
    forward = 2 * batch * (input_size + hidden) * GATES[mode] * hidden
    return forward * (3 if passes == "fwd+bwd" else 1) / 1e9  # backward: two GEMMs per forward GEMM


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_I{}_H{}".format(*s))
@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_cell(benchmark, provider, mode, shape, dtype, passes):
    batch, input_size, hidden = shape
    cell = make_cell(mode, provider, input_size, hidden, dtype)
    x = torch.randn(batch, input_size, device=DEVICE, dtype=dtype, requires_grad=passes != "fwd")
    h = torch.randn(batch, hidden, device=DEVICE, dtype=dtype)
    state = (h, torch.randn_like(h)) if mode == "lstm" else h

    # The check: torch's cell in float64 with the same weights.
    twin = TORCH_CELLS[mode](input_size, hidden, device=DEVICE, dtype=torch.float64)
    twin.load_state_dict(cell.state_dict())
    with torch.no_grad():
        wide_state = tuple(s.double() for s in state) if mode == "lstm" else state.double()
        record_error(benchmark, cell(x, state), twin(x.double(), wide_state))

    if passes == "fwd":
        def step():
            with torch.no_grad():
                return cell(x, state)
    else:
        def step():
            out = cell(x, state)
            (out[0] if mode == "lstm" else out).sum().backward()

    run_timed(benchmark, step, op="rnn_cell", cell=mode, provider=provider,
              shape=f"B={batch} I={input_size} H={hidden}", dtype=str(dtype).split(".")[1],
              passes=passes, gflop=gflop(mode, batch, input_size, hidden, passes))


def gpu_smoke(out) -> bool:
    """This family's case in bench/gpu_smoke.py (the GPU run's stage 1): fastseq against
    plain PyTorch and float64 truth under the tolerance rule; True when every quantity keeps it."""
    from .smoke_checks import DTYPES, GATES, CELL, check, recurrent_leaves
    _, B, I, H = CELL
    ok = True
    for mode in GATES:
        lstm = mode == "lstm"
        op = getattr(fastseq.ops, f"{mode}_cell")
        leaves = recurrent_leaves(mode, (B, I), B, H)

        def call(backend, t, op=op, lstm=lstm):
            hx = (t[1], t[6]) if lstm else t[1]
            result = op(t[0], hx, t[2], t[3], t[4], t[5], backend=backend)
            return list(result) if lstm else [result]
        names = (["h", "c"] if lstm else ["h"]) + ["dx", "dh", "dw_ih", "dw_hh", "db_ih", "db_hh"] \
            + (["dc"] if lstm else [])
        for backend in ("triton", "native"):
            for dtype in DTYPES:
                ok &= check(out, "rnn_cell", f"{mode} B={B} I={I} H={H}", backend, dtype, call,
                            leaves, names, B)
    return ok
