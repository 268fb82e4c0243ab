"""The shared pieces of bench/gpu_smoke.py (the GPU run's stage 1): the sizes, the leaves and
`check`, which runs one case of a family against plain PyTorch and float64 truth under the
tolerance rule. Each family's case is `gpu_smoke(out)` in its bench/bench_<family>.py, which
imports this module when it runs (never when pytest-benchmark collects the suite)."""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

import fastseq  # noqa: F401 (the families' cases call fastseq.ops through it)
from fastseq.reference.tolerance import rule_check

DRY = "--dry" in sys.argv
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
          forward_only=False, variant=None, plain="reference"):
    """One case: fastseq's `backend` against plain PyTorch in `dtype` and float64 truth, with
    `env` set while it runs; `label` names the backend in the report (default: backend);
    forward_only: outputs alone (an op with no backward); variant(dtype): what the backend runs
    inside for this case (recorded in the row, e.g. which recurrence each pass took); plain:
    what call() is given for the plain-PyTorch run ("plain" where the reference backend would
    not compute in the dtype itself: the attention references round half precision once, from
    fp32)."""
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
        plain = outputs_and_grads(call, leaves64, dtype, plain, grad_outputs)
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
