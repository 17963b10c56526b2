"""SMC² (Chopin, Jacob & Papaspiliopoulos 2013): SMC over static parameters with a particle filter
inside each parameter particle.

The model is PMMH's (:class:`~ppinfer.PMMH`): a sequential program whose ``init(theta, *args)`` and
``step(state, t, theta, *args)`` take the parameters θ first, and a static ``prior(*args)`` over θ.
An outer population of ``N_θ`` particles ``(u_i, PF_i)`` — ``u_i: f[d]`` is θ_i in the unconstrained
space of :func:`~ppinfer.kernels.space.space_of`, ``PF_i`` an inner particle filter of ``N_x``
particles over the state (a :class:`~ppinfer.kernels.smc.SMCState` with leaves ``[N_θ, N_x, …]``)
— starts from the prior (``log_weights = −log N_θ``) and at each time t:

1. advances every inner filter by one kernel step (:func:`ppinfer.kernels.smc.step`, vmapped over
   θ); the outer incremental log weight of particle i is the inner filter's incremental estimate
   ``log p̂(y_t | y_{<t}, θ_i) = log Ẑ_{0:t}(θ_i) − log Ẑ_{0:t−1}(θ_i)`` (each ``log Ẑ`` the
   ``logsumexp`` of the inner weights, which a built-in selection preserves);
2. when the outer ESS < ``ess_threshold · N_θ``: resamples the outer particles, each θ with its
   whole filter (a :mod:`~ppinfer.kernels.select` selection on the outer weights), then applies
   ``num_moves`` PMMH moves: ``u' = u + s·ε`` (``s = 2.38/√d`` × the population's per-coordinate
   sd, as resample-move and tempered SMC adapt theirs), a fresh inner filter run on ``y_{0:t}``
   for θ(u'), accepted (:func:`ppinfer.kernels.mh.accept`) with ratio
   ``[p(u') Ẑ_{0:t}(u')] / [p(u) Ẑ_{0:t}(u)]`` (``p`` the prior pushed to ``u``, Jacobian included).

``logsumexp(log_weights)`` after step t is ``log Ẑ_{0:t} = Σ_s log Σ_i W_i^{(s)} p̂(y_s | y_{<s}, θ_i)``
(``W`` the normalised outer weights before step s): the log of an unbiased estimate of
``p(y_{0:t})``.

**Validity.** Each outer particle is a point of the extended space (θ, all the inner filter's
randomness), whose target at time t is ``π_t ∝ p(θ) ψ_t(randomness) Ẑ_{0:t}(θ, randomness)``;
its θ-marginal is ``p(θ | y_{0:t})`` because ``Ẑ`` is unbiased. Advancing the inner filter
extends the randomness by its own law, so the exact importance weight of ``π_t`` against
``π_{t−1}`` ⊗ that law is ``Ẑ_{0:t} / Ẑ_{0:t−1}`` — step 1. Resampling is a valid selection, and
a PMMH move (fresh randomness from ψ_t, θ by a symmetric walk, MH on ``p(θ) Ẑ_{0:t}``) is an MH
kernel leaving ``π_t`` invariant (the move's scale depends only on the population). So this is an
SMC sampler on the extended space: the weighted θ estimate ``p(θ | y)`` consistently and
``E[Ẑ] = p(y)``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
from jax.scipy.special import logsumexp
from numpyro import handlers
from numpyro.primitives import prng_key

from ppinfer import checks
from ppinfer._compile import chunked_run, split_args
from ppinfer.algorithms.smc import stops_early
from ppinfer.errors import ConfigError
from ppinfer.kernels import smc as kernel
from ppinfer.kernels.mh import accept
from ppinfer.kernels.select import Adaptive, as_selection
from ppinfer.kernels.space import space_of
from ppinfer.program import SequentialProgram, is_sequential
from ppinfer.result import Result

__all__ = ["SMC2"]


@dataclass(frozen=True)
class SMC2:
    """SMC² for a sequential program with static parameters (the model interface of
    :class:`~ppinfer.PMMH`).

    Args:
        prior: the prior program over θ (continuous sites, any support).
        num_particles: N_θ outer (parameter) particles.
        num_inner: N_x particles of each inner particle filter.
        ess_threshold: resample-move the outer particles when their ESS < ``ess_threshold · N_θ``.
        num_moves: PMMH moves after each outer resampling (≥ 1).
        resampling: the outer selection (a scheme name or a :mod:`~ppinfer.kernels.select` one).
        inner_resampling, inner_ess_threshold: the inner filters' selection and ESS trigger.
        progress_bar: a bar over the outer steps; ``None`` (default): on a terminal, for a run
            expected to last over a second. The steps run in compiled chunks either way (Ctrl-C
            stops the run between chunks); the chunking does not change the result.

    The :class:`~ppinfer.Result` holds θ's sites ``[N_θ, …]`` with the outer ``log_weights``,
    ``log_evidence`` (``log Ẑ``), per-step ``ess`` / ``resampled`` / ``log_evidence_history`` and
    ``extras["acceptance_rate"]: f32[T]`` (mean PMMH acceptance at each step, NaN when no move).
    """

    prior: Callable[..., Any]
    num_particles: int = 256
    num_inner: int = 64
    ess_threshold: float = 0.5
    num_moves: int = 1
    resampling: Any = "systematic"
    inner_resampling: Any = "systematic"
    inner_ess_threshold: float = 0.5
    progress_bar: bool | None = None

    name = "SMC2"

    def __post_init__(self):
        if not callable(self.prior):
            raise ConfigError(f"prior must be a program (a callable over the parameters), got {self.prior!r}")
        checks.check_num_particles(self.num_particles)
        checks.check_int("num_inner", self.num_inner, 1)
        checks.check_int("num_moves", self.num_moves, 1)
        checks.check_probability("ess_threshold", self.ess_threshold)
        checks.check_probability("inner_ess_threshold", self.inner_ess_threshold)
        as_selection(self.resampling)
        as_selection(self.inner_resampling)

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        if not is_sequential(program):
            raise ConfigError("SMC2 needs a sequential program whose init/step take theta first")
        t0 = time.perf_counter()
        space = space_of(self.prior, args, what="SMC2")  # host-side: clear errors before compiling
        num_steps = program.steps_for((None, *args))
        may_stop = stops_early(program, (space.constrain(space.u0)[0], *args), None)
        dyn, static_key, rebuild = split_args(args)
        settings = dataclasses.replace(self, progress_bar=None)  # the bar does not change the code
        cache_key = ("smc2", program, settings, static_key, num_steps, may_stop)
        parts = lambda d: self._parts(program, rebuild(d), num_steps, may_stop)

        def position(run: kernel.ScanRun) -> tuple[int, bool]:
            steps = int(jax.device_get(run.steps))
            return steps, steps >= num_steps

        out = chunked_run(
            cache_key,
            key,
            dyn,
            start=lambda key, d: parts(d).start(key),
            advance=lambda run, d, stop: kernel.scan_advance(parts(d).body, run, stop),
            output=lambda run, d: parts(d).output(run),
            position=position,
            total=num_steps,
            desc=f"{self.name} {self.num_particles}x{self.num_inner} particles",
            progress=self.progress_bar,
        )
        log_z = float(out["log_evidence"])
        checks.raise_if_dead(log_z, "at the end", self.num_particles)
        return Result(
            samples=out["theta"],
            log_weights=out["log_weights"],
            log_evidence=log_z,
            algorithm=self.name,
            ess=out["ess"],
            resampled=out["resampled"],
            log_evidence_history=out["log_evidence_history"],
            wall_time=time.perf_counter() - t0,
            extras={"acceptance_rate": out["acceptance_rate"], "num_inner": self.num_inner},
        )

    def _run(self, key, program, args, num_steps: int, may_stop: bool) -> dict:
        """The whole run as one pure function (what :meth:`run` computes in compiled chunks)."""
        parts = self._parts(program, args, num_steps, may_stop)
        return parts.output(kernel.scan_advance(parts.body, parts.start(key)))

    def _parts(self, program, args, num_steps: int, may_stop: bool) -> _Parts:
        """The run's three pure phases — the one SMC step (:func:`ppinfer.kernels.smc.step`) looped
        over the *outer* program below, with the PMMH rejuvenation as the step's ``move``: ``start``
        (the outer population), ``body`` (one outer step and its records: a scan body for
        :func:`~ppinfer.kernels.smc.scan_advance`) and ``output`` (θ, outer weights, the per-step
        records)."""
        n, space = self.num_particles, space_of(self.prior, args, what="SMC2")
        inner_sel = as_selection(self.inner_resampling, self.inner_ess_threshold)
        theta_of = lambda u: space.constrain(u)[0]
        log_z = lambda pf: logsumexp(pf.log_weights, axis=-1)  # log Ẑ so far of each inner filter

        def inner_step(k, pf, theta):
            # Blocked: the inner filter's own program runs are not sites of the outer program.
            with handlers.block():
                step = kernel.step(k, pf, program, (theta, *args), selection=inner_sel, may_stop=may_stop)
            return step[0]

        def fresh(k, theta, t):
            """A new inner filter for θ run on y_{0:t} (t traced: a while loop of t + 1 steps)."""
            k0, k1 = jax.random.split(k)
            pf, _ = kernel.init(k0, program, (theta, *args), self.num_inner)
            body = lambda s, pf: inner_step(jax.random.fold_in(k1, s), pf, theta)
            return jax.lax.fori_loop(0, t + 1, body, pf)

        # The outer program over one θ-particle (u, PF): θ from its prior (pushed to u), then each
        # step extends the inner filter; the factor is its incremental estimate log p̂(y_t | y_{<t}, θ).
        def outer_init():
            u, k = space.draw(prng_key(), *args), prng_key()
            with handlers.block():
                pf, _ = kernel.init(k, program, (theta_of(u), *args), self.num_inner)
            numpyro.factor("log_z_init", log_z(pf))  # init's observations, if any, weight θ too
            return u, pf

        def outer_step(state, t):
            u, pf = state
            before = log_z(pf)
            pf = inner_step(prng_key(), pf, theta_of(u))
            # A filter already dead (−inf) stays dead (no −inf − −inf).
            numpyro.factor("log_z_increment", jnp.where(jnp.isfinite(before), log_z(pf) - before, -jnp.inf))
            return u, pf

        outer = SequentialProgram(outer_init, outer_step, num_steps)

        def move(k, state: kernel.SMCState):
            """``num_moves`` PMMH moves of every outer particle, at the scale of the population."""
            u, pf = state.particles.state
            t = state.t - 1  # the step just taken
            scale = 2.38 / jnp.sqrt(space.dim) * jnp.maximum(jnp.std(u, axis=0), 1e-3)
            log_target = lambda u, pf: jax.vmap(lambda u: space.log_prior(u, *args))(u) + log_z(pf)

            def one(carry, k):
                u, pf = carry
                k_prop, k_pf, k_acc = jax.random.split(k, 3)
                u_new = u + scale * jax.random.normal(k_prop, u.shape, u.dtype)
                pf_new = jax.vmap(fresh, (0, 0, None))(
                    jax.random.split(k_pf, n), jax.vmap(theta_of)(u_new), t
                )
                log_alpha = log_target(u_new, pf_new) - log_target(u, pf)
                carry, info = accept(k_acc, log_alpha, (u_new, pf_new), (u, pf))
                return carry, jnp.mean(info.acceptance_rate)

            (u, pf), rates = jax.lax.scan(one, (u, pf), jax.random.split(k, self.num_moves))
            particles = state.particles._replace(state=(u, pf))
            return state._replace(particles=particles), jnp.mean(rates)

        selection = Adaptive(as_selection(self.resampling), float(self.ess_threshold))

        def start(key):
            k_init, k_loop = jax.random.split(key)
            state, _ = kernel.init(k_init, outer, (), n)
            return kernel.scan_begin(body, state, jax.random.split(k_loop, num_steps))

        def body(state, k):
            state, info = kernel.step(k, state, outer, (), selection=selection, may_stop=False, move=move)
            rate = jnp.where(info.selected, info.move, jnp.nan)
            return state, {
                "ess": info.ess,
                "resampled": info.selected,
                "lse": info.log_evidence,
                "rate": rate,
            }

        def output(run: kernel.ScanRun) -> dict:
            state, rec = run.carry, run.records
            u, _ = state.particles.state
            return {
                "theta": jax.vmap(theta_of)(u),
                "log_weights": state.log_weights,
                "log_evidence": logsumexp(state.log_weights),
                "ess": rec["ess"],
                "resampled": rec["resampled"],
                "log_evidence_history": rec["lse"],
                "acceptance_rate": rec["rate"],
            }

        return _Parts(start, body, output)


class _Parts(NamedTuple):
    start: Callable
    body: Callable
    output: Callable
