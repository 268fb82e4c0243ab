"""fastseq.nn.GlobalAttention and AttentionDecoder against OpenNMT-py's own modules (built from
its package, random weights) in float64 on every backend: outputs, alignments, final states and
every gradient, for LSTM and GRU, input feeding or not, each attention type, bidirectional
encoders and padded sources; the step protocol equal to the teacher-forced forward; beam search
equal to an exhaustive search on a tiny vocabulary, beam size one equal to greedy, the
penalties as OpenNMT-py defines them; bad arguments refused by name."""
import itertools
import math

import pytest
import torch

import fastseq
from fastseq.nn import AttentionDecoder, GlobalAttention, beam_search, greedy_search
from fastseq.nn.beam_search import coverage_penalty, length_penalty

from conftest import TRITON_TEST_DEVICE
from test_patch_third_party import _onmt_model

BACKENDS = ["triton", "torch", "reference"]


def backend_or_skip(backend):
    if backend == "triton" and fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None:
        pytest.skip("the Triton interpreter is off (a GPU run tests Triton on CUDA instead)")


def onmt_or_skip():
    return pytest.importorskip("onmt", reason="OpenNMT-py is not installed (make test installs it)")


def onmt_model(rnn_type, decoder_class, bidirectional, attn_type, coverage=False):
    """The integrations tests' OpenNMT-py encoder-decoder, its weights uniform in +-0.3 so the
    attention is far from uniform: (encoder, decoder) in float64, eval mode."""
    model = _onmt_model(rnn_type, decoder_class, bidirectional, attn_type, coverage,
                        param_init=0.3)
    return model.encoder.double().eval(), model.decoder.double().eval()


def onmt_inputs():
    torch.manual_seed(1)
    src = torch.randint(2, 11, (3, 7, 1))
    tgt = torch.randint(2, 13, (3, 6, 1))
    src_len = torch.tensor([7, 5, 6])
    src[1, 5:] = 1
    src[2, 6:] = 1
    return src, tgt, src_len


CASES = [("LSTM", "InputFeedRNNDecoder", True, "general"),
         ("GRU", "InputFeedRNNDecoder", False, "mlp"),
         ("LSTM", "InputFeedRNNDecoder", False, "dot"),
         ("LSTM", "StdRNNDecoder", False, "mlp"),
         ("GRU", "StdRNNDecoder", True, "general")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rnn_type,decoder_class,bidirectional,attn_type", CASES)
def test_decoder_equals_opennmt(rnn_type, decoder_class, bidirectional, attn_type, backend):
    """AttentionDecoder.from_opennmt(decoder) gives OpenNMT-py's decoder outputs, alignments
    and final hidden state, and the same gradients of the encoder states and every weight."""
    backend_or_skip(backend)
    encoder, decoder = onmt_model(rnn_type, decoder_class, bidirectional, attn_type)
    src, tgt, src_len = onmt_inputs()
    enc_out, enc_final, _ = encoder(src, src_len)
    enc_out = enc_out.detach().requires_grad_()
    decoder.init_state(src, enc_out, enc_final)
    expected, attns = decoder(tgt[:, :-1], enc_out, src_len=src_len)
    expected_hidden = decoder.state["hidden"]
    fast = AttentionDecoder.from_opennmt(decoder, backend=backend)
    state = fast.init_state(enc_out, src_len, enc_final)
    got, alignments, state = fast(decoder.embeddings(tgt[:, :-1]), state)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(alignments, attns["std"].transpose(0, 1)
                               if attns["std"].shape[0] != 3 else attns["std"],
                               rtol=1e-10, atol=1e-12)
    for g, e in zip(state.hidden, expected_hidden):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert got.abs().max() > 0.05  # not vacuous: the outputs are far from zero
    weights = torch.linspace(-1, 1, got.numel(), dtype=got.dtype).view(got.shape)
    ours = dict(fast.named_parameters())
    theirs = {name: p for name, p in decoder.named_parameters() if name in ours}
    assert set(theirs) == set(ours)
    names = sorted(ours)
    got_grads = torch.autograd.grad((got * weights).sum(), [enc_out] + [ours[n] for n in names],
                                    retain_graph=True)
    expected_grads = torch.autograd.grad((expected * weights).sum(),
                                         [enc_out] + [theirs[n] for n in names])
    for name, g, e in zip(["enc_out"] + names, got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("attn_type", ["dot", "general", "mlp"])
def test_global_attention_equals_opennmt(attn_type):
    """fastseq.nn.GlobalAttention loads OpenNMT-py's state_dict and gives its forward, one step
    and many, with a coverage vector too."""
    onmt_or_skip()
    from onmt.modules.global_attention import GlobalAttention as OnmtAttention
    torch.manual_seed(2)
    theirs = OnmtAttention(6, coverage=True, attn_type=attn_type).double()
    ours = GlobalAttention(6, coverage=True, attn_type=attn_type, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    enc = torch.randn(2, 5, 6, dtype=torch.float64)
    lengths = torch.tensor([5, 3])
    for src in (torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)):
        for got, want in zip(ours(src, enc, lengths), theirs(src, enc.clone(), lengths)):
            torch.testing.assert_close(got, want)
    coverage = torch.rand(2, 5, dtype=torch.float64)
    src = torch.randn(2, 6, dtype=torch.float64)
    for got, want in zip(ours(src, enc, lengths, coverage),
                         theirs(src, enc.clone(), lengths, coverage)):
        torch.testing.assert_close(got, want)


def small_decoder(rnn_type="GRU", attn_type="mlp", input_feed=True, coverage=False,
                  backend=None):
    torch.manual_seed(4)
    decoder = AttentionDecoder(rnn_type, 5, 6, 2, attn_type=attn_type, input_feed=input_feed,
                               coverage_attn=coverage, backend=backend, dtype=torch.float64)
    embed = torch.nn.Embedding(4, 5, dtype=torch.float64)
    generator = torch.nn.Sequential(torch.nn.Linear(6, 4, dtype=torch.float64),
                                    torch.nn.LogSoftmax(-1))
    with torch.no_grad():  # peaked distributions: beams and greedy differ
        for p in list(decoder.parameters()) + list(generator.parameters()):
            p.mul_(4)
    return decoder.eval(), embed, generator


@pytest.mark.parametrize("input_feed", [True, False])
def test_steps_equal_the_teacher_forced_forward(input_feed):
    decoder, embed, _ = small_decoder("LSTM", "general", input_feed)
    enc = torch.randn(2, 7, 6, dtype=torch.float64)
    lengths = torch.tensor([7, 3])
    tokens = torch.randint(0, 4, (2, 5))
    with torch.no_grad():
        expected, alignments, final = decoder(embed(tokens), decoder.init_state(enc, lengths))
        state, outs = decoder.init_state(enc, lengths), []
        for t in range(5):
            out, state = decoder.step(embed(tokens[:, t]), state)
            outs.append(out)
            torch.testing.assert_close(state.alignment, alignments[:, t])
    torch.testing.assert_close(torch.stack(outs, 1), expected)
    for g, e in zip(state.hidden, final.hidden):
        torch.testing.assert_close(g, e)


def _buffers(state):
    return [t.data_ptr() for t in (*state.hidden, state.input_feed, state.alignment,
                                   state.coverage)]


@pytest.mark.parametrize("input_feed", [True, False])
def test_decoding_writes_the_state_in_place(input_feed):
    """Without autograd, steps and beam reorders overwrite the state's buffers (their addresses
    stay: what a CUDA graph replays) and give what the same steps give under autograd, where
    the state's tensors are rebound instead; each step's output is a tensor of its own."""
    decoder, embed, _ = small_decoder("LSTM", "mlp", input_feed, coverage=input_feed)
    enc = torch.randn(2, 7, 6, dtype=torch.float64)
    lengths, tokens = torch.tensor([7, 3]), torch.randint(0, 4, (6, 4))
    reorders = [torch.tensor([2, 0, 0, 5, 3, 4]), torch.tensor([1, 1, 2, 3, 5, 5])]

    def decode(grad):
        with torch.set_grad_enabled(grad):
            state = decoder.init_state(enc.requires_grad_(grad), lengths).expand_beams(3)
            if not input_feed:
                state.coverage = torch.zeros(6, 7, dtype=torch.float64)  # a buffer to watch
            start, outs = _buffers(state), []
            for t in range(4):
                out, state = decoder.step(embed(tokens[:, t]).detach(), state)
                assert grad or out.data_ptr() != state.input_feed.data_ptr()
                outs.append(out)
                if t < 2:
                    state.reorder(reorders[t])
            assert (_buffers(state) == start) is not grad
            return [o.detach() for o in outs], state

    (in_place, state), (rebound, state_grad) = decode(False), decode(True)
    for got, want in zip(in_place, rebound):
        torch.testing.assert_close(got, want)
    for got, want in zip((*state.hidden, state.input_feed, state.alignment),
                         (*state_grad.hidden, state_grad.input_feed, state_grad.alignment)):
        torch.testing.assert_close(got, want.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: the GPU run")
def test_a_beam_step_captures_in_a_cuda_graph():
    """One decoding step of 4 sentences x 5 beams at H = 256 (embed the tokens, step, reorder
    to fixed survivors) captured once and replayed three times equals three eager steps, and
    makes no host sync."""
    torch.manual_seed(0)
    decoder = AttentionDecoder("LSTM", 128, 256, 2, attn_type="mlp", coverage_attn=True,
                               device="cuda").eval()
    embed = torch.nn.Embedding(100, 128, device="cuda")
    enc = torch.randn(4, 30, 256, device="cuda")
    lengths = torch.tensor([30, 17, 1, 25], device="cuda")
    tokens = torch.randint(0, 100, (20,), device="cuda")
    survivors = torch.randperm(20, device="cuda")

    def one_step(state):
        out, state = decoder.step(embed(tokens), state)
        state.reorder(survivors)
        return out

    with torch.no_grad():
        state = decoder.init_state(enc, lengths).expand_beams(5)
        eager = decoder.init_state(enc, lengths).expand_beams(5)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation) outside the capture
            one_step(decoder.init_state(enc, lengths).expand_beams(5))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = one_step(state)
        for _ in range(3):  # the capture ran nothing: both states start at the beginning
            tokens.random_(0, 100)
            graph.replay()
            torch.cuda.set_sync_debug_mode("error")
            try:
                expected = one_step(eager)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.testing.assert_close(captured, expected)
        for got, want in zip((*state.hidden, state.input_feed, state.coverage),
                             (*eager.hidden, eager.input_feed, eager.coverage)):
            torch.testing.assert_close(got, want)


def exhaustive_best(decoder, embed, generator, enc, lengths, b, bos, eos, max_length, n):
    """Every sequence of up to max_length tokens (ending at eos, or at max_length), scored
    token by token: the n best, best first. The sequences of one length are decoded side by
    side, one row each (one sequence at a time took 44 s of the interpreter's time)."""
    scored = []
    V = generator[0].out_features
    for length in range(1, max_length + 1):
        seqs = [seq for seq in itertools.product(range(V), repeat=length)
                if eos not in seq[:-1] and (length == max_length or seq[-1] == eos)]
        rows = len(seqs)
        state = decoder.init_state(enc[b:b + 1].expand(rows, -1, -1).contiguous(),
                                   lengths[b:b + 1].expand(rows).contiguous())
        tokens = torch.tensor(seqs)
        previous = torch.full((rows,), bos)
        totals = torch.zeros(rows, dtype=torch.float64)
        for t in range(length):
            out, state = decoder.step(embed(previous), state)
            totals += generator(out).gather(1, tokens[:, t:t + 1]).squeeze(1)
            previous = tokens[:, t]
        scored += [(total.item(), seq) for total, seq in zip(totals, seqs)]
    return sorted(scored, reverse=True)[:n]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_beam_search_equals_exhaustive_search(backend):
    """Without penalties, a beam as wide as the prefixes finds the exact n best sequences (the
    OpenNMT stopping rule is exact then: a prefix's log-probability bounds its extensions)."""
    backend_or_skip(backend)
    decoder, embed, generator = small_decoder(backend=backend)
    enc = torch.randn(2, 7, 6, dtype=torch.float64)
    lengths = torch.tensor([7, 4])
    with torch.no_grad():
        found = beam_search(decoder, decoder.init_state(enc, lengths), embed, generator,
                            bos=0, eos=3, beam_size=16, max_length=3, n_best=3)
        for b in range(2):
            expected = exhaustive_best(decoder, embed, generator, enc, lengths, b, 0, 3, 3, 3)
            got = [(h.log_prob, tuple(h.tokens.tolist())) for h in found[b]]
            assert [seq for _, seq in got] == [seq for _, seq in expected]
            for (g, _), (e, _) in zip(got, expected):
                assert math.isclose(g, e, rel_tol=1e-9, abs_tol=1e-12)


def test_beam_of_one_is_greedy_and_wider_beams_score_at_least_as_well():
    decoder, embed, generator = small_decoder()
    enc = torch.randn(3, 7, 6, dtype=torch.float64)
    lengths = torch.tensor([7, 4, 2])
    with torch.no_grad():
        greedy = greedy_search(decoder, decoder.init_state(enc, lengths), embed, generator,
                               bos=0, eos=3, max_length=6)
        state = decoder.init_state(enc, lengths)
        manual = []
        for b in range(3):
            st, token, seq = decoder.init_state(enc[b:b + 1], lengths[b:b + 1]), 0, []
            for _ in range(6):
                out, st = decoder.step(embed(torch.tensor([token])), st)
                token = generator(out)[0].argmax().item()
                seq.append(token)
                if token == 3:
                    break
            manual.append(seq)
        assert [h.tokens.tolist() for h in greedy] == manual
        wide = beam_search(decoder, state, embed, generator, bos=0, eos=3, beam_size=4,
                           max_length=6)
        assert all(w[0].log_prob >= g.log_prob - 1e-12 for w, g in zip(wide, greedy))


def test_penalties_are_opennmts():
    """OpenNMT-py's formulas (onmt/translate/penalties.py), checked against it when present."""
    cov = torch.tensor([[0.5, 1.5, 0.2], [1.0, 0.0, 3.0]])
    assert length_penalty("wu", 7, 0.6) == ((5 + 7) / 6.0) ** 0.6
    assert length_penalty("avg", 7, 1.0) == 7.0
    torch.testing.assert_close(coverage_penalty("summary", cov, 0.3),
                               0.3 * (cov.clamp(min=1).sum(-1) - 3))
    onmt = pytest.importorskip("onmt.translate.penalties")
    builder = onmt.PenaltyBuilder("wu", "wu")
    finite = torch.tensor([[0.5, 1.5, 0.2]])
    torch.testing.assert_close(coverage_penalty("wu", finite, 0.2),
                               builder.coverage_penalty(finite, 0.2))
    summary = onmt.PenaltyBuilder("summary", "avg")
    torch.testing.assert_close(coverage_penalty("summary", cov, 0.3),
                               summary.coverage_penalty(cov, 0.3))
    assert builder.length_penalty(7, 0.6) == length_penalty("wu", 7, 0.6)


def test_beam_search_with_penalties_ranks_by_the_rescored_score():
    decoder, embed, generator = small_decoder(coverage=True)
    enc = torch.randn(2, 7, 6, dtype=torch.float64)
    lengths = torch.tensor([7, 5])
    with torch.no_grad():
        found = beam_search(decoder, decoder.init_state(enc, lengths), embed, generator,
                            bos=0, eos=3, beam_size=5, max_length=5, n_best=3,
                            length_penalty_kind="wu", alpha=0.6,
                            coverage_penalty_kind="summary", beta=0.2)
    for hyps in found:
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            lp = length_penalty("wu", len(h.tokens), 0.6)
            cp = coverage_penalty("summary", h.alignment.sum(0), 0.2).item()
            assert math.isclose(h.score, h.log_prob / lp - cp, rel_tol=1e-9)
            assert h.alignment.shape == (len(h.tokens), 7)


def test_bad_arguments_are_refused_by_name():
    error = fastseq.ops._checks.InputError
    with pytest.raises(error, match="rnn_type must be 'LSTM' or 'GRU'"):
        AttentionDecoder("RNN", 4, 4)
    with pytest.raises(error, match="attn_type must be one of"):
        GlobalAttention(4, attn_type="bilinear")
    with pytest.raises(error, match="attn_func 'sparsemax' is not supported"):
        GlobalAttention(4, attn_func="sparsemax")
    decoder, embed, generator = small_decoder()
    with pytest.raises(error, match=r"enc_out must be \[B, S, hidden_size=6\]"):
        decoder.init_state(torch.randn(2, 3, 5, dtype=torch.float64))
    with pytest.raises(error, match=r"enc_final must give h of \[num_layers=2, B=2"):
        decoder.init_state(torch.randn(2, 3, 6, dtype=torch.float64),
                           enc_final=torch.randn(1, 2, 6, dtype=torch.float64))
    state = decoder.init_state(torch.randn(2, 3, 6, dtype=torch.float64))
    with pytest.raises(error, match="length_penalty_kind must be one of"):
        beam_search(decoder, state, embed, generator, bos=0, eos=3, length_penalty_kind="gnmt")


@pytest.mark.parametrize("input_feed", [True, False])
def test_decoder_compiles_fullgraph(input_feed):
    """The teacher-forced decoder (its state a dataclass, the loop over steps unrolled) under
    torch.compile(fullgraph=True): the same gradients of the encoder states."""
    backend_or_skip("triton")
    torch.manual_seed(0)
    decoder = AttentionDecoder("LSTM", 5, 6, 2, attn_type="mlp", input_feed=input_feed,
                               backend="triton").eval()
    enc = torch.randn(2, 7, 6, requires_grad=True)
    lengths, emb = torch.tensor([7, 3]), torch.randn(2, 4, 5)

    def loss(enc, emb):
        out, align, _ = decoder(emb, decoder.init_state(enc, lengths))
        return out.square().sum() + align[..., :2].sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(torch.autograd.grad(compiled(enc, emb), enc)[0],
                               torch.autograd.grad(loss(enc, emb), enc)[0])
