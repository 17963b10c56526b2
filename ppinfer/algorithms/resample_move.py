"""Resample-move SMC: SMC whose particles are rejuvenated by MCMC after every resampling.

Composition of the core blocks (Gilks & Berzuini 2001):

    start → repeat T times: advance → [if ESS < threshold · N: resample → k MH moves per particle]

A move is random-walk Metropolis–Hastings on the static parameters (``move_sites``: continuous
``init`` sites), in their unconstrained space, targeting the particle's current posterior
``p(θ, x_{0:t} | y_{0:t})`` with the trajectory ``x_{0:t}`` held fixed: the target is re-scored
exactly by re-running the particle's history (:func:`ppinfer.algorithms.rescore.log_joint`).
Moves run on equally weighted particles and leave that target invariant, so the output keeps SMC's
validity (``E[Ẑ] = Z``) while restoring the diversity of ``θ`` that plain SMC loses (a static
parameter is never redrawn, so resampling collapses it onto a few values). The proposal scale is
adapted from the particles themselves (``2.38/√d`` times their per-coordinate spread), which
preserves validity since it depends only on the population before the move.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ppinfer import checks
from ppinfer._compile import cached_jit, split_args
from ppinfer.algorithms.rescore import constrain, init_supports, log_joint, unconstrain
from ppinfer.algorithms.smc import sample_names
from ppinfer.errors import ConfigError, ModelError
from ppinfer.population import Population, ess, gather, log_evidence
from ppinfer.program import SequentialProgram, is_sequential
from ppinfer.resample import ancestors_from_uniforms, check_scheme, uniforms_shape
from ppinfer.result import Result
from ppinfer.suspended import Particle, Sequential, advance, start
from ppinfer.traced import latent_sites

__all__ = ["ResampleMoveSMC", "rw_move"]


@dataclass(frozen=True)
class ResampleMoveSMC:
    """Resample-move SMC for a :class:`~ppinfer.SequentialProgram` (see the module docstring).

    Args:
        num_particles: N ≥ 1.
        move_sites: names of continuous ``init`` sites (static parameters) that the moves rejuvenate.
        num_moves: MH moves per particle after each resampling, ≥ 1.
        resampling: resampling scheme; ``ess_threshold``: resample when ``ESS < threshold · N``.
    """

    num_particles: int = 1000
    move_sites: Sequence[str] = ()
    num_moves: int = 2
    resampling: str = "systematic"
    ess_threshold: float = 0.5

    name = "ResampleMoveSMC"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        check_scheme(self.resampling)
        checks.check_probability("ess_threshold", self.ess_threshold)
        if isinstance(self.move_sites, str) or not self.move_sites:
            raise ConfigError("ResampleMoveSMC(move_sites=...): give a non-empty tuple of init sites")
        object.__setattr__(self, "move_sites", tuple(self.move_sites))
        if int(self.num_moves) < 1:
            raise ConfigError(f"num_moves must be >= 1, got {self.num_moves}")

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        if not is_sequential(program):
            raise ConfigError("ResampleMoveSMC needs a sequential program (ppinfer.sequential)")
        t0 = time.perf_counter()
        num_steps = program.steps_for(args)
        dyn, static_key, rebuild = split_args(args)
        step_names = _check_program(program, args, self.move_sites)
        settings = (self.num_particles, num_steps, self.move_sites, self.num_moves)
        settings += (self.resampling, self.ess_threshold, step_names)

        def build():
            return lambda key, dyn: resample_move_run(key, program, rebuild(dyn), *settings)

        fn, _ = cached_jit(("resample_move", program, settings, static_key), build)
        out = jax.block_until_ready(fn(key, dyn))
        checks.raise_on_nan_sites(out["nan_sites"], self.name)
        checks.raise_if_dead(float(out["log_evidence"]), "", self.num_particles)
        samples, kinds = sample_names(out["init_choices"], out["trajectories"])
        return Result(
            samples=samples,
            log_weights=out["log_weights"],
            log_evidence=float(out["log_evidence"]),
            algorithm=self.name,
            ess=out["ess"],
            resampled=out["resampled"],
            log_evidence_history=out["log_evidence_history"],
            state=out["state"],
            wall_time=time.perf_counter() - t0,
            extras={
                "active": out["active"],
                "site_kinds": kinds,
                "acceptance_rate": out["acceptance_rate"],
            },
        )


def resample_move_run(
    key, program, args, n, num_steps, move_sites, num_moves, scheme, threshold, step_names
) -> dict:
    """The pure core (jit/vmap-able); returns ``log_weights: f32[N]``, ``log_evidence``, per-step
    ``ess``/``resampled``/``log_evidence_history``/``acceptance_rate`` ``[T]``, ``init_choices``
    ``[N, …]``, ``trajectories`` ``[N, T, …]``, ``active: bool[N, T]``, ``state``, ``nan_sites``."""
    k_init, k_loop = jax.random.split(key)
    seq, init_info = start(k_init, program, args, n)
    init_latent = set(latent_sites(program.init, args))
    init_choices = {k: v for k, v in init_info.choices.items() if k in init_latent}
    transforms = init_supports(program, args, move_sites)
    hist0 = {
        "choices": None,
        "active": jnp.zeros((n, num_steps), bool),
    }

    def body(carry, xs):
        seq, inits, hist = carry
        t, key_t = xs
        k_adv, k_res, k_move = jax.random.split(key_t, 3)
        active_t = ~seq.population.particles.done
        seq, info = advance(k_adv, seq, program, args)
        step_choices = {k: info.choices[k] for k in step_names}
        choices = {k: hist["choices"][k].at[:, t].set(v) for k, v in step_choices.items()}
        hist = {"choices": choices, "active": hist["active"].at[:, t].set(active_t)}
        pop = seq.population
        ess_t = ess(pop.log_weights)
        do = (ess_t < threshold * n) | (threshold >= 1.0)

        def resample_and_move(operand):
            pop, inits, hist = operand
            u = jax.random.uniform(k_res, uniforms_shape(scheme, n), pop.log_weights.dtype)
            anc = ancestors_from_uniforms(scheme, u, pop.log_weights)
            pop = Population(
                gather(pop.particles, anc), jnp.full((n,), log_evidence(pop.log_weights) - jnp.log(n))
            )
            inits, hist = gather(inits, anc), gather(hist, anc)
            inits, state, rate = rw_move(
                k_move, program, args, inits, hist, t, transforms, num_moves, pop.particles.state
            )
            particles = Particle(state, pop.particles.done)
            return Population(particles, pop.log_weights), inits, hist, rate

        def keep(operand):
            pop, inits, hist = operand
            return pop, inits, hist, jnp.zeros(())

        pop, inits, hist, rate = jax.lax.cond(do, resample_and_move, keep, (pop, inits, hist))
        record = (ess_t, do, log_evidence(pop.log_weights), rate, info.nan_sites)
        return (Sequential(pop, seq.t), inits, hist), record

    # The first step's shapes seed the history buffers.
    shapes = jax.eval_shape(lambda s: advance(k_loop, s, program, args)[1].choices, seq)
    hist0["choices"] = {
        k: jnp.zeros((n, num_steps, *shapes[k].shape[1:]), shapes[k].dtype) for k in step_names
    }
    xs = (jnp.arange(num_steps, dtype=jnp.int32), jax.random.split(k_loop, num_steps))
    (seq, inits, hist), (ess_h, resampled, log_z_h, rate_h, nan_h) = jax.lax.scan(
        body, (seq, init_choices, hist0), xs
    )
    nan_sites = {**init_info.nan_sites, **{k: jnp.any(v) for k, v in nan_h.items()}}
    return {
        "init_choices": inits,
        "trajectories": hist["choices"],
        "active": hist["active"],
        "log_weights": seq.population.log_weights,
        "log_evidence": log_evidence(seq.population.log_weights),
        "log_evidence_history": log_z_h,
        "ess": ess_h,
        "resampled": resampled,
        "acceptance_rate": rate_h,
        "state": seq.population.particles.state,
        "nan_sites": nan_sites,
    }


def rw_move(key, program, args, inits, hist, t, transforms, num_moves, state):
    """``num_moves`` random-walk MH moves of every particle's static parameters (vmapped), targeting
    ``p(θ, x_{0:t}, y_{0:t})`` in θ's unconstrained space (Jacobian included). Returns
    ``(inits, states, acceptance rate f32[])``."""
    u = unconstrain(transforms, inits)
    flat, unravel = jax.vmap(lambda d: ravel_pytree(d)[0]), ravel_pytree(jax.tree.map(lambda x: x[0], u))[1]
    u_flat = flat(u)
    dim = u_flat.shape[1]
    scale = 2.38 / jnp.sqrt(dim) * jnp.maximum(jnp.std(u_flat, axis=0), 1e-3)

    def target(v, inits_i, hist_i):
        values, log_det = constrain(transforms, unravel(v))
        lj, st = log_joint(program, args, {**inits_i, **values}, hist_i["choices"], hist_i["active"], t)
        return jnp.where(jnp.isnan(lj), -jnp.inf, lj + log_det), st, values

    def one(k, v, inits_i, hist_i, state_i):
        lp, _, _ = target(v, inits_i, hist_i)

        def move(carry, km):
            v, lp, inits_i, state_i, acc = carry
            k1, k2 = jax.random.split(km)
            v_new = v + scale * jax.random.normal(k1, v.shape, v.dtype)
            lp_new, st_new, values = target(v_new, inits_i, hist_i)
            ok = jnp.log(jax.random.uniform(k2, dtype=lp.dtype)) < lp_new - lp
            pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)
            return (
                pick(v_new, v),
                jnp.where(ok, lp_new, lp),
                pick({**inits_i, **values}, inits_i),
                pick(st_new, state_i),
                acc + ok,
            ), None

        carry = (v, lp, inits_i, state_i, jnp.zeros(()))
        (v, lp, inits_i, state_i, acc), _ = jax.lax.scan(move, carry, jax.random.split(k, num_moves))
        return inits_i, state_i, acc / num_moves

    keys = jax.random.split(key, u_flat.shape[0])
    inits, state, acc = jax.vmap(one)(keys, u_flat, inits, hist, state)
    return inits, state, jnp.mean(acc)


def _check_program(program: SequentialProgram, args: tuple, move_sites: tuple) -> tuple[str, ...]:
    """Dry-run init and step 0; check ``move_sites`` are continuous init sites; return the step's
    latent site names."""
    init_w, _ = checks.dry_run(program.init, args, None, "running init once")
    sites = latent_sites(program.init, args)
    for name in move_sites:
        if name not in sites:
            raise ModelError(f"move site {name!r} is not a latent site of init (sites: {sorted(sites)})")
        if sites[name].support.is_discrete:
            raise ModelError(f"move site {name!r} is discrete; resample-move moves continuous sites")
    state = jax.tree.map(jnp.asarray, init_w.value)
    step = lambda s: program.step(s, jnp.zeros((), jnp.int32), *args)
    checks.dry_run(step, (state,), None, "running step 0 once")
    return tuple(latent_sites(step, (state,)))
