"""Batched beam search over the step protocol, with OpenNMT-py's penalties
(onmt/translate/beam_search.py, penalties.py; Wu et al. 2016).

Rows are (sentence, beam) pairs, sentence-major. Each step ranks every (beam, token)
continuation of a sentence by its total log-probability divided by the length penalty
lp(len): "none" 1, "avg" len^alpha, "wu" ((5 + len) / 6)^alpha; keeps the top `beam_size`,
reorders the decoder's state to the survivors in place (`state.reorder`), and moves a
continuation ending in `eos` to the sentence's finished list with the score
log P / lp(len) - cp, cp the coverage penalty of its summed alignments (OpenNMT-py's default,
non-stepwise use): "none" 0, "wu" -beta sum_j log(min(coverage_j, 1)), "summary"
beta sum_j (max(coverage_j, 1) - 1). A sentence is done when its best continuation is
finished (OpenNMT-py's rule) or at max_length, where its live beams are finished as they are.
The encoder states stay one copy per sentence (the state keeps them; the attention takes each
sentence's beams as its queries).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops._checks import InputError

LENGTH_PENALTIES = ("none", "avg", "wu")
COVERAGE_PENALTIES = ("none", "wu", "summary")


@dataclasses.dataclass
class Hypothesis:
    tokens: Tensor        # [length] token ids (eos included when it ended there)
    score: float          # log P / lp(length) - cp(coverage)
    log_prob: float       # log P
    alignment: Tensor     # [length, S] the attention of each step


def length_penalty(kind: str, length: int, alpha: float) -> float:
    if kind == "wu":
        return ((5 + length) / 6.0) ** alpha
    if kind == "avg":
        return float(length) ** alpha
    return 1.0


def coverage_penalty(kind: str, coverage: Tensor, beta: float) -> Tensor:
    """[...] penalties of coverages [..., S]."""
    if kind == "wu":
        return -beta * coverage.clamp(max=1.0).log().sum(-1)
    if kind == "summary":
        return beta * (coverage.clamp(min=1.0).sum(-1) - coverage.shape[-1])
    return coverage.new_zeros(coverage.shape[:-1])


@torch.no_grad()
def beam_search(decoder, state, embed: Callable[[Tensor], Tensor],
                generator: Callable[[Tensor], Tensor], *, bos: int, eos: int,
                beam_size: int = 5, max_length: int = 100, min_length: int = 0,
                n_best: int = 1, length_penalty_kind: str = "none", alpha: float = 0.0,
                coverage_penalty_kind: str = "none", beta: float = 0.0
                ) -> list[list[Hypothesis]]:
    """decoder: a step-protocol layer whose state has expand_beams(k), reorder(index) and the
    last step's `alignment` [rows, S] (fastseq.nn.AttentionDecoder); state: its state for B
    sentences (one row each); embed(token ids [rows]) -> [rows, E]; generator(decoder output
    [rows, H]) -> log-probabilities [rows, V]. Returns, per sentence, its n_best hypotheses,
    best first."""
    if length_penalty_kind not in LENGTH_PENALTIES or \
            coverage_penalty_kind not in COVERAGE_PENALTIES:
        raise InputError(f"fastseq.nn.beam_search: length_penalty_kind must be one of "
                         f"{LENGTH_PENALTIES} and coverage_penalty_kind one of "
                         f"{COVERAGE_PENALTIES}, got {length_penalty_kind!r}, "
                         f"{coverage_penalty_kind!r}")
    if beam_size < 1 or not 1 <= n_best <= beam_size or max_length < 1:
        raise InputError(f"fastseq.nn.beam_search: beam_size >= 1, 1 <= n_best <= beam_size "
                         f"and max_length >= 1 expected, got {beam_size}, {n_best}, "
                         f"{max_length}")
    B = state.enc_out.shape[0]
    K = beam_size
    device = state.enc_out.device
    state = state.expand_beams(K)
    # Only each sentence's first beam is live at the start (all K rows are the same).
    log_probs = torch.full((B, K), float("-inf"), dtype=torch.float64, device=device)
    log_probs[:, 0] = 0.0
    tokens = torch.full((B * K, 1), bos, dtype=torch.long, device=device)
    alignments = None   # [B * K, steps, S]
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B
    offsets = (torch.arange(B, device=device) * K)[:, None]
    for step in range(max_length):
        out, state = decoder.step(embed(tokens[:, -1]), state)
        step_lp = generator(out).to(torch.float64)                      # [B * K, V]
        V = step_lp.shape[-1]
        if step + 1 < min_length:
            step_lp[:, eos] = float("-inf")
        total = (log_probs.reshape(B * K, 1) + step_lp).view(B, K * V)
        lp = length_penalty(length_penalty_kind, step + 1, alpha)
        flat = (total / lp).topk(K, dim=1).indices                       # [B, K]
        origin = flat // V + offsets                                     # rows of the survivors
        chosen = flat % V
        select = origin.reshape(-1)
        state.reorder(select)
        tokens = torch.cat([tokens[select], chosen.reshape(-1, 1)], 1)
        alignments = (state.alignment[:, None] if alignments is None
                      else torch.cat([alignments[select], state.alignment[:, None]], 1))
        log_probs = total.gather(1, flat)                                # log P of survivors
        is_eos = chosen == eos
        last = step + 1 == max_length
        penalties = coverage_penalty(coverage_penalty_kind, alignments.sum(1), beta)
        # One host read a step: which continuations ended, and their scores.
        ended, totals, cps = is_eos.tolist(), log_probs.tolist(), penalties.view(B, K).tolist()
        for b in range(B):
            if done[b]:
                continue
            for k in range(K):
                if (ended[b][k] or last) and totals[b][k] != float("-inf"):
                    row = b * K + k
                    finished[b].append(Hypothesis(tokens[row, 1:].clone(),
                                                  totals[b][k] / lp - cps[b][k], totals[b][k],
                                                  alignments[row].clone()))
            done[b] = ended[b][0] or last
        log_probs = log_probs.masked_fill(is_eos, float("-inf"))         # finished rows stop
        if all(done):
            break
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:n_best] for hyps in finished]


def greedy_search(decoder, state, embed, generator, *, bos: int, eos: int,
                  max_length: int = 100, min_length: int = 0) -> list[Hypothesis]:
    """The argmax token at each step until eos or max_length: beam search with one beam."""
    return [hyps[0] for hyps in beam_search(decoder, state, embed, generator, bos=bos, eos=eos,
                                             beam_size=1, max_length=max_length,
                                             min_length=min_length)]
