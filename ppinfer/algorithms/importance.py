"""Importance sampling: N independent weighted runs.

Composition: ``spawn(N)`` then one :func:`~ppinfer.weighted.simulate` per particle. Each particle's
log weight is ``−log N + log p(x, y)/q(x)`` (likelihood weighting when ``q`` is the prior), so
``logsumexp(log_weights)`` is the log of the unbiased estimate ``Ẑ = mean(p/q)``. On a sequential
program this is SMC that never resamples (sequential importance sampling).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from ppinfer import checks
from ppinfer._compile import _signature, cached_jit, forget, split_args
from ppinfer.algorithms.smc import SMC, run_smc
from ppinfer.population import log_evidence
from ppinfer.program import is_sequential
from ppinfer.result import Result
from ppinfer.weighted import simulate

__all__ = ["Importance", "importance_run"]


@dataclass(frozen=True)
class Importance:
    """Importance sampling with ``num_particles`` particles.

    Args:
        num_particles: N ≥ 1.
        proposal: a program with the model's arguments that samples some of its latent sites
            (a NumPyro guide); default: the prior. For a sequential program, the per-step proposal
            ``proposal(state, t, *args)`` as in :class:`~ppinfer.SMC`.
    """

    num_particles: int = 1000
    proposal: Callable[..., Any] | None = None

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        checks.check_proposals(self)

    name = "Importance"

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        if is_sequential(program):
            smc = SMC(self.num_particles, ess_threshold=0.0, proposal=self.proposal)
            return run_smc(key, program, args, smc, self.name)
        t0 = time.perf_counter()
        dyn, static_key, rebuild = split_args(args)
        n, proposal = self.num_particles, self.proposal

        def build():
            return lambda key, dyn: importance_run(key, program, rebuild(dyn), n, proposal)

        cache_key = ("importance", program, proposal, n, static_key)
        fn, new = cached_jit(cache_key, build)
        sig = _signature((key, dyn))  # once: it selects the compiled code and says whether to check
        if new or not fn.compiled_for(key, dyn, sig=sig):  # new code, or data of new shapes: check it
            try:
                _, latent = checks.dry_run(program, args, proposal, "running the program once")
                checks.require_latent(latent)
            except Exception:
                forget(cache_key)  # a program that failed its checks must be checked again next time
                raise
        out = jax.block_until_ready(fn(key, dyn, sig=sig))
        checks.raise_on_nan_sites(out["nan_sites"], self.name)
        log_z = float(out["log_evidence"])
        if log_z == -float("inf"):  # new data of old shapes is not dry-run: out of a support?
            checks.dry_run(program, args, proposal, "running the program once")
        checks.raise_if_dead(log_z, "", n)
        return Result(
            samples=out["choices"],
            log_weights=out["log_weights"],
            log_evidence=log_z,
            algorithm=self.name,
            wall_time=time.perf_counter() - t0,
        )


def importance_run(
    key: jax.Array,
    program: Callable[..., Any],
    args: tuple,
    num_particles: int,
    proposal: Callable[..., Any] | None = None,
    values: dict | None = None,
) -> dict:
    """The pure importance sampler (jit/vmap-able): ``choices`` site → ``[N, …]``, ``log_weights:
    f32[N]`` (``−log N + log p/q``), ``log_evidence: f32[]``, ``nan_sites`` and ``log_prob_draws:
    f32[N]`` (the law of the latent draws). ``values`` (site → ``[N, …]``) injects the draws."""
    n = num_particles

    def one(i, v):
        return simulate(key, program, args, proposal=proposal, particle=i, values=v)

    weighted, info = jax.vmap(one)(jnp.arange(n), values)
    log_weights = weighted.log_weight - jnp.log(n)
    return {
        "choices": weighted.choices,
        "log_weights": log_weights,
        "log_evidence": log_evidence(log_weights),
        "nan_sites": {k: jnp.any(v) for k, v in info.nan_sites.items()},
        "log_prob_draws": info.log_prob_draws,
    }
