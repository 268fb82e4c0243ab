"""Non-contiguous and strided inputs to every public op give what their contiguous copies
give, on every backend, gradients included: transposed weights, every other time step or
batch row of a larger tensor, a state broadcast with stride 0 over the batch, heads seen
through a transpose of [B, L, H, D] (what MultiheadAttention hands the kernel)."""
import pytest
import torch

import fastseq

from conftest import backends_for

# Which public op each test covers (tests/dispatch/test_registry.py checks every op is named here).
COVERS = {"lstm_cell": ["test_cell_step"], "gru_cell": ["test_cell_step"],
          "rnn_tanh_cell": ["test_cell_step"], "rnn_relu_cell": ["test_cell_step"],
          "rnn_layer": ["test_layer_with_lengths", "test_native_layer_ops_take_views_directly"],
          "rnn_bidirectional_layer": ["test_bidirectional_layer"],
          "layer_norm_rnn_layer": ["test_layer_norm_layer"],
          "attention": ["test_attention_heads_as_views"],
          "attention_with_kv_cache": ["test_kv_cache_step_with_views"],
          "rel_attention": ["test_rel_attention_heads_as_views"]}
EXCLUDES: dict = {}
# rnn_stack's case lives in tests/rnn/test_rnn.py (its ACROSS_OPS): a family may keep these
# checks beside its own tests.

G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
I, H = 5, 4


def strided(shape, kind):
    """A view of `shape` that is not contiguous, and its values."""
    if kind == "transposed":
        return torch.randn(*reversed(shape)).t() if len(shape) == 2 else \
            torch.randn(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    if kind == "every_other":
        return torch.randn(shape[0] * 2, *shape[1:])[::2]
    if kind == "broadcast":  # one row seen B times
        return torch.randn(1, *shape[1:]).expand(shape)
    raise ValueError(kind)


def compare(run, views):
    """run(*tensors) -> outputs (each at least 2-D), on the views and on contiguous copies:
    equal outputs, equal gradients for every view (a broadcast view's gradient sums over its
    copies in both)."""
    leaves = [v.detach().requires_grad_() if v is not None else None for v in views]
    copies = [v.detach().contiguous().requires_grad_() if v is not None else None for v in views]
    for leaf in leaves:
        assert leaf is None or not leaf.is_contiguous() or leaf.dim() <= 1
    got, expected = run(*leaves), run(*copies)
    # Each output is read transposed, so the gradients reaching the op are strided too.
    torch.manual_seed(5)
    weights = [torch.randn_like(e.transpose(0, 1).contiguous()) for e in expected]
    total = sum((g.transpose(0, 1) * w).sum() for g, w in zip(got, weights))
    total_expected = sum((e.transpose(0, 1) * w).sum() for e, w in zip(expected, weights))
    params = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(total, params)
    grads_expected = torch.autograd.grad(total_expected, [t for t in copies if t is not None])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, grads_expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", list(G))
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_cell_step(mode, backend):
    B, g = 3, G[mode]
    views = [strided((B, I), "transposed"), strided((B, H), "broadcast"),
             strided((B, H), "every_other") if mode == "lstm" else None,
             strided((g * H, I), "transposed"), strided((g * H, H), "every_other"),
             torch.randn(2 * g * H)[::2], torch.randn(g * H)]

    def run(x, h, c, w_ih, w_hh, b_ih, b_hh):
        hx = (h, c) if mode == "lstm" else h
        out = getattr(fastseq.ops, f"{mode}_cell")(x, hx, w_ih, w_hh, b_ih, b_hh, backend=backend)
        return list(out) if mode == "lstm" else [out]

    compare(run, views)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend", [b for b in backends_for("cpu") if b != "torch"])
def test_layer_with_lengths(mode, backend):
    """One layer, forwards and in reverse, with padded lengths (torch's functional RNN has
    neither reverse nor lengths: it is covered by the contiguous tests)."""
    T, B, g = 6, 3, G[mode]
    views = [strided((T, B, I), "transposed"), strided((B, H), "broadcast"),
             strided((B, H), "transposed") if mode == "lstm" else None,
             strided((g * H, I), "every_other"), strided((g * H, H), "transposed"),
             torch.randn(g * H), torch.randn(2 * g * H)[1::2]]
    for reverse in (False, True):
        def run(x, h, c, w_ih, w_hh, b_ih, b_hh):
            hx = (h, c) if mode == "lstm" else h
            y, state = fastseq.ops.rnn_layer(mode, x, hx, w_ih, w_hh, b_ih, b_hh,
                                             lengths=[6, 2, 5], reverse=reverse, backend=backend)
            return [y] + (list(state) if mode == "lstm" else [state])

        compare(run, views)


@pytest.mark.parametrize("backend", [b for b in backends_for("cpu") if b != "torch"])
def test_bidirectional_layer(backend):
    """Both directions from views (triton: one fused launch for the two; torch's functional
    RNN has no reverse direction)."""
    T, B, g = 5, 2, 4
    views = [strided((T, B, I), "every_other"), strided((2, B, H), "transposed"),
             strided((2, B, H), "broadcast")]
    views += [strided((g * H, I), "transposed"), strided((g * H, H), "every_other"),
              torch.randn(2 * g * H)[::2], torch.randn(g * H)] * 2

    def run(x, h, c, *weights):
        y, (h_n, c_n) = fastseq.ops.rnn_bidirectional_layer(
            "lstm", x, (h, c), weights[:4], weights[4:], lengths=[5, 3], backend=backend)
        return [y, h_n, c_n]

    compare(run, views)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("backend", [b for b in backends_for("cpu") if b in ("triton", "reference")])
def test_layer_norm_layer(mode, backend):
    T, B, g = 5, 3, G[mode]
    lstm = mode == "lstm"
    views = [strided((T, B, I), "transposed"), strided((B, H), "every_other"),
             strided((B, H), "broadcast") if lstm else None,
             strided((g * H, I), "transposed"), strided((g * H, H), "transposed"),
             torch.randn(g * H), torch.randn(g * H),
             torch.randn(2 * g * H)[::2], torch.randn(g * H),
             torch.randn(2 * H)[::2] if lstm else None, torch.randn(H) if lstm else None]

    def run(x, h, c, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c, ln_c_bias):
        y, state = fastseq.ops.layer_norm_rnn_layer(
            mode, x, (h, c) if lstm else h, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c, ln_c_bias,
            lengths=[5, 1, 4], backend=backend)
        return [y] + (list(state) if lstm else [state])

    compare(run, views)


@pytest.mark.skipif(fastseq.backend.native_unavailable(torch.device("cpu")) is not None,
                    reason="fastseq._C is not built")
def test_native_layer_ops_take_views_directly():
    """torch.ops.fastseq.rnn_layer_forward/_backward called with transposed states and
    state gradients (a compiled graph or a direct caller may pass views): the C++ op copies
    them to contiguous accumulators (Tensor::to(copy=True) alone kept the transposed strides)."""
    ops = torch.ops.fastseq
    T, B = 4, 3
    gx, w_hh = torch.randn(T, B, 4 * H), torch.randn(4 * H, H)
    h0, c0, grad_h, grad_c = (strided((B, H), "transposed") for _ in range(4))
    grad_y = torch.randn(T, B, H)
    flat = [t.contiguous() for t in (h0, c0, grad_h, grad_c)]
    y, h_n, c_n, ws = ops.rnn_layer_forward("lstm", gx, h0, c0, w_hh, None, None, None, None,
                                            False, True)
    y2, h_n2, c_n2, ws2 = ops.rnn_layer_forward("lstm", gx, flat[0], flat[1], w_hh, None, None,
                                                None, None, False, True)
    for a, b in ((y, y2), (h_n, h_n2), (c_n, c_n2), (ws, ws2)):
        assert torch.equal(a, b)
    got = ops.rnn_layer_backward("lstm", grad_y, grad_h, grad_c, h0, c0, w_hh, y, ws, None, None,
                                 None, False)
    expected = ops.rnn_layer_backward("lstm", grad_y, flat[2], flat[3], flat[0], flat[1], w_hh,
                                      y, ws, None, None, None, False)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def heads_view(B, L, heads, D):
    """[B, heads, L, D] seen through a transpose of [B, L, heads, D]."""
    return torch.randn(B, L, heads, D).transpose(1, 2)


ATTENTION_BACKENDS = [b for b in backends_for("cpu") if b != "native"]  # no native kernel


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_heads_as_views(backend):
    mask = (torch.rand(2, 1, 1, 7) > 0.3).expand(2, 2, 5, 7)  # key padding, stride 0

    def run(q, k, v):
        return [fastseq.ops.attention(q, k, v, mask, backend=backend)]
    compare(run, [heads_view(2, 5, 2, 8), heads_view(2, 7, 2, 8), heads_view(2, 7, 2, 8)])


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_rel_attention_heads_as_views(backend):
    pos = torch.randn(14, 2, 8)[::2]  # every other distance row

    def run(q, k, v, u, w):
        return [fastseq.ops.rel_attention(q, k, v, pos, u, w, backend=backend)]
    compare(run, [heads_view(2, 5, 2, 8), heads_view(2, 7, 2, 8), heads_view(2, 7, 2, 8),
                  torch.randn(8, 2).t(), torch.randn(8, 2).t()])


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_kv_cache_step_with_views(backend):
    """A decode step with every tensor a view: query and new rows as head views, caches as one
    layer's slice of a [B, S, layers, H, D] buffer; equal to the same step on contiguous
    copies, and the append lands in the buffer."""
    q, key, value = heads_view(2, 3, 4, 8), heads_view(2, 3, 2, 8), heads_view(2, 3, 2, 8)
    buffer = torch.randn(2, 2, 20, 3, 8)  # [B, H, S, layers, D]
    k_view, v_view = buffer[:, :, :, 0], buffer[:, :, :, 2]
    lengths = torch.tensor([4, 11], dtype=torch.int32)
    caches = [k_view.contiguous(), v_view.contiguous()]
    expected = fastseq.ops.attention_with_kv_cache(q.contiguous(), *caches, lengths,
                                                   key.contiguous(), value.contiguous(),
                                                   backend=backend)
    got = fastseq.ops.attention_with_kv_cache(q, k_view, v_view, lengths, key, value,
                                              backend=backend)
    assert torch.equal(got, expected)
    assert torch.equal(k_view, caches[0]) and torch.equal(v_view, caches[1])
