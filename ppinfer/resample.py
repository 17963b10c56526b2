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

from ppinfer.errors import ConfigError
from ppinfer.population import Population, gather

__all__ = [
    "SCHEMES",
    "resample",
    "resample_groups",
    "ancestors_from_uniforms",
    "uniforms_shape",
    "inverse_cdf",
    "residual_ancestors",
]

SCHEMES = ("multinomial", "stratified", "systematic", "residual")


def resample(
    key: jax.Array, pop: Population, scheme: str = "systematic", lse: jax.Array | None = None
) -> tuple[Population, jax.Array]:
    """Resample ``pop`` with ``scheme``; see the module docstring. Returns ``(pop', ancestors)``.
    ``lse`` may pass ``logsumexp(pop.log_weights)`` when the caller has it already."""
    from ppinfer.kernels.select import as_selection, draw_uniforms

    check_scheme(scheme)
    selection = as_selection(scheme)
    n = pop.num_particles
    u = draw_uniforms(selection, key, n, pop.log_weights.dtype)
    ancestors, new_log_weights = selection(u, pop.log_weights, lse=lse)
    return Population(gather(pop.particles, ancestors), new_log_weights), ancestors


def resample_groups(
    key: jax.Array, pop: Population, scheme: str, num_groups: int
) -> tuple[Population, jax.Array]:
    """Resample each of ``num_groups`` contiguous groups of ``N / num_groups`` particles on its own
    (island resampling, :class:`~ppinfer.kernels.select.Grouped`): ancestors never leave their group
    and each group keeps its own mass (new log weight ``logsumexp(group) − log M``)."""
    from ppinfer.kernels.select import Grouped, as_selection, draw_uniforms

    check_scheme(scheme)
    selection = Grouped(as_selection(scheme), num_groups)
    u = draw_uniforms(selection, key, pop.num_particles, pop.log_weights.dtype)
    ancestors, new_log_weights = selection(u, pop.log_weights)
    return Population(gather(pop.particles, ancestors), new_log_weights), ancestors


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown resampling scheme {scheme!r}; choose one of {SCHEMES}")


def uniforms_shape(scheme: str, n: int) -> tuple[int, ...]:
    """The shape of the ``U[0, 1)`` input of :func:`ancestors_from_uniforms` for ``n`` particles."""
    check_scheme(scheme)
    return (1,) if scheme == "systematic" else (n,)


def ancestors_from_uniforms(
    scheme: str, uniforms: jax.Array, log_weights: jax.Array, lse: jax.Array | None = None
) -> jax.Array:
    """``i32[N]`` ancestors for ``log_weights: f32[N]`` given ``uniforms`` of :func:`uniforms_shape`
    — the scheme's :mod:`~ppinfer.kernels.select` selection (``lse``: ``logsumexp(log_weights)`` if
    the caller has it). If every weight is
    zero the population is dead: ancestors are the identity (the caller reports the error)."""
    from ppinfer.kernels.select import as_selection

    check_scheme(scheme)
    n = log_weights.shape[0]
    u = jnp.broadcast_to(uniforms, (n,)) if scheme == "systematic" else uniforms
    return as_selection(scheme)(u, log_weights, lse=lse)[0]


def inverse_cdf(positions: jax.Array, probs: jax.Array) -> jax.Array:
    """Index ``i`` with ``c_{i−1} ≤ u·c_{N−1} < c_i`` for each position ``u ∈ [0, 1)``: zero-weight
    particles are never chosen. Float round-off at the top (``u·c`` rounding up to ``c``) is clamped
    to the float just below ``c = c_{N−1}``: the cumulative sum is non-decreasing, so the index found
    is at most the last particle with positive weight (where the sum first reaches ``c``)."""
    probs = jax.lax.stop_gradient(probs)  # ancestors are integers: no gradient flows
    cdf = jnp.cumsum(probs)
    top = cdf[-1]
    value = jnp.minimum(positions * top, jnp.nextafter(top, jnp.zeros_like(top)))
    n = probs.shape[0]
    index = jnp.minimum(jnp.searchsorted(cdf, value, side="right"), n - 1).astype(jnp.int32)
    # XLA's cumsum is a parallel scan, not a running sum: after a zero-weight particle it can rise by
    # an ulp (measured: ~1% of the zero-weight entries of a 200,000-particle population), which makes
    # a dead particle selectable. A draw that lands on one moves to the next particle of positive
    # weight (the change of law is of the order of that rounding). Rare, so the repair runs only
    # when some draw needs it (a plain run pays one gather).
    dead = probs[index] <= 0

    def repair(index):
        position = jnp.arange(n)
        next_alive = jax.lax.cummin(jnp.where(probs > 0, position, n), reverse=True)
        last_alive = jnp.max(jnp.where(probs > 0, position, -1))
        fixed = jnp.minimum(next_alive[index], last_alive)
        return jnp.where(dead & (last_alive >= 0), fixed, index).astype(jnp.int32)

    return jax.lax.cond(jnp.any(dead), repair, lambda index: index, index)


def residual_ancestors(uniforms: jax.Array, probs: jax.Array) -> jax.Array:
    """Residual resampling of ``n_out = len(uniforms)`` slots: ``⌊n_out p_i⌋`` deterministic copies
    of particle ``i``, the remaining slots by inverse CDF of ``uniforms`` on the residual mass."""
    n_in, n_out = probs.shape[0], uniforms.shape[0]
    expected = n_out * probs
    counts = jnp.floor(expected).astype(jnp.int32)
    deterministic = jnp.repeat(jnp.arange(n_in, dtype=jnp.int32), counts, total_repeat_length=n_out)
    num_deterministic = jnp.sum(counts)
    residual = expected - counts
    # When the residual mass is zero every slot is deterministic; guard the inverse CDF anyway.
    residual = jnp.where(jnp.sum(residual) > 0, residual, probs)
    random_part = inverse_cdf(uniforms, residual)
    return jnp.where(jnp.arange(n_out) < num_deterministic, deterministic, random_part)
