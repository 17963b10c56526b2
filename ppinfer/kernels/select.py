"""Selections: which particles survive a resampling, as pure functions of explicit uniforms.

A **selection** is a callable

    select(u: f32[n_out], log_weights: f32[n_in]) -> (ancestors: i32[n_out], log_weights: f32[n_out])

deterministic given its uniforms ``u`` (each ``U[0, 1)``, independent) and written with JAX
operations (it is traced once: host randomness such as ``numpy.random`` would become a constant,
which no check can see); ``n_out = u.shape[0]``. Slot
``j`` of the new population is a copy of particle ``ancestors[j]`` with log weight
``log_weights'[j]``. It is **valid** when, for ``u ~ U[0, 1)^{n_out}`` and every population ``x``,

    E[ Σ_j exp(log_weights'[j]) δ(x[ancestors[j]]) ] = Σ_i exp(log_weights[i]) δ(x[i])

(the expected measure, total mass Ẑ included, is unchanged; a particle of weight zero is never
copied). ``semantics.check_exact`` verifies SMC built on any selection — a user's too — exactly on
the weight vectors a given program produces, by splitting each uniform at the points where the
output changes (``semantics.check_resample`` checks the selection itself on chosen weight
vectors), and SMC built on a valid selection is valid.

Optional members a selection may define (the kernel uses them when present):

- ``draw(key, n_out, dtype) -> f32[n_out]``: a cheaper way to draw the uniforms, as long as each
  coordinate the selection *reads* is ``U[0, 1)`` and the coordinates it reads are independent
  (systematic reads one uniform, so it draws one and broadcasts it).
- ``trigger(log_weights, ess_value) -> bool[]`` (and optionally ``base``, the selection to apply):
  select only when true, else keep the population as it is (:class:`Adaptive`); the kernel then
  skips the particle gather when it does not select. ``ess_value`` is the ESS the kernel computed.
- ``num_groups``: the selection never moves a particle out of its contiguous group of
  ``n_in / num_groups`` (:class:`Grouped`); a sharded kernel whose devices each hold whole groups
  then selects and gathers within each device. A user's selection that breaks this is reported
  (its weights are poisoned, as for an ancestor out of range), never clamped.

Selections here: :class:`Multinomial`, :class:`Stratified`, :class:`Systematic`, :class:`Residual`
(inverse-CDF schemes; equal new weights ``log Ẑ − log n_out``), :class:`Adaptive` (ESS-triggered),
:class:`Grouped` (island resampling), :class:`FearnheadClifford` (Steer's selection without
replacement, unequal weights, ``n_out < n_in``). :func:`as_selection` turns a scheme name into one.
Not valid on their own, by design: :class:`Conditional` (conditional SMC's resampling around a
reference), :class:`ParentWeights` (weights that are scores, re-read at every selection) and
:class:`Beam` (deterministic top-k: search, not inference).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from ppinfer.checks import check_int
from ppinfer.errors import ConfigError
from ppinfer.population import ess, normalized_weights
from ppinfer.resample import SCHEMES, inverse_cdf, residual_ancestors

__all__ = [
    "Selection",
    "Multinomial",
    "Stratified",
    "Systematic",
    "Residual",
    "Adaptive",
    "Grouped",
    "FearnheadClifford",
    "Conditional",
    "ParentWeights",
    "Beam",
    "as_selection",
    "built_in",
    "draw_uniforms",
    "parts",
    "fearnhead_clifford_threshold",
]


@runtime_checkable
class Selection(Protocol):
    """``(u: f32[n_out], log_weights: f32[n_in]) -> (ancestors: i32[n_out], log_weights: f32[n_out])``;
    see the module docstring for its validity property and optional members."""

    def __call__(self, u: jax.Array, log_weights: jax.Array) -> tuple[jax.Array, jax.Array]: ...


def draw_uniforms(selection: Callable, key: jax.Array, n_out: int, dtype: Any) -> jax.Array:
    """``f32[n_out]`` uniforms for ``selection`` (its own ``draw`` if it has one)."""
    draw = getattr(selection, "draw", None)
    if draw is None:
        return jax.random.uniform(key, (n_out,), dtype)
    u = draw(key, n_out, dtype)
    if jnp.shape(u) != (n_out,):
        raise ConfigError(
            f"{selection!r}.draw(key, {n_out}, dtype) must return f[{n_out}], got shape {jnp.shape(u)}"
        )
    return u


def parts(selection: Callable) -> tuple[Callable, Callable | None]:
    """``(base, trigger)``: the selection the kernel applies and the predicate that decides whether
    it applies (``None``: always). A selection with a ``trigger`` (e.g. :class:`Adaptive`) splits
    into its ``base`` (itself if it has none) and the trigger, so that a population that is not
    resampled is not gathered."""
    trigger = getattr(selection, "trigger", None)
    if trigger is None:
        return selection, None
    return getattr(selection, "base", selection), trigger


def as_selection(resampling: Any, ess_threshold: float | None = None) -> Callable:
    """A selection from a scheme name (``"systematic"``, ``"stratified"``, ``"multinomial"``,
    ``"residual"``) or a selection object, wrapped in :class:`Adaptive` when ``ess_threshold < 1``."""
    if isinstance(resampling, str):
        if resampling not in SCHEMES:
            raise ConfigError(f"unknown resampling scheme {resampling!r}; choose one of {SCHEMES}")
        base = _BY_NAME[resampling]()
    elif callable(resampling):
        try:
            hash(resampling)
        except TypeError as e:  # it keys the compile cache
            raise ConfigError(
                f"a selection must be hashable (e.g. a frozen dataclass or a function); got {resampling!r}"
            ) from e
        _check_signature(resampling)
        base = resampling
    else:
        raise ConfigError(
            f"resampling must be a scheme name {SCHEMES} or a selection "
            f"(u: f32[n_out], log_weights: f32[n_in]) -> (ancestors, log_weights); got {resampling!r}"
        )
    if ess_threshold is None or ess_threshold >= 1.0:
        return base
    return Adaptive(base, float(ess_threshold))


def _check_signature(selection: Callable) -> None:
    """A clear :class:`ConfigError` now, not a ``TypeError`` deep in the traced step, for a callable
    that cannot be called as ``select(u, log_weights)``."""
    try:
        signature = inspect.signature(selection)
    except (TypeError, ValueError):  # no signature to read (some builtins): the call will tell
        return
    try:
        signature.bind(None, None)
    except TypeError as e:
        raise ConfigError(
            f"a selection is called as select(u: f32[n_out], log_weights: f32[n_in]) -> (ancestors, "
            f"log_weights); {selection!r} cannot be: {e}"
        ) from e


def built_in(selection: Callable) -> bool:
    """Whether ``selection`` is one of this module's, built on built-in selections only: its output
    is in range by construction (ancestors in ``[0, n_in)``, no NaN or +inf weight from finite or
    −inf ones), so the kernel need not check it."""
    if type(selection) in (Multinomial, Stratified, Systematic, Residual, FearnheadClifford, Beam):
        return True
    if type(selection) in (Adaptive, Grouped, Conditional, ParentWeights):
        return built_in(selection.base)
    return False


def _equal(ancestors: jax.Array, log_weights: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Ancestors with equal new weights ``lse − log n_out``; a dead population (``lse = −inf``) keeps
    the identity ancestors (no NaN; the caller reports it)."""
    n_out = ancestors.shape[0]
    alive = jnp.isfinite(lse)
    ancestors = jnp.where(alive, ancestors, jnp.arange(n_out) % log_weights.shape[0])
    return ancestors.astype(jnp.int32), jnp.full((n_out,), lse - jnp.log(n_out), log_weights.dtype)


def _probs(log_weights: jax.Array, lse: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    lse = logsumexp(log_weights) if lse is None else lse
    n = log_weights.shape[0]
    return jnp.where(jnp.isfinite(lse), normalized_weights(log_weights, lse), 1.0 / n), lse


@dataclass(frozen=True)
class Multinomial:
    """``n_out`` independent draws ∝ weight (inverse CDF of ``u_j``)."""

    def __call__(self, u, log_weights, lse=None):
        probs, lse = _probs(log_weights, lse)
        return _equal(inverse_cdf(u, probs), log_weights, lse)


@dataclass(frozen=True)
class Stratified:
    """One draw in each stratum ``[j/n_out, (j+1)/n_out)`` at position ``(j + u_j)/n_out``."""

    def __call__(self, u, log_weights, lse=None):
        probs, lse = _probs(log_weights, lse)
        j = jnp.arange(u.shape[0], dtype=probs.dtype)
        return _equal(inverse_cdf((j + u) / u.shape[0], probs), log_weights, lse)


@dataclass(frozen=True)
class Systematic:
    """Stratified with one shared uniform: positions ``(j + u_0)/n_out`` (reads ``u[0]`` only)."""

    def __call__(self, u, log_weights, lse=None):
        probs, lse = _probs(log_weights, lse)
        j = jnp.arange(u.shape[0], dtype=probs.dtype)
        return _equal(inverse_cdf((j + u[0]) / u.shape[0], probs), log_weights, lse)

    def draw(self, key, n_out, dtype):
        return jnp.broadcast_to(jax.random.uniform(key, (1,), dtype), (n_out,))


@dataclass(frozen=True)
class Residual:
    """``⌊n_out w_i⌋`` deterministic copies, the rest multinomial on the residual weights."""

    def __call__(self, u, log_weights, lse=None):
        probs, lse = _probs(log_weights, lse)
        return _equal(residual_ancestors(u, probs), log_weights, lse)


_BY_NAME = {
    "multinomial": Multinomial,
    "stratified": Stratified,
    "systematic": Systematic,
    "residual": Residual,
}


@dataclass(frozen=True)
class Adaptive:
    """Apply ``base`` only when ``ESS < threshold · n_in`` (else keep every particle and weight).
    Valid when ``base`` is: either branch is (the identity trivially). Needs ``n_out = n_in``."""

    base: Callable
    threshold: float = 0.5

    def trigger(self, log_weights, ess_value=None):
        """``bool[]``: ESS below the threshold (``ess_value``: the ESS if the caller has it)."""
        value = ess(log_weights) if ess_value is None else ess_value
        return value < self.threshold * log_weights.shape[0]

    def __call__(self, u, log_weights):
        if u.shape[0] != log_weights.shape[0]:
            raise ConfigError(
                f"Adaptive keeps every particle when it does not select: it needs as many outputs as "
                f"inputs, got {u.shape[0]} uniforms for {log_weights.shape[0]} weights"
            )
        keep = lambda u, lw: (jnp.arange(lw.shape[0], dtype=jnp.int32), lw)
        return jax.lax.cond(self.trigger(log_weights), self.base, keep, u, log_weights)

    def draw(self, key, n_out, dtype):
        return draw_uniforms(self.base, key, n_out, dtype)


@dataclass(frozen=True)
class Grouped:
    """Island selection: ``base`` applied within each of ``num_groups`` contiguous groups on its
    own (group ``g`` gets slots ``g·m_out … (g+1)·m_out − 1`` and uniforms of the same slots); no
    particle leaves its group and each group keeps its own mass. Valid group by group when ``base``
    is; with one group per device no particle crosses devices, at the price of a noisier Ẑ."""

    base: Callable
    num_groups: int

    def __post_init__(self):
        check_int("Grouped(num_groups)", self.num_groups, low=1)

    def _check(self, n_in: int, n_out: int) -> None:
        if n_in % self.num_groups or n_out % self.num_groups:
            raise ConfigError(
                f"Grouped({self.num_groups} groups) needs the particle counts to be multiples of the "
                f"number of groups, got {n_in} in and {n_out} out"
            )

    def __call__(self, u, log_weights):
        g = self.num_groups
        self._check(log_weights.shape[0], u.shape[0])
        m_in, m_out = log_weights.shape[0] // g, u.shape[0] // g
        anc, lw = jax.vmap(self.base)(u.reshape(g, m_out), log_weights.reshape(g, m_in))
        # A user's base whose ancestor leaves its group is caught by the SMC step (it checks every
        # selection that is not built in against its num_groups).
        offsets = (jnp.arange(g, dtype=jnp.int32) * m_in)[:, None]
        return (anc + offsets).reshape(-1), lw.reshape(-1)

    def draw(self, key, n_out, dtype):
        g = self.num_groups
        self._check(n_out, n_out)
        keys = jax.random.split(key, g)
        return jax.vmap(lambda k: draw_uniforms(self.base, k, n_out // g, dtype))(keys).reshape(-1)


@dataclass(frozen=True)
class FearnheadClifford:
    """Keep ``n_out`` of ``n_in`` particles without replacement (Fearnhead & Clifford 2003; Steer's
    selection). With the threshold ``c`` solving ``Σ_i min(w_i / c, 1) = n_out``, the ``L`` particles
    with ``w_i ≥ c`` are kept once with their own weights; the ``n_out − L`` other slots are filled
    from the rest ∝ ``w_i`` by ``scheme`` (``"systematic"``: a particle at most once;
    ``"stratified"``), each with weight ``c``. Valid, and Ẑ is preserved exactly whenever at least
    ``n_out`` weights are positive. With ``n_out ≥ n_in`` every particle is kept in place."""

    scheme: str = "systematic"

    def __post_init__(self):
        if self.scheme not in ("systematic", "stratified"):
            raise ConfigError(
                f"unknown selection scheme {self.scheme!r} for Steer; choose 'systematic' or 'stratified'"
            )

    def __call__(self, u, log_weights):
        n, m = u.shape[0], log_weights.shape[0]
        order, kept, log_c, s = fearnhead_clifford_threshold(log_weights, n)
        ref = jnp.where(jnp.isfinite(s[0]), s[0], 0.0)
        rank = jnp.arange(m)
        residual = jnp.where(rank >= kept, jnp.exp(s - ref), 0.0)
        cdf = jnp.cumsum(residual)
        j = jnp.arange(n)
        uu = u[0] if self.scheme == "systematic" else u
        positions = (j - kept + uu) / jnp.maximum(n - kept, 1) * cdf[-1]
        last_alive = m - 1 - jnp.argmax((residual > 0)[::-1])
        drawn = jnp.minimum(jnp.searchsorted(cdf, positions, side="right"), last_alive)
        deterministic = j < kept
        ranks = jnp.where(deterministic, jnp.minimum(j, m - 1), drawn)
        new_log_weights = jnp.where(deterministic, s[jnp.minimum(j, m - 1)], log_c)
        return order[ranks].astype(jnp.int32), new_log_weights

    def draw(self, key, n_out, dtype):
        if self.scheme == "systematic":
            return Systematic().draw(key, n_out, dtype)
        return jax.random.uniform(key, (n_out,), dtype)


@dataclass(frozen=True)
class Conditional:
    """Conditional SMC's resampling: slot 0 keeps particle 0 (the reference, whose ancestor is
    itself), the other slots are ``base``'s, with ``base``'s new weights. With a ``base`` that draws
    each slot independently given the weights (:class:`Multinomial`), the ancestors are distributed
    as ``base``'s *conditioned on* ``ancestors[0] = 0``: the conditional multinomial resampling of
    Andrieu, Doucet & Holenstein (2010), which makes a conditional SMC sweep followed by a draw of
    the next reference ∝ the final weights leave the target invariant (particle Gibbs). Not valid
    as an SMC selection (it favours particle 0), and not the conditional law for schemes whose slots
    share uniforms (:class:`Systematic`, :class:`Stratified`), which need their own construction.

    *Ancestor sampling* (Lindsten, Jordan & Schön 2014): with ``ancestor_scores: f[N]`` slot 0's
    ancestor is drawn ∝ ``w_i · exp(ancestor_scores_i)`` by the inverse CDF of ``u[0]`` (which
    ``base`` spends on slot 0 only) — ``0`` when every such weight is zero. ``pin: bool[]`` (may be
    traced): where false this is ``base`` itself (an unconditional sweep)."""

    base: Callable = Multinomial()
    ancestor_scores: Any = None
    pin: Any = True

    def __call__(self, u, log_weights):
        ancestors, new_log_weights = self.base(u, log_weights)
        first = jnp.zeros((), jnp.int32)
        if self.ancestor_scores is not None:
            probs, lse = _probs(log_weights + self.ancestor_scores)
            first = jnp.where(jnp.isfinite(lse), inverse_cdf(u[:1], probs)[0], 0).astype(jnp.int32)
        return ancestors.at[0].set(jnp.where(self.pin, first, ancestors[0])), new_log_weights

    def draw(self, key, n_out, dtype):
        return draw_uniforms(self.base, key, n_out, dtype)


@dataclass(frozen=True)
class ParentWeights:
    """``base``'s ancestors, each new particle keeping the log weight of the particle it copies.
    For weights that are a *score* of the particle's current state, re-read at every selection,
    as in Puri et al.'s (2025) particle filter, whose weights are ``softmax φ(r_t)`` of a reward
    after each step. Not valid: with an unbiased ``base`` the expected measure is
    ``Σ_i n_out · w_i² / Σ_k w_k · δ(x_i)`` (weights counted twice), not ``Σ_i w_i δ(x_i)``."""

    base: Callable

    def __call__(self, u, log_weights):
        ancestors, _ = self.base(u, log_weights)
        return ancestors, log_weights[ancestors]

    def draw(self, key, n_out, dtype):
        return draw_uniforms(self.base, key, n_out, dtype)


@dataclass(frozen=True)
class Beam:
    """Beam selection: the ``keep`` particles with the largest log weights (ties: the lower index),
    slot ``j`` a copy of the ``⌊j · keep / n_out⌋``-th best (``n_out / keep`` copies each when it
    divides), each copy keeping its parent's log weight. Deterministic (reads no uniform). Not
    valid: search, not inference (a particle outside the top ``keep`` is never copied)."""

    keep: int

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise ConfigError(f"Beam's keep must be an integer >= 1, got {self.keep!r}")

    def __call__(self, u, log_weights):
        n_out, keep = u.shape[0], min(self.keep, log_weights.shape[0])
        _, ranked = jax.lax.top_k(log_weights, keep)
        ancestors = ranked[jnp.arange(n_out) * keep // n_out].astype(jnp.int32)
        return ancestors, log_weights[ancestors]

    def draw(self, key, n_out, dtype):
        return jnp.zeros((n_out,), dtype)


def fearnhead_clifford_threshold(
    log_weights: jax.Array, n: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Fearnhead–Clifford's threshold for keeping ``n`` of ``M = len(log_weights)`` particles.

    Sorting the weights ``s_0 ≥ s_1 ≥ …``, ``L`` is the smallest index with ``s_L ≤ c_L = (Σ_{i≥L}
    s_i) / (n − L)``; then ``Σ_i min(s_i / c_L, 1) = n``. Returns ``(order: i32[M]`` (descending
    sort), ``num_kept: i32[]`` (L), ``log_c: f32[]``, ``log_w_sorted: f32[M])``. ``log_c`` is −inf
    when fewer than ``n`` particles have positive weight; when ``n ≥ M`` every particle is kept in
    place (``order`` is the identity, ``L = M``)."""
    m = log_weights.shape[0]
    if n >= m:
        order = jnp.arange(m, dtype=jnp.int32)
        return order, jnp.asarray(m, jnp.int32), jnp.asarray(-jnp.inf, log_weights.dtype), log_weights
    order = jnp.argsort(-log_weights, stable=True).astype(jnp.int32)
    s = log_weights[order]
    ref = jnp.where(jnp.isfinite(s[0]), s[0], 0.0)
    w = jnp.exp(s - ref)
    # Tail sums T_L from the small end: no cancellation, and T_L ≥ s_L holds in floating point too.
    tail = jnp.cumsum(w[::-1])[::-1][:n]
    ok = w[:n] * (n - jnp.arange(n)) <= tail  # always true at L = n − 1
    kept = jnp.argmax(ok).astype(jnp.int32)
    log_c = ref + jnp.log(tail[kept]) - jnp.log((n - kept).astype(s.dtype))
    return order, kept, log_c, s
