"""Particle marginal Metropolis–Hastings (Andrieu, Doucet & Holenstein 2010).

MH over the static parameters ``θ`` of a sequential program, with the intractable likelihood
``p(y | θ)`` replaced by SMC's estimate ``Ẑ(θ)``. Valid — the chain's θ-marginal is exactly
``p(θ | y)`` — because ``Ẑ`` is unbiased (``E[Ẑ(θ)] = p(y | θ)``, checked in ``semantics``): the
sampler is an exact MH chain on the extended space of (θ, SMC randomness).

The proposal is a Gaussian random walk on θ mapped to an unconstrained space (each prior site's
support bijection, with its log-Jacobian in the target), its scale adapted towards an acceptance
rate of 0.25 during warm-up and then frozen. Log acceptance ratio::

    log α = [log p(θ′) + log|J(u′)| + log Ẑ(θ′)] − [log p(θ) + log|J(u)| + log Ẑ(θ)]

with ``Ẑ(θ)`` kept from when θ was accepted (re-estimating it would break validity).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from numpyro import handlers

from ppinfer import checks
from ppinfer.algorithms.smc import smc_run
from ppinfer.errors import ConfigError
from ppinfer.kernels.mh import accept
from ppinfer.mcmc.algorithm import MCMCResult
from ppinfer.program import SequentialProgram, is_sequential, sequential
from ppinfer.resample import check_scheme

__all__ = ["PMMH"]


@dataclass(frozen=True)
class PMMH:
    """PMMH for a sequential program with static parameters.

    The program's ``init(theta, *args)`` and ``step(state, t, theta, *args)`` take the parameters
    ``theta`` (a dict, site name → value) as their first data argument; ``prior(*args)`` is a static
    program sampling those sites (continuous, any support).

    Args:
        prior: the prior program over θ.
        num_particles: SMC particles per likelihood estimate.
        num_samples, num_warmup, num_chains: as in :class:`~ppinfer.MCMC` (chains are vmapped).
        step_size: initial random-walk scale in the unconstrained space.
        resampling, ess_threshold: the inner SMC's settings.
    """

    prior: Callable[..., Any]
    num_particles: int = 100
    num_samples: int = 1000
    num_warmup: int = 300
    num_chains: int = 4
    step_size: float = 0.2
    resampling: str = "systematic"
    ess_threshold: float = 0.5

    name = "PMMH"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        check_scheme(self.resampling)
        checks.check_probability("ess_threshold", self.ess_threshold)
        for what, v, low in (
            ("num_samples", self.num_samples, 1),
            ("num_warmup", self.num_warmup, 0),
            ("num_chains", self.num_chains, 1),
        ):
            checks.check_int(what, v, low)
        if not float(self.step_size) > 0:
            raise ConfigError(f"step_size must be > 0, got {self.step_size!r}")

    def run(self, key: jax.Array, program: Any, args: tuple) -> MCMCResult:
        if not is_sequential(program):
            raise ConfigError("PMMH needs a sequential program whose init/step take theta first")
        t0 = time.perf_counter()
        to_theta, log_prior, u0 = _unconstrained(self.prior, args)
        num_steps = program.steps_for((None, *args))
        args_j = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, args)

        def log_z(k, u):
            theta = to_theta(u)
            out = smc_run(
                k,
                _with_theta(program, theta),
                args_j,
                self.num_particles,
                num_steps,
                self.resampling,
                self.ess_threshold,
            )
            return out["log_evidence"]

        draws, accept = jax.jit(jax.vmap(lambda k: self._chain(k, u0, log_prior, log_z)))(
            jax.random.split(key, self.num_chains)
        )
        thetas = jax.vmap(jax.vmap(to_theta))(draws)
        n = self.num_chains * self.num_samples
        samples = {k: jnp.reshape(v, (n, *v.shape[2:])) for k, v in thetas.items()}
        return MCMCResult(
            samples=samples,
            log_weights=jnp.full((n,), -jnp.log(n)),
            log_evidence=float("nan"),
            algorithm=self.name,
            wall_time=time.perf_counter() - t0,
            extras={"num_chains": self.num_chains, "acceptance_rate": np.asarray(accept)},
        )

    def _chain(self, key, u0, log_prior, log_z):
        k_init, k_loop = jax.random.split(key)
        lp0 = log_prior(u0) + log_z(k_init, u0)
        total = self.num_warmup + self.num_samples

        def body(carry, inp):
            u, lp, log_step, accepted = carry
            k, i = inp
            k_prop, k_smc, k_acc = jax.random.split(k, 3)
            u_new = u + jnp.exp(log_step) * jax.random.normal(k_prop, u.shape)
            lp_new = log_prior(u_new) + log_z(k_smc, u_new)
            (u, lp), info = accept(k_acc, lp_new - lp, (u_new, lp_new), (u, lp))
            warm = i < self.num_warmup
            log_step = jnp.where(warm, log_step + (info.acceptance_rate - 0.25) / jnp.sqrt(i + 1.0), log_step)
            accepted = accepted + jnp.where(warm, 0, info.accepted.astype(jnp.int32))
            return (u, lp, log_step, accepted), u

        init = (u0, lp0, jnp.log(jnp.asarray(self.step_size, u0.dtype)), jnp.zeros((), jnp.int32))
        (_, _, _, accepted), us = jax.lax.scan(
            body, init, (jax.random.split(k_loop, total), jnp.arange(total))
        )
        return us[self.num_warmup :], accepted / self.num_samples


def _with_theta(program: SequentialProgram, theta: dict) -> SequentialProgram:
    return sequential(
        lambda *a: program.init(theta, *a),
        lambda s, t, *a: program.step(s, t, theta, *a),
        program.num_steps if not callable(program.num_steps) else (lambda *a: program.num_steps(theta, *a)),
    )


def _unconstrained(prior: Callable[..., Any], args: tuple):
    """``(to_theta, log_prior, u0)``: the map from a flat unconstrained vector to θ, the log prior
    density of θ(u) including the log-Jacobian, and a starting point (the prior's median-ish draw)."""
    tr = handlers.trace(handlers.seed(prior, 0)).get_trace(*args)
    sites = {n: s for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
    if not sites:
        raise ConfigError("the PMMH prior samples no parameter")
    for name, site in sites.items():
        if site["fn"].support.is_discrete:
            raise ConfigError(f"PMMH parameters must be continuous; site {name!r} is discrete")
    bijections = {n: dist.biject_to(s["fn"].support) for n, s in sites.items()}
    u_tree = {n: bijections[n].inv(s["value"]) for n, s in sites.items()}
    u0, unravel = ravel_pytree(u_tree)

    def to_theta(u):
        return {n: bijections[n](v) for n, v in unravel(u).items()}

    def log_prior(u):
        parts = unravel(u)
        theta = {n: bijections[n](v) for n, v in parts.items()}
        with handlers.trace() as trace, handlers.substitute(data=theta), handlers.seed(rng_seed=0):
            prior(*args)
        total = 0.0
        for n, v in parts.items():
            total = total + jnp.sum(trace[n]["fn"].log_prob(theta[n]))
            total = total + jnp.sum(bijections[n].log_abs_det_jacobian(v, theta[n]))
        return total

    return to_theta, log_prior, u0
