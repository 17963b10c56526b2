"""Validity of each building block as an executable, exact check.

A randomised transformation ``T`` is valid when ``E[⟦T(p)⟧] = ⟦p⟧`` as unnormalised measures. Where the
input is finite, these functions compute the left side *exactly* by enumerating ``T``'s own random
choices — a resampler's uniforms split at the finitely many breakpoints where its output changes, a
program's discrete choices — and running the real implementation on each outcome, in float64. Each
returns the largest absolute difference between the two measures (0 up to round-off when valid).
Implementations can be swapped in through the ``*_fn`` arguments, so a deliberately wrong block can be
shown to fail.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from ppinfer.algorithms.enumerate import enumerate_runs
from ppinfer.population import Population, collapse_from_uniform, ess, spawn
from ppinfer.program import SequentialProgram
from ppinfer.resample import ancestors_from_uniforms, uniforms_shape
from semantics.denote import denote
from semantics.measure import Measure, outcome_key

__all__ = [
    "resample_outcomes",
    "check_resample",
    "check_spawn",
    "check_collapse",
    "check_proposal",
    "exact_smc",
    "check_smc",
]

AncestorsFn = Callable[[str, jax.Array, jax.Array], jax.Array]


def resample_outcomes(
    scheme: str, log_weights: Any, ancestors_fn: AncestorsFn = ancestors_from_uniforms
) -> list[tuple[float, tuple[int, ...]]]:
    """The exact distribution of ``ancestors_fn(scheme, U, log_weights)`` over ``U ~ Uniform``:
    a list of ``(probability, ancestors)``. Each coordinate of ``U`` is split at the points where an
    inverse-CDF position crosses a cumulative weight; the map is constant between them, so it is
    evaluated at each cell's midpoint."""
    with jax.enable_x64(True):
        lw = np.asarray(log_weights, np.float64)
        n = lw.shape[0]
        probs = np.exp(lw - logsumexp(lw))
        cdf = np.cumsum(probs)
        expected = n * probs
        residual = expected - np.floor(expected)
        rcdf = np.cumsum(residual) / max(residual.sum(), 1e-300)
        shape = uniforms_shape(scheme, n)
        cuts = {
            "multinomial": lambda j: cdf,
            "stratified": lambda j: n * cdf - j,
            "systematic": lambda j: np.concatenate([n * cdf - i for i in range(n)]),
            "residual": lambda j: rcdf,
        }[scheme]
        cells = [_cells(cuts(j)) for j in range(shape[0])]
        combos = list(itertools.product(*cells))
        mids = jnp.asarray([[m for m, _ in combo] for combo in combos])
        lengths = [math.prod(length for _, length in combo) for combo in combos]
        ancestors = np.asarray(jax.vmap(lambda u: ancestors_fn(scheme, u, jnp.asarray(lw)))(mids))
        dist: dict[tuple[int, ...], float] = {}
        for p, a in zip(lengths, ancestors, strict=True):
            dist[tuple(int(i) for i in a)] = dist.get(tuple(int(i) for i in a), 0.0) + p
        return [(p, a) for a, p in dist.items()]


def check_resample(
    scheme: str,
    log_weights: Any,
    ancestors_fn: AncestorsFn = ancestors_from_uniforms,
    new_log_weight_fn: Callable[[np.ndarray], float] = lambda lw: logsumexp(lw) - math.log(len(lw)),
) -> float:
    """Exact check of ``E[⟦resample(pop)⟧] = ⟦pop⟧`` for a population whose particles are their own
    indices and whose weights are ``log_weights``; returns the max abs error of the expected measure."""
    lw = np.asarray(log_weights, np.float64)
    before = Measure.from_log(enumerate(lw))
    new_w = math.exp(new_log_weight_fn(lw))
    after = Measure(
        (a_i, p * new_w) for p, a in resample_outcomes(scheme, lw, ancestors_fn) for a_i in a
    )
    return before.max_abs_diff(after)


def check_spawn(num_particles: int, log_weight: float = -0.7) -> float:
    """``⟦spawn(x, N, w)⟧ = exp(w) δ(x)`` (deterministic)."""
    with jax.enable_x64(True):
        pop = spawn(jnp.asarray(3.0), num_particles, log_weight)
        after = Measure(
            (float(x), math.exp(float(w)))
            for x, w in zip(pop.particles, pop.log_weights, strict=True)
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
    """Validity of weighting by ``p/q``: ``E_q[⟦run under q⟧] = ⟦fn⟧`` (exact, by enumeration)."""
    return denote(fn, *args, proposal=proposal).max_abs_diff(denote(fn, *args))


def exact_smc(
    program: SequentialProgram,
    args: tuple,
    num_particles: int,
    scheme: str = "systematic",
    ess_threshold: float = 1.0,
    proposal: Callable[..., Any] | None = None,
    ancestors_fn: AncestorsFn = ancestors_from_uniforms,
) -> Measure:
    """The exact expected output measure ``E[Σ_i exp(w_i) δ(trajectory_i)]`` of SMC, enumerating every
    random choice of the algorithm: each particle's discrete choices in init and every step (with the
    real weights, :func:`~ppinfer.weighted.weight_from_traces`), and each resampling's ancestors (the
    real resampler, :func:`resample_outcomes`), resampling after step ``t < T−1`` iff
    ``ess < ess_threshold · N`` (always when the threshold is ≥ 1), as :class:`~ppinfer.SMC` does."""
    n = num_particles
    num_steps = program.steps_for(args)
    with jax.enable_x64(True):
        init = enumerate_runs(program.init, args)
        # A population: tuple of particles (state, log_weight, choices, done); with its probability.
        pops = []
        for combo in itertools.product(init, repeat=n):
            prob = math.exp(sum(b.log_prob for b in combo))
            parts = tuple(
                (b.value, b.log_weight - math.log(n), _prefixed("init", b.choices), b.stopped)
                for b in combo
            )
            pops.append((prob, parts))
        for t in range(num_steps):
            pops = [
                out
                for prob, parts in pops
                for out in _advance_exact(prob, parts, program, args, t, proposal)
            ]
            if t < num_steps - 1:
                pops = [
                    out
                    for prob, parts in pops
                    for out in _maybe_resample_exact(
                        prob, parts, n, scheme, ess_threshold, ancestors_fn
                    )
                ]
        items = []
        for prob, parts in pops:
            for _, lw, choices, _ in parts:
                items.append((outcome_key(choices), prob * math.exp(lw)))
        return Measure(items)


def check_smc(program: SequentialProgram, args: tuple, num_particles: int, **kwargs: Any) -> float:
    """Exact check of SMC's validity: ``max |E[⟦SMC⟧] − ⟦program⟧|`` (see :func:`exact_smc`)."""
    return exact_smc(program, args, num_particles, **kwargs).max_abs_diff(denote(program, *args))


def _advance_exact(prob, parts, program, args, t, proposal):
    per_particle = []
    for state, lw, choices, done in parts:
        if done:
            per_particle.append([(1.0, (state, lw, choices, done))])
            continue
        step = lambda s: program.step(s, jnp.asarray(t, jnp.int32), *args)
        prop = (
            None if proposal is None else (lambda s: proposal(s, jnp.asarray(t, jnp.int32), *args))
        )
        outs = []
        for b in enumerate_runs(step, (state,), proposal=prop):
            new_choices = {**choices, **_prefixed(str(t), b.choices)}
            outs.append(
                (math.exp(b.log_prob), (b.value, lw + b.log_weight, new_choices, b.stopped))
            )
        per_particle.append(outs)
    for combo in itertools.product(*per_particle):
        yield prob * math.prod(p for p, _ in combo), tuple(part for _, part in combo)


def _maybe_resample_exact(prob, parts, n, scheme, threshold, ancestors_fn):
    lw = np.array([p[1] for p in parts])
    if not (threshold >= 1.0 or float(ess(jnp.asarray(lw))) < threshold * n):
        yield prob, parts
        return
    new_lw = logsumexp(lw) - math.log(n)
    for p, ancestors in resample_outcomes(scheme, lw, ancestors_fn):
        yield prob * p, tuple((parts[a][0], new_lw, parts[a][2], parts[a][3]) for a in ancestors)


def _prefixed(prefix: str, choices: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in choices.items()}


def _cells(cuts: np.ndarray) -> list[tuple[float, float]]:
    """``(midpoint, length)`` of the cells that ``cuts`` split ``[0, 1)`` into."""
    points = np.unique(
        np.clip(np.concatenate([[0.0, 1.0], np.asarray(cuts, np.float64)]), 0.0, 1.0)
    )
    return [((a + b) / 2, b - a) for a, b in zip(points[:-1], points[1:], strict=True) if b - a > 0]
