"""Annealed SMC for static programs: likelihood tempering and data annealing.

Both move N particles through a path of targets from the prior to the posterior,

    γ_λ(x) = p(x) · L_λ(x),   L_0 = 1,   L_final = p(y | x),

by the blocks reweight → resample → move:

- **reweight** from ``γ_λ`` to ``γ_λ'``: ``log_weights += log L_λ'(x) − log L_λ(x)`` (incremental);
- **resample** (systematic): the population's measure is unchanged in expectation;
- **move**: ``num_moves`` random-walk MH steps per particle targeting ``γ_λ'`` in the unconstrained
  space of the latent sites (Jacobian included), scale ``2.38/√d`` × the particles' per-coordinate
  spread (adapted from the population before the move).

``log_evidence = logsumexp(log_weights)`` estimates ``log p(y)``; with a fixed schedule ``Ẑ`` is
unbiased. :class:`TemperedSMC` uses ``L_λ = p(y | x)^λ`` with the next ``λ`` chosen by bisection so
that the incremental weights' ESS is ``ess_target · N`` (Jasra et al. 2011; the adaptive schedule
adds a small bias, negligible in the tests), or a fixed ``temperatures`` schedule.
:class:`DataAnnealedSMC` adds observations in batches: ``L_b`` includes the first ``n_b`` entries
along the last batch dimension of every observed site whose last dimension has length
``num_data`` (the data plate); other observed sites are included from the first stage.

All latent sites must be continuous with supports that do not depend on other sites.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import biject_to

from ppinfer import checks
from ppinfer._compile import cached_jit, split_args
from ppinfer.errors import ConfigError, ModelError
from ppinfer.kernels.mh import accept
from ppinfer.population import Population, ess, log_evidence
from ppinfer.program import is_sequential
from ppinfer.resample import resample
from ppinfer.result import Result
from ppinfer.traced import assess, generate, latent_sites

__all__ = ["TemperedSMC", "DataAnnealedSMC", "anneal_run"]


@dataclass(frozen=True)
class TemperedSMC:
    """Likelihood-tempered SMC (see the module docstring).

    Args:
        num_particles: N ≥ 1.
        ess_target: adaptive schedule: each step's incremental-weight ESS is ``ess_target · N``.
        num_moves: RW-MH moves per particle per step, ≥ 1.
        temperatures: a fixed increasing schedule ending at 1 (overrides the adaptive one).
        max_steps: cap on adaptive steps (the last step jumps to λ = 1).
    """

    num_particles: int = 1000
    ess_target: float = 0.5
    num_moves: int = 5
    temperatures: Sequence[float] | None = None
    max_steps: int = 100

    name = "TemperedSMC"

    def __post_init__(self):
        _check_common(self.num_particles, self.num_moves)
        checks.check_probability("ess_target", self.ess_target)
        if self.temperatures is not None:
            temps = tuple(float(t) for t in self.temperatures)
            if (
                not temps
                or temps[-1] != 1.0
                or any(b <= a for a, b in zip((0.0, *temps[:-1]), temps, strict=True))
            ):
                raise ConfigError("temperatures must increase strictly from above 0 to exactly 1")
            object.__setattr__(self, "temperatures", temps)

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        if self.temperatures is None:
            schedule = ("adaptive", self.ess_target, int(self.max_steps))
        else:
            schedule = ("fixed", self.temperatures, len(self.temperatures))
        return _run(self, key, program, args, ("temper", None), schedule)


@dataclass(frozen=True)
class DataAnnealedSMC:
    """Data-annealed SMC: ``num_data`` observations added ``batch_size`` at a time."""

    num_particles: int = 1000
    num_data: int = 1
    batch_size: int = 1
    num_moves: int = 5

    name = "DataAnnealedSMC"

    def __post_init__(self):
        _check_common(self.num_particles, self.num_moves)
        if int(self.num_data) < 1 or int(self.batch_size) < 1:
            raise ConfigError("num_data and batch_size must be >= 1")

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        counts = tuple(
            float(min(c, self.num_data))
            for c in range(self.batch_size, self.num_data + self.batch_size, self.batch_size)
        )
        return _run(self, key, program, args, ("data", int(self.num_data)), ("fixed", counts, len(counts)))


def anneal_run(key, program, args, n, num_moves, path, schedule, transforms) -> dict:
    """The pure annealed-SMC core (jit/vmap-able). ``path = ("temper", None) | ("data", num_data)``,
    ``schedule = ("adaptive", ess_target, max_steps) | ("fixed", λs, len)``; ``transforms`` maps each
    latent site to the bijection onto its support. Returns ``log_weights: f32[N]``, ``log_evidence``,
    ``choices`` ``[N, …]`` (latent and deterministic), ``lambdas``/``ess``/``acceptance_rate``
    ``[max_steps]`` (padded with NaN), ``num_steps``."""
    kind, num_data = path
    mode, spec, max_steps = schedule
    k_init, k_loop = jax.random.split(key)
    x0 = jax.vmap(lambda i: generate(jax.random.fold_in(k_init, i), program, args)[0].choices)(jnp.arange(n))
    u0 = {name: transforms[name].inv(x0[name]) for name in transforms}
    unravel = ravel_pytree(jax.tree.map(lambda v: v[0], u0))[1]
    flat0 = jax.vmap(lambda d: ravel_pytree(d)[0])(u0)
    lam_end = 1.0 if kind == "temper" else float(num_data)

    def parts(v):
        """``(log prior + log |det J|, per-element log likelihood terms)`` at ``v: f32[d]``."""
        u = unravel(v)
        x = {k: transforms[k](u[k]) for k in transforms}
        log_det = sum(jnp.sum(transforms[k].log_abs_det_jacobian(u[k], x[k])) for k in transforms)
        trace = assess(program, args, x)
        return trace.log_prior + log_det, _obs_terms(program, args, x, num_data)

    def log_lik(v, lam):
        lp, (whole, per_datum) = parts(v)
        if kind == "temper":
            return lp, lam * (whole + jnp.sum(per_datum))
        return lp, whole + jnp.sum(jnp.where(jnp.arange(per_datum.shape[0]) < lam, per_datum, 0.0))

    def target(v, lam):
        lp, ll = log_lik(v, lam)
        out = lp + ll
        return jnp.where(jnp.isnan(out), -jnp.inf, out)

    def next_lambda(lam, ll1, i):
        """The next λ; ``ll1: f32[N]`` the particles' full log likelihoods (tempering only)."""
        if mode == "fixed":
            return jnp.asarray(spec, flat0.dtype)[i]
        ok = lambda d: ess(d * ll1) >= spec * n

        def bisect(_, lohi):
            lo, hi = lohi
            mid = 0.5 * (lo + hi)
            return jnp.where(ok(mid), mid, lo), jnp.where(ok(mid), hi, mid)

        lo, _ = jax.lax.fori_loop(0, 40, bisect, (jnp.zeros(()), 1.0 - lam))
        delta = jnp.where(ok(1.0 - lam) | (i >= max_steps - 1), 1.0 - lam, jnp.maximum(lo, 1e-6))
        return jnp.minimum(lam + delta, 1.0)

    def reweight(flat, lam, i):
        """``(λ', incremental log weights f32[N], log γ_λ' f32[N])`` of the particles ``flat``."""
        if kind == "temper":
            # One program run per particle serves the schedule, the weights and the move's start:
            # log γ_λ = lp + λ·ll, so the increment is (λ' − λ)·ll.
            lp, ll = jax.vmap(lambda v: log_lik(v, 1.0))(flat)
            ll = jnp.where(jnp.isnan(ll), -jnp.inf, ll)
            lam_new = next_lambda(lam, ll, i)
            inc = jnp.where(jnp.isfinite(lp), (lam_new - lam) * ll, -jnp.inf)
            new = lp + lam_new * ll
            return lam_new, jnp.where(jnp.isnan(inc), -jnp.inf, inc), jnp.where(jnp.isnan(new), -jnp.inf, new)
        lam_new = next_lambda(lam, None, i)
        new = jax.vmap(lambda v: target(v, lam_new))(flat)
        inc = new - jax.vmap(lambda v: target(v, lam))(flat)
        return lam_new, jnp.where(jnp.isnan(inc), -jnp.inf, inc), new

    def body(carry):
        i, key, lam, flat, lw, hist = carry
        k_res, k_move = jax.random.split(jax.random.fold_in(key, i))
        lam_new, inc, log_target = reweight(flat, lam, i)
        lw = lw + inc
        ess_i = ess(lw)
        pop, ancestors = resample(k_res, Population(flat, lw), "systematic")
        flat, rate = _rw_moves(
            k_move, pop.particles, lambda v: target(v, lam_new), num_moves, log_target[ancestors]
        )
        hist = {
            "lambdas": hist["lambdas"].at[i].set(lam_new),
            "ess": hist["ess"].at[i].set(ess_i),
            "acceptance_rate": hist["acceptance_rate"].at[i].set(rate),
            "log_evidence_history": hist["log_evidence_history"].at[i].set(log_evidence(lw)),
        }
        return i + 1, key, lam_new, flat, pop.log_weights, hist

    nan = jnp.full((max_steps,), jnp.nan, flat0.dtype)
    hist0 = {"lambdas": nan, "ess": nan, "acceptance_rate": nan, "log_evidence_history": nan}
    lw0 = jnp.full((n,), -jnp.log(n), flat0.dtype)
    init = (jnp.zeros((), jnp.int32), k_loop, jnp.zeros((), flat0.dtype), flat0, lw0, hist0)
    cond = lambda c: (c[2] < lam_end) & (c[0] < max_steps)
    steps, _, _, flat, lw, hist = jax.lax.while_loop(cond, body, init)

    def constrained(v):
        u = unravel(v)
        x = {k: transforms[k](u[k]) for k in transforms}
        return {**x, **assess(program, args, x).deterministics}

    return {
        "choices": jax.vmap(constrained)(flat),
        "log_weights": lw,
        "log_evidence": log_evidence(lw),
        "num_steps": steps,
        **hist,
    }


def _rw_moves(key, flat, log_target: Callable, num_moves: int, lp: jax.Array | None = None):
    """``num_moves`` Gaussian random-walk MH steps of every particle (rows of ``flat: f32[N, d]``),
    scale ``2.38/√d`` × per-coordinate sd. ``lp: f32[N]``, if given, is ``log_target`` at ``flat``
    (saves one evaluation). Returns ``(flat, mean acceptance rate)``."""
    n, d = flat.shape
    scale = 2.38 / jnp.sqrt(d) * jnp.maximum(jnp.std(flat, axis=0), 1e-4)
    lp = jax.vmap(log_target)(flat) if lp is None else lp

    def move(carry, k):
        flat, lp = carry
        k1, k2 = jax.random.split(k)
        prop = flat + scale * jax.random.normal(k1, flat.shape, flat.dtype)
        lp_new = jax.vmap(log_target)(prop)
        (flat, lp), info = accept(k2, lp_new - lp, (prop, lp_new), (flat, lp))
        return (flat, lp), jnp.mean(info.accepted)

    (flat, _), rates = jax.lax.scan(move, (flat, lp), jax.random.split(key, num_moves))
    return flat, jnp.mean(rates)


def _obs_terms(program, args, x, num_data):
    """``(whole, per_datum)``: Σ of observed sites' log densities not along the data plate, and the
    per-datum sums ``f32[num_data]`` (zeros(1) for tempering)."""
    with handlers.trace() as tr, handlers.seed(rng_seed=0), handlers.substitute(data=x):
        program(*args)
    whole = jnp.zeros(())
    per = jnp.zeros((num_data or 1,))
    for site in tr.values():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        lp = site["fn"].log_prob(site["value"])
        if site.get("mask") is not None:
            lp = jnp.where(site["mask"], lp, 0.0)
        if site.get("scale") is not None:
            lp = site["scale"] * lp
        if num_data and jnp.ndim(lp) >= 1 and lp.shape[-1] == num_data:
            per = per + jnp.sum(jnp.reshape(lp, (-1, num_data)), axis=0)
        else:
            whole = whole + jnp.sum(lp)
    return whole, per


def _run(cfg, key, program, args, path, schedule) -> Result:
    if is_sequential(program):
        raise ConfigError(f"{cfg.name} needs a static program")
    t0 = time.perf_counter()
    dyn, static_key, rebuild = split_args(args)
    _, latent = checks.dry_run(program, args, None, "running the program once")
    checks.require_latent(latent)
    sites = latent_sites(program, args)
    discrete = sorted(k for k, d in sites.items() if d.support.is_discrete)
    if discrete:
        raise ModelError(f"{cfg.name} moves continuous sites only; site(s) {discrete} are discrete")
    settings = (cfg.num_particles, cfg.num_moves, path, schedule)

    def build():
        def compiled(key, dyn):
            a = rebuild(dyn)
            transforms = {k: biject_to(d.support) for k, d in latent_sites(program, a).items()}
            return anneal_run(key, program, a, *settings[:2], path, schedule, transforms)

        return compiled

    fn, _ = cached_jit(("anneal", program, settings, static_key), build)
    out = jax.block_until_ready(fn(key, dyn))
    checks.raise_if_dead(float(out["log_evidence"]), "", cfg.num_particles)
    steps = int(out["num_steps"])
    return Result(
        samples=out["choices"],
        log_weights=out["log_weights"],
        log_evidence=float(out["log_evidence"]),
        algorithm=cfg.name,
        ess=out["ess"][:steps],
        log_evidence_history=out["log_evidence_history"][:steps],
        wall_time=time.perf_counter() - t0,
        extras={
            "lambdas": out["lambdas"][:steps],
            "acceptance_rate": out["acceptance_rate"][:steps],
            "num_steps": steps,
        },
    )


def _check_common(num_particles, num_moves) -> None:
    checks.check_num_particles(num_particles)
    if isinstance(num_moves, bool) or not isinstance(num_moves, int | np.integer) or num_moves < 1:
        raise ConfigError(f"num_moves must be an integer >= 1, got {num_moves!r}")
