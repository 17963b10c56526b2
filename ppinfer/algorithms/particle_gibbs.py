"""Particle Gibbs: conditional SMC over a sequential program's trajectory, and Gibbs updates of its
static parameters (Andrieu, Doucet & Holenstein 2010; ancestor sampling: Lindsten, Jordan & Schön 2014).

**Target.** The *trajectory* ``x = (x_init, x_0, …, x_{T−1})`` of a sequential program is the latent
choices of ``init`` and of every step; its smoothing posterior is

    π(x) = p(x | y) ∝ p(x, y) = Π_{init, t} p(x_t | s_{t−1}) · p(y_t | x_t, s_{t−1})

(``s_t`` the program's state after step ``t``, a deterministic function of the choices so far).

**Conditional SMC kernel** ``csmc_step(key, ref) -> (ref', info)``, with N particles — a loop over
the one SMC step (:func:`ppinfer.kernels.smc.step`), the same step every SMC algorithm runs:

1. ``init`` for N particles, slot 0 *pinned* to the reference's init choices (the ``pinned`` option
   of the step: in the same vmapped run, slot 0's latent sites take the reference's values);
2. for ``t = 0 … T−1``: the step runs step ``t`` for every slot (slot 0 pinned to the reference's
   step-``t`` choices; the bootstrap proposal, so each weight gains the step's *incremental* log weight
   ``log p(y_t | x_t, s_{t−1})``), then — after every step but the last — selects with
   :class:`~ppinfer.kernels.select.Conditional` multinomial resampling: slots ``1 … N−1`` draw their
   ancestors i.i.d. ∝ the weights, slot 0 keeps ancestor 0 — or, with ancestor sampling, draws it
   ∝ ``w_i · p(x*_{t+1}, y_{t+1} | s_i)``; there is no selection between ``init`` and step 0;
3. draw ``k`` ∝ the final weights and return particle ``k``'s trajectory, traced back through the
   ancestors (:func:`~ppinfer.kernels.smc.trace_genealogy`; ``k = 0`` returns the reference's own
   lineage).

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
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from ppinfer import checks
from ppinfer.algorithms.rescore import log_joint
from ppinfer.algorithms.smc import sample_names
from ppinfer.errors import ConfigError, ModelError, ZeroEvidenceError
from ppinfer.kernels import smc as smc_kernel
from ppinfer.kernels.mh import accept
from ppinfer.kernels.select import Conditional, Multinomial
from ppinfer.kernels.smc import trace_genealogy
from ppinfer.kernels.space import space_of
from ppinfer.mcmc.algorithm import MCMC, MCMCResult
from ppinfer.mcmc.base import Kernel
from ppinfer.program import SequentialProgram, is_sequential
from ppinfer.resample import ancestors_from_uniforms
from ppinfer.suspended import Particle, match_state
from ppinfer.traced import assess
from ppinfer.weighted import simulate

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
        log_weights: ``f32[N]`` the final log weights (the last selection's equal weights plus the
            last step's increments), from which the new reference was drawn.
        index: ``i32[]`` the final particle chosen as the new reference (slot 0 holds the old one).
        changed: ``bool[T]``, whether the new reference's latent choices at step ``t`` differ from
            the old reference's (path degeneracy shows as ``False`` at early steps).
        ess: ``f32[T]`` ESS of the weights after each step (before its selection).
        log_evidence: ``f32[]`` log Ẑ, the log-sum-exp of the final weights. Its ``exp`` is
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
        resample: ``f[T, N]`` the multinomial-resampling uniforms that choose the parents of step
            ``t``'s slots (slot ``i``'s ancestor; row 0 is unused: no selection before step 0).
        ancestor: ``f[T]`` the ancestor-sampling uniform for step ``t`` (row 0 unused).
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
            slots' resampling uniforms invert before step ``t`` (inverse CDF; row 0 all −inf: no
            selection there, the uniform is ignored).
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
        progress_bar: a tqdm bar over the transitions, as for :class:`~ppinfer.MCMC` (``None``:
            shown when stderr is a terminal and ppinfer is not quiet); it never changes the draws.

    The result's ``extras``: ``acceptance_rate: f[C]`` (θ moves), ``update_rate: f[C, T]`` (fraction
    of sweeps in which step ``t``'s choices changed) and ``active: bool[C·S, T]``, the steps each
    draw's trajectory ran (``False`` after a :func:`~ppinfer.stop`: those steps' values are zeros),
    as for SMC.
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
    # Not part of equality: the bar never changes the compiled chain (no recompilation).
    progress_bar: bool | None = field(default=None, compare=False)

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
        checks.check_positive("step_size", self.step_size)
        checks.check_fraction("target_accept", self.target_accept)
        if self.prior is not None and not callable(self.prior):
            raise ConfigError(f"prior must be a program (a callable) or None, got {self.prior!r}")

    sequential = True  # the MCMC driver hands it a sequential program

    def run(self, key: jax.Array, program: Any, args: tuple) -> MCMCResult:
        mcmc = MCMC(self, self.num_samples, self.num_warmup, self.num_chains, progress_bar=self.progress_bar)
        return mcmc.run(key, program, args)

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
        active = np.asarray(infos["active"])  # [C, S, T]: the steps each draw's trajectory ran
        return {
            "acceptance_rate": np.mean(np.asarray(infos["accepted"], np.float32), axis=1),
            "update_rate": np.mean(np.asarray(infos["changed"], np.float32), axis=1),
            "active": active.reshape(-1, active.shape[-1]),
        }

    def build_for(self, program: Any, args: tuple, num_warmup: int) -> Kernel:
        """The particle Gibbs :class:`~ppinfer.mcmc.Kernel` of ``program(*args)`` (a
        :class:`PGState` chain): ``init`` draws θ from the prior and the first reference by an
        unconditional sweep; ``step`` is a CSMC sweep given θ, then ``theta_moves`` random-walk MH
        updates of θ given the trajectory (scale adapted during the first ``num_warmup`` steps)."""
        checks.require_sequential(program, "ParticleGibbs", "MCMC")
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
            log_step = jnp.log(jnp.asarray(self.step_size, u.dtype))  # float64 under x64
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
            return new, {"changed": info.changed, "accepted": accepted, "flags": flags, "active": ref.active}

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
    this is one unconditional bootstrap SMC run (``ref`` only gives the structure). A loop over the
    one SMC step (:func:`ppinfer.kernels.smc.step`): ``init`` and every step with slot 0 pinned to the
    reference, the :class:`~ppinfer.kernels.select.Conditional` multinomial selection after every
    step but the last (with ancestor sampling: :class:`_AncestorSampling`), then the final pick and
    its lineage (:func:`~ppinfer.kernels.smc.trace_genealogy`). Its randomness is drawn from
    ``key``, or given as ``noise`` (a :class:`CSMCNoise`; ``key`` is then unused and the
    :class:`NoiseLaw` is returned as a third output): the same step, on injected values and
    uniforms."""
    pin = jnp.asarray(pin)
    given = noise is not None
    if given:
        # Every choice and uniform is injected: the key only fills what nothing reads.
        key = jax.random.PRNGKey(0)
    k_init, k_loop, k_pick = jax.random.split(key, 3)
    ref_init = {k: ref.init[k] for k in sites.init_latent}
    ref_steps = {k: ref.steps[k] for k in sites.step_latent}
    if given:
        values = _pin_first(noise.init, ref_init, pin)
        state, init_info = smc_kernel.init(k_init, program, args, n, values=values)
    else:
        state, init_info = smc_kernel.init(k_init, program, args, n, pinned=(ref_init, pin))
    dtype = state.log_weights.dtype

    def body(state, xs):
        t, key_t, ref_t, ref_next, noise_t = xs
        if ancestor_sampling:
            selection = _AncestorSampling(lambda s: program.step(s, t + 1, *args), ref_next, pin)
        else:
            selection = Conditional(Multinomial(), pin=pin)
        step_noise, pinned = None, (ref_t, pin)
        if given:
            values, resample, ancestor = noise_t
            u = resample.astype(dtype)
            u = u.at[0].set(jnp.where(pin & ancestor_sampling, ancestor.astype(dtype), u[0]))
            step_noise, pinned = smc_kernel.StepNoise(_pin_first(values, ref_t, pin), u), None
        return smc_kernel.step(
            key_t,
            state,
            program,
            args,
            selection=selection,
            select_now=t < num_steps - 1,
            noise=step_noise,
            pinned=pinned,
        )

    # The selection after step t chooses the parents of step t + 1: it reads step t + 1's
    # reference choices and noise rows (row 0 of the noise, before step 0, is not used).
    following = lambda tree: jax.tree.map(lambda x: jnp.roll(x, -1, axis=0), tree)
    noise_steps = None if not given else (noise.steps, following(noise.resample), following(noise.ancestor))
    xs = (
        jnp.arange(num_steps, dtype=jnp.int32),
        jax.random.split(k_loop, num_steps),
        ref_steps,
        following(ref_steps),
        noise_steps,
    )
    state, infos = jax.lax.scan(body, state, xs)
    log_w = state.log_weights
    u_pick = noise.pick.astype(dtype) if given else jax.random.uniform(k_pick, (1,), dtype)
    index = ancestors_from_uniforms("multinomial", u_pick, log_w)[0]
    (steps, active), init_index = trace_genealogy(infos.ancestors, (infos.choices, infos.active))
    new_ref = Trajectory(
        jax.tree.map(lambda c: c[init_index[index]], init_info.choices),
        jax.tree.map(lambda c: c[index], steps),
        active[index],
    )
    changed = _changed(new_ref, ref, sites) | ~pin
    nan_sites = {**init_info.nan_sites, **{k: jnp.any(v) for k, v in infos.nan_sites.items()}}
    non_markov = jnp.any(infos.selection[1]) if ancestor_sampling else jnp.zeros((), bool)
    info = CSMCInfo(log_w, index, changed, infos.ess, logsumexp(log_w), nan_sites, non_markov)
    if not given:
        return new_ref, info
    free = (jnp.arange(n) > 0) | ~pin
    drawn = free & infos.active
    unused = jnp.full((1, n), -jnp.inf, dtype)  # no selection before step 0: one cell, ignored
    before = lambda rows: jnp.concatenate([unused, rows[:-1]])
    as_log_w = jnp.zeros_like(infos.log_weights)
    if ancestor_sampling:
        as_log_w = before(infos.log_weights + infos.selection[0])
    law = NoiseLaw(
        free=free,
        init_log_prob=jnp.where(free, init_info.log_prob_draws, 0.0),
        step_log_prob=jnp.where(drawn, infos.log_prob_draws, 0.0),
        step_drawn=drawn,
        resample_log_weights=before(infos.log_weights),
        ancestor_log_weights=as_log_w,
        ancestor_drawn=jnp.asarray(ancestor_sampling) & pin,
        final_log_weights=log_w,
    )
    return new_ref, info, law


@dataclass(frozen=True)
class _AncestorSampling:
    """The selection after step ``t`` with ancestor sampling: :class:`Conditional` multinomial, slot
    0's ancestor drawn ∝ ``w_i · p(x*_{t+1}, y_{t+1} | s_i)`` (``next_step(s)`` runs step ``t + 1``
    from state ``s``; ``ref_next`` the reference's choices there). ``given`` scores the advanced
    particles (:func:`_ancestor_scores`) and reports ``(scores, non_markov)``."""

    next_step: Callable
    ref_next: dict
    pin: Any

    def given(self, particles: Particle):
        scores, non_markov = _ancestor_scores(self.next_step, particles, self.ref_next)
        return Conditional(Multinomial(), scores, self.pin), (scores, non_markov & self.pin)

    def draw(self, key, n_out, dtype):
        return jax.random.uniform(key, (n_out,), dtype)

    def __call__(self, u, log_weights):
        raise TypeError("ancestor sampling selects given the particles: the SMC step calls .given first")


def _ancestor_scores(next_step, particles: Particle, ref_next):
    """``f[N]`` each particle's ancestor-sampling log score ``log p(x*_{t+1}, y_{t+1} | s_i)`` (−inf
    for a stopped particle) and whether that score is wrong for this program (a step's returned
    state depended on the ancestor's state, or a particle stopped)."""

    def score(state):
        tr = assess(next_step, (state,), ref_next)
        return tr.score, tr.value

    scores, states = jax.vmap(score)(particles.state)
    non_markov = jnp.any(particles.done)
    for s in jax.tree.leaves(states):
        non_markov = non_markov | jnp.any(jnp.asarray(s) != jnp.asarray(s)[:1])
    return jnp.where(particles.done, -jnp.inf, scores), non_markov


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


def _pin_first(tree, value, pin):
    """``tree`` (leading axis N) with element 0 replaced by ``value`` where ``pin`` holds."""
    return jax.tree.map(
        lambda x, v: x.at[0].set(jnp.where(pin, jnp.asarray(v).astype(x.dtype), x[0])), tree, value
    )
