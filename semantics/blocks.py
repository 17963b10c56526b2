"""Validity of each building block as an executable, exact check.

A randomised transformation ``T`` is valid when ``E[⟦T(p)⟧] = ⟦p⟧`` as unnormalised measures. Where the
input is finite, these functions compute the left side *exactly* by enumerating ``T``'s own random
choices — a resampler's uniforms split at the finitely many breakpoints where its output changes, a
program's discrete choices — and running the real implementation on each outcome, in float64. Each
returns the largest absolute difference between the two measures (0 up to round-off when valid).
A deliberately wrong selection (any callable ``(u, log_weights) -> (ancestors, log_weights)``) can be
passed in place of a scheme name, so a wrong block can be shown to fail. Whole algorithms are checked
by :func:`semantics.check.check_exact`, which runs their real compiled loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from ppinfer.kernels.select import as_selection
from ppinfer.population import Population, collapse_from_uniform, spawn
from semantics.check import check_exact, selection_outcomes
from semantics.measure import Measure

__all__ = [
    "resample_outcomes",
    "check_resample",
    "check_spawn",
    "check_collapse",
    "check_proposal",
]


def resample_outcomes(scheme: Any, log_weights: Any) -> list[tuple[float, tuple[int, ...]]]:
    """The exact distribution of the ancestors drawn by ``scheme`` (a name or a selection) for
    ``log_weights``: a list of ``(probability, ancestors)``, from the selection's own outputs
    (:func:`semantics.check.selection_outcomes`)."""
    law: dict[tuple[int, ...], float] = {}
    for p, ancestors, _ in selection_outcomes(as_selection(scheme), log_weights):
        law[ancestors] = law.get(ancestors, 0.0) + p
    return [(p, a) for a, p in law.items()]


def check_resample(scheme: Any, log_weights: Any) -> float:
    """Exact check of ``E[⟦resample(pop)⟧] = ⟦pop⟧`` for a population whose particles are their own
    indices and whose weights are ``log_weights``, with ``scheme`` (a name or a selection): the
    ancestors AND the new weights the selection returns, on every cell of its uniforms. Returns the
    max abs error of the expected measure relative to the population's total mass ``Z = Σ exp(w)``
    (both measures are divided by ``Z`` in log space, so weights of any scale, e.g. ``[800, 799]``,
    check without overflow)."""
    lw = np.asarray(log_weights, np.float64)
    log_z = float(logsumexp(lw)) if np.isfinite(lw).any() else 0.0
    before = Measure.from_log(enumerate(lw - log_z))
    after = Measure(
        (a, p * math.exp(w - log_z))
        for p, ancestors, new in selection_outcomes(as_selection(scheme), lw)
        for a, w in zip(ancestors, new, strict=True)
    )
    return before.max_abs_diff(after)


def check_spawn(num_particles: int, log_weight: float = -0.7) -> float:
    """``⟦spawn(x, N, w)⟧ = exp(w) δ(x)`` (deterministic)."""
    with jax.enable_x64(True):
        pop = spawn(jnp.asarray(3.0), num_particles, log_weight)
        after = Measure(
            (float(x), math.exp(float(w))) for x, w in zip(pop.particles, pop.log_weights, strict=True)
        )
    return after.max_abs_diff(Measure([(3.0, math.exp(log_weight))]))


def check_collapse(log_weights: Any) -> float:
    """Exact check of ``E[⟦collapse(pop)⟧] = ⟦pop⟧`` (particles are their indices)."""
    lw = np.asarray(log_weights, np.float64)
    before = Measure.from_log(enumerate(lw))
    probs = np.exp(lw - logsumexp(lw))
    items = []
    with jax.enable_x64(True):
        for mid, length in _cells(np.cumsum(probs)):
            pop = Population(jnp.arange(len(lw)), jnp.asarray(lw))
            i, log_w = collapse_from_uniform(jnp.asarray([mid]), pop)
            items.append((int(i), length * math.exp(float(log_w))))
    return before.max_abs_diff(Measure(items))


def check_proposal(fn: Callable[..., Any], args: tuple, proposal: Callable[..., Any]) -> float:
    """Validity of weighting by ``p/q``: ``E_q[⟦run under q⟧] = ⟦fn⟧`` (exact, by enumeration):
    ppinfer's own engine (``simulate``, or a sequential program's ``advance``) runs ``fn`` under
    ``proposal`` — as ``pp.Importance(1, proposal=proposal)`` takes it — on every value of every
    choice (:func:`~semantics.check.check_exact`), against the reference :func:`denote` of
    ``fn``. Returns the largest absolute difference of the two measures."""
    from ppinfer.algorithms.importance import Importance

    return check_exact(fn, *args, algorithm=Importance(1, proposal=proposal)).max_abs_error


def _cells(cuts: np.ndarray) -> list[tuple[float, float]]:
    """``(midpoint, length)`` of the cells that ``cuts`` split ``[0, 1)`` into."""
    points = np.unique(np.clip(np.concatenate([[0.0, 1.0], np.asarray(cuts, np.float64)]), 0.0, 1.0))
    return [((a + b) / 2, b - a) for a, b in zip(points[:-1], points[1:], strict=True) if b - a > 0]
