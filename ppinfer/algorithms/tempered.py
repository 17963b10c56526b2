"""Annealed SMC for static programs: likelihood tempering and data annealing.

Both move N particles through a path of targets from the prior to the posterior,

    γ_λ(x) = p(x) · L_λ(x),   L_0 = 1,   L_final = p(y | x),

with the one annealing step :func:`ppinfer.kernels.anneal.anneal_step` (reweight by
``L_λ'/L_λ`` → resample, systematic → ``num_moves`` ``π_λ'``-invariant moves per particle, in the
unconstrained space of :func:`ppinfer.kernels.space.space_of`). The move is a random walk (scale
``2.38/√d`` × a Cholesky factor of the particles' covariance), HMC or NUTS (mass matrix from the
particles' covariance, or their variance below 10 particles per dimension; step size tuned between
temperatures towards a target acceptance rate); see :mod:`ppinfer.kernels.anneal`.

``log_evidence = logsumexp(log_weights)`` estimates ``log p(y)``; with a fixed schedule (and fixed
move parameters) ``Ẑ`` is unbiased. HMC/NUTS moves take their mass matrix from the population by
default (``inverse_mass="identity"`` or given values fix it), so their ``Ẑ`` has an ``O(1/N)`` bias
(measured +3 % at N = 500 on a 2-D Gaussian; the random-walk move showed none).

:class:`TemperedSMC` uses ``L_λ = p(y | x)^λ`` with the next ``λ`` chosen by bisection so that the
incremental weights' ESS is ``ess_target · N`` (Jasra et al. 2011; the adaptive schedule adds a
small bias, negligible in the tests), or a fixed ``temperatures`` schedule. :class:`DataAnnealedSMC`
adds observations in batches: ``L_b`` includes the first ``n_b`` entries along the last batch
dimension of every observed site whose last dimension has length ``num_data`` (the data plate);
other observed sites are included from the first stage. Waste-free SMC
(:class:`~ppinfer.algorithms.waste_free.WasteFreeSMC`) runs the same loop keeping every state of
shorter chains.

All latent sites must be continuous with supports that do not depend on other sites.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from ppinfer import checks
from ppinfer._compile import chunked_run, split_args
from ppinfer.errors import ConfigError, ConvergenceWarning, ModelError
from ppinfer.kernels import anneal
from ppinfer.kernels.space import space_of
from ppinfer.population import log_evidence
from ppinfer.program import is_sequential
from ppinfer.result import Result
from ppinfer.traced import assess

__all__ = ["TemperedSMC", "DataAnnealedSMC", "anneal_run"]


@dataclass(frozen=True)
class TemperedSMC:
    """Likelihood-tempered SMC (see the module docstring).

    Args:
        num_particles: N ≥ 1.
        ess_target: adaptive schedule: each step's incremental-weight ESS is ``ess_target · N``.
        num_moves: move transitions per particle per step, ≥ 1 (RW-MH steps, HMC trajectories or
            NUTS trees).
        temperatures: a fixed increasing schedule ending at 1 (overrides the adaptive one).
        max_steps: cap on adaptive steps (the last step jumps to λ = 1).
        move: ``"rw"``, ``"hmc"``, ``"nuts"`` or a move object
            (:class:`~ppinfer.kernels.anneal.RWMove`, :class:`~ppinfer.kernels.anneal.HMCMove`,
            :class:`~ppinfer.kernels.anneal.NUTSMove`: step size, leapfrog steps or tree depth,
            target acceptance for tuning). ``Result.extras`` records per temperature ``lambdas``,
            ``acceptance_rate`` and the ``step_size`` each move used.
        progress_bar: a tqdm bar over the steps (up to ``max_steps``; it completes when λ reaches
            1), as :class:`~ppinfer.SMC`'s: the steps run in compiled chunks, so Ctrl-C stops the
            run between chunks, and neither changes the result.
    """

    num_particles: int = 1000
    ess_target: float = 0.5
    num_moves: int = 5
    temperatures: Sequence[float] | None = None
    max_steps: int = 100
    move: Any = "rw"
    progress_bar: bool | None = None

    name = "TemperedSMC"

    def __post_init__(self):
        _check_common(self, self.num_moves)
        checks.check_probability("ess_target", self.ess_target)
        _check_schedule(self)

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        return _run(self, key, program, args, ("temper", None), _schedule(self), num_moves=self.num_moves)


@dataclass(frozen=True)
class DataAnnealedSMC:
    """Data-annealed SMC: ``num_data`` observations added ``batch_size`` at a time (``move`` as
    for :class:`TemperedSMC`, and ``progress_bar``)."""

    num_particles: int = 1000
    num_data: int = 1
    batch_size: int = 1
    num_moves: int = 5
    move: Any = "rw"
    progress_bar: bool | None = None

    name = "DataAnnealedSMC"

    def __post_init__(self):
        _check_common(self, self.num_moves)
        checks.check_int("num_data", self.num_data, 1)
        checks.check_int("batch_size", self.batch_size, 1)

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        counts = tuple(
            float(min(c, self.num_data))
            for c in range(self.batch_size, self.num_data + self.batch_size, self.batch_size)
        )
        schedule = ("fixed", counts, len(counts))
        return _run(
            self, key, program, args, ("data", int(self.num_data)), schedule, num_moves=self.num_moves
        )


def anneal_run(
    key,
    program,
    args,
    n,
    num_moves,
    path,
    schedule,
    transforms=None,
    *,
    move: Any = "rw",
    num_selected: int | None = None,
    keep_chain: bool = False,
    reweight_fn: Callable | None = None,
) -> dict:
    """The pure annealed-SMC core (jit/vmap-able): ``n`` prior draws, then
    :func:`~ppinfer.kernels.anneal.anneal_step` until the end of the path.

    ``path = ("temper", None) | ("data", num_data)``, ``schedule = ("adaptive", ess_target,
    max_steps) | ("fixed", λs, len)``; ``transforms`` (optional) maps each latent site to the
    bijection onto its support (default: :func:`~ppinfer.kernels.space.space_of`'s). ``move``,
    ``num_selected``, ``keep_chain`` and ``reweight_fn`` are passed to the step. Returns
    ``log_weights: f32[N]``, ``log_evidence``, ``choices`` ``[N, …]`` (latent and deterministic),
    ``lambdas``/``ess``/``acceptance_rate``/``step_size``/``log_evidence_history``
    ``[max_steps]`` (padded with NaN), ``num_steps``. The same three phases as the run wrapper
    drives in chunks: :func:`anneal_start`, :func:`anneal_continue`, :func:`anneal_output`."""
    options = {
        "move": move,
        "num_selected": num_selected,
        "keep_chain": keep_chain,
        "reweight_fn": reweight_fn,
    }
    parts = _anneal_parts(program, args, n, num_moves, path, schedule, transforms, **options)
    run = anneal_start(key, parts)
    return anneal_output(anneal_continue(run, parts, parts.max_steps), parts)


class AnnealParts(NamedTuple):
    """The closures of one annealed run (rebuilt, identical, in each compiled phase)."""

    draw: Callable
    move: Any
    step: Callable
    constrained: Callable
    n: int
    max_steps: int
    lam_end: float


def _anneal_parts(program, args, n, num_moves, path, schedule, transforms=None, **options) -> AnnealParts:
    """:func:`anneal_run`'s closures; ``options``: its ``move``, ``num_selected``, ``keep_chain``
    and ``reweight_fn``."""
    num_selected, keep_chain = options.get("num_selected"), options.get("keep_chain", False)
    reweight_fn = options.get("reweight_fn")
    kind, num_data = path
    mode, spec, max_steps = schedule
    move = anneal.as_move(options.get("move", "rw"))
    space = space_of(program, args)
    if transforms is not None:
        space = space._replace(transforms={name: transforms[name] for name in space.names})
    log_prior = lambda u: space.log_prior(u, *args)

    def log_lik(u, lam):
        """``log L_lam(u)``; ``0`` at ``lam = 0`` (the prior), even where the likelihood is ``−inf``."""
        whole, per_datum = _obs_terms(program, args, space.constrain(u)[0], num_data)
        if kind == "temper":
            value = lam * (whole + jnp.sum(per_datum))
        else:
            value = whole + jnp.sum(jnp.where(jnp.arange(per_datum.shape[0]) < lam, per_datum, 0.0))
        return jnp.where(lam > 0, value, 0.0)

    def step(key, state, i):
        if mode == "fixed":
            lam_new = jnp.asarray(spec, state.lam.dtype)[i]
        else:
            ll = jax.vmap(lambda u: log_lik(u, 1.0))(state.particles)
            lam_new = anneal.next_temperature(state.log_weights, ll, state.lam, spec)
            lam_new = jnp.where(i >= max_steps - 1, 1.0, lam_new)
        return anneal.anneal_step(
            key,
            state,
            lam_new,
            log_prior=log_prior,
            log_lik=log_lik,
            move=move,
            num_moves=num_moves,
            num_selected=num_selected,
            keep_chain=keep_chain,
            reweight_fn=reweight_fn,
        )

    def constrained(u):
        x, _ = space.constrain(u)
        return {**x, **assess(program, args, x).deterministics}

    lam_end = 1.0 if kind == "temper" else float(num_data)
    draw = lambda k: space.draw(k, *args)
    return AnnealParts(draw, move, step, constrained, n, max_steps, lam_end)


def anneal_start(key: jax.Array, parts: AnnealParts) -> anneal.AnnealRun:
    """``n`` prior draws (unconstrained), before the first annealing step."""
    k_init, k_loop = jax.random.split(key)
    u0 = jax.vmap(lambda i: parts.draw(jax.random.fold_in(k_init, i)))(jnp.arange(parts.n))
    return anneal.anneal_begin(k_loop, anneal.init(u0, parts.move), parts.step, parts.max_steps)


def anneal_continue(run: anneal.AnnealRun, parts: AnnealParts, stop: Any) -> anneal.AnnealRun:
    """Annealing steps up to step ``stop`` (traced) or the end of the path."""
    return anneal.anneal_advance(run, parts.step, stop=stop, max_steps=parts.max_steps, lam_end=parts.lam_end)


def anneal_output(run: anneal.AnnealRun, parts: AnnealParts) -> dict:
    """:func:`anneal_run`'s dict from a finished run."""
    state, hist = run.state, run.history
    return {
        "choices": jax.vmap(parts.constrained)(state.particles),
        "log_weights": state.log_weights,
        "log_evidence": log_evidence(state.log_weights),
        "num_steps": run.steps,
        "lambdas": hist.lam,
        "ess": hist.ess,
        "acceptance_rate": hist.acceptance_rate,
        "step_size": hist.step_size,
        "log_evidence_history": hist.log_evidence,
        "undefined": hist.undefined,
    }


def _obs_terms(program, args, x, num_data):
    """``(whole, per_datum)``: Σ of observed sites' log densities not along the data plate, and the
    per-datum sums ``f32[num_data]`` (zeros(1) for tempering)."""
    with handlers.trace() as tr, handlers.seed(rng_seed=0), handlers.substitute(data=x):
        program(*args)
    whole = jnp.zeros(())
    per = jnp.zeros((num_data or 1,))
    matched, shapes = False, {}
    for name, site in tr.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        lp = site["fn"].log_prob(site["value"])
        if site.get("mask") is not None:
            lp = jnp.where(site["mask"], lp, 0.0)
        if site.get("scale") is not None:
            lp = site["scale"] * lp
        shapes[name] = tuple(jnp.shape(lp))
        if num_data and jnp.ndim(lp) >= 1 and lp.shape[-1] == num_data:
            per = per + jnp.sum(jnp.reshape(lp, (-1, num_data)), axis=0)
            matched = True
        else:
            whole = whole + jnp.sum(lp)
    if num_data and not matched and (num_data > 1 or any(s and s[-1] > 1 for s in shapes.values())):
        # Nothing would be annealed: one importance step from the prior to the whole posterior.
        raise ConfigError(
            f"DataAnnealedSMC(num_data={num_data}): no observed site has a last dimension of length "
            f"{num_data} (the data plate along which data is added); the observed sites' log "
            f"densities have shapes {shapes}: set num_data to the number of observations"
        )
    return whole, per


def _run(
    cfg, key, program, args, path, schedule, *, num_moves, num_selected=None, keep_chain=False
) -> Result:
    """Check the program, compile (cached) :func:`anneal_run` for ``cfg`` and run it."""
    if is_sequential(program):
        raise ConfigError(f"{cfg.name} needs a static program")
    t0 = time.perf_counter()
    dyn, static_key, rebuild = split_args(args)
    _, latent = checks.dry_run(program, args, None, "running the program once")
    checks.require_latent(latent)
    space = space_of(program, args, what=cfg.name)  # raises ModelError for a discrete site
    _warn_if_few_particles(cfg.name, cfg.num_particles, space.dim)
    settings = (cfg.num_particles, num_moves, path, schedule, cfg.move, num_selected, keep_chain)

    options = {"move": cfg.move, "num_selected": num_selected, "keep_chain": keep_chain, "reweight_fn": None}
    parts = lambda dyn: _anneal_parts(program, rebuild(dyn), *settings[:4], **options)
    cache_key = ("anneal", program, settings, static_key)
    max_steps = schedule[2]
    lam_end = 1.0 if path[0] == "temper" else float(path[1])

    def position(run: anneal.AnnealRun) -> tuple[int, bool]:
        steps, lam = jax.device_get((run.steps, run.state.lam))
        return int(steps), bool(lam >= lam_end) or int(steps) >= max_steps

    out = chunked_run(
        cache_key,
        key,
        dyn,
        start=lambda key, dyn: anneal_start(key, parts(dyn)),
        advance=lambda run, dyn, stop: anneal_continue(run, parts(dyn), stop),
        output=lambda run, dyn: anneal_output(run, parts(dyn)),
        position=position,
        total=max_steps,
        desc=cfg.name,
        progress=getattr(cfg, "progress_bar", None),
    )
    steps = int(out["num_steps"])
    if np.any(np.asarray(out["undefined"])[:steps] > 0):
        raise ModelError(
            f"{cfg.name}: the program's log density was NaN or +inf for some particles (a "
            "distribution given an invalid parameter there, e.g. a negative scale or the log of a "
            "negative number, or an infinite factor): the posterior is not defined there"
        )
    checks.raise_if_dead(float(out["log_evidence"]), "", cfg.num_particles)
    _warn_if_stuck(cfg.name, np.asarray(out["acceptance_rate"])[:steps])
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
            "step_size": out["step_size"][:steps],
            "num_steps": steps,
        },
    )


LOW_ACCEPTANCE = 0.1
"""Median acceptance rate of the moves below which :func:`_warn_if_stuck` warns."""


FEW_PARTICLES = 5
"""Particles per dimension below which :func:`_warn_if_few_particles` warns."""


def _warn_if_few_particles(name: str, n: int, d: int) -> None:
    """Warn (:class:`~ppinfer.errors.ConvergenceWarning`) when N < :data:`FEW_PARTICLES` · d: the
    moves adapt to the population's spread (its covariance for the random walk and, from 10 d
    particles, for HMC/NUTS), which so few particles cannot estimate; the population then collapses
    onto a subspace (measured at d = 20, a correlated regression: N = 16 left means 4–7 posterior sds
    off and log Ẑ 24–100 nats low; N = 512 within 0.3 sd)."""
    if n < FEW_PARTICLES * d:
        warnings.warn(
            f"{name}({n}) on {d} dimensions: the moves adapt to the population's spread, which fewer "
            f"than {FEW_PARTICLES} particles per dimension cannot estimate (the population may "
            f"collapse onto a subspace and the answer be far off): use num_particles >= {10 * d}",
            ConvergenceWarning,
            stacklevel=4,
        )


STUCK_ACCEPTANCE = 0.01
"""Acceptance rate below which a step's moves count as stuck (:func:`_warn_if_stuck`)."""


def _warn_if_stuck(name: str, rates: np.ndarray) -> None:
    """Warn (:class:`~ppinfer.errors.ConvergenceWarning`) when at a tenth of the annealing steps (at
    least two) the moves accepted under :data:`STUCK_ACCEPTANCE` (``TemperedSMC(1000,
    move=HMCMove(inverse_mass="population"))`` on a correlated 5-D regression: 3–4 of 10 steps with
    the step-size rule before, about 2 with today's, none with the full mass:
    ``benchmarks/bench_tempered_tuning.py``; on a peaked one, about a sixth and means hundreds of
    sds off), or when
    the moves' median acceptance rate
    over the annealing steps is below :data:`LOW_ACCEPTANCE`: the particles then barely move away
    from their resampled copies, and the population can be far wider or narrower than the target
    (posteriordb's arK with a diagonal random walk, ``RWMove(covariance="diagonal")``: acceptance
    about 5 %, posterior sds up to 1.85× the reference; ``benchmarks/bench_tempered_move.py``)."""
    rates = rates[np.isfinite(rates)]
    stuck = int(np.sum(rates < STUCK_ACCEPTANCE))
    if rates.size and float(np.median(rates)) >= LOW_ACCEPTANCE and stuck >= max(2, 0.1 * rates.size):
        warnings.warn(
            f"{name}: at {stuck} of {rates.size} steps the moves accepted under "
            f"{100 * STUCK_ACCEPTANCE:.0f}% of proposals, so the particles did not move there (a step "
            "size tuned past the target's narrowing; HMC's acceptance drops off a cliff past its "
            "stable step). For a correlated posterior use HMCMove/NUTSMove(inverse_mass='full') (the "
            "default 'auto' does from 10 particles per dimension); "
            "result.extras['acceptance_rate'] has each step's rate.",
            ConvergenceWarning,
            stacklevel=4,
        )
    if rates.size and float(np.median(rates)) < LOW_ACCEPTANCE:
        warnings.warn(
            f"{name}: the moves accepted {100 * float(np.median(rates)):.1f}% of proposals (median over "
            f"{rates.size} steps): the particles have barely moved, so the population may not "
            "represent the posterior. Raise num_moves, use move='hmc' or 'nuts', or tune the "
            "random walk (RWMove(target_acceptance=0.234)); result.extras['acceptance_rate'] has "
            "each step's rate.",
            ConvergenceWarning,
            stacklevel=4,
        )


def _schedule(cfg) -> tuple:
    """``anneal_run``'s schedule of a config with ``temperatures``, ``ess_target``, ``max_steps``."""
    if cfg.temperatures is None:
        return ("adaptive", cfg.ess_target, int(cfg.max_steps))
    return ("fixed", cfg.temperatures, len(cfg.temperatures))


def _check_schedule(cfg) -> None:
    """Validate (and normalise to a tuple of floats) ``cfg.temperatures``."""
    if cfg.temperatures is None:
        return
    try:
        temps = tuple(float(t) for t in cfg.temperatures)
    except (TypeError, ValueError):
        raise ConfigError(f"temperatures must be a sequence of numbers, got {cfg.temperatures!r}") from None
    increasing = (
        bool(temps)
        and all(  # False for a NaN
            a < b for a, b in zip((0.0, *temps[:-1]), temps, strict=True)
        )
    )
    if not temps or temps[-1] != 1.0 or not increasing:
        raise ConfigError("temperatures must increase strictly from above 0 to exactly 1")
    object.__setattr__(cfg, "temperatures", temps)


def _check_common(cfg, num_moves) -> None:
    """Validate ``num_particles``, ``num_moves`` and ``max_steps``; turn ``cfg.move`` into a move."""
    checks.check_num_particles(cfg.num_particles)
    checks.check_int("num_moves", num_moves, 1)
    if hasattr(cfg, "max_steps"):
        checks.check_int("max_steps", cfg.max_steps, 1)
    object.__setattr__(cfg, "move", anneal.as_move(cfg.move))
