"""Train a Transformer-XL and an LSTM language model from fastseq side by side.

    python -m fastseq.examples.train_lm [--steps 300] [--device cuda]

The corpus ships with Python: the source text of a few standard-library modules, read as bytes
(a character-level model, vocabulary 256, ids ranked by frequency so the adaptive softmax's
cutoffs split frequent from rare bytes, as the original code's vocabularies are sorted). The
text is cut into --batch parallel streams, as the original Transformer-XL code batches a
corpus; each step trains on the next --seq-len bytes of every stream. The Transformer-XL is
the full model (fastseq.nn.TransformerXLLM: adaptive embedding and softmax, called as the
original's `loss, *mems = model(data, target, *mems)`), carrying its memory (mem_len =
seq_len); the LSTM carries its hidden state; both detached. Prints the training loss and
tokens/s of both models every --log-every steps, and the validation loss at the end.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import time

import torch
from torch import nn

import fastseq

CORPUS_MODULES = ["argparse", "textwrap", "collections", "json.decoder", "difflib", "inspect"]


def load_corpus(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) streams of byte ids ranked by frequency (0: the most frequent): the
    last 5% of the text is held out."""
    text = "\n".join(inspect.getsource(importlib.import_module(name)) for name in CORPUS_MODULES)
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    rank = torch.empty(256, dtype=torch.long)
    rank[torch.bincount(data, minlength=256).argsort(descending=True, stable=True)] = \
        torch.arange(256)
    data = rank[data].to(device)
    split = int(len(data) * 0.95)
    return data[:split], data[split:]


def batchify(data: torch.Tensor, batch: int) -> torch.Tensor:
    """[len // batch, batch]: column b is the b-th consecutive slice of the text."""
    length = data.numel() // batch
    return data[:length * batch].view(batch, length).t().contiguous()


def transformer_xl(d_model, layers, heads, seq_len, mem_len=None, clamp_len=-1):
    """The full model: an adaptive embedding and softmax over the 256 ranked bytes (the 32
    most frequent in the head, then 64 and 160 in tails of half and quarter width)."""
    return fastseq.nn.TransformerXLLM(
        256, layers, heads, d_model, d_model // heads, 4 * d_model, dropout=0.1, dropatt=0.0,
        d_embed=d_model, div_val=2, cutoffs=[32, 96], tie_projs=[False, True, True],
        tgt_len=seq_len, mem_len=seq_len if mem_len is None else mem_len, clamp_len=clamp_len)


def xl_loss(model, tokens, targets, mems):
    """The mean NLL of a segment and the new memories, in the original's call form."""
    loss, *mems = model(tokens, targets, *(mems or ()))
    return loss.mean(), mems


class LSTMLM(nn.Module):
    def __init__(self, d_model, layers):
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.body = fastseq.nn.LSTM(d_model, d_model, layers, dropout=0.1)
        self.head = nn.Linear(d_model, 256)

    def forward(self, tokens, state):
        hidden, state = self.body(self.embed(tokens), state)
        return self.head(hidden), tuple(s.detach() for s in state)


def evaluate(model, data, seq_len):
    """The mean NLL (nats a byte) over the stream, segment by segment with the carried state."""
    model.eval()
    xl = isinstance(model, fastseq.nn.TransformerXLLM)
    state = model.init_mems() if xl else None
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, data.shape[0] - 1, seq_len):
            targets = data[start + 1:start + 1 + seq_len]
            tokens = data[start:start + targets.shape[0]]
            if xl:
                loss, state = xl_loss(model, tokens, targets, state)
                total += loss.item() * targets.numel()
            else:
                logits, state = model(tokens, state)
                total += nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                     reduction="sum").item()
            count += targets.numel()
    model.train()
    return total / max(count, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="transformer-xl,lstm",
                        help="comma-separated: transformer-xl, lstm")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    train, valid = load_corpus(device)
    train, valid = batchify(train, args.batch), batchify(valid, args.batch)
    builders = {"transformer-xl": lambda: transformer_xl(args.d_model, args.layers, args.heads,
                                                         args.seq_len),
                "lstm": lambda: LSTMLM(args.d_model, args.layers)}
    models = {name: builders[name]() for name in args.models.split(",")}
    print(f"device {device}; corpus {train.numel()} training bytes in {args.batch} streams; "
          f"backends {fastseq.backends()['environment']}")
    results = {}
    for name, model in models.items():
        model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        xl = name == "transformer-xl"
        fresh = model.init_mems if xl else (lambda: None)
        state, tokens_seen, elapsed, loss = fresh(), 0, 0.0, float("nan")
        for step in range(1, args.steps + 1):
            start = (step - 1) * args.seq_len % (train.shape[0] - args.seq_len - 1)
            if start < args.seq_len:
                state = fresh()  # wrapped around the corpus: a fresh memory
            tokens = train[start:start + args.seq_len]
            targets = train[start + 1:start + 1 + args.seq_len]
            began = time.perf_counter()
            if xl:
                loss_t, state = xl_loss(model, tokens, targets, state)
            else:
                logits, state = model(tokens, state)
                loss_t = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimizer.zero_grad()
            loss_t.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - began
            tokens_seen += tokens.numel()
            loss = loss_t.item()
            if step % args.log_every == 0 or step == args.steps:
                print(f"{name:>15} step {step:5d}  loss {loss:6.3f}  "
                      f"{tokens_seen / elapsed:10.0f} tokens/s", flush=True)
        results[name] = {"train_loss": loss, "tokens_per_s": tokens_seen / elapsed,
                         "valid_loss": evaluate(model, valid, args.seq_len), "model": model}
    print("\nmodel            train loss  valid loss  tokens/s")
    for name, r in results.items():
        print(f"{name:<15} {r['train_loss']:10.3f}  {r['valid_loss']:10.3f}  "
              f"{r['tokens_per_s']:8.0f}")
    return results


if __name__ == "__main__":
    main()
