"""Layer-normalized LSTM/GRU (fastseq.nn.LayerNormLSTM/GRU), GPU only.

Providers: fastseq-triton (the fused recurrence: both layer norms inside the kernel),
reference (the same math step by step in PyTorch ops: what a user writes without fastseq,
~15 launches a step) and torch-no-layernorm (torch.nn.LSTM/GRU on cuDNN, without any layer
norm: the price of the normalization, not a like-for-like peer; cuDNN has none). On a CPU
fastseq's only layer-normalized path is that reference (Triton runs there only through its
interpreter), so there is nothing to compare and no case is collected.
"""
import pytest
import torch

import fastseq

from .conftest import DEVICE, GPU_CASES, pass_step, record_error, run_timed

LAYERS = {"lstm": (fastseq.nn.LayerNormLSTM, torch.nn.LSTM), "gru": (fastseq.nn.LayerNormGRU, torch.nn.GRU)}
GATES = {"lstm": 4, "gru": 3}
# (B, H, T, dtype): a small-batch long sequence, a training batch, fp32.
CASES = [(16, 768, 256, torch.bfloat16), (64, 512, 100, torch.bfloat16), (16, 512, 100, torch.float32)] \
    if GPU_CASES else []
PROVIDERS = ["fastseq-triton", "reference", "torch-no-layernorm"]


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}_H{c[1]}_T{c[2]}_{str(c[3]).split('.')[1]}")
@pytest.mark.parametrize("mode", list(LAYERS))
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_layer_norm_layer(benchmark, provider, mode, case, passes):
    batch, hidden, steps, dtype = case
    fast_cls, torch_cls = LAYERS[mode]
    if provider == "torch-no-layernorm":
        layer = torch_cls(hidden, hidden, device=DEVICE, dtype=dtype)
    else:
        layer = fast_cls(hidden, hidden, device=DEVICE, dtype=dtype,
                         backend="triton" if provider == "fastseq-triton" else "reference")
    x = torch.randn(steps, batch, hidden, device=DEVICE, dtype=dtype, requires_grad=passes != "fwd")

    # The check: the float64 reference of the same layer (torch's for the plain LSTM/GRU).
    if provider == "torch-no-layernorm":
        twin = torch_cls(hidden, hidden, device=DEVICE, dtype=torch.float64)
    else:
        twin = fast_cls(hidden, hidden, device=DEVICE, dtype=torch.float64, backend="reference")
    twin.load_state_dict(layer.state_dict())
    with torch.no_grad():
        record_error(benchmark, layer(x)[0], twin(x.detach().double())[0])

    step = pass_step(passes, lambda: layer(x), lambda out: out[0])

    per_step = 2 * batch * 2 * hidden * GATES[mode] * hidden
    run_timed(benchmark, step, calls_per_round=3, op="layer_norm_rnn", cell=mode, provider=provider,
              shape=f"B={batch} H={hidden} T={steps}", dtype=str(dtype).split(".")[1], passes=passes,
              steps=steps, length=steps, gflop=per_step * steps * (3 if passes == "fwd+bwd" else 1) / 1e9)


def gpu_smoke(out) -> bool:
    """This family's case in bench/gpu_smoke.py (the GPU run's stage 1): fastseq against
    plain PyTorch and float64 truth under the tolerance rule; True when every quantity keeps it."""
    from .smoke_checks import DTYPES, GATES, RECURRENT, rand, check, recurrent_leaves
    T, B, I, H = RECURRENT
    ok = True
    for mode, g in GATES.items():
        lstm = mode == "lstm"
        plain = recurrent_leaves(mode, (T, B, I), B, H)  # the gains go after the biases
        leaves = plain[:6] + [1 + rand(g * H, scale=0.3), 1 + rand(g * H, scale=0.3)] + \
            plain[6:] + ([1 + rand(H, scale=0.3), rand(H, scale=0.3)] if lstm else [])

        def call(backend, t, mode=mode, lstm=lstm):
            hx = (t[1], t[8]) if lstm else t[1]
            extra = (t[9], t[10]) if lstm else (None, None)
            y, h_n = fastseq.ops.layer_norm_rnn_layer(mode, t[0], hx, *t[2:8], *extra,
                                                      backend=backend)
            return [y] + (list(h_n) if lstm else [h_n])
        names = (["y", "h_n", "c_n"] if lstm else ["y", "h_n"]) + \
            ["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh", "dln_ih", "dln_hh"] + \
            (["dc0", "dln_c_weight", "dln_c_bias"] if lstm else [])
        for dtype in DTYPES:
            ok &= check(out, "layer_norm_rnn", f"{mode} T={T} B={B} I={I} H={H}", "triton",
                        dtype, call, leaves, names, T * B)
    return ok
