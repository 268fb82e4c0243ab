"""Whole-sequence recurrent layers: fastseq.nn.LSTM/GRU against torch.nn.LSTM/GRU (cuDNN).

Providers on a GPU: fastseq-persistent (backend native: the persistent kernel where its plan
fits, else the GEMM-per-step loop, chosen per pass by fastseq/ops/rnn_native.py),
fastseq-loop (native with FASTSEQ_PERSISTENT=0: the loop alone), fastseq-triton (the program-per-batch-tile Triton kernel) and torch. On a CPU:
fastseq-native (the C++ loop: an MKL GEMM and a scalar pointwise pass per step) and torch (aten),
on small cases; Triton there is the interpreter, not timed.
"""
import os

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastseq

from .conftest import DEVICE, GPU_CASES, HEADLINE, pass_step, record_error, run_timed

GATES = {"lstm": 4, "gru": 3}
TORCH_LAYERS = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
FAST_LAYERS = {"lstm": fastseq.nn.LSTM, "gru": fastseq.nn.GRU}
if GPU_CASES:
    # (B, H, T, layers, bidirectional, dtype, packed). First the target, cuDNN's
    # persistent case (B=16, H=768, T=1024, bf16, 1 layer, ~2 us a step forward); then where
    # cuDNN leaves its persistent path (fp32; 2 layers bidirectional; H=300, not a multiple of
    # 128; packed variable lengths), training batches (B=64, 256) and B=1.
    # The grid is covered dimension by dimension (B 1-256, H 256-1024, T 100/1000+, 1-2
    # layers, uni/bi, fp32/bf16, packed), not as a full product (1024 cases x 4 providers).
    CASES = [(16, 768, 1024, 1, False, torch.bfloat16, False), (1, 512, 1024, 1, False, torch.bfloat16, False),
             (64, 512, 100, 1, False, torch.bfloat16, False), (16, 768, 1024, 1, False, torch.float32, False),
             (16, 300, 100, 2, True, torch.float32, False), (16, 768, 1024, 1, False, torch.bfloat16, True),
             (256, 1024, 100, 1, False, torch.bfloat16, False), (16, 256, 1000, 2, True, torch.bfloat16, False)]
    PROVIDERS = {"fastseq-persistent": "native", "fastseq-loop": "native",
                 "fastseq-triton": "triton", "torch": None}
    if HEADLINE:  # the target case alone
        CASES = CASES[:1]
else:
    CASES = [(16, 256, 50, 1, False, torch.float32, False), (16, 256, 50, 1, False, torch.float32, True)]
    PROVIDERS = {"fastseq-native": "native", "torch": None}


def gflop(mode, batch, hidden, steps, layers, directions, passes):
    per_step = 2 * batch * 2 * hidden * GATES[mode] * hidden  # input + recurrent GEMMs (I = H)
    total = per_step * steps * layers * directions
    return total * (3 if passes == "fwd+bwd" else 1) / 1e9


@pytest.fixture
def persistent_switch(request):
    """FASTSEQ_PERSISTENT=0 for fastseq-loop, else unset (the default rule: on CUDA the
    persistent kernel where it fits; on CPU the loop, never the kernel's slow C++ twin)."""
    provider = request.node.callspec.params["provider"]
    saved = os.environ.get("FASTSEQ_PERSISTENT")
    os.environ["FASTSEQ_PERSISTENT"] = "0" if provider == "fastseq-loop" else ""
    yield
    if saved is None:
        os.environ.pop("FASTSEQ_PERSISTENT")
    else:
        os.environ["FASTSEQ_PERSISTENT"] = saved


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_H{}_T{}_L{}_{}_{}{}".format(
    c[0], c[1], c[2], c[3], "bi" if c[4] else "uni", str(c[5]).split(".")[1],
    "_packed" if c[6] else ""))
@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def bench_layer(benchmark, persistent_switch, provider, mode, case, passes):
    batch, hidden, steps, layers, bidirectional, dtype, packed = case
    cls = TORCH_LAYERS[mode] if provider == "torch" else FAST_LAYERS[mode]
    kwargs = {} if provider == "torch" else {"backend": PROVIDERS[provider]}
    layer = cls(hidden, hidden, num_layers=layers, bidirectional=bidirectional, device=DEVICE,
                dtype=dtype, **kwargs)
    x = torch.randn(steps, batch, hidden, device=DEVICE, dtype=dtype, requires_grad=passes != "fwd")
    if packed:  # lengths spread over [T/4, T], packed once as a data loader would
        lengths = torch.linspace(steps, steps // 4, batch).long()
        x = pack_padded_sequence(x.detach(), lengths, enforce_sorted=False)
        x = PackedSequence(x.data.requires_grad_(passes != "fwd"), x.batch_sizes, x.sorted_indices,
                           x.unsorted_indices)  # a leaf: every timed backward starts at it
        steps_run = int(lengths.float().mean())
    else:
        steps_run = steps

    def output(result):
        out = result[0]
        return out.data if packed else out

    # The check: torch's layer in float64 with the same weights, on the same input.
    twin = TORCH_LAYERS[mode](hidden, hidden, num_layers=layers, bidirectional=bidirectional,
                              device=DEVICE, dtype=torch.float64)
    twin.load_state_dict(layer.state_dict())
    wide = (PackedSequence(x.data.detach().double(), x.batch_sizes, x.sorted_indices,
                           x.unsorted_indices) if packed else x.detach().double())
    with torch.no_grad():
        record_error(benchmark, output(layer(x)), output(twin(wide)))

    step = pass_step(passes, lambda: layer(x), output)

    # A whole sequence is milliseconds: 3 calls per synchronized round suffice.
    run_timed(benchmark, step, calls_per_round=3, op="rnn_layer", cell=mode, provider=provider,
              shape=f"B={batch} H={hidden} T={steps} L={layers}{' bi' if bidirectional else ''}"
                    f"{' packed' if packed else ''}",
              dtype=str(dtype).split(".")[1], passes=passes, steps=steps * layers, length=steps,
              gflop=gflop(mode, batch, hidden, steps_run, layers, 2 if bidirectional else 1, passes))


# The LSTM with a projection (LSTMP, speech models): (B, H, P, T, dtype), input size P as in
# a stacked LSTMP's upper layers. The fused backends fold the projection into the recurrent
# weights (fastseq.ops.rnn_layer's _projected_layer): 4H x H a step instead of cuDNN's
# 4H x P + P x H, so at this case the folded recurrence does 2.5x cuDNN's loop FLOPs.
PROJECTED_CASES = ([(16, 1024, 256, 1024, torch.bfloat16)] if GPU_CASES
                   else [(16, 256, 64, 50, torch.float32)])
if HEADLINE:  # not a headline case: the headline run keeps to the LSTM/GRU target
    PROJECTED_CASES = []


def projected_gflop(batch, hidden, proj, steps, passes):
    per_step = 2 * batch * (4 * hidden * proj * 2 + proj * hidden)  # input, recurrent, projection
    return per_step * steps * (3 if passes == "fwd+bwd" else 1) / 1e9


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", PROJECTED_CASES, ids=lambda c: "B{}_H{}_P{}_T{}_{}".format(
    c[0], c[1], c[2], c[3], str(c[4]).split(".")[1]))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def bench_projected_lstm(benchmark, persistent_switch, provider, case, passes):
    batch, hidden, proj, steps, dtype = case
    cls = torch.nn.LSTM if provider == "torch" else fastseq.nn.LSTM
    kwargs = {} if provider == "torch" else {"backend": PROVIDERS[provider]}
    layer = cls(proj, hidden, proj_size=proj, device=DEVICE, dtype=dtype, **kwargs)
    x = torch.randn(steps, batch, proj, device=DEVICE, dtype=dtype, requires_grad=passes != "fwd")
    twin = torch.nn.LSTM(proj, hidden, proj_size=proj, device=DEVICE, dtype=torch.float64)
    twin.load_state_dict(layer.state_dict())
    with torch.no_grad():
        record_error(benchmark, layer(x)[0], twin(x.detach().double())[0])

    step = pass_step(passes, lambda: layer(x), lambda out: out[0])

    run_timed(benchmark, step, calls_per_round=3, op="rnn_layer", cell="lstm_proj",
              provider=provider, shape=f"B={batch} H={hidden} P={proj} T={steps}",
              dtype=str(dtype).split(".")[1], passes=passes, steps=steps, length=steps,
              gflop=projected_gflop(batch, hidden, proj, steps, passes))


# Streaming: one frame through a 2-layer LSTM/GRU with the state carried (fastseq's step: one
# cell per layer) against torch's module on a one-frame sequence, batch 1 (edge inference) and
# 16. GPU: H=512 bf16 (its step is launch-bound: 2 fused cell kernels); CPU: H=256 fp32.
STREAM_CASES = ([(1, 512, torch.bfloat16), (16, 512, torch.bfloat16)] if GPU_CASES
                else [(1, 256, torch.float32), (16, 256, torch.float32)])
STREAM_PROVIDERS = {"fastseq-step": None, "fastseq-native-step": "native", "torch": None}
if HEADLINE:
    STREAM_CASES = []


@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: "B{}_H{}_{}".format(
    c[0], c[1], str(c[2]).split(".")[1]))
@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("provider", list(STREAM_PROVIDERS))
def bench_stream_step(benchmark, provider, mode, case):
    batch, hidden, dtype = case
    torch.manual_seed(0)
    theirs = TORCH_LAYERS[mode](hidden, hidden, num_layers=2, device=DEVICE, dtype=dtype).eval()
    ours = FAST_LAYERS[mode](hidden, hidden, num_layers=2, device=DEVICE, dtype=dtype,
                             backend=STREAM_PROVIDERS[provider]).eval()
    ours.load_state_dict(theirs.state_dict())
    frame = torch.randn(batch, hidden, device=DEVICE, dtype=dtype)
    lstm = mode == "lstm"
    zeros = torch.zeros(2, batch, hidden, device=DEVICE, dtype=dtype)
    state = (zeros, zeros.clone()) if lstm else zeros
    if provider == "torch":
        def step():
            with torch.no_grad():
                return theirs(frame[None], state)[0][0]
    else:
        def step():
            with torch.no_grad():
                return ours.step(frame, state)[0]
    twin = TORCH_LAYERS[mode](hidden, hidden, num_layers=2, device=DEVICE, dtype=torch.float64)
    twin.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        wide = tuple(s.double() for s in state) if lstm else state.double()
        record_error(benchmark, step(), twin(frame[None].double(), wide)[0][0])
    run_timed(benchmark, step, op="stream_step", cell=mode, provider=provider,
              shape=f"B={batch} H={hidden} L=2", dtype=str(dtype).split(".")[1], passes="fwd",
              steps=1, length=batch, gflop=2 * batch * 2 * 2 * GATES[mode] * hidden ** 2 / 1e9)


def gpu_smoke(out) -> bool:
    """This family's case in bench/gpu_smoke.py (the GPU run's stage 1): fastseq against
    plain PyTorch and float64 truth under the tolerance rule; True when every quantity keeps it."""
    from .smoke_checks import DEVICE, DTYPES, GATES, RECURRENT, check, recurrent_leaves
    from fastseq.ops import rnn_native
    T, B, I, H = RECURRENT
    ok = True
    lengths = [T - (b * 3) % T for b in range(B)]
    for mode in GATES:
        lstm = mode == "lstm"
        leaves = recurrent_leaves(mode, (T, B, I), B, H)

        def call(backend, t, mode=mode, lstm=lstm):
            hx = (t[1], t[6]) if lstm else t[1]
            y, h_n = fastseq.ops.rnn_layer(mode, t[0], hx, t[2], t[3], t[4], t[5],
                                           lengths=lengths, backend=backend)
            return [y] + (list(h_n) if lstm else [h_n])
        names = (["y", "h_n", "c_n"] if lstm else ["y", "h_n"]) + \
            ["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"] + (["dc0"] if lstm else [])
        for backend, label, env in (("triton", None, None),
                                    ("native", "native-persistent", {"FASTSEQ_PERSISTENT": "1"}),
                                    ("native", "native-loop", {"FASTSEQ_PERSISTENT": "0"})):
            def recurrence(dtype, mode=mode):
                # the native recurrence each pass runs here (persistent or loop, and why)
                return rnn_native.describe(mode, B, H, dtype, DEVICE)
            for dtype in DTYPES:
                ok &= check(out, "rnn", f"{mode} T={T} B={B} I={I} H={H} lengths", backend,
                            dtype, call, leaves, names, T * B, env=env, label=label,
                            variant=recurrence if backend == "native" else None)
    return ok
