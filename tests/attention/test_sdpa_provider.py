"""fastseq as PyTorch's SDPA flash provider (fastseq/sdpa_provider.py): listed on import, never
active until asked, its overrides registered on aten's CUDA kernels and removed by restore; the
two kernels it installs compute what aten's flash forward and backward return (here on CPU
tensors through Triton's interpreter, called directly; the GPU smoke runs them through
F.scaled_dot_product_attention)."""
import pytest
import torch

import fastseq
from fastseq import sdpa_provider
from fastseq.reference import attention as reference

from numerics import assert_within_rule

OP = "aten::_scaled_dot_product_flash_attention"
registry = pytest.importorskip("torch.nn.attention._registry",
                               reason="this torch has no flash-attention provider registry")


def _cuda_kernel_line() -> str:
    return next(line for line in torch._C._dispatch_dump(OP).splitlines()
                if line.startswith("CUDA:"))


def test_listed_on_import_active_only_when_asked():
    assert "fastseq" in torch.nn.attention.list_flash_attention_impls()
    assert registry.current_flash_attention_impl() != "fastseq"
    torch_kernel = _cuda_kernel_line()
    try:
        fastseq.activate_sdpa()
        assert sdpa_provider.sdpa_active()
        assert "fastseq/sdpa_provider.py" in _cuda_kernel_line()
        backward = torch._C._dispatch_dump(OP + "_backward")
        assert "fastseq/sdpa_provider.py" in backward
    finally:
        fastseq.restore_sdpa()
    assert not sdpa_provider.sdpa_active()
    assert _cuda_kernel_line() == torch_kernel


def _triton_or_skip():
    reason = fastseq.backend.triton_unavailable(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_kernels_return_flashs_outputs_and_gradients(causal, heads):
    _triton_or_skip()
    torch.manual_seed(0)
    (hq, hk), L, S, E = heads, 13, 19 if not causal else 13, 24
    q64 = torch.randn(2, hq, L, E, dtype=torch.float64)
    k64 = torch.randn(2, hk, S, E, dtype=torch.float64)
    v64 = torch.randn(2, hk, S, E, dtype=torch.float64)
    grad64 = torch.randn(2, hq, L, E, dtype=torch.float64)
    scale = 0.3

    def ref(q, k, v, upcast=True):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out, lse = reference.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=hq != hk, return_lse=True,
            upcast=upcast)
        grads = torch.autograd.grad(out, (q, k, v), grad64.to(out.dtype))
        return (out, lse) + grads

    truth = ref(q64, k64, v64)
    q, k, v = q64.float(), k64.float(), v64.float()
    plain = ref(q, k, v, upcast=False)
    out, lse, cum_q, cum_k, max_q, max_k, state, offset, debug = sdpa_provider.flash_forward(
        q, k, v, 0.0, causal, scale=scale)
    assert (cum_q, cum_k, max_q, max_k) == (None, None, L, S)
    assert state.dtype == torch.uint64 and state.shape == (2,) and offset.shape == ()
    assert lse.dtype == torch.float32 and lse.shape == (2, hq, L)
    grads = sdpa_provider.flash_backward(grad64.float(), q, k, v, out, lse, None, None, L, S,
                                         0.0, causal, state, offset, scale=scale)
    for name, fast, p, t in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + grads, plain,
                                truth):
        assert_within_rule(name, fast, p.to(fast.dtype), t, terms=S)


def test_dropout_backward_replays_the_forwards_draw():
    """The seed rides in flash's philox state: the backward's gradients are those of the
    forward's own dropout mask (fastseq.ops.attention with the same torch seed draws it)."""
    _triton_or_skip()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float64) for _ in range(3))
    grad = torch.randn(1, 2, 9, 16, dtype=torch.float64)
    torch.manual_seed(7)
    out, lse, *_, state, offset, _ = sdpa_provider.flash_forward(q, k, v, 0.3, False)
    dq, dk, dv = sdpa_provider.flash_backward(grad, q, k, v, out, lse, None, None, 9, 9, 0.3,
                                              False, state, offset)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    expected = fastseq.ops.attention(*leaves, dropout_p=0.3, backend="triton")
    torch.testing.assert_close(out, expected.detach())
    for got, want in zip((dq, dk, dv), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(got, want)


def test_debug_mask_is_refused_by_name():
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(RuntimeError, match="return_debug_mask"):
        sdpa_provider.flash_forward(q, q, q, 0.0, False, True)


def test_outputs_keep_the_inputs_strides_as_torchs_meta_functions_promise():
    """q, k, v as transposed views of [B, L, H, E] (what attention layers pass): out and the
    gradients come back in the inputs' strides (a compiled graph reads them with those)."""
    _triton_or_skip()
    q, k, v = (torch.randn(2, 7, 3, 8).transpose(1, 2) for _ in range(3))
    out, lse, *_, state, offset, _ = sdpa_provider.flash_forward(q, k, v, 0.0, True)
    assert out.stride() == q.stride()
    grads = sdpa_provider.flash_backward(torch.randn(2, 3, 7, 8), q, k, v, out, lse, None, None,
                                         7, 7, 0.0, True, state, offset)
    for grad, like in zip(grads, (q, k, v)):
        assert grad.stride() == like.stride()
    expected = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
