"""A small run of the persistent recurrence on CUDA for compute-sanitizer (bench/gpu_run.sh):
every mode and dtype, forward and backward, against the GEMM-per-step loop on the same inputs.
Exits non-zero if they disagree by more than the dtype's rounding allows.

    compute-sanitizer --tool memcheck python3 bench/sanitize_persistent.py
"""
import sys

import torch

import fastseq  # noqa: F401  (registers the ops)

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the twin, to check this script
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def layer(op_suffix, mode, args, saved=None):
    """Forward, then backward from `saved` (y, ws) if given, else from this forward's own: the
    two backwards compare on the same inputs (a relu's derivative flips where two forwards'
    roundings put h on different sides of zero). The ops by name: "" the loop, "_persistent"
    the persistent kernel (each runs what it is called for)."""
    forward = getattr(torch.ops.fastseq, "rnn_layer_forward" + op_suffix)
    backward = getattr(torch.ops.fastseq, "rnn_layer_backward" + op_suffix)
    gx, h0, c0, w_hh, b_hh, lengths, zh, zc, reverse, grads = args
    y, h_n, c_n, ws = forward(mode, gx, h0, c0, w_hh, b_hh, lengths, zh, zc, reverse, True)
    y_in, ws_in = saved if saved is not None else (y, ws)
    dgx, dgh, dh0, dc0 = backward(mode, grads[0], grads[1], grads[2], h0, c0, w_hh, y_in, ws_in,
                                  lengths, zh, zc, reverse)
    return [y, h_n, c_n, dgx, dgh, dh0, dc0], (y, ws)


def main() -> int:
    torch.manual_seed(0)
    worst = 0.0
    failed = False
    T, B, H = 5, 19, 40  # 19 rows: two 16-row tensor-core tiles, the second mostly padding
    for mode, g in GATES.items():
        for dtype in TOLERANCE:
            for reverse in (False, True):
                def rand(*shape, s=1.0):
                    return ((torch.rand(*shape, device=DEVICE) * 2 - 1) * s).to(dtype)
                lstm = mode == "lstm"

                def zoneout(used):  # Bernoulli(0.3) masks where the mode has the state
                    return (torch.rand(T, B, H, device=DEVICE) < 0.3).to(dtype) if used else None
                lengths = torch.tensor([T - i % T for i in range(B)], dtype=torch.int32, device=DEVICE)
                grads = (rand(T, B, H), rand(B, H), rand(B, H) if lstm else None)
                args = (rand(T, B, g * H), rand(B, H), rand(B, H) if lstm else None,
                        rand(g * H, H, s=H ** -0.5), rand(g * H, s=0.1), lengths,
                        zoneout(mode in ("lstm", "gru")), zoneout(lstm), reverse, grads)
                loop, saved = layer("", mode, args)
                persistent, _ = layer("_persistent", mode, args, saved)
                for name, a, b in zip(["y", "h_n", "c_n", "dgx", "dgh", "dh0", "dc0"], loop, persistent):
                    if a.numel() == 0:
                        continue
                    err = (a.float() - b.float()).abs().max().item()
                    worst = max(worst, err)
                    if not err <= TOLERANCE[dtype] or not torch.isfinite(b).all():
                        failed = True
                        print(f"MISMATCH {mode} {dtype} reverse={reverse} {name}: {err:.3g}")
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print(f"persistent vs loop: largest difference {worst:.3g}; {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
