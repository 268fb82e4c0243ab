"""Train a small RNN encoder-decoder with attention to reverse sequences, then decode greedily
and with beam search.

    python -m fastseq.examples.train_seq2seq [--steps 400] [--device cuda]

The task needs attention: sequences of 8 to --max-len random symbols are reversed, longer than
the model's hidden state could hold symbol by symbol at this width. The encoder is a
bidirectional fastseq.nn.LSTM; the decoder OpenNMT-py's input-feeding LSTM decoder with
"general" attention (fastseq.nn.AttentionDecoder: fused cells, fused global attention). Prints
the training loss, then the exact-match accuracy and token accuracy of greedy and beam-5
decoding on held-out sequences.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fastseq

PAD, BOS, EOS, SYMBOLS = 0, 1, 2, 3  # symbols are ids 3 .. 3 + vocab - 1


class Seq2Seq(nn.Module):
    def __init__(self, vocab: int, d_model: int):
        super().__init__()
        self.src_embed = nn.Embedding(SYMBOLS + vocab, d_model, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(SYMBOLS + vocab, d_model, padding_idx=PAD)
        self.encoder = fastseq.nn.LSTM(d_model, d_model // 2, batch_first=True,
                                       bidirectional=True)
        self.decoder = fastseq.nn.AttentionDecoder("LSTM", d_model, d_model, 1,
                                                   attn_type="general",
                                                   bidirectional_encoder=True)
        self.generator = nn.Sequential(nn.Linear(d_model, SYMBOLS + vocab), nn.LogSoftmax(-1))

    def encode(self, src, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.src_embed(src), lengths.cpu(),
                                                   batch_first=True, enforce_sorted=False)
        out, final = self.encoder(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                  total_length=src.shape[1])
        return self.decoder.init_state(out, lengths, final)

    def forward(self, src, lengths, tgt_in):
        outputs, _, _ = self.decoder(self.tgt_embed(tgt_in), self.encode(src, lengths))
        return self.generator(outputs)


def batch(n, vocab, max_len, generator, device):
    """Random sequences (lengths 8 .. max_len) and their reversals: (src, lengths, target
    input (BOS + reversed), target output (reversed + EOS)), padded."""
    lengths = torch.randint(8, max_len + 1, (n,), generator=generator)
    src = torch.full((n, max_len), PAD, dtype=torch.long)
    tgt_in = torch.full((n, max_len + 1), PAD, dtype=torch.long)
    tgt_out = torch.full((n, max_len + 1), PAD, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        seq = torch.randint(SYMBOLS, SYMBOLS + vocab, (length,), generator=generator)
        src[i, :length] = seq
        tgt_in[i, 0], tgt_in[i, 1:length + 1] = BOS, seq.flip(0)
        tgt_out[i, :length], tgt_out[i, length] = seq.flip(0), EOS
    return src.to(device), lengths.to(device), tgt_in.to(device), tgt_out.to(device)


@torch.no_grad()
def evaluate(model, src, lengths, tgt_out, beam_size):
    """(exact-match accuracy, token accuracy) of beam_size decoding (1: greedy)."""
    model.eval()
    found = fastseq.nn.beam_search(model.decoder, model.encode(src, lengths), model.tgt_embed,
                                   model.generator, bos=BOS, eos=EOS, beam_size=beam_size,
                                   max_length=src.shape[1] + 2)
    exact, right, total = 0, 0, 0
    for hyps, want, length in zip(found, tgt_out, lengths.tolist()):
        want = want[:length + 1]
        got = hyps[0].tokens
        exact += int(got.shape == want.shape and bool((got == want).all()))
        n = min(len(got), len(want))
        right += int((got[:n] == want[:n]).sum())
        total += len(want)
    model.train()
    return exact / len(found), right / total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=10)
    parser.add_argument("--max-len", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    data = torch.Generator().manual_seed(1)
    model = Seq2Seq(args.vocab, args.d_model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.NLLLoss(ignore_index=PAD)
    curve, began = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        src, lengths, tgt_in, tgt_out = batch(args.batch, args.vocab, args.max_len, data, device)
        log_probs = model(src, lengths, tgt_in)
        loss = loss_fn(log_probs.flatten(0, 1), tgt_out.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps:
            curve.append((step, loss.item()))
            print(f"step {step:5d}  loss {loss.item():6.3f}  "
                  f"({time.perf_counter() - began:5.1f} s)", flush=True)
    held_out = batch(args.eval_size, args.vocab, args.max_len,
                     torch.Generator().manual_seed(2), device)
    src, lengths, _, tgt_out = held_out
    results = {"curve": curve, "model": model}
    for name, beam in (("greedy", 1), ("beam-5", 5)):
        exact, tokens = evaluate(model, src, lengths, tgt_out, beam)
        results[name] = {"exact": exact, "tokens": tokens}
        print(f"{name:>7}: exact match {exact:6.1%}  token accuracy {tokens:6.1%}")
    return results


if __name__ == "__main__":
    main()
