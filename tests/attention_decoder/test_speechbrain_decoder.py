"""fastseq.nn.AttentionalRNNDecoder against SpeechBrain's own AttentionalRNNDecoder (built from
its package, random weights): from_speechbrain gives its outputs, alignments and every gradient
(inputs, encoder states, each parameter) on every backend, for each cell and attention type,
with ragged lengths; its attention modules called on their own cache as SpeechBrain's do; the
step protocol equals the forward; beam search decodes it; bad arguments are refused by name."""
import pytest
import torch

import fastseq
from fastseq.nn import AttentionalRNNDecoder, beam_search, greedy_search

from conftest import TRITON_TEST_DEVICE

BACKENDS = ["triton", "torch", "reference"]
CASES = [("lstm", "content"), ("gru", "location"), ("rnn", "keyvalue"), ("lstm", "location")]


def backend_or_skip(backend):
    if backend == "triton" and fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("the Triton interpreter is off (a GPU run tests Triton on CUDA instead)")


def speechbrain_decoder(rnn_type, attn_type, dtype):
    sb_rnn = pytest.importorskip("speechbrain.nnet.RNN",
                                 reason="SpeechBrain is not installed (make test installs it)")
    torch.manual_seed(0)
    decoder = sb_rnn.AttentionalRNNDecoder(
        rnn_type=rnn_type, attn_type=attn_type, hidden_size=7, attn_dim=5, num_layers=2,
        enc_dim=6, input_size=3, channels=3, kernel_size=2, scaling=1.5)
    with torch.no_grad():  # peaked attention: the test sees the scores
        for p in decoder.parameters():
            p.mul_(2)
    return decoder.to(dtype).eval()


def inputs(dtype):
    torch.manual_seed(1)
    return (torch.randn(3, 5, 3, dtype=dtype), torch.randn(3, 9, 6, dtype=dtype),
            torch.tensor([1.0, 0.5, 0.8]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rnn_type,attn_type", CASES)
def test_decoder_equals_speechbrains(rnn_type, attn_type, backend):
    """Outputs, alignments and the gradients of inputs, encoder states and every parameter.
    SpeechBrain's location-aware attention makes its first alignment in float32 (its float64
    model fails there), so that case compares in float32."""
    backend_or_skip(backend)
    dtype = torch.float32 if attn_type == "location" else torch.float64
    tolerance = {} if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    theirs = speechbrain_decoder(rnn_type, attn_type, dtype)
    ours = AttentionalRNNDecoder.from_speechbrain(theirs, backend=backend)
    # The same names in the same order (an optimizer's state_dict indexes parameters by order).
    assert list(ours.state_dict()) == list(theirs.state_dict())
    results = []
    for model in (theirs, ours):
        leaves = [x.clone().requires_grad_(x.is_floating_point() and x.dim() == 3)
                  for x in inputs(dtype)]
        out, attn = model(*leaves)
        weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape)
        loss = (out * weights).sum() + attn[..., :4].square().sum()
        grads = torch.autograd.grad(loss, leaves[:2] + list(model.parameters()))
        results.append((out, attn, *grads))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("attn_type", ["content", "location", "keyvalue"])
def test_attention_modules_called_alone_cache_as_speechbrains(attn_type):
    """Three calls on one sequence, then reset() and a new one: SpeechBrain's module keeps
    its keys (and the last alignment) between calls; so does fastseq's."""
    theirs = speechbrain_decoder("gru", attn_type, torch.float32).attn
    ours = AttentionalRNNDecoder("gru", attn_type, 7, 5, 2, 6, 3, channels=3,
                                 kernel_size=2, scaling=1.5).attn
    ours.load_state_dict(theirs.state_dict())
    torch.manual_seed(2)
    enc_len = torch.tensor([9, 4, 6])
    for sequence in range(2):
        theirs.reset(), ours.reset()
        enc = torch.randn(3, 9, 6)
        for _ in range(3):
            dec = torch.randn(3, 7)
            for got, want in zip(ours(enc, enc_len, dec), theirs(enc, enc_len, dec)):
                torch.testing.assert_close(got, want)


@pytest.mark.parametrize("attn_type", ["location", "keyvalue"])
def test_steps_equal_the_forward(attn_type):
    torch.manual_seed(3)
    decoder = AttentionalRNNDecoder("lstm", attn_type, 7, 5, 2, 6, 3, channels=3, kernel_size=2,
                                    dtype=torch.float64).eval()
    inp, enc, _ = inputs(torch.float64)
    enc_len = torch.tensor([9, 5, 7])
    with torch.no_grad():
        expected, attn = decoder(inp, enc, enc_len / 9)
        state = decoder.init_state(enc, enc_len)
        for t in range(inp.shape[1]):
            out, state = decoder.step(inp[:, t], state)
            torch.testing.assert_close(out, expected[:, t])
            torch.testing.assert_close(state.alignment, attn[:, t].reshape(3, 9))


def test_beam_search_decodes_it():
    """fastseq's beam search over the SpeechBrain-form decoder: beam 1 is greedy, and each
    hypothesis's log-probability is what teacher forcing its tokens gives."""
    torch.manual_seed(4)
    decoder = AttentionalRNNDecoder("gru", "location", 7, 5, 1, 6, 4, channels=2, kernel_size=1,
                                    dtype=torch.float64).eval()
    embed = torch.nn.Embedding(5, 4, dtype=torch.float64)
    generator = torch.nn.Sequential(torch.nn.Linear(7, 5, dtype=torch.float64),
                                    torch.nn.LogSoftmax(-1))
    enc, enc_len = torch.randn(2, 8, 6, dtype=torch.float64), torch.tensor([8, 5])
    hyps = beam_search(decoder, decoder.init_state(enc, enc_len), embed, generator, bos=0, eos=4,
                       beam_size=3, max_length=6, n_best=2)
    greedy = greedy_search(decoder, decoder.init_state(enc, enc_len), embed, generator, bos=0,
                           eos=4, max_length=6)
    for b in range(2):
        best = beam_search(decoder, decoder.init_state(enc[b:b + 1], enc_len[b:b + 1]), embed,
                           generator, bos=0, eos=4, beam_size=1, max_length=6)[0][0]
        assert torch.equal(best.tokens, greedy[b].tokens)
        assert hyps[b][0].log_prob >= greedy[b].log_prob - 1e-12
        for hyp in hyps[b]:
            tokens = torch.cat([torch.zeros(1, dtype=torch.long), hyp.tokens])
            with torch.no_grad():
                out, _ = decoder(embed(tokens[None, :-1]), enc[b:b + 1],
                                 enc_len[b:b + 1] / 8)
                log_p = generator(out[0]).gather(1, tokens[1:, None]).sum()
            assert abs(float(log_p) - hyp.log_prob) < 1e-9


def test_bad_arguments_are_refused_by_name():
    error = fastseq.ops._checks.InputError
    with pytest.raises(error, match=r"rnn_type must be one of \('rnn', 'gru', 'lstm'\), got "
                                    r"'ligru'"):
        AttentionalRNNDecoder("ligru", "content", 4, 4, 1, 4, 4)
    with pytest.raises(error, match="attn_type must be one of"):
        AttentionalRNNDecoder("gru", "multihead", 4, 4, 1, 4, 4)
    with pytest.raises(error, match="'location' needs channels and kernel_size"):
        AttentionalRNNDecoder("gru", "location", 4, 4, 1, 4, 4)
    with pytest.raises(error, match=r"enc_states must be \[B, S, enc_dim\], got \[2, 3\]"):
        AttentionalRNNDecoder("gru", "content", 4, 4, 1, 4, 4).init_state(torch.randn(2, 3))
    with pytest.raises(error, match="a SpeechBrain AttentionalRNNDecoder, got Linear"):
        AttentionalRNNDecoder.from_speechbrain(torch.nn.Linear(2, 2))
