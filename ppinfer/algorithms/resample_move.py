"""Resample-move SMC: SMC whose particles are rejuvenated by MCMC after every resampling.

Composition of the core blocks (Gilks & Berzuini 2001):

    start → repeat T times: advance → [if ESS < threshold · N: resample → k MH moves per particle]

A move is one or both of:

- **static parameters** (``move_sites``) — described below;
- **suffix regeneration** (``regenerate_suffix = L``): after step ``t``, steps ``j..t`` with
  ``j = max(0, t − L + 1)`` are redrawn from the SMC's own step proposal (``proposal``, default the
  step's prior — for a token-level program, the LM itself), starting from the particle's state after
  step ``j − 1`` (rebuilt by replaying its recorded choices, e.g. re-feeding its first ``j`` tokens
  to the LM). With ``w_s = log p/q`` the step's incremental weight (what :func:`advance` adds), the
  proposal is ``Π_{s≥j} q(x'_s | x'_{<s})`` and the target ``π_t(x_{0:t}) ∝ Π_s p(x_s | x_{<s}) g_s``,
  so the MH acceptance ratio is ``log α = Σ_{s=j}^{t} w'_s − Σ_{s=j}^{t} w_s`` (the prefix cancels;
  the old suffix's weights are recomputed by replay, so they are exact after a static-parameter
  move). ``j`` depends only on ``t``, not on the particle, so each move is a valid MH kernel for
  ``π_t``; a stopped particle's steps after its stop contribute nothing (a particle that stopped
  before ``j`` is unchanged), and a regenerated suffix may stop at a different step.
  ``L ≥ T`` regenerates the whole trajectory: independence MH with the sequential proposal.

Static-parameter moves are random-walk Metropolis–Hastings on ``move_sites`` (continuous
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from numpyro import handlers

from ppinfer import checks
from ppinfer._compile import cached_jit, split_args
from ppinfer.algorithms.rescore import constrain, init_supports, log_joint, unconstrain
from ppinfer.algorithms.smc import sample_names
from ppinfer.errors import ConfigError, ModelError
from ppinfer.kernels.mh import accept
from ppinfer.population import Population, ess, gather, log_evidence
from ppinfer.program import SequentialProgram, is_sequential
from ppinfer.resample import ancestors_from_uniforms, check_scheme, uniforms_shape
from ppinfer.result import Result
from ppinfer.suspended import Particle, Sequential, advance, can_stop, match_state, start
from ppinfer.traced import assess, latent_sites
from ppinfer.weighted import simulate

__all__ = ["ResampleMoveSMC", "rw_move", "regenerate_suffix"]


@dataclass(frozen=True)
class ResampleMoveSMC:
    """Resample-move SMC for a :class:`~ppinfer.SequentialProgram` (see the module docstring).

    Args:
        num_particles: N ≥ 1.
        move_sites: names of continuous ``init`` sites (static parameters) that the moves rejuvenate.
        num_moves: MH moves per particle after each resampling, ≥ 1 (each: a static-parameter move,
            then a suffix regeneration, whichever are configured).
        resampling: resampling scheme; ``ess_threshold``: resample when ``ESS < threshold · N``.
        regenerate_suffix: ``L ≥ 1`` to redraw each particle's last ``L`` steps by MH (see the module
            docstring); ``None``: no suffix moves. At least one of ``move_sites`` and
            ``regenerate_suffix`` must be given.
        proposal: ``proposal(state, t, *args)`` proposing some of a step's latent sites, as in
            :class:`~ppinfer.SMC` (default: the step's prior); used by the SMC steps and by the
            suffix regeneration.
    """

    num_particles: int = 1000
    move_sites: Sequence[str] = ()
    num_moves: int = 2
    resampling: str = "systematic"
    ess_threshold: float = 0.5
    regenerate_suffix: int | None = None
    proposal: Callable[..., Any] | None = None

    name = "ResampleMoveSMC"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        check_scheme(self.resampling)
        checks.check_probability("ess_threshold", self.ess_threshold)
        if isinstance(self.move_sites, str):
            raise ConfigError("ResampleMoveSMC(move_sites=...): give a tuple of init site names")
        object.__setattr__(self, "move_sites", tuple(self.move_sites))
        if self.regenerate_suffix is not None:
            checks.check_int("regenerate_suffix", self.regenerate_suffix, 1)
        if not self.move_sites and self.regenerate_suffix is None:
            raise ConfigError(
                "ResampleMoveSMC has no move: give move_sites (init sites) and/or regenerate_suffix=L"
            )
        if self.proposal is not None and not callable(self.proposal):
            raise ConfigError("ResampleMoveSMC(proposal=...): the proposal must be a callable program")
        if int(self.num_moves) < 1:
            raise ConfigError(f"num_moves must be >= 1, got {self.num_moves}")

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        if not is_sequential(program):
            raise ConfigError("ResampleMoveSMC needs a sequential program (ppinfer.sequential)")
        t0 = time.perf_counter()
        num_steps = program.steps_for(args)
        dyn, static_key, rebuild = split_args(args)
        step_names = _check_program(program, args, self.move_sites, self.proposal)
        settings = (self.num_particles, num_steps, self.move_sites, self.num_moves)
        settings += (self.resampling, self.ess_threshold, step_names, self.regenerate_suffix, self.proposal)

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
                "suffix_acceptance_rate": out["suffix_acceptance_rate"],
            },
        )


def resample_move_run(
    key,
    program,
    args,
    n,
    num_steps,
    move_sites,
    num_moves,
    scheme,
    threshold,
    step_names,
    suffix=None,
    proposal=None,
) -> dict:
    """The pure core (jit/vmap-able); returns ``log_weights: f32[N]``, ``log_evidence``, per-step
    ``ess``/``resampled``/``log_evidence_history`` ``[T]``, ``acceptance_rate`` ``[T]`` (of the
    static-parameter moves, or of the suffix moves when there are none), ``suffix_acceptance_rate``
    ``[T]``, ``init_choices`` ``[N, …]``, ``trajectories`` ``[N, T, …]``, ``active: bool[N, T]``,
    ``state``, ``nan_sites``."""
    k_init, k_loop = jax.random.split(key)
    may_stop = can_stop(program, args, proposal)  # no finished-particle masks when it cannot stop
    seq, init_info = start(k_init, program, args, n)
    init_latent = set(latent_sites(program.init, args))
    init_choices = {k: v for k, v in init_info.choices.items() if k in init_latent}
    transforms = init_supports(program, args, move_sites) if move_sites else {}
    hist0 = {
        "choices": None,
        "active": jnp.zeros((n, num_steps), bool),
    }

    def body(carry, xs):
        seq, inits, hist = carry
        t, key_t = xs
        k_adv, k_res, k_move = jax.random.split(key_t, 3)
        active_t = ~seq.population.particles.done
        seq, info = advance(k_adv, seq, program, args, proposal, may_stop)
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
            state, done = pop.particles.state, pop.particles.done
            rates, suffix_rates = [], []
            if suffix is None:
                inits, state, rate = rw_move(
                    k_move, program, args, inits, hist, t, transforms, num_moves, state
                )
                rates.append(rate)
            for i in range(num_moves if suffix is not None else 0):
                k_i = jax.random.fold_in(k_move, i)
                if move_sites:
                    inits, state, rate = rw_move(k_i, program, args, inits, hist, t, transforms, 1, state)
                    rates.append(rate)
                hist, state, done, rate = regenerate_suffix(
                    jax.random.fold_in(k_i, 1), program, args, proposal, inits, hist, state, done, t, suffix
                )
                suffix_rates.append(rate)
            mean = lambda xs: jnp.mean(jnp.stack(xs)) if xs else jnp.zeros(())
            particles = Particle(state, done)
            return Population(particles, pop.log_weights), inits, hist, mean(rates), mean(suffix_rates)

        def keep(operand):
            pop, inits, hist = operand
            return pop, inits, hist, jnp.zeros(()), jnp.zeros(())

        pop, inits, hist, rate, suffix_rate = jax.lax.cond(do, resample_and_move, keep, (pop, inits, hist))
        record = (ess_t, do, log_evidence(pop.log_weights), rate, suffix_rate, info.nan_sites)
        return (Sequential(pop, seq.t), inits, hist), record

    # The first step's shapes seed the history buffers.
    shapes = jax.eval_shape(lambda s: advance(k_loop, s, program, args)[1].choices, seq)
    hist0["choices"] = {
        k: jnp.zeros((n, num_steps, *shapes[k].shape[1:]), shapes[k].dtype) for k in step_names
    }
    xs = (jnp.arange(num_steps, dtype=jnp.int32), jax.random.split(k_loop, num_steps))
    (seq, inits, hist), (ess_h, resampled, log_z_h, rate_h, suffix_h, nan_h) = jax.lax.scan(
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
        "acceptance_rate": rate_h if move_sites else suffix_h,
        "suffix_acceptance_rate": suffix_h,
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
            proposed = (v_new, lp_new, {**inits_i, **values}, st_new)
            (v, lp, inits_i, state_i), info = accept(k2, lp_new - lp, proposed, (v, lp, inits_i, state_i))
            return (v, lp, inits_i, state_i, acc + info.accepted), None

        carry = (v, lp, inits_i, state_i, jnp.zeros(()))
        (v, lp, inits_i, state_i, acc), _ = jax.lax.scan(move, carry, jax.random.split(k, num_moves))
        return inits_i, state_i, acc / num_moves

    keys = jax.random.split(key, u_flat.shape[0])
    inits, state, acc = jax.vmap(one)(keys, u_flat, inits, hist, state)
    return inits, state, jnp.mean(acc)


def regenerate_suffix(key, program, args, proposal, inits, hist, state, done, t, length):
    """One suffix-regeneration MH move of every particle (see the module docstring): redraw steps
    ``j..t``, ``j = max(0, t − length + 1)``, from ``proposal`` (``None``: the step's prior) and accept
    with ``log α = Σ_{s≥j} w'_s − Σ_{s≥j} w_s``. Leaves ``π_t`` (the target after step ``t``) invariant.

    Args: ``inits`` init latent choices ``[N, …]``; ``hist`` the history (``choices`` ``[N, T, …]``,
    ``active: bool[N, T]``); ``state``/``done: bool[N]`` the particles after step ``t``.
    Returns ``(hist, state, done, acceptance rate f32[])``. Cost: ``t + 1`` replayed or fresh steps
    per particle plus ``min(length, t + 1)`` replays of the old suffix.
    """
    n = done.shape[0]
    j = jnp.maximum(t - length + 1, 0)
    key, k_accept = jax.random.split(key)
    state0 = jax.vmap(lambda c: jax.tree.map(jnp.asarray, assess(program.init, args, c).value), axis_size=n)(
        inits
    )
    state0 = match_state(state0, state)
    idx = jnp.arange(n)

    def run(k, s, st, choices):
        """One step of one particle: fresh from the proposal (``choices=None``) or at ``choices``;
        returns ``(state, latent choices, w = log p/q, stopped)``."""
        step = lambda x: program.step(x, s, *args)
        prop = None if proposal is None else (lambda x: proposal(x, s, *args))
        if choices is not None:
            step = handlers.substitute(step, data=choices)
            prop = None if prop is None else handlers.substitute(prop, data=choices)
        weighted, info = simulate(k, step, (st,), proposal=prop)
        latent = {name: weighted.choices[name] for name in hist["choices"]}
        return weighted.value, latent, weighted.log_weight, info.stopped

    def one_step(k, s, st, dn, choices):
        new, latent, w, stopped = jax.vmap(lambda i, x, c: run(jax.random.fold_in(k, i), s, x, c))(
            idx, st, choices
        )
        new = match_state(new, st)
        active = ~dn
        keep = lambda a, b: jnp.where(active.reshape(active.shape + (1,) * (a.ndim - 1)), a, b)
        w = jnp.where(active, w, 0.0)
        return jax.tree.map(keep, new, st), dn | (active & stopped), latent, w, active

    def body(s, carry):
        new_st, new_dn, old_st, old_dn, choices, active, log_new, log_old = carry
        stored = {k: v[:, s] for k, v in hist["choices"].items()}

        def replay(_):
            st, dn, _, _, _ = one_step(key, s, new_st, new_dn, stored)
            return st, dn, st, dn, choices, active, log_new, log_old

        def regenerate(_):
            k_s = jax.random.fold_in(key, s)
            st_n, dn_n, latent, w_n, act_n = one_step(k_s, s, new_st, new_dn, None)
            st_o, dn_o, _, w_o, _ = one_step(key, s, old_st, old_dn, stored)
            ch = {k: v.at[:, s].set(latent[k].astype(v.dtype)) for k, v in choices.items()}
            return st_n, dn_n, st_o, dn_o, ch, active.at[:, s].set(act_n), log_new + w_n, log_old + w_o

        return jax.lax.cond(s < j, replay, regenerate, None)

    zeros = jnp.zeros((n,), jnp.result_type(float))
    init_done = jnp.zeros((n,), bool)
    carry = (state0, init_done, state0, init_done, hist["choices"], hist["active"], zeros, zeros)
    new_st, new_dn, _, _, choices, active, log_new, log_old = jax.lax.fori_loop(0, t + 1, body, carry)
    proposed = ({"choices": choices, "active": active}, new_st, new_dn)
    current = ({"choices": hist["choices"], "active": hist["active"]}, state, done)
    (hist, state, done), info = accept(k_accept, log_new - log_old, proposed, current)
    return hist, state, done, jnp.mean(info.accepted)


def _check_program(
    program: SequentialProgram, args: tuple, move_sites: tuple, proposal: Callable[..., Any] | None = None
) -> tuple[str, ...]:
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
    t0 = jnp.zeros((), jnp.int32)
    step = lambda s: program.step(s, t0, *args)
    prop = None if proposal is None else (lambda s: proposal(s, t0, *args))
    checks.dry_run(step, (state,), prop, "running step 0 once")
    return tuple(latent_sites(step, (state,)))
