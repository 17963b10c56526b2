"""Objectives: expectations over ``K`` guide samples, and their surrogate for ``jax.grad``.

An :class:`Objective` is ``L(φ, θ) = E_{x_1..K ~ q_φ}[F(x_1..K)]`` for a function ``F`` of a
:class:`~ppinfer.vi.density.Particles` (``K`` samples with their ``log_weight``, ``log_p``,
``log_q``). Every objective here is built with :func:`expectation` from a one-line ``F``; a user
writes a new one the same way, e.g. a tempered ELBO::

    tempered = expectation(lambda ps: jnp.mean(beta * ps.log_p - ps.log_q), num_particles=4)

:meth:`Objective.surrogate` returns a scalar whose value is an unbiased estimate of ``L`` and whose
``jax.grad`` is an unbiased estimate of ``∇L``, with the per-site gradient estimators of
:mod:`ppinfer.vi.estimators` (pathwise, score function with baseline, exact enumeration). All
objectives are *maximised*.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from numpyro import handlers

from ppinfer import checks
from ppinfer.errors import ConfigError
from ppinfer.vi.density import Particles, sample_particles
from ppinfer.vi.estimators import ENUMERATE, Estimators, choose_and_detach, enumerate_values

__all__ = [
    "Objective",
    "expectation",
    "elbo",
    "iwelbo",
    "renyi",
    "wake_p",
    "wake_q",
    "rws",
    "MAX_ENUMERATED_CONFIGS",
]

MAX_ENUMERATED_CONFIGS = 4096
sg = jax.lax.stop_gradient


@dataclass(frozen=True, eq=False)
class Objective:
    """``E[F(K guide samples)]``, to be maximised.

    Attributes:
        fn: ``F``: :class:`Particles` (fields ``[K]``) → ``f32[]``.
        num_particles: ``K`` ≥ 1.
        fixed_samples: the gradient is ``E[∇F]`` at fixed samples (no pathwise or score terms): for
            the wake phases of reweighted wake-sleep, whose ``F`` carries its own weights.
        full_coverage: the guide must sample every latent site of the model.
        monitor: the figure recorded in the objective trace (default ``F``).
        name: for reports.
    """

    fn: Callable[[Particles], jax.Array]
    num_particles: int = 1
    fixed_samples: bool = False
    full_coverage: bool = True
    monitor: Callable[[Particles], jax.Array] | None = None
    name: str = "objective"

    def __post_init__(self):
        k = self.num_particles
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ConfigError(f"an objective needs num_particles >= 1, got {k!r}")

    def surrogate(
        self,
        key: jax.Array,
        model: Callable[..., Any],
        guide: Callable[..., Any],
        params: dict[str, jax.Array],
        args: tuple = (),
        estimators: Estimators = None,
        baseline: jax.Array | float = 0.0,
    ) -> tuple[jax.Array, jax.Array]:
        """``(surrogate, monitored)``: ``jax.grad`` of ``surrogate: f32[]`` (in ``params``, the
        constrained values) is an unbiased estimate of ``∇L`` (of ``E[∇F]`` when
        ``fixed_samples``); its value equals the estimate ``F`` (its conditional mean over
        enumerated sites; with ``fixed_samples`` the enumerated sites' probabilities are held
        fixed too). ``baseline`` is the score-function control variate ``b`` (must not
        depend on this draw). ``monitored: f32[]`` is the :attr:`monitor` figure."""
        k = self.num_particles
        draw = lambda fixed: sample_particles(
            key, model, guide, params, args, k, estimators, fixed, self.fixed_samples,
            self.full_coverage,
        )  # fmt: skip
        supports = _enumerated(key, guide, params, args, estimators)

        def estimate(fixed):
            ps = draw(fixed)
            f = self.fn(ps)
            s = jnp.sum(ps.score)
            surr = f + (sg(f) - baseline) * (s - sg(s))
            mon = f if self.monitor is None else self.monitor(ps)
            return surr, sg(mon), jnp.sum(ps.log_q_enum)

        if not supports:
            surr, mon, _ = estimate(None)
            return surr, mon
        configs = _configs(supports, k)
        surr, mon, log_q = jax.vmap(estimate)(configs)
        q = sg(jnp.exp(log_q)) if self.fixed_samples else jnp.exp(log_q)
        return jnp.sum(q * surr), jnp.sum(sg(q) * mon)


def expectation(
    fn: Callable[[Particles], jax.Array],
    num_particles: int = 1,
    fixed_samples: bool = False,
    full_coverage: bool = True,
    monitor: Callable[[Particles], jax.Array] | None = None,
    name: str | None = None,
) -> Objective:
    """The objective ``E_{x_1..K ~ q}[fn(particles)]`` (see :class:`Objective`)."""
    return Objective(
        fn, num_particles, fixed_samples, full_coverage, monitor, name or getattr(fn, "__name__", "")
    )


def elbo(num_particles: int = 1) -> Objective:
    """ELBO ``E_q[log p(x, y) − log q(x)]``, ``F = mean_k log_weight_k`` (``K`` samples only lower
    the variance). ``≤ log Z``, equal iff ``q`` is the posterior."""
    return expectation(lambda ps: jnp.mean(ps.log_weight), num_particles, name="elbo")


def iwelbo(num_particles: int) -> Objective:
    """Importance-weighted ELBO (Burda et al.) ``E[log (1/K) Σ_k w_k]``; ``F = logsumexp(log_weight)
    − log K``. Non-decreasing in ``K``, ``→ log Z`` as ``K → ∞``."""
    return expectation(_log_mean_exp, num_particles, name="iwelbo")


def renyi(alpha: float, num_particles: int) -> Objective:
    """Rényi-α bound (Li & Turner) ``E[1/(1−α) log (1/K) Σ_k w_k^{1−α}]``; ``α = 0`` is the IWELBO
    and ``α → 1`` the ELBO (``α = 1`` gives :func:`elbo`)."""
    if not (checks.is_number(alpha) and math.isfinite(alpha)):
        raise ConfigError(f"renyi's alpha must be a finite number, got {alpha!r}")
    alpha = float(alpha)
    if alpha == 1.0:
        return elbo(num_particles)
    f = lambda ps: _log_mean_exp_of((1.0 - alpha) * ps.log_weight) / (1.0 - alpha)
    return expectation(f, num_particles, name=f"renyi({alpha:g})")


def wake_p(num_particles: int) -> Objective:
    """Reweighted wake-sleep, wake-p (model parameters θ): ``F = Σ_k w̄_k log p_θ(x_k, y)``,
    ``w̄ = softmax(log_weight)`` held fixed. Its gradient is the self-normalised IS estimate of
    ``∇_θ log p_θ(y)`` (biased for finite ``K``, consistent as ``K → ∞``). Monitors the IWELBO."""
    f = lambda ps: jnp.sum(sg(jax.nn.softmax(ps.log_weight)) * ps.log_p)
    return expectation(f, num_particles, True, monitor=_log_mean_exp, name="wake_p")


def wake_q(num_particles: int) -> Objective:
    """Reweighted wake-sleep, wake-q (guide parameters φ): ``F = Σ_k w̄_k log q_φ(x_k)`` with
    ``w̄`` fixed: the self-normalised IS estimate of ``−∇_φ KL(p(·|y) ‖ q_φ)`` (biased for finite
    ``K``, consistent). Monitors the IWELBO."""
    f = lambda ps: jnp.sum(sg(jax.nn.softmax(ps.log_weight)) * ps.log_q)
    return expectation(f, num_particles, True, monitor=_log_mean_exp, name="wake_q")


def rws(num_particles: int) -> Objective:
    """Reweighted wake-sleep: wake-p for the model's parameters and wake-q for the guide's, in one
    objective (each only depends on its own parameters at fixed samples). Monitors the IWELBO."""
    f = lambda ps: jnp.sum(sg(jax.nn.softmax(ps.log_weight)) * (ps.log_p + ps.log_q))
    return expectation(f, num_particles, True, monitor=_log_mean_exp, name="rws")


def _log_mean_exp(ps: Particles) -> jax.Array:
    return _log_mean_exp_of(ps.log_weight)


def _log_mean_exp_of(x: jax.Array) -> jax.Array:
    return logsumexp(x) - math.log(x.shape[0])


def _enumerated(key, guide, params, args, estimators) -> dict[str, np.ndarray]:
    """name → ``[M_i, …]`` values of the guide's enumerated sites (found by running it once; their
    supports depend only on shapes, so they are concrete even under ``jit``)."""
    if estimators is None or (isinstance(estimators, str) and estimators != ENUMERATE):
        return {}
    if not isinstance(estimators, str) and ENUMERATE not in estimators.values():
        return {}
    chooser = choose_and_detach(estimators)
    with chooser, handlers.seed(rng_seed=key), handlers.substitute(data=params):
        guide(*args)
    return {n: enumerate_values(n, chooser.fns[n]) for n, e in chooser.chosen.items() if e == ENUMERATE}


def _configs(supports: dict[str, np.ndarray], k: int) -> dict[str, jax.Array]:
    """Every joint value of the enumerated sites of ``k`` samples: name → ``[C, k, …]``."""
    names = list(supports)
    per_sample = list(itertools.product(*(range(len(supports[n])) for n in names)))
    total = len(per_sample) ** k
    if total > MAX_ENUMERATED_CONFIGS:
        raise ConfigError(
            f"enumerating sites {names} over {k} samples needs {total} joint values "
            f"(> {MAX_ENUMERATED_CONFIGS}); use fewer particles or 'reinforce'"
        )
    idx = np.asarray(list(itertools.product(range(len(per_sample)), repeat=k)))  # [C, k]
    table = np.asarray(per_sample)  # [M, n_sites]
    return {n: jnp.asarray(supports[n][table[idx, j]]) for j, n in enumerate(names)}
