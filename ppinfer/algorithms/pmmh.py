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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer import checks
from ppinfer.algorithms.smc import Loop, _dry_run, run_loop, smc_selection
from ppinfer.errors import ConfigError, ZeroEvidenceError
from ppinfer.kernels.mh import accept
from ppinfer.kernels.space import space_of
from ppinfer.mcmc.algorithm import MCMC, MCMCResult
from ppinfer.mcmc.base import Kernel
from ppinfer.program import SequentialProgram, is_sequential, sequential
from ppinfer.resample import check_scheme

__all__ = ["PMMH", "PMMHState"]


class PMMHState(NamedTuple):
    """One PMMH chain: ``u: f[d]`` (θ unconstrained), ``log_target: f[]`` (``log p(u) + log Ẑ(θ(u))``
    as accepted), ``log_step: f[]`` (log random-walk scale) and ``i: i32[]`` transitions taken."""

    u: jax.Array
    log_target: jax.Array
    log_step: jax.Array
    i: jax.Array


@dataclass(frozen=True)
class PMMH:
    """PMMH for a sequential program with static parameters: a kernel run by the one
    :class:`~ppinfer.MCMC` driver (``infer(..., algorithm=PMMH(...))`` is
    ``MCMC(kernel=PMMH(...), num_samples, num_warmup, num_chains)``).

    The program's ``init(theta, *args)`` and ``step(state, t, theta, *args)`` take the parameters
    ``theta`` (a dict, site name → value) as their first data argument; ``prior(*args)`` is a static
    program sampling those sites (continuous, any support; its space is
    :func:`~ppinfer.kernels.space.space_of`).

    Args:
        prior: the prior program over θ.
        num_particles: SMC particles per likelihood estimate (a pure filter, ``history=False``).
        num_samples, num_warmup, num_chains: as in :class:`~ppinfer.MCMC` (chains are vmapped; each
            starts from its own prior draw).
        step_size: initial random-walk scale in the unconstrained space (adapted during warm-up).
        resampling, ess_threshold: the inner SMC's settings.
        progress_bar: a tqdm bar over the transitions, as for :class:`~ppinfer.MCMC` (``None``:
            shown when stderr is a terminal and ppinfer is not quiet); it never changes the draws.

    ``extras["acceptance_rate"]: f[C]`` is each chain's acceptance rate over the recorded draws;
    each transition's info also records the chain's ``log_target`` (``log p(u) + log Ẑ(θ(u))`` as
    accepted, :class:`PMMHState`).
    """

    prior: Callable[..., Any]
    num_particles: int = 100
    num_samples: int = 1000
    num_warmup: int = 300
    num_chains: int = 4
    step_size: float = 0.2
    resampling: str = "systematic"
    ess_threshold: float = 0.5
    # Not part of equality: the bar never changes the compiled chain (no recompilation).
    progress_bar: bool | None = field(default=None, compare=False)

    name = "PMMH"
    sequential = True  # the MCMC driver hands it a sequential program

    def __post_init__(self):
        if not callable(self.prior):
            raise ConfigError(f"prior must be a program (a callable over the parameters), got {self.prior!r}")
        checks.check_num_particles(self.num_particles)
        check_scheme(self.resampling)
        checks.check_probability("ess_threshold", self.ess_threshold)
        for what, v, low in (
            ("num_samples", self.num_samples, 1),
            ("num_warmup", self.num_warmup, 0),
            ("num_chains", self.num_chains, 1),
        ):
            checks.check_int(what, v, low)
        checks.check_positive("step_size", self.step_size)

    def run(self, key: jax.Array, program: Any, args: tuple) -> MCMCResult:
        mcmc = MCMC(self, self.num_samples, self.num_warmup, self.num_chains, progress_bar=self.progress_bar)
        return mcmc.run(key, program, args)

    def extras(self, infos: dict) -> dict:
        """The result's extras from the recorded infos (``[C, S]``); a chain whose log target is
        still −inf (or NaN) at its last draw never found a θ with Ẑ > 0: it did not move, and its
        draws are not from the posterior (:class:`~ppinfer.errors.ZeroEvidenceError`)."""
        last = np.asarray(infos["log_target"])[:, -1]
        if not np.all(np.isfinite(last)):
            chain = int(np.flatnonzero(~np.isfinite(last))[0])
            raise ZeroEvidenceError(
                f"PMMH: chain {chain}'s likelihood estimate Ẑ(θ) was zero (every particle impossible) "
                f"at every θ it tried, so it never moved; check the observations (e.g. an infinite "
                f"value or one outside a distribution's support) or use more particles"
            )
        return {"acceptance_rate": np.mean(np.asarray(infos["accepted"], np.float32), axis=1)}

    def build_for(self, program: Any, args: tuple, num_warmup: int) -> Kernel:
        """The PMMH :class:`~ppinfer.mcmc.Kernel` of ``program(*args)``: random-walk MH on ``u``
        with ``Ẑ(θ)`` from a fresh SMC run (kept from when θ was accepted), the log scale adapted
        towards an acceptance rate of 0.25 during the first ``num_warmup`` transitions."""
        if not is_sequential(program):
            raise ConfigError("PMMH needs a sequential program whose init/step take theta first")
        space = space_of(self.prior, args, what="PMMH", error=ConfigError)
        num_steps = program.steps_for((None, *args))
        # The program once, eagerly, at the prior's first θ: clear errors before anything is traced.
        _dry_run(program, (space.constrain(space.u0)[0], *args), None, need_latent=False)
        selection = smc_selection(self.resampling, self.ess_threshold)
        loop = Loop(self.num_particles, num_steps, selection, history=False)

        def log_target(key, u, args):
            theta = space.constrain(u)[0]
            log_z = run_loop(key, _with_theta(program, theta), args, loop)["log_evidence"]
            return space.log_prior(u, *args) + log_z

        def init(key, args):
            k_u, k_z = jax.random.split(key)
            u = space.draw(k_u, *args)
            log_step = jnp.log(jnp.asarray(self.step_size, u.dtype))
            return PMMHState(u, log_target(k_z, u, args), log_step, jnp.zeros((), jnp.int32))

        def step(key, state, args):
            k_prop, k_smc, k_acc = jax.random.split(key, 3)
            u_new = state.u + jnp.exp(state.log_step) * jax.random.normal(
                k_prop, state.u.shape, state.u.dtype
            )
            lt_new = log_target(k_smc, u_new, args)
            (u, lt), info = accept(
                k_acc, lt_new - state.log_target, (u_new, lt_new), (state.u, state.log_target)
            )
            warm = state.i < num_warmup
            adapted = state.log_step + (info.acceptance_rate - 0.25) / jnp.sqrt(state.i + 1.0)
            log_step = jnp.where(warm, adapted, state.log_step)
            return PMMHState(u, lt, log_step, state.i + 1), {"accepted": info.accepted, "log_target": lt}

        return Kernel(init, step, lambda state, args: space.constrain(state.u)[0])


def _with_theta(program: SequentialProgram, theta: dict) -> SequentialProgram:
    return sequential(
        lambda *a: program.init(theta, *a),
        lambda s, t, *a: program.step(s, t, theta, *a),
        program.num_steps if not callable(program.num_steps) else (lambda *a: program.num_steps(theta, *a)),
    )
