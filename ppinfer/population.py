"""Population: N weighted particles.

Meaning: the unnormalised measure ``Σ_i exp(log_weights[i]) · δ(particles[i])``. Its total mass
``Σ_i exp(log_weights[i])`` is the evidence estimate Ẑ, so ``log_evidence = logsumexp(log_weights)``
(the convention of monad-bayes' ``Population``: spawning N particles gives each ``−log N``).

Validity of each block (checked in ``semantics``): a randomised transformation ``T`` is valid when
``E[⟦T(pop)⟧] = ⟦pop⟧`` as unnormalised measures. :func:`spawn` and :func:`collapse` are valid
(``spawn`` deterministically so); :func:`normalize` is not — it preserves only the normalised
measure, and must not be used where Ẑ matters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

__all__ = [
    "Population",
    "spawn",
    "ess",
    "normalized_weights",
    "normalize",
    "log_evidence",
    "log_evidence_and_ess",
    "collapse",
    "collapse_from_uniform",
    "gather",
]


class Population(NamedTuple):
    """Weighted particles.

    Attributes:
        particles: a pytree whose every leaf has leading axis ``N``.
        log_weights: ``f32[N]``, unnormalised; ``logsumexp(log_weights)`` is ``log Ẑ`` so far.
    """

    particles: Any
    log_weights: jax.Array

    @property
    def num_particles(self) -> int:
        return self.log_weights.shape[0]


def spawn(particles: Any, num_particles: int, log_weight: jax.Array | float = 0.0) -> Population:
    """``num_particles`` copies of one weighted particle (leaves without the particle axis), each with
    log weight ``log_weight − log N``. Deterministic and valid: the measure is unchanged."""
    n = int(num_particles)
    copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), particles)
    log_weights = jnp.full((n,), jnp.asarray(log_weight, jnp.result_type(float)) - jnp.log(n))
    return Population(copies, log_weights)


def ess(log_weights: jax.Array, lse: jax.Array | None = None) -> jax.Array:
    """``f32[]``: the effective sample size ``(Σ w)² / Σ w²`` of ``log_weights: f32[N]``; 0 when
    every weight is zero. ``lse`` may pass ``logsumexp(log_weights)`` if the caller has it."""
    lse = logsumexp(log_weights) if lse is None else lse
    normalized = normalized_weights(log_weights, lse)
    return jnp.where(jnp.isfinite(lse), 1.0 / jnp.sum(normalized * normalized), 0.0)


# Below this |log Ẑ|, ``w − lse`` is exact to ~1e-3 in float32 (an ulp of 1e4 is ~1e-3).
_SAFE_LSE = 1e4


def normalized_weights(log_weights: jax.Array, lse: jax.Array) -> jax.Array:
    """``f32[N]``: ``exp(log_weights − lse)`` (``lse = logsumexp(log_weights)``), the normalised
    weights, in one pass when ``|lse|`` is moderate; for weights around ``−1e8`` or below, where
    float32 has no room for ``log N`` next to them, the largest weight is subtracted first (two
    more passes, taken only then). Meaningless (NaN) when every weight is zero: callers mask it."""

    def direct(_):
        return jnp.exp(log_weights - lse)

    def shifted(_):
        top = jnp.max(log_weights)
        w = jnp.exp(log_weights - jnp.where(jnp.isfinite(top), top, 0.0))
        return w / jnp.sum(w)

    return jax.lax.cond(jnp.abs(lse) < _SAFE_LSE, direct, shifted, None)


def normalize(log_weights: jax.Array) -> jax.Array:
    """``f32[N]``: log weights shifted to ``logsumexp = 0`` (log-probabilities). Preserves the
    normalised measure only (not valid for Ẑ). All −inf stays all −inf.

    The largest weight is subtracted first: with log weights around ``−1e8`` or below, float32 has
    no room left for ``log N`` next to them, so ``w − logsumexp(w)`` would be 0 for N equal weights
    (each normalised weight 1, summing to N); after the shift the spread is exact."""
    top = jnp.max(log_weights)
    shifted = log_weights - jnp.where(jnp.isfinite(top), top, 0.0)
    lse = logsumexp(shifted)
    return jnp.where(jnp.isfinite(lse), shifted - lse, log_weights)


def log_evidence_and_ess(log_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(log Ẑ, ESS)`` of ``log_weights: f32[N]``: :func:`log_evidence` and :func:`ess` from one
    shift by the largest weight and two sums over ``w = exp(log_weights − max)``:
    ``log Ẑ = max + log Σ w`` and ``ESS = (Σ w)² / Σ w²`` (no branch, no second normalisation
    pass). Exact at every scale (no ``w − log Ẑ`` round-off for weights far from 0) and
    differentiable in ``log Ẑ`` like ``logsumexp`` (the ESS is not differentiated). Every weight
    zero: ``(−inf, 0)``; a NaN or +inf weight gives a NaN or +inf log Ẑ."""
    top = jax.lax.stop_gradient(jnp.max(log_weights))
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(log_weights - shift)
    total = jnp.sum(w)
    ess_value = jax.lax.stop_gradient(jnp.where(total > 0, total * total / jnp.sum(w * w), 0.0))
    return jnp.log(total) + shift, ess_value


def log_evidence(log_weights: jax.Array) -> jax.Array:
    """``f32[]``: ``log Ẑ = logsumexp(log_weights)``, the log total mass of the population."""
    return logsumexp(log_weights)


def collapse(key: jax.Array, pop: Population) -> tuple[Any, jax.Array]:
    """Collapse a population into one weighted particle: pick particle ``i`` with probability
    ``∝ exp(log_weights[i])`` and give it the total mass ``log Ẑ``. Returns ``(particle, log_weight)``.
    Valid: ``E[exp(log Ẑ) δ(x_I)] = Σ_i exp(w_i) δ(x_i)``."""
    return collapse_from_uniform(jax.random.uniform(key, (1,), pop.log_weights.dtype), pop)


def collapse_from_uniform(u: jax.Array, pop: Population) -> tuple[Any, jax.Array]:
    """:func:`collapse` given its uniform draw ``u: f32[1]`` (inverse CDF), for exact enumeration."""
    from ppinfer.resample import ancestors_from_uniforms

    i = ancestors_from_uniforms("multinomial", u, pop.log_weights)[0]
    return jax.tree.map(lambda x: x[i], pop.particles), log_evidence(pop.log_weights)


def gather(particles: Any, ancestors: jax.Array) -> Any:
    """Particles indexed by ``ancestors: i32[M]`` along the particle axis (every leaf). Ancestors
    are in range by construction; ``mode="clip"`` clamps the M indices instead of masking every
    element of the (possibly large: KV caches) gathered leaves. A node whose type defines
    ``reindex(ancestors)`` (e.g. :class:`ppinfer.lm.paged.PagedCache`, whose block pool is shared,
    not per particle) is resampled by that method instead."""

    def take(x):
        if _reindexable(x):
            return x.reindex(ancestors)
        return jnp.take(x, ancestors, axis=0, mode="clip")

    return jax.tree.map(take, particles, is_leaf=_reindexable)


def _reindexable(x: Any) -> bool:
    return callable(getattr(type(x), "reindex", None))
