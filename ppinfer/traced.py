"""Traced: one run of a static program with its choice map and per-site log densities.

Meaning: the point ``x = trace.choices`` together with the joint density ``p(x, y) = exp(score)``
evaluated there. This is the representation MCMC moves act on (Gen's generative-function
interface, for programs of *fixed structure*: every run visits the same sites with the same shapes,
so traces are pytrees and every function here is pure and jit/vmap-able).

Weights returned (``p`` the program's joint density, ``y`` its observations and factors):

- :func:`generate` ``(key, program, args, constraints)`` → weight ``log p(x, y) − log q(x_U)`` where
  ``x_U`` are the unconstrained latent sites, drawn from the prior: the log density of the
  constrained sites (latent and observed) given the rest.
- :func:`assess` → ``score = log p(x, y)`` for a complete choice map.
- :func:`update` ``(trace, constraints)`` → weight ``log p(x', y) − log p(x, y)``.
- :func:`regenerate` ``(key, trace, selection)`` → weight
  ``log [p(x', y) q(x_S | x') / (p(x, y) q(x'_S | x))]`` where ``q`` redraws the selected sites ``S``
  from their prior conditionals. With fixed structure this is
  ``Σ_{sites ∉ S} [log p'(site) − log p(site)]`` (observations included): exactly the log
  Metropolis–Hastings acceptance ratio of the prior-regeneration proposal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro import handlers

from ppinfer.errors import ModelError
from ppinfer.weighted import drawn_log_prob, reweighted, seed, site_log_prob

__all__ = ["Trace", "generate", "assess", "update", "regenerate", "latent_sites"]


class Trace(NamedTuple):
    """One run of a static program.

    Attributes:
        choices: latent ``sample`` sites, name → value.
        log_probs: every ``sample`` site (latent, observed, factor), name → ``f32[]`` log density
            (summed over the site's batch, masked and scaled).
        deterministics: ``deterministic`` sites, name → value.
        log_prior: ``f32[]``, Σ of the latent sites' log densities.
        log_likelihood: ``f32[]``, Σ of the observed sites' (and factors') log densities.
        value: the program's return value.
        drawn_log_probs: latent sites, name → ``f32[]``: the log density of the distribution a
            fresh draw comes from (neither masked nor scaled; ``log_probs`` has the site's term
            in the joint, which ``numpyro.handlers.mask``/``scale`` change).
    """

    choices: dict[str, jax.Array]
    log_probs: dict[str, jax.Array]
    deterministics: dict[str, jax.Array]
    log_prior: jax.Array
    log_likelihood: jax.Array
    value: Any
    drawn_log_probs: dict[str, jax.Array]

    @property
    def score(self) -> jax.Array:
        """``f32[]``: ``log p(x, y) = log_prior + log_likelihood``."""
        return self.log_prior + self.log_likelihood


def generate(
    key: jax.Array,
    program: Callable[..., Any],
    args: tuple = (),
    constraints: dict[str, Any] | None = None,
) -> tuple[Trace, jax.Array]:
    """Run ``program(*args)`` with the latent sites in ``constraints`` fixed and the others drawn from
    their prior. Returns ``(trace, log_weight)`` with ``log_weight = Σ_{constrained and observed sites}
    log p(site | …)`` (``= score − Σ_{drawn sites} log p``)."""
    constraints = dict(constraints or {})
    trace = _run(key, program, args, constraints)
    _check_names(constraints, trace.choices, "generate")
    drawn = sum((trace.drawn_log_probs[n] for n in trace.choices if n not in constraints), jnp.zeros(()))
    return trace, trace.score - drawn


def assess(program: Callable[..., Any], args: tuple, choices: dict[str, Any]) -> Trace:
    """The trace of ``program(*args)`` at the complete latent choice map ``choices`` (its ``score``
    is ``log p(x, y)``). Raises :class:`ModelError` if a latent site is missing from ``choices``."""
    trace = _run(jax.random.PRNGKey(0), program, args, dict(choices))
    missing = sorted(set(trace.choices) - set(choices))
    if missing:
        raise ModelError(f"assess: the choice map has no value for latent site(s) {missing}")
    return trace


def update(
    program: Callable[..., Any], args: tuple, trace: Trace, constraints: dict[str, Any]
) -> tuple[Trace, jax.Array, dict[str, jax.Array]]:
    """Replace the values of some latent sites. Returns ``(new_trace, log_weight, discard)`` with
    ``log_weight = log p(x', y) − log p(x, y)`` and ``discard`` the replaced old values."""
    _check_names(constraints, trace.choices, "update")
    new = assess(program, args, {**trace.choices, **constraints})
    discard = {n: trace.choices[n] for n in constraints}
    return new, new.score - trace.score, discard


def regenerate(
    key: jax.Array, program: Callable[..., Any], args: tuple, trace: Trace, selection: Iterable[str]
) -> tuple[Trace, jax.Array]:
    """Redraw the ``selection`` sites from their prior conditionals (given the other sites' values),
    keeping every other latent site. Returns ``(new_trace, log_weight)``, ``log_weight`` as in the
    module docstring: the log MH acceptance ratio of this proposal."""
    selection = frozenset(selection)
    _check_names(selection, trace.choices, "regenerate")
    kept = {n: v for n, v in trace.choices.items() if n not in selection}
    new = _run(key, program, args, kept)
    not_selected = [n for n in new.log_probs if n not in selection]
    log_weight = sum((new.log_probs[n] - trace.log_probs[n] for n in not_selected), jnp.zeros(()))
    # A redrawn site whose term in the joint is masked or scaled: that term over the density drawn
    # from (0 for a plain site).
    adjust = lambda tr, n: tr.log_probs[n] - tr.drawn_log_probs[n]
    log_weight = log_weight + sum((adjust(new, n) - adjust(trace, n) for n in selection), jnp.zeros(()))
    return new, log_weight


def latent_sites(program: Callable[..., Any], args: tuple) -> dict[str, Any]:
    """The latent sites of one prior run (eager, host-side), name → its distribution: for checks
    on a program's structure (e.g. which sites are discrete)."""
    from ppinfer import checks  # (checks imports this module)

    with (
        handlers.trace() as tr,
        handlers.seed(rng_seed=0),
        checks.program_errors("running the program once failed"),
    ):
        program(*args)
    return {n: s["fn"] for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}


def _run(key: jax.Array, program: Callable[..., Any], args: tuple, fixed: dict) -> Trace:
    with handlers.trace() as tr, seed(rng_seed=key), handlers.substitute(data=fixed):
        value = program(*args)
    choices, log_probs, dets, drawn = {}, {}, {}, {}
    log_prior = log_lik = jnp.zeros((), jnp.result_type(float))
    for name, site in tr.items():
        if site["type"] == "deterministic":
            dets[name] = site["value"]
        if site["type"] != "sample":
            continue
        lp = site_log_prob(site)
        log_probs[name] = lp
        if site["is_observed"]:
            log_lik = log_lik + lp
        else:
            choices[name] = site["value"]
            log_prior = log_prior + lp
            drawn[name] = drawn_log_prob(site) if reweighted(site) else lp
    return Trace(choices, log_probs, dets, log_prior, log_lik, value, drawn)


def _check_names(names: Iterable[str], choices: dict, what: str) -> None:
    unknown = sorted(set(names) - set(choices))
    if unknown:
        raise ModelError(f"{what}: site(s) {unknown} are not latent sites of the program")
