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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from numpyro import handlers

from ppinfer import checks
from ppinfer.algorithms.rescore import log_joint
from ppinfer.algorithms.smc import Loop, run_sequential, smc_selection
from ppinfer.errors import ConfigError, ModelError
from ppinfer.kernels.mh import accept
from ppinfer.kernels.space import space_of
from ppinfer.program import SequentialProgram
from ppinfer.resample import check_scheme
from ppinfer.result import Result
from ppinfer.suspended import Particle, match_state
from ppinfer.traced import assess, latent_sites
from ppinfer.weighted import simulate

__all__ = ["ResampleMoveSMC", "Rejuvenate", "rw_move", "regenerate_suffix"]


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
        progress_bar: a progress bar over the steps, as :class:`~ppinfer.SMC`'s (it never changes
            the result).
    """

    num_particles: int = 1000
    move_sites: Sequence[str] = ()
    num_moves: int = 2
    resampling: str = "systematic"
    ess_threshold: float = 0.5
    regenerate_suffix: int | None = None
    proposal: Callable[..., Any] | None = None
    progress_bar: bool | None = None

    name = "ResampleMoveSMC"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        check_scheme(self.resampling)
        checks.check_probability("ess_threshold", self.ess_threshold)
        object.__setattr__(self, "move_sites", checks.site_names("move_sites", self.move_sites))
        if self.regenerate_suffix is not None:
            checks.check_int("regenerate_suffix", self.regenerate_suffix, 1)
        if not self.move_sites and self.regenerate_suffix is None:
            raise ConfigError(
                "ResampleMoveSMC has no move: give move_sites (init sites) and/or regenerate_suffix=L"
            )
        checks.check_proposals(self)
        if int(self.num_moves) < 1:
            raise ConfigError(f"num_moves must be >= 1, got {self.num_moves}")

    init_proposal = None  # not configurable: init is drawn from its prior

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        checks.require_sequential(program, "ResampleMoveSMC")
        step_names = _check_program(program, args, self.move_sites, self.proposal)
        move = Rejuvenate(self.move_sites, self.num_moves, self.regenerate_suffix, self.proposal, step_names)
        loop = Loop(
            self.num_particles,
            program.steps_for(args),
            smc_selection(self.resampling, self.ess_threshold),
            self.proposal,
            select_last=True,  # the final particles are rejuvenated too
            history=False,
            move=move,
        )

        def post(out):
            rates = out["move"]
            main = rates["acceptance_rate"] if self.move_sites else rates["suffix_acceptance_rate"]
            return out, {"acceptance_rate": main, "suffix_acceptance_rate": rates["suffix_acceptance_rate"]}

        return run_sequential(key, program, args, self, loop, self.name, post)


@dataclass(frozen=True)
class Rejuvenate:
    """The resample-move rejuvenation, as a :class:`~ppinfer.algorithms.smc.Loop` ``move``: it carries
    each particle's init latent choices and step history (``choices`` ``[N, T, …]``, ``active:
    bool[N, T]``) and, after each selection following step ``t``, runs ``num_moves`` moves (see the
    module docstring), each leaving ``π_t`` invariant. Info: ``acceptance_rate`` (static-parameter
    moves) and ``suffix_acceptance_rate`` (suffix moves), ``f32[]`` means over particles and moves."""

    move_sites: tuple
    num_moves: int
    suffix: int | None
    proposal: Callable[..., Any] | None
    step_names: tuple

    def start(self, program, args, init_choices, step_shapes, num_steps):
        init_latent = set(latent_sites(program.init, args))
        hist = {
            k: jnp.zeros(
                (step_shapes[k].shape[0], num_steps, *step_shapes[k].shape[1:]), step_shapes[k].dtype
            )
            for k in self.step_names
        }
        n = jax.tree.leaves(step_shapes)[0].shape[0]
        inits = {k: v for k, v in init_choices.items() if k in init_latent}
        return {"init": inits, "hist": {"choices": hist, "active": jnp.zeros((n, num_steps), bool)}}

    def update(self, carried, choices, active, t):
        hist = carried["hist"]
        new = {k: v.at[:, t].set(choices[k].astype(v.dtype)) for k, v in hist["choices"].items()}
        return {**carried, "hist": {"choices": new, "active": hist["active"].at[:, t].set(active)}}

    def output(self, carried):
        hist = carried["hist"]
        return {"init_choices": carried["init"], "trajectories": hist["choices"], "active": hist["active"]}

    def __call__(self, key, state, program, args):
        t = state.t - 1
        inits, hist = state.carried["init"], state.carried["hist"]
        st, done = state.particles.state, state.particles.done
        space = (
            space_of(program.init, args, sites=self.move_sites, what="ResampleMoveSMC")
            if self.move_sites
            else None
        )
        rates, suffix_rates = [], []
        if self.suffix is None:
            inits, st, rate = rw_move(key, program, args, inits, hist, t, space, self.num_moves, st)
            rates.append(rate)
        for i in range(self.num_moves if self.suffix is not None else 0):
            k_i = jax.random.fold_in(key, i)
            if space is not None:
                inits, st, rate = rw_move(k_i, program, args, inits, hist, t, space, 1, st)
                rates.append(rate)
            hist, st, done, rate = regenerate_suffix(
                jax.random.fold_in(k_i, 1),
                program,
                args,
                self.proposal,
                inits,
                hist,
                st,
                done,
                t,
                self.suffix,
            )
            suffix_rates.append(rate)
        mean = lambda xs: jnp.mean(jnp.stack(xs)) if xs else jnp.zeros(())
        carried = {"init": inits, "hist": hist}
        info = {"acceptance_rate": mean(rates), "suffix_acceptance_rate": mean(suffix_rates)}
        return state._replace(particles=Particle(st, done), carried=carried), info


def rw_move(key, program, args, inits, hist, t, space, num_moves, state):
    """``num_moves`` random-walk MH moves of every particle's static parameters (vmapped), targeting
    ``p(θ, x_{0:t}, y_{0:t})`` in θ's unconstrained ``space`` (:mod:`ppinfer.kernels.space`,
    Jacobian included). Returns ``(inits, states, acceptance rate f32[])``."""
    u_flat = jax.vmap(space.unconstrain)(inits)
    scale = 2.38 / jnp.sqrt(space.dim) * jnp.maximum(jnp.std(u_flat, axis=0), 1e-3)

    def target(v, inits_i, hist_i):
        values, log_det = space.constrain(v)
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
