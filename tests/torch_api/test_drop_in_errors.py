"""Drop-in error types: for a bad input, each fastseq layer (on every backend) and
fastseq.ops.attention raise an exception of the type torch's layer or SDPA raises for the same
input, so `except RuntimeError` / assertRaises(AssertionError) written against torch (torch's
own tests among them) still catch it; fastseq's message stays its own, naming the argument.
The cases are PyTorch's own test_nn / MultiheadAttention / SDPA failure modes, in our words."""
import pytest
import torch
import torch.nn.functional as F

import fastseq

from conftest import backends_for

BACKENDS = backends_for("cpu")
X = torch.randn(3, 2, 4)
Q = torch.randn(2, 2, 5, 8)
E = torch.randn(2, 5, 8)

RNN_CASES = {
    "input width": ("LSTM", lambda m: m(torch.randn(3, 2, 3))),
    "4-D input": ("LSTM", lambda m: m(torch.randn(3, 2, 4, 1))),
    "h0 batch": ("LSTM", lambda m: m(X, (torch.randn(1, 3, 5), torch.randn(1, 3, 5)))),
    "h0 width": ("LSTM", lambda m: m(X, (torch.randn(1, 2, 6), torch.randn(1, 2, 5)))),
    "h0 layers": ("GRU", lambda m: m(X, torch.randn(2, 2, 5))),
    "input dtype": ("GRU", lambda m: m(X.double())),
    "rnn input width": ("RNN", lambda m: m(torch.randn(3, 2, 7))),
}
CELL_CASES = {
    "input width": ("LSTMCell", lambda m: m(torch.randn(2, 3))),
    "hidden batch": ("LSTMCell", lambda m: m(torch.randn(2, 4), (torch.randn(3, 5),) * 2)),
    "hidden width": ("GRUCell", lambda m: m(torch.randn(2, 4), torch.randn(2, 6))),
    "3-D input": ("GRUCell", lambda m: m(torch.randn(2, 2, 4))),
    "rnn cell width": ("RNNCell", lambda m: m(torch.randn(2, 9))),
}
MHA_CASES = {
    "query width": lambda m: m(torch.randn(2, 5, 6), E, E),
    "key/value lengths": lambda m: m(E, E, torch.randn(2, 6, 8)),
    "attn_mask shape": lambda m: m(E, E, E, attn_mask=torch.zeros(4, 4)),
    "key_padding_mask shape": lambda m: m(E, E, E,
                                          key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
    "4-D query": lambda m: m(*(torch.randn(1, 2, 5, 8),) * 3),
    "int attn_mask": lambda m: m(E, E, E, attn_mask=torch.zeros(5, 5, dtype=torch.int32)),
}
SDPA_CASES = {
    "1-D inputs": lambda f: f(torch.randn(8), torch.randn(8), torch.randn(8)),
    "mixed dtypes": lambda f: f(Q, Q.double(), Q),
    "head dims": lambda f: f(Q, torch.randn(2, 2, 5, 4), Q),
    "int mask": lambda f: f(Q, Q, Q, torch.ones(5, 5, dtype=torch.int64)),
}


def raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 (the type is what is compared)
        return error
    return None


def assert_same_kind(torch_call, fast_call):
    expected, got = raised(torch_call), raised(fast_call)
    assert expected is not None, "torch accepts this input: not a failure mode to compare"
    assert got is not None, f"fastseq accepted what torch refused ({expected!r})"
    assert isinstance(got, type(expected)), (
        f"torch raises {type(expected).__name__}, fastseq {type(got).__name__}: {got}")
    assert str(got) != "", "fastseq's error must say what is wrong"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(RNN_CASES) + [f"cell {c}" for c in CELL_CASES])
def test_recurrent_layers_and_cells_raise_torchs_types(case, backend):
    kind, call = CELL_CASES[case[5:]] if case.startswith("cell ") else RNN_CASES[case]
    assert_same_kind(lambda: call(getattr(torch.nn, kind)(4, 5)),
                     lambda: call(getattr(fastseq.nn, kind)(4, 5, backend=backend)))


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_raises_torchs_types(case):
    call = MHA_CASES[case]
    assert_same_kind(lambda: call(torch.nn.MultiheadAttention(8, 2, batch_first=True)),
                     lambda: call(fastseq.nn.MultiheadAttention(8, 2, batch_first=True)))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "native"])
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_attention_raises_sdpas_types(case, backend):
    call = SDPA_CASES[case]
    assert_same_kind(lambda: call(F.scaled_dot_product_attention),
                     lambda: call(lambda *a: fastseq.ops.attention(*a, backend=backend)))


def test_input_error_is_both_value_and_runtime_error():
    assert issubclass(fastseq.InputError, ValueError)
    assert issubclass(fastseq.InputError, RuntimeError)
