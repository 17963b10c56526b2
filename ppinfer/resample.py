"""Resampling: replace a population by N equally weighted copies of its particles.

``resample(key, pop, scheme) -> (pop', ancestors: i32[N])`` draws ``ancestors`` so that particle ``i``
is copied ``O_i`` times with ``E[O_i] = N · w_i / Σ w`` and gives every copy the log weight
``logsumexp(log_weights) − log N``. That is exactly the validity property
``E[⟦resample(pop)⟧] = ⟦pop⟧``: the expected measure, Ẑ included, is unchanged. A particle with
log weight −inf has probability 0 of being copied (it is dropped).

Every scheme is an inverse-CDF map from uniforms to ancestors: ``uniforms_shape(scheme, N)`` says how
many ``U[0, 1)`` draws it takes and ``ancestors_from_uniforms(scheme, uniforms, log_weights)`` is the
deterministic rest. ``semantics`` enumerates the finitely many regions of the uniforms that give
different ancestor vectors and so checks these very functions exactly.

Schemes: ``multinomial`` (N independent draws), ``stratified`` (one draw per stratum ``[j/N, (j+1)/N)``),
``systematic`` (one draw shared by all strata), ``residual`` (``⌊N w_i⌋`` deterministic copies, the
rest multinomial on the residual weights). All are jit/vmap-able with static N, O(N log N).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from ppinfer.errors import ConfigError
from ppinfer.population import Population, gather

__all__ = ["SCHEMES", "resample", "resample_groups", "ancestors_from_uniforms", "uniforms_shape"]

SCHEMES = ("multinomial", "stratified", "systematic", "residual")


def resample(
    key: jax.Array, pop: Population, scheme: str = "systematic", lse: jax.Array | None = None
) -> tuple[Population, jax.Array]:
    """Resample ``pop`` with ``scheme``; see the module docstring. Returns ``(pop', ancestors)``.
    ``lse`` may pass ``logsumexp(pop.log_weights)`` when the caller has it already."""
    check_scheme(scheme)
    n = pop.num_particles
    lse = logsumexp(pop.log_weights) if lse is None else lse
    uniforms = jax.random.uniform(key, uniforms_shape(scheme, n), dtype=pop.log_weights.dtype)
    ancestors = ancestors_from_uniforms(scheme, uniforms, pop.log_weights, lse)
    new_log_weights = jnp.full_like(pop.log_weights, lse - jnp.log(n))
    return Population(gather(pop.particles, ancestors), new_log_weights), ancestors


def resample_groups(
    key: jax.Array, pop: Population, scheme: str, num_groups: int
) -> tuple[Population, jax.Array]:
    """Resample each of ``num_groups`` contiguous groups of ``N / num_groups`` particles on its own
    (island resampling): ancestors never leave their group and each group keeps its own mass
    (new log weight ``logsumexp(group) − log M``). Valid for the same reason as :func:`resample`,
    group by group; with one group per device it needs no cross-device traffic, at the price of a
    higher-variance Ẑ than global resampling."""
    check_scheme(scheme)
    n = pop.num_particles
    m = n // num_groups
    groups = pop.log_weights.reshape(num_groups, m)
    uniforms = jax.random.uniform(key, (num_groups, *uniforms_shape(scheme, m)), dtype=groups.dtype)
    local = jax.vmap(lambda u, lw: ancestors_from_uniforms(scheme, u, lw))(uniforms, groups)
    ancestors = local.reshape(n) + (jnp.arange(n, dtype=jnp.int32) // m) * m
    new = jnp.broadcast_to(logsumexp(groups, axis=1, keepdims=True) - jnp.log(m), groups.shape)
    return Population(gather(pop.particles, ancestors), new.reshape(n)), ancestors


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown resampling scheme {scheme!r}; choose one of {SCHEMES}")


def uniforms_shape(scheme: str, n: int) -> tuple[int, ...]:
    """The shape of the ``U[0, 1)`` input of ``scheme`` for ``n`` particles."""
    check_scheme(scheme)
    return (1,) if scheme == "systematic" else (n,)


def ancestors_from_uniforms(
    scheme: str, uniforms: jax.Array, log_weights: jax.Array, lse: jax.Array | None = None
) -> jax.Array:
    """``i32[N]`` ancestors for ``log_weights: f32[N]`` given ``uniforms`` of ``uniforms_shape``
    (``lse``: ``logsumexp(log_weights)`` if the caller has it).

    If every weight is zero the population is dead: ancestors are the identity (the caller reports
    the error; no NaN is produced)."""
    check_scheme(scheme)
    n = log_weights.shape[0]
    lse = logsumexp(log_weights) if lse is None else lse
    alive = jnp.isfinite(lse)
    probs = jnp.where(alive, jnp.exp(log_weights - jnp.where(alive, lse, 0.0)), 1.0 / n)
    if scheme == "residual":
        ancestors = _residual(uniforms, probs)
    else:
        j = jnp.arange(n, dtype=probs.dtype)
        positions = {
            "multinomial": uniforms,
            "stratified": (j + uniforms) / n,
            "systematic": (j + uniforms[0]) / n,
        }[scheme]
        ancestors = _inverse_cdf(positions, probs)
    return jnp.where(alive, ancestors, jnp.arange(n))


def _inverse_cdf(positions: jax.Array, probs: jax.Array) -> jax.Array:
    """Index ``i`` with ``c_{i−1} ≤ u·c_{N−1} < c_i`` for each position ``u ∈ [0, 1)``: zero-weight
    particles are never chosen. Float round-off at the top (``u·c`` rounding up to ``c``) is clamped
    to the float just below ``c = c_{N−1}``: the cumulative sum is non-decreasing, so the index found
    is at most the last particle with positive weight (where the sum first reaches ``c``)."""
    cdf = jnp.cumsum(jax.lax.stop_gradient(probs))  # ancestors are integers: no gradient flows
    top = cdf[-1]
    value = jnp.minimum(positions * top, jnp.nextafter(top, jnp.zeros_like(top)))
    return jnp.searchsorted(cdf, value, side="right").astype(jnp.int32)


def _residual(uniforms: jax.Array, probs: jax.Array) -> jax.Array:
    n = probs.shape[0]
    expected = n * probs
    counts = jnp.floor(expected).astype(jnp.int32)
    deterministic = jnp.repeat(jnp.arange(n, dtype=jnp.int32), counts, total_repeat_length=n)
    num_deterministic = jnp.sum(counts)
    residual = expected - counts
    # When the residual mass is zero every slot is deterministic; guard the inverse CDF anyway.
    residual = jnp.where(jnp.sum(residual) > 0, residual, probs)
    random_part = _inverse_cdf(uniforms, residual)
    return jnp.where(jnp.arange(n) < num_deterministic, deterministic, random_part)
