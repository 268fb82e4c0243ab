"""Train a Transformer-XL and an LSTM language model from fastseq side by side.

    python -m fastseq.examples.train_lm [--steps 300] [--device cuda]

The corpus ships with Python: the source text of a few standard-library modules, read as bytes
(a character-level model, vocabulary 256). The text is cut into --batch parallel streams, as
the original Transformer-XL code batches a corpus; each step trains on the next --seq-len
bytes of every stream, the Transformer-XL carrying its memory (mem_len = seq_len) and the LSTM
its hidden state across steps, both detached. Prints the training loss and tokens/s of both
models every --log-every steps, and the validation loss at the end.
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
    """(train, validation) byte streams: the last 5% of the text is held out."""
    text = "\n".join(inspect.getsource(importlib.import_module(name)) for name in CORPUS_MODULES)
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long, device=device)
    split = int(len(data) * 0.95)
    return data[:split], data[split:]


def batchify(data: torch.Tensor, batch: int) -> torch.Tensor:
    """[len // batch, batch]: column b is the b-th consecutive slice of the text."""
    length = data.numel() // batch
    return data[:length * batch].view(batch, length).t().contiguous()


class TransformerXLLM(nn.Module):
    def __init__(self, d_model, layers, heads, seq_len):
        super().__init__()
        self.body = fastseq.nn.TransformerXL(256, layers, heads, d_model, d_model // heads,
                                             4 * d_model, dropout=0.1, dropatt=0.0,
                                             mem_len=seq_len)
        self.head = nn.Linear(d_model, 256)

    def forward(self, tokens, state):
        hidden, state = self.body(tokens, state)
        return self.head(hidden), state


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
    model.eval()
    state, total, count = None, 0.0, 0
    with torch.no_grad():
        for start in range(0, data.shape[0] - 1, seq_len):
            tokens = data[start:start + seq_len]
            targets = data[start + 1:start + 1 + seq_len]
            logits, state = model(tokens[:targets.shape[0]], state)
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
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    train, valid = load_corpus(device)
    train, valid = batchify(train, args.batch), batchify(valid, args.batch)
    models = {"transformer-xl": TransformerXLLM(args.d_model, args.layers, args.heads,
                                                args.seq_len),
              "lstm": LSTMLM(args.d_model, args.layers)}
    print(f"device {device}; corpus {train.numel()} training bytes in {args.batch} streams; "
          f"backends {fastseq.backends()['environment']}")
    results = {}
    for name, model in models.items():
        model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        state, tokens_seen, elapsed, loss = None, 0, 0.0, float("nan")
        for step in range(1, args.steps + 1):
            start = (step - 1) * args.seq_len % (train.shape[0] - args.seq_len - 1)
            if start < args.seq_len:
                state = None  # wrapped around the corpus: a fresh memory
            tokens = train[start:start + args.seq_len]
            targets = train[start + 1:start + 1 + args.seq_len]
            began = time.perf_counter()
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
                         "valid_loss": evaluate(model, valid, args.seq_len)}
    print("\nmodel            train loss  valid loss  tokens/s")
    for name, r in results.items():
        print(f"{name:<15} {r['train_loss']:10.3f}  {r['valid_loss']:10.3f}  "
              f"{r['tokens_per_s']:8.0f}")
    return results


if __name__ == "__main__":
    main()
