"""Shared inputs and runners of the recurrent-layer tests: random leaves in float64, one layer
run through fastseq.ops.rnn_layer (a backend) or straight through the persistent ops, and the
gradients of a random projection of every output."""
import torch
import torch.nn.functional as F

import fastseq
from fastseq.kernels.rnn_cell_layout import GATES

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


def persistent_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False,
                     zoneout_h=None, zoneout_c=None):
    """One layer through the persistent ops (on CPU: the CUDA kernel's twin), as
    fastseq.ops.rnn_layer's native path calls its ops: one GEMM for every step's input
    projection, then the recurrence."""
    h0, c0 = hx if mode == "lstm" else (hx, None)
    lengths = torch.tensor(lengths, dtype=torch.int32, device=x.device) if lengths is not None else None
    needs_grad = any(t is not None and t.requires_grad for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh))
    y, h_n, c_n, _ = torch.ops.fastseq.rnn_layer_forward_persistent(
        mode, F.linear(x, w_ih, b_ih), h0, c0, w_hh, b_hh, lengths, zoneout_h, zoneout_c, reverse,
        needs_grad)
    return y, ((h_n, c_n) if mode == "lstm" else h_n)


def run(mode, leaves64, dtype, backend, lengths, reverse, grad_outputs):
    """Outputs and gradients of every leaf for one layer in `dtype`; backend "persistent"
    runs the persistent ops, any other name fastseq.ops.rnn_layer with that backend."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in leaves64]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = leaves
    hx = (h0, c0) if mode == "lstm" else h0
    if backend == "persistent":
        y, h_n = persistent_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    else:
        y, h_n = fastseq.ops.rnn_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh, lengths=lengths,
                                       reverse=reverse, backend=backend)
    outs = [y] + (list(h_n) if mode == "lstm" else [h_n])
    loss = sum((o.double() * go).sum() for o, go in zip(outs, grad_outputs))
    present = [t for t in leaves if t is not None]
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, present))


def lengths_for(T, B, variable):
    if not variable:
        return None
    return [T - (i * 5) % T for i in range(B)]  # includes T, and 1 when T > 1
