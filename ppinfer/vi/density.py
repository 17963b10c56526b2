"""Densities of one guide sample: the first-class pieces objectives are written with.

One draw ``x ~ q_φ`` from the guide, run through the model, gives

    log_p      = log p_θ(x, y)        (every ``sample`` site of the model: latent and observed)
    log_q      = log q_φ(x)           (every latent site of the guide, auxiliary sites included)
    log_weight = log_p − log_q        (the log density ratio; ``E_q[exp(log_weight)] = Z``)
    score      = Σ_{score-function sites} log q_φ(x_s)       (sample held fixed; see estimators)
    log_q_enum = Σ_{enumerated sites} log q_φ(x_s)

``log_p``, ``log_q`` and ``log_weight`` are differentiable in the parameters, and in the sample
wherever it is reparameterised. A guide site absent from the model is an error unless marked
auxiliary (``infer={"is_auxiliary": True}``, as NumPyro's ``AutoContinuous`` guides do); with
``full_coverage`` every latent site of the model must be sampled by the guide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro import handlers

from ppinfer.errors import ModelError
from ppinfer.vi.estimators import ENUMERATE, REINFORCE, Estimators, choose_and_detach
from ppinfer.weighted import check_covers, choices_of, site_log_prob

__all__ = ["Particles", "log_density_ratio", "sample_particles"]


class Particles(NamedTuple):
    """``K`` independent guide samples with their densities (module docstring), each ``f32[K]``;
    ``choices``: the model's latent and deterministic sites, name → ``[K, …]``."""

    log_weight: jax.Array
    log_p: jax.Array
    log_q: jax.Array
    score: jax.Array
    log_q_enum: jax.Array
    choices: dict[str, jax.Array]


def log_density_ratio(
    key: jax.Array,
    model: Callable[..., Any],
    guide: Callable[..., Any],
    params: dict[str, jax.Array],
    args: tuple = (),
    estimators: Estimators = None,
    fixed: dict[str, jax.Array] | None = None,
    fixed_samples: bool = False,
    full_coverage: bool = True,
) -> Particles:
    """One guide sample and its densities (a :class:`Particles` of scalars instead of ``[K]``).

    Args:
        key: PRNG key of this sample.
        params: *constrained* parameter values, name → array (guide's and model's).
        estimators: per-site gradient estimators (see :mod:`ppinfer.vi.estimators`).
        fixed: values of enumerated guide sites for this sample.
        fixed_samples: hold every sample fixed (no pathwise gradient, no score): for objectives
            whose gradient is not taken through the sampling (wake phases).
        full_coverage: raise :class:`ModelError` if the model has a latent site the guide does not
            sample.
    """
    k_q, k_p = jax.random.split(key)
    chooser = choose_and_detach(estimators, fixed_samples)
    with (
        chooser,
        handlers.trace() as q_trace,
        handlers.seed(rng_seed=k_q),
        handlers.substitute(data={**params, **(fixed or {})}),
    ):
        guide(*args)
    q_latent = {n: s for n, s in q_trace.items() if s["type"] == "sample" and not s["is_observed"]}
    values = {n: s["value"] for n, s in q_latent.items()}
    # A subsampled plate's indices too (numpyro.plate(..., subsample_size=m)): the model must score
    # the guide's local latents against the same minibatch the guide drew them for.
    subsample = {n: s["value"] for n, s in q_trace.items() if s["type"] == "plate"}
    with (
        handlers.trace() as p_trace,
        handlers.seed(rng_seed=k_p),
        handlers.substitute(data={**params, **subsample, **values}),
    ):
        model(*args)
    _check_sites(p_trace, q_latent, full_coverage)
    zero = jnp.zeros((), jnp.result_type(float))
    log_p = sum((site_log_prob(s) for s in p_trace.values() if s["type"] == "sample"), zero)
    log_q = sum((site_log_prob(s) for s in q_latent.values()), zero)
    by = lambda est: sum((site_log_prob(s) for n, s in q_latent.items() if chooser.chosen[n] == est), zero)
    score = zero if fixed_samples else by(REINFORCE)
    return Particles(log_p - log_q, log_p, log_q, score, by(ENUMERATE), choices_of(p_trace))


def sample_particles(
    key: jax.Array,
    model: Callable[..., Any],
    guide: Callable[..., Any],
    params: dict[str, jax.Array],
    args: tuple = (),
    num_particles: int = 1,
    estimators: Estimators = None,
    fixed: dict[str, jax.Array] | None = None,
    fixed_samples: bool = False,
    full_coverage: bool = True,
) -> Particles:
    """``num_particles`` independent :func:`log_density_ratio` samples (vmapped; sample ``k`` uses
    ``fold_in(key, k)``); ``fixed`` values, if given, carry a leading axis ``K``."""

    def one(k, fixed_k):
        return log_density_ratio(
            jax.random.fold_in(key, k), model, guide, params, args, estimators, fixed_k,
            fixed_samples, full_coverage,
        )  # fmt: skip

    return jax.vmap(one)(jnp.arange(num_particles), fixed)


def _check_sites(p_trace: dict, q_latent: dict, full_coverage: bool) -> None:
    for name, site in q_latent.items():
        if name not in p_trace:
            if not site["infer"].get("is_auxiliary", False):
                raise ModelError(
                    f"the guide samples site {name!r}, which the model does not have (mark it "
                    "infer={'is_auxiliary': True} if it is an auxiliary variable)"
                )
        elif p_trace[name]["type"] == "sample" and p_trace[name]["is_observed"]:
            raise ModelError(f"the guide samples site {name!r}, which the model observes")
        elif p_trace[name]["type"] == "sample":
            check_covers(name, p_trace[name]["fn"], site["fn"], p_trace[name]["value"], "guide")
    if full_coverage:
        missing = [
            n
            for n, s in p_trace.items()
            if s["type"] == "sample" and not s["is_observed"] and n not in q_latent
        ]
        if missing:
            raise ModelError(
                f"the guide does not sample the model's latent site(s) {missing}; this objective "
                "needs a guide covering every latent site"
            )
