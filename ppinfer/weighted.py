"""Weighted: one run of a program with its accumulated log weight.

Meaning: the one-point measure ``exp(log_weight) · δ(choices)``. Running a program under a proposal
is *valid* (``E_q[⟦run⟧] = ⟦program⟧``) because every latent choice drawn from ``q`` is paid for with
``log p − log q``:

    log_weight = Σ_observed log p(y | …)                  (observations, factors, conditions)
               + Σ_{x proposed by q} [log p(x | …) − log q(x | …)]

Latent choices that the proposal does not make are drawn from the program's own prior and contribute
nothing (their ``p/q`` is 1). Without a proposal this is likelihood weighting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import MaskedDistribution
from numpyro.distributions.batch_util import promote_batch_shape
from numpyro.primitives import Messenger

from ppinfer.errors import ConfigError, ModelError
from ppinfer.primitives import collect_stops

__all__ = ["Weighted", "RunInfo", "simulate", "weight_from_traces", "choices_of", "site_log_prob"]


class Weighted(NamedTuple):
    """One weighted run.

    Attributes:
        value: the program's return value (a pytree).
        choices: latent ``sample`` sites and ``deterministic`` sites, name → value.
        log_weight: ``f32[]``, as in the module docstring (log p/q of the latent choices plus log
            likelihood of the observations).
    """

    value: Any
    choices: dict[str, Any]
    log_weight: jax.Array


class RunInfo(NamedTuple):
    """Diagnostics of one run: ``nan_sites`` maps each weighted site to whether its log density was
    NaN or +inf (invalid parameters or data, an infinite factor); ``stopped`` is the OR of the run's
    ``stop`` flags; ``log_prob_draws: f32[]`` is the log probability (density) of the run's latent
    choices under the distributions they were drawn from (the proposal's where it made them, the
    prior's elsewhere): the law of the run's randomness, which exact checks that inject ``values``
    enumerate."""

    nan_sites: dict[str, jax.Array]
    stopped: jax.Array
    log_prob_draws: jax.Array


def simulate(
    key: jax.Array,
    fn: Callable[..., Any],
    args: tuple = (),
    kwargs: dict | None = None,
    proposal: Callable[..., Any] | None = None,
    particle: jax.Array | None = None,
    values: dict[str, Any] | None = None,
    pinned: tuple[dict[str, Any], jax.Array] | None = None,
) -> tuple[Weighted, RunInfo]:
    """Run ``fn(*args, **kwargs)`` once, its latent choices drawn from ``proposal`` (called with the
    same arguments) where it makes them and from ``fn``'s prior elsewhere. Pure and vmap/jit-able.
    ``key`` seeds the run: site ``i`` draws with ``fold_in(key, i)``, or, when ``particle: i32[]`` is
    given, ``fold_in(fold_in(key, i), particle)`` — so a population vmapped over ``particle`` with one
    shared ``key`` derives each particle's keys with one hash per site (the shared part is computed
    once, not per particle).

    ``values`` (site name → value) replaces the random draw of those latent sites, in the proposal
    where it makes them, else in ``fn`` — the same run on injected randomness (exact checks
    enumerate it; ``RunInfo.log_prob_draws`` is its law).

    ``pinned = (values, on)`` (``on: bool[]``, traced) gives those latent sites ``values[name]`` where
    ``on`` holds and their own draw elsewhere — conditional SMC's reference slot inside a vmapped
    population, in the same single run per particle (:class:`pin`). Not with a ``proposal``."""
    kwargs = kwargs or {}
    if pinned is not None and proposal is not None:
        raise ConfigError("a pinned (reference) run takes its latent values from the program, not a proposal")
    values = values or {}
    k_p, k_q = (key, None) if proposal is None else jax.random.split(key)
    q_trace = None
    data = dict(values)
    if proposal is not None:
        with (
            handlers.trace() as q_trace,
            seed(rng_seed=k_q, particle=particle),
            handlers.substitute(data=values),
        ):
            proposal(*args, **kwargs)
        data.update({name: site["value"] for name, site in q_trace.items() if _is_latent(site)})
        # A subsampled plate's indices (numpyro.plate(..., subsample_size=m)) too: the program
        # weighs the proposal's local choices on the minibatch they were drawn for.
        data.update({name: site["value"] for name, site in q_trace.items() if site["type"] == "plate"})
    stops = collect_stops()
    with (
        handlers.trace() as p_trace,
        pin(*pinned) if pinned is not None else contextlib.nullcontext(),
        seed(rng_seed=k_p, particle=particle),
        handlers.substitute(data=data),
    ):
        with stops:
            value = fn(*args, **kwargs)
    log_weight, nan_sites = weight_from_traces(p_trace, q_trace)
    info = RunInfo(nan_sites, stops.stopped, _log_prob_draws(p_trace, q_trace))
    return Weighted(value, choices_of(p_trace), log_weight), info


def _log_prob_draws(p_trace: dict, q_trace: dict | None) -> jax.Array:
    """Log probability of the latent draws under the distributions they came from (unused on the
    key-driven path, where jit drops it). A site's mask and scale weight its density, not its draw,
    so they do not enter."""
    q_latent = {} if q_trace is None else {n: s for n, s in q_trace.items() if _is_latent(s)}
    drawn = list(q_latent.values())
    drawn += [s for n, s in p_trace.items() if _is_latent(s) and n not in q_latent]
    total = jnp.zeros((), dtype=jnp.result_type(float))
    for site in drawn:
        total = total + jnp.sum(site["fn"].log_prob(site["value"]))
    return total


def weight_from_traces(
    p_trace: dict, q_trace: dict | None = None, drawn_from_prior: bool = True
) -> tuple[jax.Array, dict]:
    """The log weight of a program trace ``p_trace`` whose latent values were proposed by
    ``q_trace`` (``None``: all drawn from the prior). See the module docstring for the formula.
    A latent site drawn from its prior whose term in the joint is masked or scaled adds that term
    over the prior, unless ``drawn_from_prior=False`` (a caller that weights each choice by its
    term itself, as :mod:`~ppinfer.algorithms.enumerate` does, whose stopped steps are masked).

    Raises :class:`ModelError` if the proposal makes a choice the program does not have, or proposes
    an observed site."""
    q_latent = {} if q_trace is None else {n: s for n, s in q_trace.items() if _is_latent(s)}
    for name in q_latent:
        if name not in p_trace:
            raise ModelError(f"the proposal samples site {name!r}, which the program does not have")
        if not _is_latent(p_trace[name]):
            raise ModelError(f"the proposal samples site {name!r}, which the program observes")
        check_covers(name, p_trace[name]["fn"], q_latent[name]["fn"], p_trace[name]["value"], "proposal")
    log_weight = jnp.zeros((), dtype=jnp.result_type(float))
    nan_sites = {}
    for name, site in p_trace.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            lp = site_log_prob(site)
        elif name in q_latent:
            lp = site_log_prob(site) - site_log_prob(q_latent[name])
        elif drawn_from_prior and reweighted(site):
            # Drawn from its prior p, but its term in the joint is masked or scaled (numpyro.handlers
            # .mask/.scale on a latent site, as NUTS and VI read it): weight by that term over p.
            lp = site_log_prob(site) - drawn_log_prob(site)
        else:
            continue
        nan_sites[name] = jnp.isnan(lp) | (lp == jnp.inf)  # +inf: an infinite weight, as bad
        log_weight = log_weight + lp
    return log_weight, nan_sites


def check_covers(name: str, p_fn: Any, q_fn: Any, value: Any, what: str = "proposal") -> None:
    """Check that a proposal's (or guide's) distribution ``q_fn`` at latent site ``name`` can stand
    in for the program's ``p_fn`` in an importance weight ``p(x)/q(x)``.

    - A discrete ``q`` for a continuous ``p`` (or the reverse) is a :class:`ModelError`: the ratio
      of a mass to a density is not a weight (any draw's "weight" is then meaningless).
    - A ``q`` whose support provably leaves out part of ``p``'s (``HalfNormal`` for a ``Normal``
      site, ``Bernoulli`` for a ``Poisson`` one: support bounds compared where they are concrete)
      gets a :class:`~ppinfer.errors.ProposalSupportWarning`: the weights then target the posterior
      restricted to ``q``'s support, which is the posterior only when the program itself puts no
      mass outside it (a ``condition``, a truncated likelihood). Warned once per compilation: only
      while tracing (``value``, the site's value, is a tracer), not on eager runs such as the dry
      run before it."""
    p_sup, q_sup = _base_support(p_fn), _base_support(q_fn)
    if p_sup is None or q_sup is None:
        return
    if bool(p_sup.is_discrete) != bool(q_sup.is_discrete):
        kinds = {True: "discrete", False: "continuous"}
        raise ModelError(
            f"the {what}'s distribution at site {name!r} ({type(q_fn).__name__}) is "
            f"{kinds[bool(q_sup.is_discrete)]} where the program's ({type(p_fn).__name__}) is "
            f"{kinds[bool(p_sup.is_discrete)]}: the {what} must draw from the same kind of space"
        )
    p_lo, p_hi = _support_bounds(p_sup)
    q_lo, q_hi = _support_bounds(q_sup)
    try:  # NumPy, not jnp: under a trace jnp would stage even constant comparisons
        short = bool(np.any(np.asarray(q_lo) > np.asarray(p_lo))) or bool(
            np.any(np.asarray(q_hi) < np.asarray(p_hi))
        )
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return  # bounds that depend on traced values (Uniform(0, θ)): cannot tell here
    if short and isinstance(value, jax.core.Tracer):
        import warnings

        from ppinfer.errors import ProposalSupportWarning

        warnings.warn(
            f"the {what}'s distribution at site {name!r} ({type(q_fn).__name__}, support {q_sup}) "
            f"does not cover the program's ({type(p_fn).__name__}, support {p_sup}): the weights "
            f"target the posterior restricted to the {what}'s support, which is the posterior only "
            "if the program puts no mass outside it",
            ProposalSupportWarning,
            stacklevel=2,
        )


def _base_support(fn: Any) -> Any:
    """The support constraint of a distribution, ``Independent``/event wrappers removed (``None``
    when the distribution has none)."""
    try:
        sup = fn.support
    except (AttributeError, NotImplementedError):
        return None
    while hasattr(sup, "base_constraint"):
        sup = sup.base_constraint
    return sup


def _support_bounds(sup: Any) -> tuple[Any, Any]:
    """``(lower, upper)`` bounds of a one-dimensional support constraint (``±inf`` where it has
    none; the whole line for a constraint without bounds, e.g. ``real``; ``(0, 1)`` for
    ``boolean``). Constraints of other shapes (``simplex``…) give the whole line: never flagged."""
    if isinstance(sup, dist.constraints._Boolean):
        return 0, 1
    lo = getattr(sup, "lower_bound", -jnp.inf)
    hi = getattr(sup, "upper_bound", jnp.inf)
    return lo, hi


def reweighted(site: dict) -> bool:
    """Whether a latent site's term in the joint differs from the density its draws come from:
    the site is masked or scaled (``numpyro.handlers.mask``/``scale``, a site's ``mask``/``scale``,
    or a ``MaskedDistribution``)."""
    masked = isinstance(site["fn"], MaskedDistribution)
    return masked or site.get("mask") is not None or site.get("scale") is not None


def drawn_log_prob(site: dict) -> jax.Array:
    """``f32[]``: the log density of a latent site's value under the distribution a fresh draw comes
    from (masks unwrapped, no scale); its :func:`site_log_prob` where it is not :func:`reweighted`."""
    if not reweighted(site):
        return site_log_prob(site)
    fn = site["fn"]
    while isinstance(fn, MaskedDistribution):
        fn = fn.base_dist
    return jnp.sum(fn.log_prob(site["value"]))


def site_log_prob(site: dict) -> jax.Array:
    """``f32[]``: the log density of a trace site's value, masked and scaled as NumPyro does."""
    fn, value = site["fn"], site["value"]
    intermediates = site.get("intermediates")
    lp = fn.log_prob(value, intermediates) if intermediates else fn.log_prob(value)
    mask = site.get("mask")
    if mask is not None:
        lp = jnp.where(mask, lp, 0.0)
    lp = jnp.sum(lp)
    scale = site.get("scale")
    return lp if scale is None else scale * lp


def choices_of(trace: dict) -> dict[str, Any]:
    """Latent sample sites and deterministic sites of a trace, name → value."""
    return {
        name: site["value"]
        for name, site in trace.items()
        if _is_latent(site) or site["type"] == "deterministic"
    }


class pin(Messenger):
    """Latent sites named in ``values`` take ``values[name]`` where ``on: bool[]`` holds and keep their
    own draw elsewhere (``jnp.where``, so ``on`` may be traced: one run serves a pinned and a free
    particle alike under ``vmap``). Entered outside :class:`seed`, so that it sees the seeded draw."""

    def __init__(self, values: dict[str, Any], on: Any):
        super().__init__()
        self.values, self.on = values, on

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"] or msg["name"] not in self.values:
            return
        drawn = msg["value"]
        if drawn is None:
            drawn = msg["fn"](*msg["args"], **msg["kwargs"])
        ref = jnp.asarray(self.values[msg["name"]]).astype(jnp.result_type(drawn))
        msg["value"] = jnp.where(self.on, ref, drawn)


class seed(handlers.seed):
    """NumPyro's ``seed`` handler, deriving the i-th site's key as ``fold_in(key, i)`` (then folding in
    ``particle`` if given): one hash per random site and particle instead of a split's two — this is
    on the hot path of every particle's step."""

    def __init__(self, fn=None, rng_seed=None, particle=None):
        super().__init__(fn, rng_seed)
        self._count = 0
        self._particle = particle

    def process_message(self, msg):
        if msg["type"] in self.hide_types or msg["type"] not in (
            "sample",
            "prng_key",
            "plate",
            "control_flow",
        ):
            return
        if msg["kwargs"]["rng_key"] is not None or msg["value"] is not None:
            return
        key = jax.random.fold_in(self.rng_key, self._count)
        self._count += 1
        if self._particle is None:
            msg["kwargs"]["rng_key"] = key
        elif msg["type"] == "sample" and type(msg["fn"]) in _BATCHABLE and not msg["args"]:
            msg["value"] = particle_draw(key, self._particle, msg["fn"], msg["kwargs"]["sample_shape"])
        else:
            msg["kwargs"]["rng_key"] = jax.random.fold_in(key, self._particle)


# Distributions whose ``sample`` reads only their parameters and ``batch_shape``, so that a copy with
# every parameter given a leading particle axis (and the batch shape promoted) draws N independent
# values in one call. Anything else (composite, transformed, expanded or masked distributions, user
# subclasses) takes the per-particle-key path, which is always correct.
_BATCHABLE = frozenset(
    {
        dist.Normal,
        dist.Cauchy,
        dist.Laplace,
        dist.Gumbel,
        dist.Uniform,
        dist.Exponential,
        dist.Gamma,
        dist.Poisson,
        dist.BernoulliProbs,
        dist.BernoulliLogits,
        dist.CategoricalProbs,
        dist.CategoricalLogits,
        dist.MultivariateNormal,
    }
)


def particle_draw(site_key: jax.Array, particle: jax.Array, fn: dist.Distribution, sample_shape=()):
    """One particle's draw from ``fn`` at a site whose shared key is ``site_key``: by definition
    ``fn.sample(fold_in(site_key, particle), sample_shape)``. Under ``vmap`` over ``particle`` with a
    shared ``site_key`` (how every population runs a one-particle program) the whole population's
    draws are made in ONE call, ``fn_N.sample(site_key)`` with the particle axis as a batch axis — the
    random stream differs from the per-particle-key one but is equally valid: the N draws are
    independent, each from its particle's ``fn``. This saves one PRNG hash per particle and site (the
    per-particle key derivation), the dominant cost of a cheap step. Other batching patterns (e.g. a
    batched ``site_key`` when many runs are vmapped) fall back to per-particle keys."""
    leaves, treedef = jax.tree.flatten(fn)
    event = tuple(sample_shape) + tuple(fn.batch_shape) + tuple(fn.event_shape)

    def one(key, i, *leaves):
        d = jax.tree.unflatten(treedef, leaves)
        return d.sample(jax.random.fold_in(key, i), sample_shape)

    draw = jax.custom_batching.custom_vmap(one)

    @draw.def_vmap
    def _rule(axis_size, in_batched, key, i, *leaves):
        key_batched, i_batched, *leaf_batched = in_batched
        if key_batched or not i_batched:
            axes = [0 if b else None for b in in_batched]
            return jax.vmap(one, in_axes=axes)(key, i, *leaves), True
        if not any(leaf_batched):
            d = jax.tree.unflatten(treedef, leaves)
            return d.sample(key, (axis_size,) + tuple(sample_shape)), True
        full = [
            x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
            for x, b in zip(leaves, leaf_batched, strict=True)
        ]
        d = promote_batch_shape(jax.tree.unflatten(treedef, full))
        if tuple(d.batch_shape) != (axis_size,) + tuple(fn.batch_shape):
            return jax.vmap(one, in_axes=[None, 0] + [0] * len(full))(key, i, *full), True
        out = d.sample(key, sample_shape)
        out = jnp.moveaxis(out, len(tuple(sample_shape)), 0)
        assert out.shape == (axis_size,) + event, (out.shape, event)
        return out, True

    return draw(site_key, particle, *leaves)


def _is_latent(site: dict) -> bool:
    return site["type"] == "sample" and not site["is_observed"]
