"""Whole models built from fastseq layers under torch.compile(fullgraph=True), trained: an LSTM
tagger, a Transformer encoder-decoder (torch's nn.Transformer after fastseq.patch) and a
Transformer-XL language model carrying its memory across segments. Three SGD steps through
the compiled model on one batch (forward and backward in the compiled graph, the optimizer step
eager) give the losses and parameters three eager steps give.

CPU: the aot_eager backend (the graphs, fakes and autograd registrations that inductor gets,
without its C++ compile time); CUDA: inductor."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastseq

from conftest import TRITON_TEST_DEVICE

pytestmark = [
    pytest.mark.usefixtures("on_triton_test_device"),
    pytest.mark.skipif(fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE) is not None,
                       reason="needs Triton (the interpreter on CPU)"),
]
COMPILER = "inductor" if TRITON_TEST_DEVICE.type == "cuda" else "aot_eager"
STEPS = 3


class LSTMTagger(torch.nn.Module):
    """Embedding, a 2-layer bidirectional LSTM over padded batches (lengths), a tag classifier."""

    def __init__(self, vocab=23, tags=5, dim=8, hidden=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.lstm = fastseq.nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.classify = torch.nn.Linear(2 * hidden, tags)

    def loss(self, tokens, lengths, tags):
        out, _ = self.lstm(self.embed(tokens), lengths=lengths)
        logits = self.classify(out)
        valid = torch.arange(tokens.shape[1]) < lengths[:, None]
        return F.cross_entropy(logits[valid], tags[valid])


class Seq2Seq(torch.nn.Module):
    """torch.nn.Transformer (2 encoder and 2 decoder layers) patched to fastseq's layers,
    between token embeddings and an output projection."""

    def __init__(self, vocab=19, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.transformer = torch.nn.Transformer(dim, 2, 2, 2, 32, dropout=0.0, batch_first=True)
        report = fastseq.patch(self.transformer)
        layers = [new for _, _, new in report.replaced if new.endswith("coderLayer")]
        assert len(layers) == 4 and not report.left, report  # 2 encoder + 2 decoder layers
        self.project = torch.nn.Linear(dim, vocab)

    def loss(self, src, tgt, src_padding):
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1] - 1)
        hidden = self.transformer(self.embed(src), self.embed(tgt[:, :-1]), tgt_mask=causal,
                                  src_key_padding_mask=src_padding,
                                  memory_key_padding_mask=src_padding, tgt_is_causal=True)
        return F.cross_entropy(self.project(hidden).flatten(0, 1), tgt[:, 1:].flatten())


class TransformerXLLM(torch.nn.Module):
    """TransformerXL with a tied output layer; loss over one segment given the last memory."""

    def __init__(self, vocab=17):
        super().__init__()
        self.model = fastseq.nn.TransformerXL(vocab, 2, 2, 16, 8, 24, mem_len=4)
        self.vocab = vocab

    def loss(self, tokens, targets, mems):
        hidden, new_mems = self.model(tokens, mems)
        logits = F.linear(hidden, self.model.word_emb.weight)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), new_mems


def train(model, batches, compiler=None):
    """STEPS SGD steps (compiled with `compiler` if given); returns the losses and the trained
    parameters."""
    model = copy.deepcopy(model)
    loss_fn = torch.compile(model.loss, fullgraph=True, backend=compiler) if compiler else model.loss
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, carried = [], None
    for batch in batches:
        if isinstance(model, TransformerXLLM):  # the memory of one step feeds the next
            loss, carried = loss_fn(*batch, carried)
        else:
            loss = loss_fn(*batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, dict(model.named_parameters())


def assert_same_training(model, batches, compiler=COMPILER):
    torch._dynamo.reset()
    with fastseq.use_backend("triton"):  # fastseq's kernels in both runs
        eager_losses, eager_params = train(model, batches)
        losses, params = train(model, batches, compiler)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    assert eager_losses[-1] < eager_losses[0]  # it trains (the same batch every step)
    for name, p in params.items():
        torch.testing.assert_close(p, eager_params[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("compiler", sorted({COMPILER, "inductor"}))
def test_lstm_tagger_trains_compiled(compiler):
    """Also through inductor on CPU (its C++ codegen around fastseq's ops: ~40 s with a cold
    inductor cache; all three models pass it in 117 s, so CI runs this one)."""
    lengths = torch.tensor([7, 3, 5])
    batches = [(torch.randint(0, 23, (3, 7)), lengths, torch.randint(0, 5, (3, 7)))] * STEPS
    assert_same_training(LSTMTagger(), batches, compiler)


def test_transformer_encoder_decoder_trains_compiled():
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    batches = [(torch.randint(0, 19, (2, 9)), torch.randint(0, 19, (2, 6)), padding)] * STEPS
    assert_same_training(Seq2Seq(), batches)


def test_transformer_xl_lm_trains_compiled_across_segments():
    # A stream of period 5: each segment repeats the last, its memory changing step to step.
    stream = torch.randint(0, 17, (5, 2)).repeat(2, 1)
    batches = [(stream[:5], stream[1:6])] * STEPS
    assert_same_training(TransformerXLLM(), batches)
