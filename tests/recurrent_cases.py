"""Shared inputs and runners of the recurrent-layer tests: random leaves in float64, one layer
run through fastseq.ops.rnn_layer (a backend, or "persistent": the native backend with its
persistent kernel, on CPU the kernel's C++ twin), and the gradients of a random projection of
every output."""
import contextlib
import os

import torch

import fastseq
from fastseq.ops import rnn_native
from fastseq.kernels.recurrent_layout import GATES

from numerics import assert_within_rule

MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
LEAF_NAMES = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"]


def layer_backends(device):
    """fastseq's own sequence implementations that can run on `device` here."""
    dev = torch.device(device)
    names = ["reference"]
    if fastseq.backend.native_unavailable(dev) is None:
        names.insert(0, "native")
    if fastseq.backend.triton_unavailable(dev) is None:
        names.insert(0, "triton")
    return names


def make_leaves(mode, T, B, I, H, device):
    g, k = GATES[mode], H ** -0.5

    def rand(*shape, s=1.0):
        return (torch.rand(*shape, dtype=torch.float64, device=device) * 2 - 1) * s

    return [rand(T, B, I), rand(B, H), rand(B, H) if mode == "lstm" else None,
            rand(g * H, I, s=k), rand(g * H, H, s=k), rand(g * H, s=k), rand(g * H, s=k)]


def make_grad_outputs(mode, T, B, H, device):
    return [torch.randn(T, B, H, dtype=torch.float64, device=device)] + \
        [torch.randn(B, H, dtype=torch.float64, device=device)
         for _ in range(2 if mode == "lstm" else 1)]


@contextlib.contextmanager
def persistent_everywhere():
    """FASTSEQ_PERSISTENT=1 inside the block (forward and backward alike): the native backend
    runs its persistent kernel wherever the plan fits, CPU tensors included (its C++ twin)."""
    saved = os.environ.get("FASTSEQ_PERSISTENT")
    os.environ["FASTSEQ_PERSISTENT"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["FASTSEQ_PERSISTENT"]
        else:
            os.environ["FASTSEQ_PERSISTENT"] = saved


def environment(backend):
    """What a test backend name needs around its forward and backward."""
    return persistent_everywhere() if backend == "persistent" else contextlib.nullcontext()


def persistent_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False,
                     zoneout_h=None, zoneout_c=None):
    """One layer on the native backend's persistent kernel (on CPU: the CUDA kernel's twin),
    both passes: checks that the plan runs it for this size (else the test would be the
    loop's), under persistent_everywhere()."""
    batch, hidden = x.shape[1], w_hh.shape[1]
    with persistent_everywhere():
        for backward in (False, True):
            assert rnn_native.runs_persistent(mode, backward, batch, hidden, x.dtype,
                                                     x.device), (mode, backward, batch, hidden)
        return fastseq.ops.rnn_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh, lengths=lengths,
                                     reverse=reverse, zoneout_h=zoneout_h, zoneout_c=zoneout_c,
                                     backend="native")


def layer_call(mode, backend, x, hx, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False,
               zoneout_h=None, zoneout_c=None):
    """One layer through fastseq.ops.rnn_layer with `backend`, or its persistent kernel for
    backend "persistent" (run it, and its backward, inside environment(backend))."""
    if backend == "persistent":
        return persistent_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse, zoneout_h,
                                zoneout_c)
    return fastseq.ops.rnn_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh, lengths=lengths,
                                 reverse=reverse, zoneout_h=zoneout_h, zoneout_c=zoneout_c,
                                 backend=backend)


def run(mode, leaves64, dtype, backend, lengths, reverse, grad_outputs, zoneout64=(None, None)):
    """Outputs and gradients of every leaf for one layer in `dtype` (zoneout weights, if any,
    cast to it too)."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in leaves64]
    zh, zc = [z.to(dtype) if z is not None else None for z in zoneout64]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = leaves
    hx = (h0, c0) if mode == "lstm" else h0
    with environment(backend):
        y, h_n = layer_call(mode, backend, x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse, zh, zc)
        outs = [y] + (list(h_n) if mode == "lstm" else [h_n])
        loss = sum((o.double() * go).sum() for o, go in zip(outs, grad_outputs))
        present = [t for t in leaves if t is not None]
        return [o.detach() for o in outs], list(torch.autograd.grad(loss, present))


def assert_backends_match_reference(mode, leaves64, dtype, backends, lengths, reverse,
                                    grad_outputs, zoneout64=(None, None)):
    """Each backend's outputs and gradients in `dtype` within the tolerance rule: against the
    float64 reference, at most 2x plain PyTorch's (the reference in `dtype`) error."""
    ref_outs, ref_grads = run(mode, leaves64, torch.float64, "reference", lengths, reverse,
                              grad_outputs, zoneout64)
    plain_outs, plain_grads = run(mode, leaves64, dtype, "reference", lengths, reverse,
                                  grad_outputs, zoneout64)
    grad_names = [n for n, t in zip(LEAF_NAMES, leaves64) if t is not None]
    for backend in backends:
        outs, grads = run(mode, leaves64, dtype, backend, lengths, reverse, grad_outputs, zoneout64)
        for name, o, p, r in zip(["y", "h_n", "c_n"], outs, plain_outs, ref_outs):
            assert o.dtype == dtype
            assert_within_rule(f"{backend} {mode} {name}", o, p, r)
        for name, g, p, r in zip(grad_names, grads, plain_grads, ref_grads):
            assert_within_rule(f"{backend} {mode} grad {name}", g, p, r,
                               terms=parameter_gradient_terms(name, leaves64[0], leaves64[4]))


def parameter_gradient_terms(name: str, x64, w_hh64) -> int:
    """How many products a gradient element sums: T*B for a parameter (every step of every
    row); for x and h0/c0 the gate columns G*H (dx = W_ih^T dg, dh = W_hh^T dg, the latter
    compounded over the steps). The test_layer_norm_rnn fp32 case T6-B5-H20 (G*H = 80) failed
    once under load with grad h0 at 7.87e-6 against a bound of 7.59e-6 that counted 1 term:
    the rounding of an 80-term sum (~sqrt(80) ulps) moves with the summation order, which
    plain PyTorch's threaded GEMM changes with the machine's load."""
    if name.startswith(("w_", "b_", "ln_")):
        return x64.shape[0] * x64.shape[1]
    return w_hh64.shape[0]


def gradcheck_layer(mode, backend, T, B, I, H, lengths, zoneout=False):
    """torch.autograd.gradcheck of one reverse layer in float64 on `backend`; with zoneout,
    random fractional weights (neither 0 nor 1), so both shares of every gradient count."""
    leaves = [t.requires_grad_() if t is not None else None for t in make_leaves(mode, T, B, I, H, "cpu")]
    zh = torch.rand(T, B, H, dtype=torch.float64) if zoneout else None
    zc = torch.rand(T, B, H, dtype=torch.float64) if zoneout and mode == "lstm" else None
    present = [i for i, t in enumerate(leaves) if t is not None]

    def f(*args):
        full = list(leaves)
        for i, a in zip(present, args):
            full[i] = a
        x, h0, c0, w_ih, w_hh, b_ih, b_hh = full
        hx = (h0, c0) if mode == "lstm" else h0
        y, h_n = layer_call(mode, backend, x, hx, w_ih, w_hh, b_ih, b_hh, lengths, True, zh, zc)
        return (y,) + (tuple(h_n) if mode == "lstm" else (h_n,))

    with environment(backend):
        # fast_mode: random projections of the Jacobian; the full one took 20-40 s a case on
        # CI's cores (every element of every leaf, two interpreted sequences each).
        return torch.autograd.gradcheck(f, [leaves[i] for i in present], eps=1e-6, atol=1e-6,
                                        fast_mode=True)


def lengths_for(T, B, variable):
    if not variable:
        return None
    return [T - (i * 5) % T for i in range(B)]  # includes T, and 1 when T > 1


def assert_compiles_like_eager(loss_fn, x, params):
    """loss_fn(x) under torch.compile(fullgraph=True) gives the eager loss and gradients of x and
    every parameter."""
    torch._dynamo.reset()
    eager = loss_fn(x)
    eager_grads = torch.autograd.grad(eager, [x] + params)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x)
    grads = torch.autograd.grad(compiled, [x] + params)
    torch.testing.assert_close(compiled, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def make_stack(mode, T, B, I, H, num_layers, bidirectional, proj, device, bias=True):
    """(x [T, B, I], hx, flat weights in torch's order) of a whole stack, float64 leaves."""
    g, k, directions = GATES[mode], H ** -0.5, 2 if bidirectional else 1
    out = proj or H

    def rand(*shape, s=1.0):
        return ((torch.rand(*shape, dtype=torch.float64, device=device) * 2 - 1) * s).requires_grad_()

    weights = []
    for layer in range(num_layers):
        width = I if layer == 0 else out * directions
        for _ in range(directions):
            weights += [rand(g * H, width, s=k), rand(g * H, out, s=k)]
            weights += [rand(g * H, s=k), rand(g * H, s=k)] if bias else []
            weights += [rand(proj, H, s=k)] if proj else []
    h0 = rand(num_layers * directions, B, out)
    hx = (h0, rand(num_layers * directions, B, H)) if mode == "lstm" else h0
    return rand(T, B, I), hx, weights


def layer_weights(weights, per_group, bias=True):
    """Flat weights (torch's order: w_ih, w_hh, (b_ih, b_hh), (w_hr)) as
    fastseq.reference.rnn's LayerWeights, one per layer and direction."""
    from fastseq.reference.rnn import LayerWeights
    projected = per_group > 2 + 2 * bias
    return [LayerWeights(g[0], g[1], *(g[2:4] if bias else (None, None)),
                         g[-1] if projected else None)
            for g in (weights[i:i + per_group] for i in range(0, len(weights), per_group))]
