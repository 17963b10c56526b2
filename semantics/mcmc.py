"""Invariance of MCMC kernels: exact for finite programs, statistical for continuous ones.

An MH kernel ``K`` is valid when the normalised posterior ``π`` is stationary: ``π K = π``.

- :func:`transition_matrix` computes ``K`` *exactly* for a program with finitely many discrete
  latent choices: for every state ``x`` (every execution, from :func:`semantics.denote`), it
  enumerates the kernel's own proposal choices (every DSL ``sample`` site the proposal step draws,
  with its probability) and takes the accept/reject uniform analytically: the proposal outcome
  ``x'`` gets ``q · min(1, exp(log_alpha))`` with the kernel's returned ``log_alpha``, and ``x`` keeps
  the rest. A :func:`~ppinfer.mcmc.cycle` is the product of its components' matrices.
  :func:`check_invariance` returns ``max |π K − π|`` (float64; ~1e-15 when valid).
- :func:`check_joint_invariance` (continuous programs, Geweke's successive-conditional test): draw
  ``(θ₀, y)`` from the joint, run ``k`` kernel steps on ``θ`` given ``y``; if ``K`` leaves each
  posterior invariant then ``(θ_k, y)`` has the joint distribution too, so for each statistic
  ``f``, ``E[f(θ_k, y) − f(θ₀, y)] = 0``. Tested by a CLT bound on ``R`` vmapped replications with a
  stated false-failure rate (Bonferroni over the statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions.distribution import MaskedDistribution
from numpyro.primitives import Messenger

from ppinfer.algorithms.enumerate import enumerate_runs, support_values
from ppinfer.errors import EnumerationError
from ppinfer.mcmc.base import Kernel, MHState
from ppinfer.primitives import prior_predictive
from ppinfer.traced import assess, generate, latent_sites
from semantics.denote import denote
from semantics.measure import outcome_key
from semantics.stats import CLTCheck, check_mean

__all__ = ["transition_matrix", "check_invariance", "check_joint_invariance", "proposal_outcomes"]


def transition_matrix(
    program: Callable[..., Any], args: tuple, kernel: Kernel
) -> tuple[list[tuple], np.ndarray]:
    """``(states, K)``: the states (outcome keys of latent choice maps) and the exact transition
    matrix ``K: f64[S, S]`` of an MH ``kernel`` (or a cycle of them) on ``program(*args)``."""
    with jax.enable_x64(True):
        branches = enumerate_runs(program, args)
        latent = set(latent_sites(program, args))
        choice_maps = [{k: v for k, v in b.choices.items() if k in latent} for b in branches]
        states = [outcome_key(c) for c in choice_maps]
        index = {s: i for i, s in enumerate(states)}
        return states, _matrix(program, args, kernel, choice_maps, index)


def check_invariance(program: Callable[..., Any], args: tuple, kernel: Kernel) -> float:
    """``max_x' |Σ_x π(x) K(x, x') − π(x')|`` for the exact posterior ``π`` (float64)."""
    states, k = transition_matrix(program, args, kernel)
    latent = {name for name, _ in states[0]}
    post = denote(program, *args).map(lambda key: tuple((n, v) for n, v in key if n in latent))
    post = post.normalized()
    pi = np.array([post.mass.get(s, 0.0) for s in states])
    return float(np.max(np.abs(pi @ k - pi)))


def proposal_outcomes(
    propose: Callable, program: Callable[..., Any], args: tuple, choices: dict
) -> list[tuple[float, dict, float]]:
    """Every outcome of one proposal step from the state ``choices``: ``(probability, new latent
    choices, log_alpha)``, enumerating the DSL sample sites the step draws (eager, float64)."""
    trace = assess(program, args, {k: jnp.asarray(v) for k, v in choices.items()})
    out, pending = [], [{}]
    while pending:
        prefix = pending.pop()
        fixer = _fix_drawn(prefix)
        try:
            with fixer:
                new, log_alpha = propose(jax.random.PRNGKey(0), trace, args)
        except _Branching as b:
            pending.extend({**prefix, b.index: v} for v in b.values)
            continue
        prob = math.exp(sum(fixer.log_probs))
        new_choices = {k: np.asarray(v) for k, v in new.choices.items()}
        _require_no_key_randomness(propose, trace, args, prefix)
        out.append((prob, new_choices, float(log_alpha)))
    return out


def _require_no_key_randomness(propose, trace, args, prefix: dict) -> None:
    """Raise :class:`EnumerationError` if the proposal step, its sample sites fixed to ``prefix``,
    still uses its key: a step that draws from it (``jax.random``) instead of DSL ``sample`` sites
    would be enumerated as if that draw were fixed, and the verdict would be about a kernel that is
    not the one that runs."""
    from jax._src.interpreters.partial_eval import dce_jaxpr

    message = (
        "the proposal step draws randomness from its key (jax.random) rather than from DSL sample "
        "sites: check_invariance enumerates sample sites only, so it cannot give this kernel an "
        "exact verdict (draw the randomness with pp.sample)"
    )
    # With every sample site fixed to its enumerated value, the step's output must not depend on
    # the key at all: dead-code elimination of its jaxpr tells whether the key is still used.
    try:
        with _fix_drawn(prefix):
            closed = jax.make_jaxpr(lambda k: propose(k, trace, args))(jax.random.PRNGKey(0))
    except _Branching:
        raise EnumerationError(message) from None
    _, used = dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    if used[0]:
        raise EnumerationError(message)


def check_joint_invariance(
    program: Callable[..., Any],
    data_site: str,
    kernel: Kernel,
    statistics: dict[str, Callable[[dict, jax.Array], jax.Array]],
    num_replicates: int = 2000,
    num_steps: int = 5,
    key: int = 0,
    false_failure_rate: float = 1e-3,
) -> dict[str, CLTCheck]:
    """Geweke's test (module docstring) of ``kernel`` on ``program(y)``, whose observed site
    ``data_site`` is drawn from the prior predictive by calling ``program(None)``. ``statistics``
    maps a name to ``f(choices, y) -> f32[]``. Each returned check has false-failure rate
    ``false_failure_rate / len(statistics)`` (so the family's is at most ``false_failure_rate``)."""

    def one(k):
        k_joint, k_run = jax.random.split(k)
        joint, _ = generate(k_joint, program, (None,))
        y = joint.choices[data_site]
        theta0 = {n: v for n, v in joint.choices.items() if n != data_site}
        state = MHState(assess(program, (y,), theta0))

        def body(s, kt):
            return kernel.step(kt, s, (y,))[0], None

        state, _ = jax.lax.scan(body, state, jax.random.split(k_run, num_steps))
        theta_k = state.trace.choices
        return {name: f(theta_k, y) - f(theta0, y) for name, f in statistics.items()}

    with prior_predictive():  # program(None): its observe(data_site, fn, None) samples the data
        diffs = jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(key), num_replicates))
    rate = false_failure_rate / len(statistics)
    return {name: check_mean(np.asarray(d), 0.0, rate) for name, d in diffs.items()}


def _matrix(program, args, kernel, choice_maps, index) -> np.ndarray:
    if kernel.components:
        k = np.eye(len(choice_maps))
        for part in kernel.components:
            k = k @ _matrix(program, args, part, choice_maps, index)
        return k
    if kernel.propose is None:
        raise ValueError("transition_matrix needs an MH kernel (with a proposal step) or a cycle")
    k = np.zeros((len(choice_maps), len(choice_maps)))
    for i, choices in enumerate(choice_maps):
        for prob, new, log_alpha in proposal_outcomes(kernel.propose, program, args, choices):
            accept = 0.0 if math.isnan(log_alpha) else math.exp(min(0.0, log_alpha))
            j = index.get(outcome_key(new))
            if j is None:
                # A proposal outside the support is rejected: its log_alpha must be −inf.
                assert accept == 0.0, "the kernel accepts a move to a state of zero posterior mass"
                j = i
            k[i, j] += prob * accept
            k[i, i] += prob * (1.0 - accept)
    # Far from 1, not float32 round-off (a proposal's parameters from float32 data: ~1e-7).
    sums = k.sum(1)
    worst = int(np.argmax(np.abs(sums - 1)))
    if abs(sums[worst] - 1) > 1e-5:
        raise EnumerationError(
            f"the enumerated proposal outcomes of state {worst} have total probability "
            f"{float(sums[worst]):.10g}, not 1: the proposal's draws are not read at the law they "
            "come from, so no verdict can be given"
        )
    return k


class _Branching(Exception):
    def __init__(self, index, values):
        self.index, self.values = index, values


class _fix_drawn(Messenger):
    """Fixes the i-th *drawn* latent site (one that no inner handler gave a value) from ``prefix``;
    raises :class:`_Branching` at the first one not in it. Records the drawn sites' log densities."""

    def __init__(self, prefix: dict):
        super().__init__()
        self.prefix, self.count, self.log_probs = prefix, 0, []

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        i = self.count
        self.count += 1
        if i not in self.prefix:
            raise _Branching(i, support_values(msg["name"], msg["fn"]))
        msg["value"] = jnp.asarray(self.prefix[i])
        # The law the value is drawn from: a masked site draws from its base distribution (its
        # log_prob, masked, is 0: every outcome had probability 1 and K's rows summed to 2).
        fn = msg["fn"]
        while isinstance(fn, MaskedDistribution):
            fn = fn.base_dist
        lp = jnp.sum(fn.log_prob(msg["value"]))
        if not isinstance(lp, jax.core.Tracer):  # (traced by the key-dependence check: not needed)
            self.log_probs.append(float(lp))
