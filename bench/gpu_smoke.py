"""Stage 1 of bench/gpu_run.sh: a correctness smoke of every kernel family against the float64
reference, forward and every gradient, under the tolerance rule (fastseq/reference/tolerance.py:
at most 2x plain PyTorch's error in the same dtype, plus a small slack).

    python3 bench/gpu_smoke.py OUT.jsonl          on CUDA: GPU-sized shapes, fp32 and bf16
    python3 bench/gpu_smoke.py OUT.jsonl --dry    on the CPU: tiny shapes, Triton interpreted

One JSON line per (case, quantity) is written and flushed as it is checked, so a run killed at
its limit still leaves what it checked. "plain" is fastseq's reference backend run in the tested
dtype (plain PyTorch); "truth" the same in float64. Exits 1 if any quantity breaks the rule or
any case raises.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

DRY = "--dry" in sys.argv
if DRY:  # before fastseq (and so its kernels) is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTSEQ_POISON_OUTPUTS", "1")  # an unwritten element reads NaN

import torch  # noqa: E402

import fastseq  # noqa: E402
from fastseq.families import FAMILIES  # noqa: E402
from fastseq.ops import rnn_native  # noqa: E402
from fastseq.reference.tolerance import rule_check  # noqa: E402

DEVICE = torch.device("cpu" if DRY else "cuda")
DTYPES = [torch.float32] if DRY else [torch.float32, torch.bfloat16]
GATES = {"lstm": 4, "gru": 3}
# (T, B, I, H): 19 rows cross two 16-row tiles; H=256 fits the persistent kernel's plan.
RECURRENT = (5, 3, 7, 12) if DRY else (64, 19, 200, 256)
CELL = (None, 3, 7, 12) if DRY else (None, 70, 300, 500)
# (B, H, L, memory, D): L crosses several tiles and ends ragged.
ATTENTION = (1, 2, 37, 11, 32) if DRY else (2, 4, 333, 128, 128)


def rand(*shape, scale=1.0):
    return (torch.rand(*shape, dtype=torch.float64, device=DEVICE) * 2 - 1) * scale


def outputs_and_grads(call, leaves64, dtype, backend, grad_outputs):
    """call(backend, leaves) -> list of outputs, in `dtype`; returns outputs + d(leaves) (the
    outputs alone for a forward-only op: grad_outputs None)."""
    if grad_outputs is None:
        with torch.no_grad():
            return [o.detach() for o in call(backend, [t.detach().to(dtype) for t in leaves64])]
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    outs = call(backend, leaves)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, grad_outputs))
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


def check(out, family, case, backend, dtype, call, leaves64, names, terms, env=None, label=None,
          forward_only=False, variant=None):
    """One case: fastseq's `backend` against plain PyTorch in `dtype` and float64 truth, with
    `env` set while it runs; `label` names the backend in the report (default: backend);
    forward_only: outputs alone (an op with no backward); variant(dtype): what the backend runs
    inside for this case (recorded in the row, e.g. which recurrence each pass took)."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    began = time.perf_counter()
    row = {"family": family, "case": case, "backend": label or backend,
           "dtype": str(dtype).split(".")[1]}
    try:
        if variant is not None:
            row["variant"] = variant(dtype)
        truth_outs = call("reference", [t.detach() for t in leaves64])
        grad_outputs = None if forward_only else [rand(*o.shape) for o in truth_outs]
        truth = outputs_and_grads(call, leaves64, torch.float64, "reference", grad_outputs)
        plain = outputs_and_grads(call, leaves64, dtype, "reference", grad_outputs)
        fast = outputs_and_grads(call, leaves64, dtype, backend, grad_outputs)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        ok = True
        n_out = len(truth_outs)
        for i, name in enumerate(names):
            good, err_fast, err_plain, bound = rule_check(
                fast[i], plain[i], truth[i], terms=1 if i < n_out else terms)
            ok &= good
            out.write(json.dumps(dict(row, quantity=name, ok=good, error=err_fast,
                                      plain_error=err_plain, bound=bound)) + "\n")
        row.update(ok=ok, seconds=round(time.perf_counter() - began, 2))
    except Exception as error:  # noqa: BLE001 (every failure is reported, the run goes on)
        row.update(ok=False, error=f"{type(error).__name__}: {error}",
                   trace=traceback.format_exc()[-1500:])
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    out.write(json.dumps(dict(row, quantity="*")) + "\n")
    out.flush()
    print(("ok    " if row["ok"] else "FAIL  ") + f"{family} {case} {row['backend']} {row['dtype']}"
          + ("" if row["ok"] else f"  {row.get('error', 'outside the rule')}"), flush=True)
    return row["ok"]


def recurrent_leaves(mode, x_shape, B, H):
    """(x, h0, w_ih, w_hh, b_ih, b_hh[, c0]) in float64, weights at torch's init scale."""
    g, I = GATES[mode], x_shape[-1]
    return [rand(*x_shape), rand(B, H), rand(g * H, I, scale=H ** -0.5),
            rand(g * H, H, scale=H ** -0.5), rand(g * H), rand(g * H)] + \
        ([rand(B, H)] if mode == "lstm" else [])


def cell_cases(out):
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


def layer_cases(out):
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


def layer_norm_cases(out):
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


def attention_cases(out):
    from torch.nn.attention.bias import causal_lower_right

    B, H, L, M, D = ATTENTION
    ok = True
    padding = torch.arange(L, device=DEVICE) < torch.tensor([L, L - L // 3], device=DEVICE)[:B, None]
    # (variant, key length, mask, is_causal); bottom-right causal against M cached keys.
    for variant, S, mask, causal in (("causal", L, None, True),
                                     ("key-padding", L, padding.view(B, 1, 1, L), False),
                                     ("causal-lower-right", L + M, causal_lower_right(L, L + M),
                                      False)):
        leaves = [rand(B, H, L, D), rand(B, H, S, D), rand(B, H, S, D)]

        def call(backend, t, mask=mask, causal=causal):
            return [fastseq.ops.attention(*t, mask, is_causal=causal, backend=backend)]
        for dtype in DTYPES:
            ok &= check(out, "attention", f"B={B} H={H} L={L} S={S} D={D} {variant}", "triton",
                        dtype, call, leaves, ["out", "dq", "dk", "dv"], S)
    return ok


def decode_cases(out):
    """A decode step against a ragged, GQA cache (split-KV kernels, forward only): four new
    rows appended per row, causal among themselves, with and without a window. The caches are
    leaves 1 and 2: each call appends into its own copy."""
    B, H, L, M, D = ATTENTION
    capacity, new = 4 * L, 4
    lengths = torch.tensor([capacity - new, L][:B], dtype=torch.int32, device=DEVICE)
    leaves = [rand(B, H, new, D), rand(B, H // 2, capacity, D), rand(B, H // 2, capacity, D),
              rand(B, H // 2, new, D), rand(B, H // 2, new, D)]
    ok = True
    for window in (None, L // 2):
        def call(backend, t, window=window):
            q, k_cache, v_cache, key, value = t
            return [fastseq.ops.attention_with_kv_cache(
                q, k_cache.clone(), v_cache.clone(), lengths, key, value, window=window,
                backend=backend)]
        for dtype in DTYPES:
            ok &= check(out, "kv_cache", f"B={B} Hq={H} Hk={H // 2} S_max={capacity} D={D} "
                        f"Lq={new} window={window}", "triton", dtype, call, leaves, ["out"], 1,
                        forward_only=True)
    return ok


def rel_attention_cases(out):
    B, H, L, M, D = ATTENTION
    D = min(D, 128)
    S = L + M
    leaves = [rand(B, H, L, D), rand(B, H, S, D), rand(B, H, S, D), rand(S, H, D),
              rand(H, D), rand(H, D)]

    def call(backend, t):
        return [fastseq.ops.rel_attention(*t, is_causal=True, backend=backend)]
    ok = True
    for dtype in DTYPES:
        ok &= check(out, "rel_attention", f"B={B} H={H} Lq={L} M={M} D={D} causal", "triton",
                    dtype, call, leaves, ["out", "dq", "dk", "dv", "dpos", "dcontent_bias",
                     "dposition_bias"], S)
    return ok


# Each family's smoke case (fastseq.families names them; main refuses a family without one).
SMOKE = {"rnn_cell": cell_cases, "rnn": layer_cases, "layer_norm_rnn": layer_norm_cases,
         "attention": attention_cases, "kv_cache": decode_cases,
         "rel_attention": rel_attention_cases}


def main() -> int:
    if not DRY and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (use --dry to run on the CPU)", file=sys.stderr)
        return 2
    path = next((a for a in sys.argv[1:] if not a.startswith("--")), "smoke.jsonl")
    torch.manual_seed(0)
    with open(path, "w") as out:
        out.write(json.dumps({"backends": fastseq.backends(), "device": str(DEVICE),
                              "torch": torch.__version__}) + "\n")
        missing = [name for name in FAMILIES if name not in SMOKE]
        if missing:  # every declared family gets its smoke case here
            raise SystemExit(f"gpu_smoke: no smoke case for the families {missing}")
        results = [SMOKE[name](out) for name in FAMILIES]
    print("gpu_smoke:", "every case within the rule" if all(results) else "FAILURES", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
