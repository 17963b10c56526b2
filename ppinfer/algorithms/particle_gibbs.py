"""Particle Gibbs: conditional SMC over a sequential program's trajectory, and Gibbs updates of its
static parameters (Andrieu, Doucet & Holenstein 2010; ancestor sampling: Lindsten, Jordan & Schön 2014).

**Target.** The *trajectory* ``x = (x_init, x_0, …, x_{T−1})`` of a sequential program is the latent
choices of ``init`` and of every step; its smoothing posterior is

    π(x) = p(x | y) ∝ p(x, y) = Π_{init, t} p(x_t | s_{t−1}) · p(y_t | x_t, s_{t−1})

(``s_t`` the program's state after step ``t``, a deterministic function of the choices so far).

**Conditional SMC kernel** ``csmc_step(key, ref) -> (ref', info)``, with N particles:

1. run ``init`` for N particles; slot 0 runs it with the reference's init choices substituted;
2. for ``t = 0 … T−1``: draw the ancestors of slots ``1 … N−1`` i.i.d. ∝ the current weights
   (multinomial resampling at every step); slot 0 keeps ancestor 0 — or, with ancestor sampling,
   draws it ∝ ``w_i · p(x*_t, y_t | s_i)``; run step ``t`` for every slot, slot 0 with the
   reference's step-``t`` choices substituted; each particle's weight becomes the step's
   *incremental* log weight ``log p(y_t | x_t, s_{t−1})`` (observations, factors and conditions of
   the step: the bootstrap proposal, so the latent choices contribute nothing);
3. draw ``k`` ∝ the final weights and return particle ``k``'s trajectory, traced back through the
   ancestors (``k = 0`` returns the reference's own lineage).

**Validity.** For every ``N ≥ 1`` the kernel leaves ``π`` invariant (it is a Gibbs sampler on the
extended target of all particles, ancestors and the index ``k``, whose marginal of the selected
trajectory is ``π``); for ``N ≥ 2`` it moves, and it is ergodic under mild conditions. Unlike
independent SMC draws (whose law is only asymptotically ``π`` as N → ∞), this holds for small N.
Checked exactly in ``tests/test_csmc_exact.py``: :func:`csmc_step_from_noise` runs this sweep with
all its randomness given (the free slots' latent choices and every uniform) and reports the law it
draws them from, and :func:`semantics.csmc.csmc_transition_matrix` enumerates that noise to get the
kernel's transition matrix ``K`` on finite HMMs (N = 2, 3; with and without ancestor sampling, latent
``init`` choices, stopping particles): ``max |πK − π|`` is below 1e-13 in float64, against 0.02 to
0.13 for a sweep that does not pin the reference or that ancestor-samples ∝ ``w_i`` alone.
Statistically in ``tests/test_particle_gibbs.py``: chains started from exact posterior draws stay
posterior-distributed after one key-driven step (chi-square test), while a kernel that drops the
reference does not.

**Path degeneracy.** Plain CSMC (no ancestor sampling, no backward pass) rarely changes the early
part of the trajectory: the resampled lineages coalesce, usually into the reference's own, so
``x_0`` is updated with probability that decays with ``T/N`` (``info.changed`` shows it per step).
*Ancestor sampling* fixes this at the cost of one more step evaluation per particle: slot 0's ancestor
is redrawn ∝ ``w_{t−1}^i · γ_T(x^i_{0:t−1}, x*_{t:T}) / γ_{t−1}(x^i_{0:t−1})``. The kernel computes that
ratio as ``p(x*_t, y_t | s^i_{t−1})`` (the step's full joint density of the reference's step-``t``
choices, run from particle ``i``'s state), which is exact when the state a step returns does not
depend on the ancestor's state once its choices are fixed — a Markov state-space program whose state
is the latest latent value (``return x``). The kernel checks this at every step (``info.non_markov``)
and :class:`ParticleGibbs` raises :class:`~ppinfer.errors.ModelError` when it fails; ancestor
sampling does not support programs that :func:`~ppinfer.stop`.

**Static parameters.** :class:`ParticleGibbs` with ``prior`` treats parameters as PMMH does (a prior
program over ``θ``; ``init(θ, *args)``, ``step(state, t, θ, *args)``) and alternates the CSMC kernel
given ``θ`` with random-walk Metropolis–Hastings on ``θ`` given the trajectory, on ``θ``'s
unconstrained space with the exact log target ``log p(θ) + log|J| + log p(x, y | θ)`` (the trajectory
re-scored under the proposed θ). Both updates leave ``p(θ, x | y)`` invariant, so their cycle does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jax.scipy.special import logsumexp
from numpyro import handlers
from numpyro.primitives import Messenger

from ppinfer import checks
from ppinfer.algorithms.rescore import log_joint
from ppinfer.algorithms.smc import sample_names
from ppinfer.errors import ConfigError, ModelError, ZeroEvidenceError
from ppinfer.kernels.mh import accept
from ppinfer.kernels.space import space_of
from ppinfer.mcmc.algorithm import MCMC, MCMCResult
from ppinfer.mcmc.base import Kernel
from ppinfer.population import Population, ess, gather
from ppinfer.program import SequentialProgram, is_sequential
from ppinfer.resample import ancestors_from_uniforms
from ppinfer.suspended import Particle, Sequential, StepInfo, advance, match_state, start
from ppinfer.traced import assess
from ppinfer.weighted import simulate, site_log_prob

__all__ = [
    "ParticleGibbs",
    "Trajectory",
    "CSMCInfo",
    "Sites",
    "csmc",
    "csmc_step",
    "csmc_step_from_noise",
    "CSMCNoise",
    "NoiseLaw",
    "initial_trajectory",
    "check_program",
]


class Trajectory(NamedTuple):
    """One particle's whole history: the state of the CSMC kernel (the reference).

    Attributes:
        init: ``init``'s latent and deterministic site values, name → value.
        steps: each step's latent and deterministic site values, name → ``[T, …]`` (values at steps
            where the particle had already stopped are meaningless).
        active: ``bool[T]``, whether step ``t`` ran (``False`` after a :func:`~ppinfer.stop`).
    """

    init: dict[str, jax.Array]
    steps: dict[str, jax.Array]
    active: jax.Array


class CSMCInfo(NamedTuple):
    """What one conditional SMC sweep did.

    Attributes:
        log_weights: ``f32[N]`` the last step's incremental log weights (log-likelihood of its
            observations), from which the new reference was drawn.
        index: ``i32[]`` the final particle chosen as the new reference (slot 0 holds the old one).
        changed: ``bool[T]``, whether the new reference's latent choices at step ``t`` differ from
            the old reference's (path degeneracy shows as ``False`` at early steps).
        ess: ``f32[T]`` ESS of each step's incremental weights.
        log_evidence: ``f32[]`` ``Σ log mean exp(weights)`` over init and the steps. Its ``exp`` is
            an unbiased estimate of ``Z = p(y)`` only for the unconditional
            :func:`initial_trajectory`; with a pinned reference it is a diagnostic.
        nan_sites: site name → ``bool[]``, whether any live particle's log density there was NaN.
        non_markov: ``bool[]`` (ancestor sampling) whether some step's returned state depended on the
            ancestor's state, or some particle stopped: then the ancestor-sampling weights are wrong.
    """

    log_weights: jax.Array
    index: jax.Array
    changed: jax.Array
    ess: jax.Array
    log_evidence: jax.Array
    nan_sites: dict[str, jax.Array]
    non_markov: jax.Array


class Sites(NamedTuple):
    """The latent site names of ``init`` and of a step (static; from :func:`check_program`)."""

    init_latent: tuple[str, ...]
    step_latent: tuple[str, ...]


class CSMCNoise(NamedTuple):
    """Every random input of one sweep, given explicitly (:func:`csmc_step_from_noise`).

    Attributes:
        init: ``init``'s latent choices of each slot, name → ``[N, …]``.
        steps: each step's latent choices of each slot, name → ``[T, N, …]``.
        resample: ``f[T, N]`` the multinomial-resampling uniforms of step ``t`` (slot ``i``'s ancestor).
        ancestor: ``f[T]`` the ancestor-sampling uniform of step ``t``.
        pick: ``f[1]`` the uniform that picks the final particle.

    Slot 0's entries are ignored when the sweep is pinned to a reference (its choices are the
    reference's, its ancestor is 0 or ancestor-sampled).
    """

    init: dict[str, jax.Array]
    steps: dict[str, jax.Array]
    resample: jax.Array
    ancestor: jax.Array
    pick: jax.Array


class NoiseLaw(NamedTuple):
    """The law under which the key-driven sweep draws each part of :class:`CSMCNoise`, as the sweep
    computed it on a given noise (each law depends only on earlier parts of the noise).

    Attributes:
        free: ``bool[N]`` slots whose init choices and resampled ancestors are random (all but slot 0
            when pinned).
        init_log_prob: ``f[N]`` log density of each free slot's ``init`` latent choices (0 elsewhere).
        step_log_prob: ``f[T, N]`` log density of slot ``i``'s step-``t`` latent choices given its
            parent's state, where ``step_drawn`` (0 elsewhere).
        step_drawn: ``bool[T, N]`` the slot is free and its parent had not stopped (a stopped
            particle's step draws nothing).
        resample_log_weights: ``f[T, N]`` the log weights whose normalised cumulative sum the free
            slots' resampling uniforms invert at step ``t`` (inverse CDF).
        ancestor_log_weights: ``f[T, N]`` the same for the ancestor-sampling uniform (ancestor
            sampling only; zeros otherwise).
        ancestor_drawn: ``bool[]`` whether the ancestor-sampling uniforms are used.
        final_log_weights: ``f[N]`` the same for the final pick.
    """

    free: jax.Array
    init_log_prob: jax.Array
    step_log_prob: jax.Array
    step_drawn: jax.Array
    resample_log_weights: jax.Array
    ancestor_log_weights: jax.Array
    ancestor_drawn: jax.Array
    final_log_weights: jax.Array


def csmc_step(
    key: jax.Array,
    ref: Trajectory,
    program: SequentialProgram,
    args: tuple,
    num_particles: int,
    num_steps: int,
    sites: Sites,
    ancestor_sampling: bool = False,
) -> tuple[Trajectory, CSMCInfo]:
    """One conditional SMC transition from reference ``ref`` (module docstring): pure, jit/vmap-able.
    Leaves the smoothing posterior ``p(x | y)`` of ``program(*args)`` invariant for any
    ``num_particles ≥ 1`` (moves for ≥ 2)."""
    return _sweep(key, program, args, num_particles, num_steps, sites, ref, True, ancestor_sampling)


def csmc_step_from_noise(
    noise: CSMCNoise,
    ref: Trajectory,
    program: SequentialProgram,
    args: tuple,
    num_particles: int,
    num_steps: int,
    sites: Sites,
    ancestor_sampling: bool = False,
    pin: bool = True,
) -> tuple[Trajectory, CSMCInfo, NoiseLaw]:
    """:func:`csmc_step` with its randomness given as ``noise`` instead of drawn from a key: the same
    sweep, the free slots' latent choices substituted into each slot's run of ``init`` and the steps
    (each slot runs :func:`~ppinfer.suspended.start` / :func:`~ppinfer.suspended.advance` as a
    one-particle population, vmapped over slots) and the uniforms fed to the same inverse-CDF draws.
    Also returns the :class:`NoiseLaw` that the key-driven sweep draws the noise from, so that the
    kernel's transition probabilities can be computed exactly by enumerating the noise
    (:func:`semantics.csmc.csmc_transition_matrix`). ``pin=False``: the unconditional sweep of
    :func:`initial_trajectory`. Pure, jit/vmap-able."""
    return _sweep(None, program, args, num_particles, num_steps, sites, ref, pin, ancestor_sampling, noise)


def initial_trajectory(
    key: jax.Array,
    program: SequentialProgram,
    args: tuple,
    num_particles: int,
    num_steps: int,
    sites: Sites,
) -> tuple[Trajectory, CSMCInfo]:
    """A starting reference: one *unconditional* bootstrap SMC run (multinomial resampling at every
    step) and one trajectory drawn ∝ its final weights. Its law is only approximately ``p(x | y)``
    (exact as N → ∞); ``info.log_evidence`` is an unbiased ``log Ẑ`` (``−inf``: every particle died)."""
    ref = _placeholder(program, args, num_steps)
    return _sweep(key, program, args, num_particles, num_steps, sites, ref, False, False)


def check_program(program: SequentialProgram, args: tuple, what: str = "ParticleGibbs") -> Sites:
    """Run ``init`` and step 0 once eagerly (clear :class:`~ppinfer.errors.ModelError` on a bad
    program) and return their latent site names."""
    init_w, init_latent = checks.dry_run(program.init, args, None, f"{what}: running init once")
    state = jax.tree.map(jnp.asarray, init_w.value)
    t0 = jnp.zeros((), jnp.int32)
    step_w, step_latent = checks.dry_run(
        lambda s: program.step(s, t0, *args), (state,), None, f"{what}: running step 0 once"
    )
    if not step_latent:
        raise ModelError(
            f"{what}: the program's step makes no random choice (no latent sample site): "
            "there is no trajectory for conditional SMC to update"
        )
    batched = lambda tree: jax.tree.map(lambda x: jnp.asarray(x)[None], tree)
    match_state(batched(step_w.value), batched(state))
    return Sites(tuple(init_latent), tuple(step_latent))


def csmc(
    program: SequentialProgram, args: tuple, num_particles: int, ancestor_sampling: bool = False
) -> Kernel:
    """The conditional SMC :class:`~ppinfer.mcmc.Kernel` of ``program(*args)`` (checked once here):
    ``init(key, args)`` → :func:`initial_trajectory`'s reference, ``step(key, ref, args)`` →
    :func:`csmc_step` (``functools.partial(step, args=args)`` is the BlackJAX form
    ``kernel(key, state) -> (state, info)``), ``position(ref, args)`` → site values named as in
    SMC results (step sites ``[T, …]``)."""
    if not is_sequential(program):
        raise ConfigError("csmc needs a sequential program (ppinfer.sequential(init, step, num_steps))")
    n = _check_num_particles(num_particles)
    num_steps = program.steps_for(args)
    sites = check_program(program, args, "csmc")
    return Kernel(
        init=lambda key, a: initial_trajectory(key, program, a, n, num_steps, sites)[0],
        step=lambda key, ref, a: csmc_step(key, ref, program, a, n, num_steps, sites, ancestor_sampling),
        position=lambda ref, a: sample_names(ref.init, ref.steps)[0],
    )


@dataclass(frozen=True)
class ParticleGibbs:
    """Particle Gibbs for a :class:`~ppinfer.SequentialProgram` (module docstring).

    Without ``prior`` the chains run the CSMC kernel over the trajectory. With ``prior`` (a static
    program sampling continuous parameters θ, as for :class:`~ppinfer.PMMH`) the program's
    ``init(theta, *args)`` and ``step(state, t, theta, *args)`` take ``theta`` (site name → value)
    first, and each sweep is one CSMC update given θ followed by ``theta_moves`` random-walk MH
    updates of θ given the trajectory.

    Args:
        num_particles: CSMC particles, ≥ 2.
        num_samples, num_warmup, num_chains: recorded sweeps, discarded sweeps (step-size adaptation)
            and vmapped chains, as in :class:`~ppinfer.MCMC`.
        prior: the prior program over θ, or ``None``.
        ancestor_sampling: redraw the reference's ancestor at every step (needs a Markov program,
            module docstring); mixes the early steps far better.
        theta_moves: MH updates of θ per sweep, ≥ 1.
        step_size: initial random-walk scale of θ in the unconstrained space, adapted during warm-up
            towards ``target_accept`` and then frozen.

    The result's ``extras``: ``acceptance_rate: f[C]`` (θ moves), ``update_rate: f[C, T]`` (fraction
    of sweeps in which step ``t``'s choices changed).
    """

    num_particles: int = 20
    num_samples: int = 1000
    num_warmup: int = 300
    num_chains: int = 4
    prior: Callable[..., Any] | None = None
    ancestor_sampling: bool = False
    theta_moves: int = 1
    step_size: float = 0.2
    target_accept: float = 0.3

    name = "ParticleGibbs"

    def __post_init__(self):
        _check_num_particles(self.num_particles)
        for what, v, low in (
            ("num_samples", self.num_samples, 1),
            ("num_warmup", self.num_warmup, 0),
            ("num_chains", self.num_chains, 1),
            ("theta_moves", self.theta_moves, 1),
        ):
            checks.check_int(what, v, low)
        if not float(self.step_size) > 0:
            raise ConfigError(f"step_size must be > 0, got {self.step_size!r}")
        if not 0.0 < float(self.target_accept) < 1.0:
            raise ConfigError(f"target_accept must be in (0, 1), got {self.target_accept!r}")
        if self.prior is not None and not callable(self.prior):
            raise ConfigError(f"prior must be a program (a callable) or None, got {self.prior!r}")

    sequential = True  # the MCMC driver hands it a sequential program

    def run(self, key: jax.Array, program: Any, args: tuple) -> MCMCResult:
        return MCMC(self, self.num_samples, self.num_warmup, self.num_chains).run(key, program, args)

    def extras(self, infos: dict) -> dict:
        """Check the run (NaN sites, a dead first sweep, a non-Markov program under ancestor
        sampling: the infos carry these flags over every sweep) and summarise it (``[C, S]`` infos)."""
        last = jax.tree.map(lambda x: np.asarray(x)[:, -1], infos["flags"])
        checks.raise_on_nan_sites(last["nan_sites"], self.name)
        if not np.all(np.isfinite(last["initial_log_evidence"])):
            raise ZeroEvidenceError(
                f"ParticleGibbs: the initial SMC run ({self.num_particles} particles) of some chain "
                "gave every particle weight zero, so no starting trajectory was found; check the "
                "observations and constraints, or use more particles"
            )
        if bool(np.any(last["non_markov"])):
            raise ModelError(
                "ParticleGibbs(ancestor_sampling=True) needs a Markov program: the state a step "
                "returns must be determined by that step's own choices (e.g. `return x`), and no "
                "particle may stop; here some step's state depended on its ancestor's state or a "
                "particle stopped. Use ancestor_sampling=False."
            )
        return {
            "acceptance_rate": np.mean(np.asarray(infos["accepted"], np.float32), axis=1),
            "update_rate": np.mean(np.asarray(infos["changed"], np.float32), axis=1),
        }

    def build_for(self, program: Any, args: tuple, num_warmup: int) -> Kernel:
        """The particle Gibbs :class:`~ppinfer.mcmc.Kernel` of ``program(*args)`` (a
        :class:`PGState` chain): ``init`` draws θ from the prior and the first reference by an
        unconditional sweep; ``step`` is a CSMC sweep given θ, then ``theta_moves`` random-walk MH
        updates of θ given the trajectory (scale adapted during the first ``num_warmup`` steps)."""
        if not is_sequential(program):
            raise ConfigError(
                "ParticleGibbs needs a sequential program (ppinfer.sequential(init, step, num_steps)); "
                "for a static program use MCMC"
            )
        space = (
            None
            if self.prior is None
            else space_of(self.prior, args, what="ParticleGibbs", error=ConfigError)
        )
        if space is None:
            num_steps = program.steps_for(args)
            sites = check_program(program, args)
        else:
            num_steps = program.steps_for((None, *args))
            sites = check_program(program, (space.constrain(space.u0)[0], *args))
            clash = sorted(set(space.names) & (set(sites.init_latent) | set(sites.step_latent)))
            if clash:
                raise ModelError(f"ParticleGibbs: parameter site(s) {clash} are also sites of the program")
        n = self.num_particles
        full_args = (
            (lambda u, args: args) if space is None else (lambda u, args: (space.constrain(u)[0], *args))
        )

        def log_target(u, ref, args):
            init = {k: ref.init[k] for k in sites.init_latent}
            steps = {k: ref.steps[k] for k in sites.step_latent}
            last = jnp.asarray(num_steps - 1, jnp.int32)
            lj, _ = log_joint(program, full_args(u, args), init, steps, ref.active, last)
            lp = space.log_prior(u, *args) + lj
            return jnp.where(jnp.isnan(lp), -jnp.inf, lp)

        def theta_update(key, u, ref, log_step, args):
            lp = log_target(u, ref, args)

            def move(carry, k):
                u, lp, rate = carry
                k_prop, k_acc = jax.random.split(k)
                u_new = u + jnp.exp(log_step) * jax.random.normal(k_prop, u.shape, u.dtype)
                lp_new = log_target(u_new, ref, args)
                (u, lp), info = accept(k_acc, lp_new - lp, (u_new, lp_new), (u, lp))
                return (u, lp, rate + info.acceptance_rate / self.theta_moves), info.accepted

            keys = jax.random.split(key, self.theta_moves)
            (u, _, rate), accepted = jax.lax.scan(move, (u, lp, jnp.zeros(())), keys)
            return u, rate, jnp.mean(accepted.astype(jnp.float32))

        def sweep(key, u, ref, pin, args):
            return _sweep(
                key, program, full_args(u, args), n, num_steps, sites, ref, pin, self.ancestor_sampling
            )

        def init(key, args):
            k_theta, k_sweep = jax.random.split(key)
            u = jnp.zeros((0,)) if space is None else space.draw(k_theta, *args)
            ref, info = sweep(k_sweep, u, _placeholder(program, full_args(u, args), num_steps), False, args)
            flags = {"nan_sites": info.nan_sites, "non_markov": info.non_markov}
            flags["initial_log_evidence"] = info.log_evidence
            log_step = jnp.log(jnp.asarray(self.step_size, jnp.float32))
            return PGState(u, ref, log_step, jnp.zeros((), jnp.int32), flags)

        def step(key, state, args):
            k_csmc, k_theta = jax.random.split(key)
            u, log_step = state.u, state.log_step
            ref, info = sweep(k_csmc, u, state.ref, True, args)
            accepted = jnp.zeros(())
            if space is not None:
                u, rate, accepted = theta_update(k_theta, u, ref, log_step, args)
                adapted = log_step + (rate - self.target_accept) / jnp.sqrt(state.i + 2.0)
                log_step = jnp.where(state.i < num_warmup, adapted, log_step)
            old = state.flags
            flags = {
                "nan_sites": {k: old["nan_sites"][k] | v for k, v in info.nan_sites.items()},
                "non_markov": old["non_markov"] | info.non_markov,
                "initial_log_evidence": old["initial_log_evidence"],
            }
            new = PGState(u, ref, log_step, state.i + 1, flags)
            return new, {"changed": info.changed, "accepted": accepted, "flags": flags}

        def position(state, args):
            theta = {} if space is None else space.constrain(state.u)[0]
            return {**theta, **sample_names(state.ref.init, state.ref.steps)[0]}

        return Kernel(init, step, position)


class PGState(NamedTuple):
    """One particle Gibbs chain: ``u: f[d]`` θ unconstrained (``f[0]`` without a prior), the
    reference :class:`Trajectory`, the log θ step size, ``i`` sweeps taken and ``flags`` (NaN
    sites, a non-Markov step, the first sweep's log Ẑ) accumulated over every sweep."""

    u: jax.Array
    ref: Trajectory
    log_step: jax.Array
    i: jax.Array
    flags: dict


def _placeholder(program: SequentialProgram, args: tuple, num_steps: int) -> Trajectory:
    """A zero trajectory with the program's site structure (for the unpinned first sweep)."""

    def shapes():
        key = jax.random.PRNGKey(0)
        init, _ = simulate(key, program.init, args)
        step, _ = simulate(key, lambda s: program.step(s, jnp.zeros((), jnp.int32), *args), (init.value,))
        return init.choices, step.choices

    init, step = jax.eval_shape(shapes)
    zeros = lambda s, lead=(): jnp.zeros(lead + s.shape, s.dtype)
    return Trajectory(
        jax.tree.map(zeros, init),
        jax.tree.map(lambda s: zeros(s, (num_steps,)), step),
        jnp.zeros((num_steps,), bool),
    )


def _sweep(key, program, args, n, num_steps, sites, ref, pin, ancestor_sampling, noise=None):
    """The CSMC sweep when ``pin: bool[]`` is true; when false, slot 0 is free like the others and
    this is one unconditional bootstrap SMC run (``ref`` only gives the structure). Its randomness is
    drawn from ``key``, or given as ``noise`` (a :class:`CSMCNoise`; ``key`` is then unused and the
    :class:`NoiseLaw` is returned as a third output)."""
    pin = jnp.asarray(pin)
    given = noise is not None
    if given:
        # Every choice is substituted and every uniform given: the keys below only fill the slots.
        key = jax.random.PRNGKey(0)
    k_init, k_ref0, k_loop, k_pick = jax.random.split(key, 4)
    if given:
        particles, init_info, init_lp = _start_given(k_init, program, args, n, noise.init)
    else:
        seq, init_info = start(k_init, program, args, n)
        particles = seq.population.particles
    fixed = handlers.substitute(program.init, data={k: ref.init[k] for k in sites.init_latent})
    w0, run0 = simulate(k_ref0, fixed, args)
    particles = Particle(
        _pin_first(particles.state, _cast_like(w0.value, _first(particles.state)), pin),
        _pin_first(particles.done, run0.stopped, pin),
    )
    init_choices = _pin_first(init_info.choices, w0.choices, pin)
    log_w = _pin_first(init_info.log_increments, w0.log_weight, pin)
    init_nan = _merge_nan(init_info.nan_sites, run0.nan_sites, pin)
    log_z0 = logsumexp(log_w) - jnp.log(n)

    def body(carry, xs):
        particles, log_w, log_z = carry
        t, key_t, ref_t, noise_t = xs
        k_res, k_as, k_adv, k_ref = jax.random.split(key_t, 4)
        if given:
            u = noise_t.resample.astype(log_w.dtype)
        else:
            u = jax.random.uniform(k_res, (n,), log_w.dtype)
        ancestors = ancestors_from_uniforms("multinomial", u, log_w)
        step_t = lambda s: program.step(s, t, *args)
        b, non_markov, as_log_w = jnp.zeros((), jnp.int32), jnp.zeros((), bool), None
        if ancestor_sampling:
            u_as = noise_t.ancestor.astype(log_w.dtype)[None] if given else None
            b, non_markov, as_log_w = _ancestor(k_as, step_t, particles, log_w, ref_t, u_as)
        ancestors = _pin_first(ancestors, b, pin)
        parents = gather(particles, ancestors)
        equal = Population(parents, jnp.zeros(n, log_w.dtype))
        if given:
            new, info, step_lp = _advance_given(k_adv, Sequential(equal, t), program, args, noise_t.steps)
        else:
            seq, info = advance(k_adv, Sequential(equal, t), program, args)
            new = seq.population.particles
        p0 = _first(parents)
        w0, run0 = simulate(k_ref, handlers.substitute(step_t, data=ref_t), (p0.state,))
        state0 = jax.tree.map(
            lambda a, old: jnp.where(p0.done, old, a), _cast_like(w0.value, p0.state), p0.state
        )
        new = Particle(_pin_first(new.state, state0, pin), _pin_first(new.done, p0.done | run0.stopped, pin))
        inc = _pin_first(info.log_increments, jnp.where(p0.done, 0.0, w0.log_weight), pin)
        choices = _pin_first(info.choices, w0.choices, pin)
        nan = _merge_nan(info.nan_sites, run0.nan_sites, pin & ~p0.done)
        log_z = log_z + logsumexp(inc) - jnp.log(n)
        record = (choices, ~parents.done, ancestors, ess(inc), nan, non_markov & pin)
        if given:
            as_log_w = jnp.zeros_like(log_w) if as_log_w is None else as_log_w
            record += ((step_lp, parents.done, log_w, as_log_w),)
        return (new, inc, log_z), record

    ref_steps = {k: ref.steps[k] for k in sites.step_latent}
    noise_steps = None
    if given:
        noise_steps = _StepNoise(noise.steps, noise.resample, noise.ancestor)
    xs = (
        jnp.arange(num_steps, dtype=jnp.int32),
        jax.random.split(k_loop, num_steps),
        ref_steps,
        noise_steps,
    )
    (_, log_w, log_z), records = jax.lax.scan(body, (particles, log_w, log_z0), xs)
    choices, active, ancestors, ess_h, nan_h, non_markov = records[:6]
    if given:
        u_pick = noise.pick.astype(log_w.dtype)
    else:
        u_pick = jax.random.uniform(k_pick, (1,), log_w.dtype)
    index = ancestors_from_uniforms("multinomial", u_pick, log_w)[0]

    def back(idx, rec):
        choices_t, active_t, anc_t = rec
        return anc_t[idx], (jax.tree.map(lambda c: c[idx], choices_t), active_t[idx])

    idx0, (steps, active_path) = jax.lax.scan(back, index, (choices, active, ancestors), reverse=True)
    new_ref = Trajectory(jax.tree.map(lambda c: c[idx0], init_choices), steps, active_path)
    changed = _changed(new_ref, ref, sites) | ~pin
    nan_sites = {**init_nan, **{k: jnp.any(v) for k, v in nan_h.items()}}
    info = CSMCInfo(log_w, index, changed, ess_h, log_z, nan_sites, jnp.any(non_markov))
    if not given:
        return new_ref, info
    step_lp, parent_done, resample_log_w, as_log_w = records[6]
    free = (jnp.arange(n) > 0) | ~pin
    drawn = free & ~parent_done
    law = NoiseLaw(
        free=free,
        init_log_prob=jnp.where(free, init_lp, 0.0),
        step_log_prob=jnp.where(drawn, step_lp, 0.0),
        step_drawn=drawn,
        resample_log_weights=resample_log_w,
        ancestor_log_weights=as_log_w,
        ancestor_drawn=jnp.asarray(ancestor_sampling) & pin,
        final_log_weights=log_w,
    )
    return new_ref, info, law


class _StepNoise(NamedTuple):
    """One step's slice of :class:`CSMCNoise` (scanned over steps)."""

    steps: dict[str, jax.Array]
    resample: jax.Array
    ancestor: jax.Array


# A deterministic site recording the log density of a substituted run's latent choices.
_PROPOSAL_LOG_PROB = "_csmc_proposal_log_prob"


def _start_given(key, program, args, n, values):
    """:func:`start` with slot ``i``'s ``init`` latent choices ``values[name][i]``: each slot runs as a
    one-particle population (vmapped). Returns the particles, the :class:`StepInfo` and ``f[N]`` the
    log density of each slot's choices."""

    def one(i):
        slot = _substituted(program, jax.tree.map(lambda v: v[i], values), None)
        seq, info = start(key, slot, args, 1)
        return seq.population.particles, info

    particles, info = jax.vmap(one)(jnp.arange(n))
    return _squeeze_slots(particles, info)


def _advance_given(key, seq: Sequential, program, args, values):
    """:func:`advance` with slot ``i``'s step latent choices ``values[name][i]`` (as
    :func:`_start_given`)."""

    def one(i, particle):
        slot = _substituted(program, None, jax.tree.map(lambda v: v[i], values))
        alone = Population(jax.tree.map(lambda x: x[None], particle), jnp.zeros((1,)))
        new, info = advance(key, Sequential(alone, seq.t), slot, args)
        return new.population.particles, info

    particles = seq.population.particles
    new, info = jax.vmap(one)(jnp.arange(particles.done.shape[0]), particles)
    return _squeeze_slots(new, info)


def _squeeze_slots(particles, info):
    """Drop the one-particle axis of per-slot runs; split off the recorded log density."""
    particles = jax.tree.map(lambda x: x[:, 0], particles)
    choices = {k: v[:, 0] for k, v in info.choices.items()}
    log_prob = choices.pop(_PROPOSAL_LOG_PROB)
    nan_sites = {k: jnp.any(v) for k, v in info.nan_sites.items()}
    return particles, StepInfo(choices, info.log_increments[:, 0], nan_sites), log_prob


def _substituted(program: SequentialProgram, init_values, step_values) -> SequentialProgram:
    """``program`` with the latent choices of ``init`` (or of ``step``) substituted by ``values`` and
    their log density recorded in the deterministic site ``_PROPOSAL_LOG_PROB``."""

    def recorded(fn, values):
        def run(*a):
            density = _latent_log_density()
            with handlers.substitute(data=values), density:
                out = fn(*a)
            numpyro.deterministic(_PROPOSAL_LOG_PROB, density.total)
            return out

        return run

    init = program.init if init_values is None else recorded(program.init, init_values)
    step = program.step if step_values is None else recorded(program.step, step_values)
    return SequentialProgram(init, step, program.num_steps)


class _latent_log_density(Messenger):
    """Sums the log densities (:func:`~ppinfer.weighted.site_log_prob`) of latent sample sites."""

    def __init__(self):
        super().__init__()
        self.total = jnp.zeros(())

    def postprocess_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            self.total = self.total + site_log_prob(msg)


def _ancestor(key, step_t, particles: Particle, log_w, ref_t, uniform=None):
    """Ancestor sampling: slot 0's ancestor ∝ ``w_i · p(x*_t, y_t | s_i)`` (drawn with ``uniform:
    f[1]`` if given), whether that weight is wrong for this program (a step's state depended on the
    ancestor's, or a particle stopped), and the log weights ``f[N]`` it was drawn from."""

    def score(state):
        tr = assess(step_t, (state,), ref_t)
        return tr.score, tr.value

    scores, states = jax.vmap(score)(particles.state)
    logits = log_w + jnp.where(particles.done, -jnp.inf, scores)
    if uniform is None:
        uniform = jax.random.uniform(key, (1,), log_w.dtype)
    b = ancestors_from_uniforms("multinomial", uniform, logits)[0]
    non_markov = jnp.any(particles.done)
    for s in jax.tree.leaves(states):
        non_markov = non_markov | jnp.any(jnp.asarray(s) != jnp.asarray(s)[:1])
    return b, non_markov, logits


def _changed(new: Trajectory, old: Trajectory, sites: Sites) -> jax.Array:
    """``bool[T]``: whether step ``t``'s latent choices differ (on steps either trajectory ran)."""
    t = old.active.shape[0]
    diff = jnp.zeros((t,), bool)
    for k in sites.step_latent:
        d = new.steps[k] != old.steps[k]
        diff = diff | jnp.any(d.reshape(t, -1), axis=1)
    return diff & (new.active | old.active)


def _check_num_particles(n: Any) -> int:
    n = checks.check_num_particles(n)
    if n < 2:
        raise ConfigError(
            f"particle Gibbs needs num_particles >= 2, got {n}: with one particle the conditional "
            "SMC kernel can only return its reference"
        )
    return n


def _first(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _pin_first(tree, value, pin):
    """``tree`` (leading axis N) with element 0 replaced by ``value`` where ``pin`` holds."""
    return jax.tree.map(
        lambda x, v: x.at[0].set(jnp.where(pin, jnp.asarray(v).astype(x.dtype), x[0])), tree, value
    )


def _cast_like(new, old):
    return jax.tree.map(lambda a, b: jnp.asarray(a).astype(jnp.asarray(b).dtype), new, old)


def _merge_nan(nan: dict, extra: dict, live: jax.Array) -> dict:
    return {k: nan.get(k, False) | (extra.get(k, False) & live) for k in {**nan, **extra}}
