"""Both directions of a layer in one Triton launch (fastseq.ops.rnn_bidirectional_layer and the
stacked ops behind it): equal to the two single-direction launches up to GEMM rounding, within the
tolerance rule against the float64 reference (outputs, final states, every gradient), with
lengths, zoneout and no biases; opcheck, gradcheck; the fallback to one direction at a time;
errors."""
import pytest
import torch

import fastseq

from numerics import assert_within_rule
from recurrent_cases import MODES, layer_backends, make_leaves

triton_or_skip = pytest.mark.skipif("triton" not in layer_backends("cpu"),
                                    reason="the Triton interpreter is off")


def make_pair(mode, T, B, I, H, bias=True):
    """float64 leaves: x, then per direction (h0, c0, w_ih, w_hh, b_ih, b_hh)."""
    forward = make_leaves(mode, T, B, I, H, "cpu")
    reverse = make_leaves(mode, T, B, I, H, "cpu")
    x = forward[0]
    directions = [leaves[1:] for leaves in (forward, reverse)]
    if not bias:
        directions = [d[:4] + [None, None] for d in directions]
    return x, directions


def call(mode, x, directions, backend, lengths=None, zoneout=(None, None), fused=True):
    """(output, h_n[, c_n]) of both directions: through rnn_bidirectional_layer, or (fused=False)
    as two fastseq.ops.rnn_layer calls."""
    lstm = mode == "lstm"
    h0 = torch.stack([d[0] for d in directions])
    c0 = torch.stack([d[1] for d in directions]) if lstm else None
    if fused:
        out, state = fastseq.ops.rnn_bidirectional_layer(
            mode, x, (h0, c0) if lstm else h0, directions[0][2:], directions[1][2:], lengths=lengths,
            zoneout_h=zoneout[0], zoneout_c=zoneout[1], backend=backend)
        return [out] + (list(state) if lstm else [state])
    results = []
    for d in range(2):
        hx = (h0[d], c0[d]) if lstm else h0[d]
        results.append(fastseq.ops.rnn_layer(
            mode, x, hx, *directions[d][2:], lengths=lengths, reverse=d == 1,
            zoneout_h=zoneout[0][d] if zoneout[0] is not None else None,
            zoneout_c=zoneout[1][d] if zoneout[1] is not None else None, backend=backend))
    out = torch.cat([r[0] for r in results], dim=-1)
    if lstm:
        return [out, torch.stack([r[1][0] for r in results]), torch.stack([r[1][1] for r in results])]
    return [out, torch.stack([r[1] for r in results])]


def outputs_and_grads(mode, x64, directions64, dtype, backend, lengths, zoneout64, fused=True):
    x = x64.detach().to(dtype).requires_grad_()
    directions = [[t.detach().to(dtype).requires_grad_() if t is not None else None for t in d]
                  for d in directions64]
    zoneout = tuple(z.to(dtype) if z is not None else None for z in zoneout64)
    outs = call(mode, x, directions, backend, lengths, zoneout, fused)
    torch.manual_seed(7)
    loss = sum((o.double() * torch.randn(o.shape, dtype=torch.float64)).sum() for o in outs)
    leaves = [x] + [t for d in directions for t in d if t is not None]
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


def zoneout_masks(mode, T, B, H, on):
    if not on or mode not in ("lstm", "gru"):
        return None, None
    return ((torch.rand(2, T, B, H) < 0.3).double(),
            (torch.rand(2, T, B, H) < 0.3).double() if mode == "lstm" else None)


@triton_or_skip
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["plain", "lengths-zoneout", "nobias"])
def test_one_launch_equals_two_and_the_reference(mode, variant):
    T, B, I, H = 5, 17, 3, 9  # B=17: two batch tiles per direction
    x, directions = make_pair(mode, T, B, I, H, bias=variant != "nobias")
    lengths = [T - (i * 3) % T for i in range(B)] if "lengths" in variant else None
    if lengths is not None:
        lengths[4] = 0
    zoneout = zoneout_masks(mode, T, B, H, "zoneout" in variant)
    fused = outputs_and_grads(mode, x, directions, torch.float32, "triton", lengths, zoneout)
    apart = outputs_and_grads(mode, x, directions, torch.float32, "triton", lengths, zoneout, fused=False)
    for a, b in zip(fused, apart):
        # The recurrence runs the same code per direction; the input projection (one GEMM with
        # both directions' weights) and dW_hh (one batched GEMM) may round differently: ~1 ulp.
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    reference = outputs_and_grads(mode, x, directions, torch.float64, "reference", lengths, zoneout)
    plain = outputs_and_grads(mode, x, directions, torch.float32, "reference", lengths, zoneout)
    for i, (f, p, r) in enumerate(zip(fused, plain, reference)):
        assert_within_rule(f"{mode} {variant} output/grad {i}", f, p, r)


@triton_or_skip
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_bfloat16_within_rule(mode):
    T, B, I, H = 6, 5, 3, 20
    x, directions = make_pair(mode, T, B, I, H)
    lengths = [6, 2, 5, 1, 6]
    fused = outputs_and_grads(mode, x, directions, torch.bfloat16, "triton", lengths, (None, None))
    plain = outputs_and_grads(mode, x, directions, torch.bfloat16, "reference", lengths, (None, None))
    reference = outputs_and_grads(mode, x, directions, torch.float64, "reference", lengths, (None, None))
    for i, (f, p, r) in enumerate(zip(fused, plain, reference)):
        assert f.dtype == torch.bfloat16
        assert_within_rule(f"{mode} bf16 output/grad {i}", f, p, r)


@triton_or_skip
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_opcheck(mode):
    x, directions = make_pair(mode, 4, 3, 2, 5)
    lstm = mode == "lstm"
    gx = torch.stack([x.float() @ d[2].float().t() + d[4].float() for d in directions]).requires_grad_()
    h0 = torch.stack([d[0] for d in directions]).float()
    c0 = torch.stack([d[1] for d in directions]).float() if lstm else None
    w_hh = torch.stack([d[3] for d in directions]).float().requires_grad_()
    b_hh = torch.stack([d[5] for d in directions]).float()
    lengths = torch.tensor([4, 1, 3], dtype=torch.int32)
    forward = torch.ops.fastseq.rnn_bidirectional_layer_forward_triton
    torch.library.opcheck(forward, (mode, gx, h0, c0, w_hh, b_hh, lengths, None, None, False, True))
    y, h_n, c_n, ws = forward(mode, gx.detach(), h0, c0, w_hh.detach(), b_hh, lengths, None, None,
                              False, True)
    torch.library.opcheck(torch.ops.fastseq.rnn_bidirectional_layer_backward_triton, (
        mode, torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n) if lstm else None,
        h0, c0, w_hh.detach(), y, ws, lengths, None, None, False))


@triton_or_skip
def test_gradcheck_float64():
    x, directions = make_pair("gru", 3, 2, 2, 3)
    leaves = [x.requires_grad_()] + [t.requires_grad_() for d in directions for t in d if t is not None]

    def f(*args):
        it = iter(args[1:])
        rebuilt = [[next(it) if t is not None else None for t in d] for d in directions]
        return tuple(call("gru", args[0], rebuilt, "triton", lengths=[3, 2]))

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, fast_mode=True)


def test_other_backends_run_one_direction_at_a_time():
    x, directions = make_pair("lstm", 4, 3, 2, 5)
    backends = [b for b in layer_backends("cpu") if b != "triton"]
    expected = call("lstm", x, directions, "reference", lengths=[4, 2, 3], fused=False)
    for backend in backends:
        for got, want in zip(call("lstm", x, directions, backend, lengths=[4, 2, 3]), expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(fastseq.BackendError, match="backend 'torch' cannot run this call"):
        call("lstm", x, directions, "torch")


def test_errors():
    x, directions = make_pair("gru", 4, 3, 2, 5)
    op = fastseq.ops.rnn_bidirectional_layer
    with pytest.raises(fastseq.InputError, match=r"h0 of a bidirectional layer must be \[2, batch, size\]"):
        op("gru", x, directions[0][0], directions[0][2:], directions[1][2:])
    with pytest.raises(fastseq.InputError, match=r"zoneout_h of a bidirectional layer must be \[2, steps"):
        op("gru", x, None, directions[0][2:], directions[1][2:], zoneout_h=torch.zeros(4, 3, 5))
    with pytest.raises(fastseq.InputError, match="mode must be one of"):
        op("lstmx", x, None, directions[0][2:], directions[1][2:])
    if "triton" in layer_backends("cpu"):  # the fused path checks the two directions together
        with pytest.raises(fastseq.InputError, match="both directions must have biases, or neither"):
            op("gru", x, None, directions[0][2:], directions[1][2:4], backend="triton")
