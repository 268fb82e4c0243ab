"""torch.nn.attention.bias CausalBias masks (causal_upper_left, causal_lower_right) in
fastseq.nn.MultiheadAttention and the Transformer layers. torch's own modules refuse them (they
read one as a 3-D mask of the wrong shape), so the answer to match is torch's module given the
same rule as a materialized bool mask: on the kernel path (need_weights=False, nothing to
merge) and on the merging paths (key_padding_mask, bias_kv, need_weights)."""
import pytest
import torch
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fastseq

from conftest import backends_for
from test_attention_nn import assert_same_forward_backward, twin

BIASES = {"upper_left": (causal_upper_left, 0), "lower_right": (causal_lower_right, 1)}


def hidden(alignment, L, S):
    """torch's bool attn_mask (True = hidden) for the bias's rule."""
    shift = S - L if alignment == "lower_right" else 0
    return ~torch.ones(L, S, dtype=torch.bool).tril(shift)


def padding(N, S):
    """Row n hides its last n + 1 keys."""
    return torch.arange(S) >= S - 1 - torch.arange(N)[:, None]


CASES = {  # name: (constructor kwargs, forward kwargs builder)
    "kernel_path": ({}, lambda N, S: {"need_weights": False}),
    "with_padding": ({}, lambda N, S: {"need_weights": False, "key_padding_mask": padding(N, S)}),
    "with_bias_kv": ({"add_bias_kv": True}, lambda N, S: {"need_weights": False}),
    "with_weights": ({}, lambda N, S: {"need_weights": True}),
}


@pytest.mark.parametrize("alignment", sorted(BIASES))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", [b for b in backends_for("cpu") if b != "native"])
def test_multihead_attention_takes_a_causal_bias(alignment, case, backend):
    N, L, S, E, H = 2, 3, 7, 8, 2
    module_kwargs, call_kwargs = CASES[case]
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True, **module_kwargs)
    ours = twin(theirs, fastseq.nn.MultiheadAttention, E, H, batch_first=True, **module_kwargs)
    kwargs = call_kwargs(N, S)
    make_bias = BIASES[alignment][0]
    with fastseq.use_backend(backend):
        assert_same_forward_backward(
            theirs, ours, [torch.randn(N, L, E), torch.randn(N, S, E)],
            lambda m, q, kv: m(q, kv, kv, attn_mask=(
                make_bias(L, S) if m is ours else hidden(alignment, L, S)), **kwargs))


@pytest.mark.parametrize("alignment", sorted(BIASES))
def test_encoder_layer_takes_a_causal_bias_as_src_mask(alignment):
    L, E = 5, 8
    theirs = torch.nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0, batch_first=True)
    ours = twin(theirs, fastseq.nn.TransformerEncoderLayer, E, 2, 16, dropout=0.0,
                batch_first=True)
    make_bias = BIASES[alignment][0]
    assert_same_forward_backward(
        theirs, ours, [torch.randn(2, L, E)],
        lambda m, x: m(x, src_mask=make_bias(L, L) if m is ours else hidden(alignment, L, L)))


def test_a_causal_bias_of_other_lengths_is_refused_by_name():
    m = fastseq.nn.MultiheadAttention(8, 2, batch_first=True)
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 7, 8)
    with pytest.raises(AssertionError, match="CausalBias is taken as attn_mask for the "
                                             "query's 3 rows and the key's 7; got one for 3 and 6"):
        m(q, kv, kv, attn_mask=causal_lower_right(3, 6), need_weights=False)
    with pytest.raises(RuntimeError, match="as key_padding_mask"):
        m(q, kv, kv, key_padding_mask=causal_lower_right(3, 7), need_weights=False)
