"""The answer each reasoning algorithm must return, recomputed from its returned particles by the
rule its docstring states (written out here, not taken from ``ppinfer.reasoning``).

Votes are sums of floats: an answer whose total is below the largest by less than 1e-9 (relative)
may win by rounding; :func:`expected_answers` lists the answer the rule picks, then those."""

from __future__ import annotations

from typing import Any

import numpy as np

from ppinfer import reasoning as rs


def weighted_majority(answers: list[Any], votes: Any) -> list[Any]:
    """The answer with the largest total vote (``None`` answers do not vote; exact ties: the answer
    seen first), then any answer whose total falls short of it by rounding only (< 1e-9 of all
    votes); ``[None]`` when no particle has an answer."""
    tally: dict[Any, float] = {}
    for a, v in zip(answers, np.asarray(votes, np.float64), strict=True):
        if a is not None:
            tally[a] = tally.get(a, 0.0) + float(v)
    if not tally:
        return [None]
    best = max(tally.values())
    first = next(a for a, v in tally.items() if v == best)
    slack = 1e-9 * sum(tally.values())
    return [first] + [a for a, v in tally.items() if best - slack <= v < best]


def _normalised(log_weights: Any) -> np.ndarray:
    lw = np.asarray(log_weights, np.float64)
    w = np.exp(lw - lw[np.isfinite(lw)].max())
    return w / w.sum()


def _first_max(values: Any) -> int:
    return int(np.argmax(np.asarray(values)))


def _reward(fn: Any, question: str, solution: str) -> float:
    """A (possibly call-counting) reward's value, without counting the call."""
    return float(getattr(fn, "fn", fn)(question, solution))


def expected_answers(alg: Any, result: Any) -> list[Any]:
    """The answers ``alg``'s rule allows for ``result`` (its extras, weights and final PRM scores):
    one, unless votes tie up to rounding (module docstring)."""
    ex = result.extras
    answers, question, solutions = ex["answers"], ex["question"], ex["solutions"]
    scores = np.asarray(result.samples["score"], np.float64)
    log_weights = np.asarray(result.log_weights, np.float64)
    if isinstance(alg, rs.Sampling):  # the first sample's answer
        return [answers[0]]
    if isinstance(alg, rs.BestOfN):  # the highest outcome reward (ties: the first)
        return [answers[_first_max([_reward(alg.outcome, question, s) for s in solutions])]]
    if isinstance(alg, rs.MajorityVote):  # votes of 1, or of the reward
        if alg.reward is None:
            return weighted_majority(answers, np.ones(len(answers)))
        return weighted_majority(answers, [_reward(alg.reward, question, s) for s in solutions])
    if isinstance(alg, rs.BeamSearch):  # the highest final score (ties: the lowest index)
        return [answers[_first_max(scores)]]
    if alg.answer == "vote":  # Σ normalised weights per answer
        return weighted_majority(answers, _normalised(log_weights))
    if isinstance(alg, rs.ParticleGibbs):  # highest score, then highest weight, then lowest index
        return [answers[max(range(len(answers)), key=lambda i: (scores[i], log_weights[i], -i))]]
    if isinstance(alg, rs.FeynmanKacFilter):  # the highest weight
        return [answers[_first_max(log_weights)]]
    return [answers[_first_max(scores)]]  # ParticleFilter: the highest final score
