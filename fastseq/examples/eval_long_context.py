"""Perplexity over a long stream with an evaluation memory longer than training's.

    python -m fastseq.examples.eval_long_context [--steps 300] [--device cuda]

Transformer-XL's evaluation reuses the memory of every earlier segment, and nothing ties its
length to training's: the original evaluates WikiText-103 with mem_len 1600 and clamp_len 1000
after training with 150 and 150 (distances past clamp_len share its position embedding, the
ones training never saw). This trains the byte-level model of fastseq.examples.train_lm
(mem_len = seq_len), then scores the held-out stream segment by segment with memories of
0, 1, 4 and 16 segments (clamp_len = the training span), printing nats a byte and perplexity:
the memory's effect on the same weights.
"""
from __future__ import annotations

import argparse
import math

import torch

from . import train_lm


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--memories", default="0,1,4,16",
                        help="evaluation memories, in segments of --seq-len tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    trained = train_lm.main(["--steps", str(args.steps), "--seq-len", str(args.seq_len),
                             "--batch", str(args.batch), "--d-model", str(args.d_model),
                             "--device", args.device, "--models", "transformer-xl",
                             "--log-every", str(max(args.steps, 1))])
    model = trained["transformer-xl"]["model"]
    _, valid = train_lm.load_corpus(torch.device(args.device))
    valid = train_lm.batchify(valid, args.batch)
    span = args.seq_len * 2  # the longest distance training saw: memory + segment
    results = {}
    print("\nevaluation memory (tokens)  clamp_len  nats/byte  perplexity")
    for segments in (int(m) for m in args.memories.split(",")):
        model.mem_len, model.clamp_len = segments * args.seq_len, span
        loss = train_lm.evaluate(model, valid, args.seq_len)
        results[model.mem_len] = loss
        print(f"{model.mem_len:>26}  {span:>9}  {loss:9.4f}  {math.exp(loss):10.3f}")
    return results


if __name__ == "__main__":
    main()
