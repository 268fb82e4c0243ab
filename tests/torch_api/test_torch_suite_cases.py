"""A selection of PyTorch's own test cases for its RNN, MultiheadAttention and Transformer
modules (test_nn.py, test/nn/test_multihead_attention.py, test_transformers.py, the ModuleInfo
tests), in our own words, run against fastseq's drop-ins with each backend forced
(fastseq.use_backend). Each case either matches torch's module (same seed, so the same initial
weights) or, where the forced backend cannot serve the call, is refused by name with
fastseq.BackendError: never a silent difference. REFUSED lists which; torch tests judged
inapplicable are listed at the end with the reason."""
import copy
import io

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq

from conftest import backends_for

BACKENDS = backends_for("cpu")


def twins(name, *args, **kwargs):
    """torch's module and fastseq's, built from the same seed (the same initial weights)."""
    torch.manual_seed(7)
    theirs = getattr(torch.nn, name)(*args, **kwargs)
    torch.manual_seed(7)
    ours = getattr(fastseq.nn, name)(*args, **kwargs)
    return theirs, ours


def outputs_and_grads(module, call, inputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = call(module, *leaves)
    flat = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) for t in
            (t if isinstance(t, (tuple, list)) else (t,)) if isinstance(t, torch.Tensor)]
    loss = sum((t.double() * torch.linspace(-1, 1, t.numel(), dtype=torch.float64)
                .view(t.shape)).sum() for t in flat)
    wrt = [t for t in leaves if t.requires_grad] + [p for p in module.parameters()
                                                    if p.requires_grad]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else []
    return flat, [g for g in grads if g is not None]


def assert_matches_torch(case, backend, build, call, inputs, *, tol=1e-6):
    """Forced `backend`: fastseq's outputs and gradients equal torch's, or BackendError."""
    theirs, ours = build()
    want = outputs_and_grads(theirs, call, inputs)
    with fastseq.use_backend(backend):
        if (case, backend) in REFUSED:
            with pytest.raises(fastseq.BackendError, match=f"backend '{backend}'"):
                outputs_and_grads(ours, call, inputs)
            return
        got = outputs_and_grads(ours, call, inputs)
    for a, b in zip(want[0] + want[1], got[0] + got[1]):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    assert len(want[0]) == len(got[0]) and len(want[1]) == len(got[1])


# (case, backend) pairs that a forced backend refuses by name. Attention has no native kernel:
# the cases that reach the fused op (need_weights=False, the Transformer layers) are refused;
# need_weights=True computes the returned weights in plain PyTorch whatever the backend.
REFUSED = {(case, "native") for case in ("mask_per_head", "two_masks_eval",
                                         "encoder_empty_batch", "encoder_is_causal",
                                         "decoder_masks")}

D = torch.float64


def rnn(kind, **kw):
    return lambda: tuple(m.double() for m in twins(kind, **kw))


RNN_CASES = {
    # ModuleInfo's empty batch: a recurrence over no sequences.
    "empty_batch": (rnn("LSTM", input_size=3, hidden_size=3, num_layers=2),
                    lambda m, x: m(x), [torch.randn(4, 0, 3, dtype=D)]),
    # test_rnn_initial_hidden_state: an explicit zero state equals none.
    "zero_initial_state": (rnn("GRU", input_size=3, hidden_size=4, num_layers=2),
                           lambda m, x, h: m(x, h)[0] - m(x)[0] + m(x, h)[1].sum(),
                           [torch.randn(5, 2, 3, dtype=D), torch.zeros(2, 2, 4, dtype=D)]),
    # test_RNN_nonlinearity / _passed_as_arg: relu instead of tanh.
    "relu_nonlinearity": (rnn("RNN", input_size=3, hidden_size=4, nonlinearity="relu",
                              num_layers=2, bidirectional=True),
                          lambda m, x: m(x), [torch.randn(5, 2, 3, dtype=D)]),
    # test_rnn_retain_variables: two backwards through one graph give the same gradients.
    "retain_graph": (rnn("LSTM", input_size=3, hidden_size=4),
                     lambda m, x: _twice(m(x)[0]), [torch.randn(5, 2, 3, dtype=D)]),
    # test_variable_sequence: a packed unsorted batch of different lengths.
    "packed_unsorted": (rnn("GRU", input_size=3, hidden_size=4, bidirectional=True),
                        lambda m, x: _packed(m, x, [2, 5, 3]), [torch.randn(5, 3, 3, dtype=D)]),
    # ModuleInfo's batch_first, bias=False and unbatched forms.
    "batch_first_no_bias": (rnn("LSTM", input_size=3, hidden_size=4, num_layers=2,
                                bias=False, batch_first=True),
                            lambda m, x: m(x), [torch.randn(2, 5, 3, dtype=D)]),
    "unbatched": (rnn("RNN", input_size=3, hidden_size=4),
                  lambda m, x: m(x), [torch.randn(5, 3, dtype=D)]),
    # test_RNN_cell and the cells' unbatched and no-hidden forms.
    "lstm_cell": (rnn("LSTMCell", input_size=3, hidden_size=4),
                  lambda m, x, h, c: m(x, (h, c)) + m(x) + m(x[0], (h[0], c[0])),
                  [torch.randn(2, 3, dtype=D), torch.randn(2, 4, dtype=D),
                   torch.randn(2, 4, dtype=D)]),
    "gru_cell": (rnn("GRUCell", input_size=3, hidden_size=4, bias=False),
                 lambda m, x, h: (m(x, h), m(x), m(x[0], h[0])),
                 [torch.randn(2, 3, dtype=D), torch.randn(2, 4, dtype=D)]),
    "rnn_relu_cell": (rnn("RNNCell", input_size=3, hidden_size=4, nonlinearity="relu"),
                      lambda m, x, h: m(x, h), [torch.randn(2, 3, dtype=D),
                                                torch.randn(2, 4, dtype=D)]),
    # The LSTM with projections (proj_size, torch's LSTMP).
    "lstm_proj_size": (rnn("LSTM", input_size=3, hidden_size=5, proj_size=2,
                           num_layers=2, bidirectional=True),
                       lambda m, x: m(x), [torch.randn(4, 2, 3, dtype=D)]),
}


def _twice(out):
    loss = out.pow(2).sum()
    first = torch.autograd.grad(loss, out, retain_graph=True)[0]
    second = torch.autograd.grad(loss, out, retain_graph=True)[0]
    assert torch.equal(first, second)
    return out


def _packed(module, x, lengths):
    out, h = module(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False))
    return pad_packed_sequence(out)[0], h


@pytest.mark.parametrize("kwargs", [dict(input_size=0, hidden_size=3),
                                    dict(input_size=3, hidden_size=0),
                                    dict(input_size=3, hidden_size=3, proj_size=3),
                                    dict(input_size=3, hidden_size=3, dropout=1.5),
                                    dict(input_size=3, hidden_size=3, nonlinearity="sigmoid")])
def test_constructor_refusals_are_torchs(kwargs):
    """test_nn's argument checks (test_RNN_input_size_zero is now a refusal in torch)."""
    name = "RNN" if "nonlinearity" in kwargs else "LSTM"
    with pytest.raises(ValueError) as theirs:
        getattr(torch.nn, name)(**kwargs)
    with pytest.raises(ValueError) as ours:
        getattr(fastseq.nn, name)(**kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(RNN_CASES))
def test_recurrent_cases(case, backend):
    build, call, inputs = RNN_CASES[case]
    assert_matches_torch(case, backend, build, call, inputs, tol=1e-9)


def mha(**kw):
    return lambda: twins("MultiheadAttention", 8, 2, **kw)


Q, K = torch.randn(3, 4, 8), torch.randn(5, 4, 8)
PADDING = torch.tensor([[False] * 5, [False] * 4 + [True], [False, True] * 2 + [False],
                        [True] + [False] * 4])
ATTN_CASES = {
    # test_multihead_attention: key padding, bias_kv and a zero key, weights returned.
    "padding_bias_kv_zero_attn": (mha(add_bias_kv=True, add_zero_attn=True),
                                  lambda m, q, k: m(q, k, k, key_padding_mask=PADDING),
                                  [Q, K]),
    # test_multihead_attn_3d_attn_mask: a mask per (batch, head).
    "mask_per_head": (mha(), lambda m, q, k: m(q, k, k, attn_mask=_mask3d(), need_weights=False),
                      [Q, K]),
    # test_multihead_attn_in_proj_bias_none / _weight_none (kdim, vdim differ).
    "no_bias": (mha(bias=False), lambda m, q: m(q, q, q), [Q]),
    "kdim_vdim": (lambda: twins("MultiheadAttention", 8, 2, kdim=3, vdim=5),
                  lambda m, q, k, v: m(q, k, v), [Q, torch.randn(5, 4, 3),
                                                  torch.randn(5, 4, 5)]),
    # test_multihead_self_attn_two_masks_fast_path: both masks, eval, no row fully hidden.
    "two_masks_eval": (lambda: tuple(m.eval() for m in mha(batch_first=True)()),
                       lambda m, x: m(x, x, x, attn_mask=torch.eye(4, dtype=torch.bool),
                                      key_padding_mask=PADDING[:, :4], need_weights=False),
                       [torch.randn(4, 4, 8)]),
    # test_multihead_attn_fast_path_query_and_bias_have_different_dtypes.
    "bias_of_another_dtype": (_half_bias := lambda: tuple(
        _with_half_bias(m) for m in twins("MultiheadAttention", 4, 4, batch_first=True,
                                          dtype=torch.float64)),
                              lambda m, x: m(x, x, x), [torch.randn(4, 4, 4, dtype=D)]),
    # test_transformers' empty batch through the encoder layer, both layouts.
    "encoder_empty_batch": (lambda: twins("TransformerEncoderLayer", 8, 2, 16),
                            lambda m, x: m(x), [torch.randn(3, 0, 8)]),
    # train with is_causal and its mask (TransformerEncoder's causal training step).
    "encoder_is_causal": (lambda: twins("TransformerEncoderLayer", 8, 2, 16, dropout=0.0,
                                        norm_first=True, activation="gelu"),
                          lambda m, x: m(x, src_mask=_causal(3), is_causal=True),
                          [torch.randn(3, 4, 8)]),
    "decoder_masks": (lambda: twins("TransformerDecoderLayer", 8, 2, 16, dropout=0.0,
                                    bias=False),
                      lambda m, x, mem: m(x, mem, tgt_mask=_causal(3), tgt_is_causal=True,
                                          memory_key_padding_mask=PADDING),
                      [torch.randn(3, 4, 8), torch.randn(5, 4, 8)]),
}


def _mask3d():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(4 * 2, 3, 5, generator=g) > 0.6
    mask[..., 0] = False
    return mask


def _causal(n):
    return torch.nn.Transformer.generate_square_subsequent_mask(n)


def _with_half_bias(module):
    module.in_proj_bias = torch.nn.Parameter(module.in_proj_bias.detach().half())
    return module.eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(ATTN_CASES))
def test_attention_cases(case, backend):
    build, call, inputs = ATTN_CASES[case]
    tol = 1e-9 if inputs[0].dtype == D else 2e-5
    assert_matches_torch(case, backend, build, call, inputs, tol=tol)


def test_nested_tensors_are_refused_as_torch_refuses_them_off_its_fast_path():
    """test_multihead_attn_nested_tensor_outside_fast_path: torch asserts; so does fastseq
    (it has no fast path of torch's), naming the way round."""
    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)],
                                        layout=torch.jagged)
    _, ours = twins("MultiheadAttention", 8, 2, batch_first=True)
    with pytest.raises(AssertionError, match="to_padded_tensor"):
        ours(nested, nested, nested)


@pytest.mark.parametrize("name,args", [("LSTM", (3, 4)), ("GRUCell", (3, 4)),
                                       ("MultiheadAttention", (8, 2)),
                                       ("TransformerEncoderLayer", (8, 2, 16))])
def test_module_info_save_load_and_deepcopy(name, args):
    """ModuleInfo's save/load (weights_only with fastseq.nn.safe_globals()), deepcopy and
    .to(dtype) keep the class, the weights and the forward."""
    _, ours = twins(name, *args)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals(fastseq.nn.safe_globals()):
        loaded = torch.load(buffer, weights_only=True)
    for other in (loaded, copy.deepcopy(ours)):
        assert type(other) is type(ours)
        for (k, a), (_, b) in zip(ours.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), k
    doubled = ours.double()
    assert all(p.dtype == D for p in doubled.parameters())


# torch tests judged inapplicable to fastseq's layers, and why:
INAPPLICABLE = {
    "test_multihead_self_attn_two_masks_fast_path_mock": "asserts torch's own inference kernel "
    "(torch._native_multi_head_attention) is called; fastseq's layers never take torch's fast "
    "path (their fused kernel is the point). Its numerics: two_masks_eval above.",
    "TransformerEncoder nested-tensor fast path (test_transformerencoder_fastpath, "
    "enable_nested_tensor)": "torch's kernels on nested tensors; fastseq.patch turns the "
    "conversion off and the layers refuse nested tensors by name.",
    "TorchScript of the layers and of subclasses (test_script_encoder_subclass, "
    "test_scripted_...)": "refused by name (fastseq.TorchScriptError), pointing to "
    "torch.compile / torch.export; see tests/torch_api/test_torchscript.py.",
    "cuDNN-specific (test_cudnn_weight_format, flatten_parameters, test_rnn_fused, "
    "test_RNN_cpu_vs_cudnn)": "need a GPU; the GPU run (bench/gpu_run.sh 3) runs the CUDA "
    "tests of the recurrent layers against cuDNN instead.",
    "fully masked rows": "torch gives NaN on some backends, fastseq gives zeros (documented).",
}


def test_the_inapplicable_list_gives_a_reason_for_each():
    assert all(len(reason) > 40 for reason in INAPPLICABLE.values())
