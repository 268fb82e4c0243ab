"""Train a Block-Recurrent Transformer and a Transformer-XL language model side by side on the
same character data as fastseq.examples.train_lm.

    python -m fastseq.examples.train_block_recurrent [--steps 300] [--device cuda]
           [--curves curves.csv]

The corpus, its byte ranking and the --batch parallel streams are train_lm's. Each step trains
both models on the next --seq-len bytes of every stream with their carried memory (truncated
backpropagation per segment, as both papers train): the Block-Recurrent Transformer
(fastseq.nn.BlockRecurrentTransformerLM, blocks of --window tokens, --states state vectors in
the recurrent layer) carries the previous block's keys and values and its state; the
Transformer-XL (train_lm's model) carries mem_len = seq-len positions. Prints the training
loss (mean over the last --log-every steps) and tokens/s of both, the validation loss at the
end, and writes the loss curves as CSV with --curves.
"""
from __future__ import annotations

import argparse
import time

import torch

import fastseq
from fastseq.examples.train_lm import batchify, load_corpus, transformer_xl, xl_loss


def block_recurrent(d_model, layers, heads, window, states):
    """The paper's layer stack at small size: the recurrent layer third from the top (the
    original's recurrent_layer_indices=(-3,)), or the first of a shallower stack; the bias gate
    in the dual configuration (its "fixed:dual", the paper's best at its cost)."""
    return fastseq.nn.BlockRecurrentTransformerLM(
        256, layers, d_model, heads, d_model // heads, 4 * d_model, window, states,
        recurrent_layers=(-3 if layers >= 3 else 0,), gate="bias", configuration="dual",
        dropout=0.1)


def segment_loss(name, model, tokens, targets, memory):
    """Mean NLL of one segment ([seq_len, batch] streams) and the carried memory."""
    if name == "transformer-xl":
        return xl_loss(model, tokens, targets, memory)
    loss, memory = model(tokens.t(), memory, targets=targets.t())
    return loss.mean(), memory


def evaluate(name, model, data, seq_len):
    """Mean NLL (nats a byte) over the validation streams, segment by segment."""
    model.eval()
    memory = model.init_mems() if name == "transformer-xl" else None
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, data.shape[0] - 1, seq_len):
            targets = data[start + 1:start + 1 + seq_len]
            tokens = data[start:start + targets.shape[0]]
            loss, memory = segment_loss(name, model, tokens, targets, memory)
            total += loss.item() * targets.numel()
            count += targets.numel()
    model.train()
    return total / max(count, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--states", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="block-recurrent,transformer-xl",
                        help="comma-separated: block-recurrent, transformer-xl")
    parser.add_argument("--curves", default=None, help="write step,model,loss rows here (CSV)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    train, valid = load_corpus(device)
    train, valid = batchify(train, args.batch), batchify(valid, args.batch)
    builders = {
        "block-recurrent": lambda: block_recurrent(args.d_model, args.layers, args.heads,
                                                   args.window, args.states),
        "transformer-xl": lambda: transformer_xl(args.d_model, args.layers, args.heads,
                                                 args.seq_len)}
    print(f"device {device}; corpus {train.numel()} training bytes in {args.batch} streams")
    results, curves = {}, []
    for name in args.models.split(","):
        model = builders[name]().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        fresh = model.init_mems if name == "transformer-xl" else (lambda: None)
        memory, tokens_seen, elapsed, window_losses = fresh(), 0, 0.0, []
        for step in range(1, args.steps + 1):
            start = (step - 1) * args.seq_len % (train.shape[0] - args.seq_len - 1)
            if start < args.seq_len:
                memory = fresh()  # wrapped around the corpus: a fresh memory
            tokens = train[start:start + args.seq_len]
            targets = train[start + 1:start + 1 + args.seq_len]
            began = time.perf_counter()
            loss, memory = segment_loss(name, model, tokens, targets, memory)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - began
            tokens_seen += tokens.numel()
            window_losses.append(loss.item())
            if step % args.log_every == 0 or step == args.steps:
                mean = sum(window_losses) / len(window_losses)
                curves.append((step, name, mean))
                window_losses = []
                print(f"{name:>16} step {step:5d}  loss {mean:6.3f}  "
                      f"{tokens_seen / elapsed:10.0f} tokens/s", flush=True)
        results[name] = {"train_loss": curves[-1][2], "tokens_per_s": tokens_seen / elapsed,
                         "valid_loss": evaluate(name, model, valid, args.seq_len),
                         "model": model}
    print("\nmodel             train loss  valid loss  tokens/s")
    for name, r in results.items():
        print(f"{name:<16} {r['train_loss']:10.3f}  {r['valid_loss']:10.3f}  "
              f"{r['tokens_per_s']:8.0f}")
    if args.curves:
        with open(args.curves, "w") as out:
            out.write("step,model,loss\n")
            out.writelines(f"{step},{name},{loss:.4f}\n" for step, name, loss in curves)
    return results


if __name__ == "__main__":
    main()
