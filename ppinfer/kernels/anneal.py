"""Annealing kernels: one reweight → select → move step along a path of targets, and its moves.

Tempered SMC, data-annealed SMC and waste-free SMC (and IBIS's tempered stages) move a population
of ``N`` particles ``u: f[N, d]`` (a flat unconstrained space, :mod:`ppinfer.kernels.space`) along
a path of unnormalised targets

    γ_λ(u) = p(u) · L_λ(u),   L_0 = 1,   λ: 0 = λ_0 < λ_1 < … < λ_T = λ_end,

``p(u)`` the prior pushed to ``u`` (Jacobian included) and ``L_λ`` a likelihood path:
``L_λ = p(y | x)^λ`` (tempering), or the first ``λ`` observations (data annealing). The population's
**log weights carry the 1/N**: ``logsumexp(log_weights) = log Ẑ_λ``, an estimate of the mass
``Z_λ = ∫ γ_λ``.

One :func:`anneal_step` from ``λ`` to ``λ'`` is the one SMC step (:func:`ppinfer.kernels.smc.step`)
with a :class:`~ppinfer.kernels.smc.Reweighting` advance, a selection of ``M`` and an MH move; the
choices of ``λ'`` and of the move's scale, which read the whole population, are made before it:

1. **reweight** (:func:`reweight`): ``log_weights += log L_λ'(u) − log L_λ(u)``, the incremental
   weight ``γ_λ' / γ_λ``: if ``E[Σ_i w_i f(u_i)] = ∫ f γ_λ`` for every ``f`` (the population is
   properly weighted for ``γ_λ``, mass included), then ``E[Σ_i w_i (L_λ'/L_λ)(u_i) f(u_i)] =
   ∫ f γ_λ'`` (take ``f · L_λ'/L_λ``); it needs ``L_λ > 0`` wherever ``L_λ' > 0``.
2. **select** ``M`` of them with a selection (:mod:`ppinfer.kernels.select`): the expected
   weighted measure, total mass included, is unchanged.
3. **move**: ``num_moves`` transitions of a ``π_λ'``-invariant kernel (a :class:`Move`) from each
   selected particle; a weighted particle that is moved by an invariant kernel stays properly
   weighted. ``keep_chain=True`` keeps every state of each chain (``num_moves + 1`` per selected
   particle, each with ``1/(num_moves + 1)`` of its weight): waste-free SMC.

**Validity.** For a schedule and move parameters fixed in advance, each block preserves the
expected weighted measure, so ``E[Ẑ_λ_T] = Z_λ_T`` exactly and weighted averages are consistent
as ``N → ∞``. Two adaptive choices are made from the current population: the next ``λ``
(:func:`next_temperature`) and the move's parameters (the population's mean and variance, and a
step size tuned from the previous move's acceptance, :func:`tune_step_size`). Each tuned move is
still exactly ``π_λ'``-invariant (its parameters are fixed while it runs), so the population
stays consistent; but a move whose parameters read the population it moves makes ``Ẑ`` biased
by ``O(1/N)``, as in every adaptive SMC sampler (Beskos, Jasra, Kantas & Thiery 2016): within
the tests' ``E[Ẑ] = Z`` bounds for the random walk, a few per cent for HMC at N = 32
(:class:`HMCMove`). A fixed schedule and moves with fixed parameters (``target_acceptance=None``,
a fixed ``inverse_mass``) make ``E[Ẑ] = Z`` exact.

Kernels here are pure and jit/vmap-able, in BlackJAX's form: ``(key, state, …) -> (state, info)``
with :class:`AnnealState` and :class:`AnnealInfo`. Moves: :class:`RWMove` (Gaussian random walk,
scale ``2.38/√d`` × a Cholesky factor of the population's covariance, or its per-coordinate
spread), :class:`HMCMove` (leapfrog HMC, :func:`ppinfer.kernels.mh.accept`) and :class:`NUTSMove`
(NumPyro's ``build_tree``), the last two with a mass matrix from the population's covariance
(:func:`whitened`), or its variance below :data:`FULL_MASS_PARTICLES` particles per dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from numpyro.infer.hmc_util import build_tree, euclidean_kinetic_energy, velocity_verlet

from ppinfer.checks import check_fraction, check_int, check_positive
from ppinfer.errors import ConfigError
from ppinfer.kernels import smc
from ppinfer.kernels.mh import accept
from ppinfer.kernels.select import Systematic
from ppinfer.population import ess
from ppinfer.suspended import Particle

__all__ = [
    "AnnealState",
    "AnnealInfo",
    "Position",
    "MoveParams",
    "Move",
    "RWMove",
    "HMCMove",
    "NUTSMove",
    "as_move",
    "init",
    "anneal_step",
    "anneal_loop",
    "anneal_begin",
    "anneal_advance",
    "AnnealRun",
    "next_temperature",
    "reweight",
    "tune_step_size",
    "weighted_moments",
    "rw_move",
    "hmc_move",
    "nuts_move",
]


class AnnealState(NamedTuple):
    """The population at temperature ``lam``.

    Attributes:
        particles: ``f[N, d]``, points of the unconstrained space.
        log_weights: ``f[N]``, with the ``1/N``: ``logsumexp = log Ẑ_lam``.
        lam: ``f[]``, the current ``λ``.
        step_size: ``f[]``, the move's step size, as tuned so far (used, after one more tuning, by
            the next step's move).
        acceptance_rate: ``f[]``, the mean acceptance probability of the last move (NaN before the
            first move); it drives :func:`tune_step_size`.
    """

    particles: jax.Array
    log_weights: jax.Array
    lam: jax.Array
    step_size: jax.Array
    acceptance_rate: jax.Array


class AnnealInfo(NamedTuple):
    """What one :func:`anneal_step` did (all ``f[]``).

    Attributes:
        lam: the new ``λ'``.
        ess: the ESS of the reweighted population, before selection.
        log_evidence: ``logsumexp`` of the reweighted log weights: ``log Ẑ_λ'``.
        acceptance_rate: the move's mean acceptance probability (Rao–Blackwellised; for NUTS the
            mean of NumPyro's per-tree acceptance statistic).
        step_size: the step size the move used.
        undefined: ``1.0`` if the log target at ``λ'`` was NaN or ``+inf`` for some particle before
            the move (an invalid distribution parameter there: such a particle is given weight
            zero, so the algorithms raise a ``ModelError`` rather than target the posterior
            restricted to where the program is defined), else ``0.0``.
    """

    lam: jax.Array
    ess: jax.Array
    log_evidence: jax.Array
    acceptance_rate: jax.Array
    step_size: jax.Array
    undefined: jax.Array


class Position(NamedTuple):
    """A move's per-particle state: ``u: f[M, d]``, ``log_target: f[M]`` at ``u`` and, for
    gradient-based moves, ``grad: f[M, d]`` of the log target (``None`` for the random walk)."""

    u: jax.Array
    log_target: jax.Array
    grad: jax.Array | None


class MoveParams(NamedTuple):
    """A move's parameters, fixed while it runs: ``step_size: f[]``; ``mean``, ``var: f[d]`` the
    reweighted population's mean and per-coordinate variance (before selection); ``chol: f[d, d]``
    a Cholesky factor of its covariance (regularised, :func:`weighted_chol`), for moves whose
    ``covariance`` or ``inverse_mass`` is ``"full"``, and ``"auto"`` from
    :data:`FULL_MASS_PARTICLES` particles per dimension (``None`` otherwise)."""

    step_size: jax.Array
    mean: jax.Array
    var: jax.Array
    chol: jax.Array | None = None


@runtime_checkable
class Move(Protocol):
    """A population move: a frozen (hashable) object with

    - ``step_size: float``, the initial step size, and ``target_acceptance: float | None`` (``None``:
      no tuning, ``step_size`` stays as given);
    - ``uses_grad: bool``: whether :class:`Position` needs ``grad``;
    - ``__call__(key, position, log_target, params) -> (position, acceptance_rate: f[M])``: one
      transition of every particle, **invariant** for ``log_target`` (``u: f[d] -> f[]``) given
      ``params`` (:class:`MoveParams`).
    """

    step_size: float
    target_acceptance: float | None
    uses_grad: bool

    def __call__(
        self, key: jax.Array, position: Position, log_target: Callable, params: MoveParams
    ) -> tuple[Position, jax.Array]: ...


@dataclass(frozen=True)
class RWMove:
    """Gaussian random-walk MH: ``u' = u + step_size/√d · L z``, ``L`` a Cholesky factor of the
    population's covariance (``covariance="full"``, the default: the walk follows the target's
    correlations) or its per-coordinate spread (``"diagonal"``), with Roberts, Gelman & Gilks'
    ``2.38/√d`` scaling by default; untuned unless ``target_acceptance`` is given (0.234 is the
    classical choice). On posteriordb's arK (5 correlated AR coefficients), ``TemperedSMC(2000)``
    with the diagonal walk accepted about 5 % and left means up to 1.5 reference sds off and sds up
    to 1.85× the reference; the full one accepts about 21 %, means within 0.14 sd, sds 0.99–1.07×,
    at the same time per run (``benchmarks/bench_tempered_move.py``)."""

    step_size: float = 2.38
    target_acceptance: float | None = None
    covariance: str = "full"
    uses_grad = False

    def __post_init__(self):
        _check_move(self.step_size, self.target_acceptance)
        if self.covariance not in ("full", "diagonal"):
            raise ConfigError(f"RWMove covariance must be 'full' or 'diagonal', got {self.covariance!r}")

    def __call__(self, key, position, log_target, params):
        d = position.u.shape[-1]
        if self.covariance == "full":
            scale = params.step_size / np.sqrt(d) * params.chol
        else:
            scale = params.step_size / np.sqrt(d) * jnp.maximum(jnp.sqrt(params.var), 1e-4)
        return rw_move(key, position, log_target, scale)


@dataclass(frozen=True)
class HMCMove:
    """HMC with ``num_leapfrog`` leapfrog steps of size ``step_size`` and an inverse mass matrix
    from the population; the step size is tuned between temperatures towards ``target_acceptance``.

    ``inverse_mass``: ``"population"`` the reweighted population's variance, so the step size is in
    units of the target's spread; ``"full"`` its whole covariance (a dense mass matrix: the
    trajectories follow the target's correlations, :func:`whitened`); ``"auto"`` (default) full
    where the population can estimate a covariance (N ≥ :data:`FULL_MASS_PARTICLES` · d), else the
    variance; ``"identity"``; or a tuple of ``d`` positive floats. On a peaked regression with
    correlated columns scaled 100 apart, the diagonal mass left the posterior mean hundreds of
    posterior sds off (532 over 4 seeds; 5,053 with the step-size rule before; a sixth of the
    temperatures accepted nothing: the step collapses and regrows), the full one within 0.03
    (both, and a correlated 5-D regression: ``benchmarks/bench_tempered_tuning.py``).
    Adapted parameters make ``Ẑ`` biased by ``O(1/N)`` (module docstring); HMC is the most
    sensitive move. On a 2-D conjugate Gaussian (5 fixed temperatures, 2 moves, 12,000 runs),
    ``E[Ẑ/Z]`` = 0.958 ± 0.002 at N = 32 and 0.993 ± 0.001 at N = 128 with the population mass
    and a fixed step size, and 1.006 ± 0.002 at N = 32 with the default tuning; with a fixed
    mass and ``target_acceptance=None`` every parameter is fixed and ``E[Ẑ] = Z`` exactly
    (``tests/test_anneal.py``)."""

    step_size: float = 0.5
    num_leapfrog: int = 10
    target_acceptance: float | None = 0.65
    inverse_mass: Any = "auto"
    uses_grad = True

    def __post_init__(self):
        _check_move(self.step_size, self.target_acceptance)
        check_int("num_leapfrog", self.num_leapfrog, 1)
        object.__setattr__(self, "inverse_mass", _check_inverse_mass(self.inverse_mass))

    def __call__(self, key, position, log_target, params):
        if _dense(self.inverse_mass, params):
            return whitened(replace(self, inverse_mass="identity"), key, position, log_target, params)
        inverse_mass = _inverse_mass(params, self.inverse_mass)
        return hmc_move(key, position, log_target, params.step_size, inverse_mass, self.num_leapfrog)


@dataclass(frozen=True)
class NUTSMove:
    """The No-U-Turn sampler (NumPyro's ``build_tree``, multinomial sampling along the trajectory),
    one tree per particle (vmapped), inverse mass matrix ``inverse_mass`` (as :class:`HMCMove`'s:
    ``"auto"``, ``"full"``, ``"population"``, …); the step size is tuned towards
    ``target_acceptance`` of NumPyro's acceptance statistic."""

    step_size: float = 0.5
    max_tree_depth: int = 6
    target_acceptance: float | None = 0.8
    inverse_mass: Any = "auto"
    uses_grad = True

    def __post_init__(self):
        _check_move(self.step_size, self.target_acceptance)
        check_int("max_tree_depth", self.max_tree_depth, 1)
        object.__setattr__(self, "inverse_mass", _check_inverse_mass(self.inverse_mass))

    def __call__(self, key, position, log_target, params):
        if _dense(self.inverse_mass, params):
            return whitened(replace(self, inverse_mass="identity"), key, position, log_target, params)
        inverse_mass = _inverse_mass(params, self.inverse_mass)
        return nuts_move(key, position, log_target, params.step_size, inverse_mass, self.max_tree_depth)


def as_move(move: Any) -> Move:
    """A :class:`Move` from ``"rw"``, ``"hmc"``, ``"nuts"`` (the defaults of each) or a move object."""
    if isinstance(move, str):
        if move not in _MOVES:
            raise ConfigError(f"unknown move {move!r}; choose one of {sorted(_MOVES)} or pass a move object")
        return _MOVES[move]()
    if not isinstance(move, Move):
        raise ConfigError(
            f"move must be 'rw', 'hmc', 'nuts' or a move object (step_size, target_acceptance, uses_grad, "
            f"__call__(key, position, log_target, params)); got {move!r}"
        )
    try:
        hash(move)
    except TypeError as e:  # it keys the compile cache
        raise ConfigError(f"a move must be hashable (e.g. a frozen dataclass); got {move!r}") from e
    return move


_MOVES = {"rw": RWMove, "hmc": HMCMove, "nuts": NUTSMove}


def init(particles: jax.Array, move: Move, lam: float = 0.0) -> AnnealState:
    """The state of ``particles: f[N, d]`` drawn from ``γ_lam`` (normally the prior, ``lam = 0``),
    with equal log weights ``−log N`` and the move's initial step size."""
    n = particles.shape[0]
    dtype = particles.dtype
    return AnnealState(
        particles,
        jnp.full((n,), -jnp.log(n), dtype),
        jnp.asarray(lam, dtype),
        jnp.asarray(move.step_size, dtype),
        jnp.asarray(jnp.nan, dtype),
    )


def anneal_step(
    key: jax.Array,
    state: AnnealState,
    lam_new: Any,
    *,
    log_prior: Callable,
    log_lik: Callable,
    move: Move,
    num_moves: int = 1,
    select: Callable | None = None,
    num_selected: int | None = None,
    keep_chain: bool = False,
    reweight_fn: Callable | None = None,
) -> tuple[AnnealState, AnnealInfo]:
    """Reweight from ``state.lam`` to ``lam_new``, select, move: :func:`ppinfer.kernels.smc.step`
    with a :class:`~ppinfer.kernels.smc.Reweighting` and the MH move (see the module docstring).

    Args:
        key: the step's PRNG key.
        state: the population at ``λ`` (:class:`AnnealState`).
        lam_new: ``f[]`` the next ``λ'`` (a fixed schedule's, or :func:`next_temperature`'s).
        log_prior: ``u: f[d] -> f[]``, ``log p(u)`` (Jacobian included).
        log_lik: ``(u: f[d], lam: f[]) -> f[]``, ``log L_lam(u)``, ``0`` at ``lam = 0``.
        move: a :class:`Move`, applied ``num_moves`` times to every selected particle, targeting
            ``log_prior + log_lik(·, lam_new)``.
        select: a selection ``(u: f[M], log_weights: f[N]) -> (ancestors: i32[M], log_weights: f[M])``
            (default systematic).
        num_selected: ``M`` (default ``N``).
        keep_chain: keep all ``num_moves + 1`` states of each selected particle's chain as the new
            population (``M · (num_moves + 1)`` particles, each ``1/(num_moves + 1)`` of its
            ancestor's selected weight; waste-free SMC), instead of the last one.
        reweight_fn: the reweighting block (default :func:`reweight`); a parameter so that tests
            can show a wrong one is caught.

    Returns:
        ``(state, info)``: the population at ``lam_new`` and :class:`AnnealInfo`.
    """
    particles = state.particles
    n = particles.shape[0]
    m = n if num_selected is None else int(num_selected)
    dtype = state.log_weights.dtype
    lam_new = jnp.asarray(lam_new, dtype)
    select = Systematic() if select is None else select

    # One vmapped evaluation: for a tempering path the program runs once per particle (XLA merges
    # the identical likelihood computations at λ and λ').
    lp, ll_old, ll_new = jax.vmap(lambda u: (log_prior(u), log_lik(u, state.lam), log_lik(u, lam_new)))(
        particles
    )
    log_weights = (reweight_fn or reweight)(state.log_weights, ll_new, ll_old)
    mean, var = weighted_moments(particles, log_weights)
    step_size = tune_step_size(state.step_size, state.acceptance_rate, move.target_acceptance)
    chol = (
        weighted_chol(particles, log_weights, mean, var)
        if "full" in (getattr(move, "covariance", None), getattr(move, "inverse_mass", None))
        or (getattr(move, "inverse_mass", None) == "auto" and n >= FULL_MASS_PARTICLES * particles.shape[1])
        else None
    )
    params = MoveParams(step_size, mean, var, chol)
    target = _log_target(log_prior, log_lik, lam_new)

    def mh_moves(k_move: jax.Array, selected: smc.SMCState) -> tuple[smc.SMCState, jax.Array]:
        """``num_moves`` transitions of ``move`` from each selected particle (``M`` of them)."""
        u = selected.particles.state
        grad = jax.vmap(jax.grad(target))(u) if move.uses_grad else None
        position = Position(u, selected.carried, grad)

        def transition(position, k):
            position, rate = move(k, position, target, params)
            return position, (position.u if keep_chain else None, jnp.mean(rate))

        position, (chain, rates) = jax.lax.scan(transition, position, jax.random.split(k_move, num_moves))
        new_u, new_log_weights = position.u, selected.log_weights
        if keep_chain:
            copies = num_moves + 1
            new_u = jnp.concatenate([u[None], chain]).reshape(copies * m, -1)
            new_log_weights = jnp.tile(selected.log_weights, copies) - jnp.log(copies)
        done = jnp.zeros(new_u.shape[0], bool)
        return smc.SMCState(Particle(new_u, done), new_log_weights, selected.t), jnp.mean(rates)

    # The SMC step: advance (the reweighting), select M, move. The move starts from each selected
    # particle's log target, carried through the selection.
    before = smc.SMCState(
        Particle(particles, jnp.zeros(n, bool)),
        state.log_weights,
        jnp.zeros((), jnp.int32),
        _nan_to_neg_inf(lp + ll_new),
    )
    after, info = smc.step(
        key, before, smc.Reweighting(log_weights), (), selection=select, move=mh_moves, num_selected=m
    )
    rate = info.move
    new = AnnealState(after.particles.state, after.log_weights, lam_new, step_size, rate)
    target_now = lp + ll_new
    undefined = jnp.any(jnp.isnan(target_now) | (target_now == jnp.inf)).astype(dtype)
    return new, AnnealInfo(lam_new, info.ess, info.log_evidence, rate, step_size, undefined)


class AnnealRun(NamedTuple):
    """An annealing loop between steps: the step key ``key``, steps done ``steps: i32[]``, the
    :class:`AnnealState` and the infos so far ``history`` ``[max_steps]`` (NaN after the last)."""

    key: jax.Array
    steps: jax.Array
    state: AnnealState
    history: AnnealInfo


def anneal_begin(key: jax.Array, state: AnnealState, step: Callable, max_steps: int) -> AnnealRun:
    """The :class:`AnnealRun` before the first step of ``step(key_i, state, i) -> (state, info)``."""
    shapes = jax.eval_shape(step, key, state, jnp.zeros((), jnp.int32))[1]
    history = jax.tree.map(lambda s: jnp.full((max_steps, *s.shape), jnp.nan, s.dtype), shapes)
    return AnnealRun(key, jnp.zeros((), jnp.int32), state, history)


def anneal_advance(
    run: AnnealRun, step: Callable, *, stop: Any, max_steps: int, lam_end: float = 1.0
) -> AnnealRun:
    """Run steps (``key_i = fold_in(key, i)``) until ``state.lam ≥ lam_end``, ``max_steps`` steps
    or step ``stop`` (may be traced: a run driven in chunks compiles this once), in a
    ``lax.while_loop``."""

    def body(r: AnnealRun) -> AnnealRun:
        state, info = step(jax.random.fold_in(r.key, r.steps), r.state, r.steps)
        history = jax.tree.map(lambda h, v: h.at[r.steps].set(v), r.history, info)
        return AnnealRun(r.key, r.steps + 1, state, history)

    cond = lambda r: (r.state.lam < lam_end) & (r.steps < jnp.minimum(stop, max_steps))
    return jax.lax.while_loop(cond, body, run)


def anneal_loop(
    key: jax.Array,
    state: AnnealState,
    step: Callable,
    *,
    max_steps: int,
    lam_end: float = 1.0,
) -> tuple[AnnealState, AnnealInfo, jax.Array]:
    """Run ``step(key_i, state, i) -> (state, info)`` until ``state.lam ≥ lam_end`` or ``max_steps``
    steps (:func:`anneal_begin`, then :func:`anneal_advance` to the end). Returns the final state,
    the infos ``[max_steps]`` (NaN after the last step) and the number of steps ``i32[]``."""
    run = anneal_begin(key, state, step, max_steps)
    run = anneal_advance(run, step, stop=max_steps, max_steps=max_steps, lam_end=lam_end)
    return run.state, run.history, run.steps


def next_temperature(
    log_weights: jax.Array,
    log_lik: jax.Array,
    lam: jax.Array,
    target: float,
    *,
    conditional: bool = False,
    lam_max: float = 1.0,
    iters: int = 40,
) -> jax.Array:
    """The next ``λ' ∈ (lam, lam_max]`` of a tempering path ``L_λ = L^λ``: the largest (by
    bisection on ``δ = λ' − lam``) whose incremental weights ``δ · log_lik`` keep

    - ``conditional=False``: the ESS of the reweighted population, ``(Σ w_i e^{δℓ_i})² /
      Σ w_i² e^{2δℓ_i}``, at least ``target · N`` (Jasra et al. 2011);
    - ``conditional=True``: the conditional ESS ``N (Σ W_i e^{δℓ_i})² / Σ W_i e^{2δℓ_i}`` (``W``
      the normalised weights; Zhou, Johansen & Aston 2016) at least ``target · N``.

    The two agree when the weights are equal. ``lam_max`` when the whole step satisfies it; always
    ``> lam`` (the smallest bisection bracket otherwise), so a loop makes progress.

    Args:
        log_weights: ``f[N]`` the population's log weights at ``lam``.
        log_lik: ``f[N]`` ``log L(u_i)`` (the full likelihood, ``λ = 1``; ``−inf`` allowed).
        lam: ``f[]`` the current ``λ``.
        target: the ESS fraction in (0, 1].
    """
    logw = log_weights - logsumexp(log_weights)
    max_delta = jnp.asarray(lam_max, logw.dtype) - lam

    def fraction(delta):
        inc = jnp.where(log_lik == -jnp.inf, -jnp.inf, delta * log_lik)
        if conditional:
            out = jnp.exp(2.0 * logsumexp(logw + inc) - logsumexp(logw + 2.0 * inc))
        else:
            out = ess(logw + inc) / logw.shape[0]
        return jnp.where(jnp.isnan(out), 0.0, out)

    def bisect(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        ok = fraction(mid) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, bisect, (jnp.zeros_like(max_delta), max_delta))
    delta = jnp.where(fraction(max_delta) >= target, max_delta, jnp.where(lo > 0, lo, hi))
    return jnp.where(delta >= max_delta, lam_max, jnp.minimum(lam + delta, lam_max)).astype(logw.dtype)


def reweight(log_weights: jax.Array, log_lik_new: jax.Array, log_lik_old: jax.Array) -> jax.Array:
    """``log_weights + log L_λ'(u) − log L_λ(u)`` (``f[N]``), the incremental weight ``γ_λ'/γ_λ``;
    NaN (e.g. ``−inf − (−inf)`` for a particle already dead) becomes ``−inf``."""
    out = log_weights + (log_lik_new - log_lik_old)
    return jnp.where(jnp.isnan(out), -jnp.inf, out)


def tune_step_size(
    step_size: jax.Array, acceptance_rate: jax.Array, target: float | None, gain: float = 1.0
) -> jax.Array:
    """The next temperature's step size from the last move's acceptance rate ``a``: above
    ``target``, ``step_size · exp(gain · (a − target))`` (a gentle stochastic-approximation step on
    ``log step_size``, at most ×e^gain); below it, ``step_size · max(a / target, 0.1)`` (in
    proportion to the shortfall). HMC's acceptance falls off a cliff once the step passes the
    leapfrog's stability limit, and the targets narrow from one temperature to the next: the
    symmetric rule (×0.52 at most) left about a third of the temperatures of a correlated 5-D
    regression with no move accepted, this one about a fifth (``benchmarks/bench_tempered_tuning.py``;
    ``inverse_mass="full"`` none). Unchanged when ``target`` is ``None`` or ``a`` is NaN (no move
    yet)."""
    if target is None:
        return step_size
    change = jnp.where(
        acceptance_rate >= target,
        gain * (acceptance_rate - target),
        jnp.log(jnp.maximum(acceptance_rate / target, 0.1)),
    )
    return jnp.where(jnp.isnan(acceptance_rate), step_size, step_size * jnp.exp(change))


def weighted_moments(particles: jax.Array, log_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(mean, var)``, ``f[d]`` each: the weighted mean and per-coordinate variance of
    ``particles: f[N, d]`` (unweighted when every weight is zero)."""
    lse = logsumexp(log_weights)
    n = log_weights.shape[0]
    w = jnp.where(jnp.isfinite(lse), jnp.exp(log_weights - jnp.where(jnp.isfinite(lse), lse, 0.0)), 1.0 / n)
    mean = w @ particles
    return mean, w @ (particles - mean) ** 2


def weighted_chol(particles: jax.Array, log_weights: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """``f[d, d]``: a lower Cholesky factor of the weighted covariance of ``particles: f[N, d]``
    (``mean``, ``var`` from :func:`weighted_moments`), regularised by ``1e-6 · diag(var)``; the
    diagonal ``diag(√var)`` (floored at ``1e-4``) where the factorisation fails."""
    lse = logsumexp(log_weights)
    n, d = particles.shape
    w = jnp.where(jnp.isfinite(lse), jnp.exp(log_weights - jnp.where(jnp.isfinite(lse), lse, 0.0)), 1.0 / n)
    centred = particles - mean
    var = jnp.maximum(var, 1e-8)
    cov = (centred * w[:, None]).T @ centred + 1e-6 * jnp.diag(var)
    chol = jnp.linalg.cholesky(cov)
    return jnp.where(jnp.all(jnp.isfinite(chol)), chol, jnp.diag(jnp.sqrt(var)))


def rw_move(
    key: jax.Array,
    position: Position,
    log_target: Callable,
    scale: jax.Array,
    mean: jax.Array | None = None,
    rho: Any = 1.0,
) -> tuple[Position, jax.Array]:
    """One Gaussian MH transition of every particle: ``u' = ρ u + (1 − ρ) mean + S z``,
    ``z ~ N(0, I)``, ``S`` = ``scale`` (``f[d]`` or ``f[]``: a diagonal; ``f[d, d]``: a
    lower-triangular factor).

    ``ρ = 1`` (the default, ``mean`` unused) is a random walk, symmetric, so ``log_alpha = log π(u')
    − log π(u)``; ``ρ = 0`` is an independence proposal ``N(mean, S Sᵀ)``; in general the proposal
    ratio ``log q(u | u') − log q(u' | u)`` is added (0 for ``ρ = 1``), so the move leaves ``π``
    invariant for any ``ρ`` (:func:`~ppinfer.kernels.mh.accept`). ``rho`` may be traced (to alternate
    proposals inside a scan at the cost of one target evaluation). Returns ``(position,
    acceptance_rate: f[M])``."""
    k_prop, k_acc = jax.random.split(key)
    u = position.u
    z = jax.random.normal(k_prop, u.shape, u.dtype)
    scale = jnp.asarray(scale)
    if mean is None:
        proposal, log_q_ratio = u + _apply(scale, z), 0.0
    else:
        centre = lambda v: rho * v + (1.0 - rho) * mean
        proposal = centre(u) + _apply(scale, z)
        log_q = lambda v, given: -0.5 * jnp.sum(_solve(scale, v - centre(given)) ** 2, axis=-1)
        log_q_ratio = log_q(u, proposal) - log_q(proposal, u)
    lp = jax.vmap(log_target)(proposal)
    new, info = accept(k_acc, lp - position.log_target + log_q_ratio, Position(proposal, lp, None), position)
    return new, info.acceptance_rate


def hmc_move(
    key: jax.Array,
    position: Position,
    log_target: Callable,
    step_size: jax.Array,
    inverse_mass: jax.Array,
    num_leapfrog: int,
) -> tuple[Position, jax.Array]:
    """One HMC transition of every particle: momentum ``p ~ N(0, M)`` (``M⁻¹ = diag(inverse_mass)``,
    ``inverse_mass: f[d]``), ``num_leapfrog`` leapfrog steps of ``step_size``, then MH on the
    Hamiltonian ``H = −log π(u) + ½ pᵀ M⁻¹ p``. The leapfrog map is volume-preserving and reversible
    under ``p ↦ −p``, so ``log_alpha = H(u, p) − H(u', p')`` is the exact MH ratio (a diverging
    trajectory, ``−inf`` or NaN, rejects). Returns ``(position, acceptance_rate: f[M])``."""
    k_mom, k_acc = jax.random.split(key)
    value_and_grad = jax.vmap(jax.value_and_grad(log_target))
    u = position.u
    p0 = jax.random.normal(k_mom, u.shape, u.dtype) / jnp.sqrt(inverse_mass)

    def leapfrog(carry, _):
        u, p, lp, g = carry
        p = p + 0.5 * step_size * g
        u = u + step_size * inverse_mass * p
        lp, g = value_and_grad(u)
        return (u, p + 0.5 * step_size * g, lp, g), None

    start = (u, p0, position.log_target, position.grad)
    (u1, p1, lp1, g1), _ = jax.lax.scan(leapfrog, start, None, length=num_leapfrog)
    kinetic = lambda p: 0.5 * jnp.sum(inverse_mass * p * p, axis=-1)
    log_alpha = (lp1 - kinetic(p1)) - (position.log_target - kinetic(p0))
    new, info = accept(k_acc, log_alpha, Position(u1, lp1, g1), position)
    return new, info.acceptance_rate


def nuts_move(
    key: jax.Array,
    position: Position,
    log_target: Callable,
    step_size: jax.Array,
    inverse_mass: jax.Array,
    max_tree_depth: int,
) -> tuple[Position, jax.Array]:
    """One NUTS transition of every particle (NumPyro's ``build_tree`` on the potential
    ``−log_target``, vmapped over particles): the next state is drawn from the trajectory's states
    (multinomially, biased towards the last doubling), which leaves the target invariant (Hoffman &
    Gelman 2014; Betancourt 2017); there is no separate accept step. Returns ``(position,
    acceptance_rate: f[M])``, the rate being NumPyro's mean acceptance statistic of each tree."""
    potential = lambda u: -log_target(u)
    vv_init, vv_update = velocity_verlet(potential, euclidean_kinetic_energy)

    def one(key, u, lp, g):
        k_mom, k_tree = jax.random.split(key)
        r = jax.random.normal(k_mom, u.shape, u.dtype) / jnp.sqrt(inverse_mass)
        tree = build_tree(
            vv_update,
            euclidean_kinetic_energy,
            vv_init(u, r, potential_energy=-lp, z_grad=-g),
            inverse_mass,
            step_size,
            k_tree,
            max_tree_depth=max_tree_depth,
        )
        rate = tree.sum_accept_probs / tree.num_proposals
        return Position(tree.z_proposal, -tree.z_proposal_pe, -tree.z_proposal_grad), rate

    keys = jax.random.split(key, position.u.shape[0])
    return jax.vmap(one)(keys, position.u, position.log_target, position.grad)


def whitened(
    move: Callable, key: jax.Array, position: Position, log_target: Callable, params: MoveParams
) -> tuple[Position, jax.Array]:
    """``move`` run in the population's whitened coordinates ``z = L⁻¹(u − mean)`` (``L =
    params.chol``, the reweighted population's covariance factor) and mapped back: HMC or NUTS with
    the identity mass in ``z`` is HMC or NUTS with the dense inverse mass ``L Lᵀ`` in ``u``. The map
    is affine and fixed while the move runs, so invariance for ``log_target`` (``u ↦ log π(u)``)
    carries over: the target in ``z`` is ``log π(mean + L z)`` (its constant Jacobian omitted)."""
    chol, mean = params.chol, params.mean
    if chol is None:
        raise ConfigError(
            "a move with inverse_mass='full' needs MoveParams.chol, a Cholesky factor of the "
            "population's covariance (weighted_chol(particles, log_weights, mean, var))"
        )
    # Rows throughout (u, z, gradients: f[M, d]), by matrix products: L⁻¹ is formed once (d × d),
    # as XLA's CPU triangular solves and per-particle matrix-vector products are slow.
    inverse = jax.scipy.linalg.solve_triangular(chol, jnp.eye(chol.shape[0], dtype=chol.dtype), lower=True)
    target_z = lambda z: log_target(mean + z @ chol.T)
    grad = None if position.grad is None else position.grad @ chol  # ∇_z = Lᵀ ∇_u
    z = (position.u - mean) @ inverse.T
    moved, rate = move(key, Position(z, position.log_target, grad), target_z, params)
    # A particle that did not move keeps its own u and gradient (no round trip through L⁻¹ and L).
    stayed = jnp.all(moved.u == z, axis=-1, keepdims=True)
    u = jnp.where(stayed, position.u, mean + moved.u @ chol.T)
    if moved.grad is not None:
        grad = jnp.where(stayed, position.grad, moved.grad @ inverse)  # ∇_u = L⁻ᵀ ∇_z
    return Position(u, moved.log_target, grad), rate


def _log_target(log_prior: Callable, log_lik: Callable, lam: jax.Array) -> Callable:
    """``u ↦ log γ_lam(u)``, ``−inf`` where NaN."""
    return lambda u: _nan_to_neg_inf(log_prior(u) + log_lik(u, lam))


def _nan_to_neg_inf(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isnan(x), -jnp.inf, x)


def _apply(scale: jax.Array, z: jax.Array) -> jax.Array:
    """``S z`` for rows ``z: f[M, d]``: ``S`` diagonal (``f[d]``/``f[]``) or a matrix ``f[d, d]``."""
    return z @ scale.T if scale.ndim == 2 else scale * z


def _solve(scale: jax.Array, x: jax.Array) -> jax.Array:
    """``S⁻¹ x`` for rows ``x: f[M, d]`` (``S`` as in :func:`_apply`; a matrix is lower-triangular)."""
    if scale.ndim == 2:
        return jax.scipy.linalg.solve_triangular(scale, x.T, lower=True).T
    return x / scale


FULL_MASS_PARTICLES = 10
"""``inverse_mass="auto"`` uses the population's covariance from this many particles per dimension
(N ≥ 10 d), its variance below (a covariance from N ≲ d particles is singular: at d = 20,
N = 16 left means 4 sds off)."""


def _dense(how: Any, params: MoveParams) -> bool:
    """Whether a move with ``inverse_mass=how`` runs whitened by the population's covariance
    (``"auto"``: when :func:`anneal_step` computed it, at N ≥ :data:`FULL_MASS_PARTICLES` · d)."""
    return how == "full" or (how == "auto" and params.chol is not None)


def _inverse_mass(params: MoveParams, how: Any = "population") -> jax.Array:
    """The diagonal inverse mass matrix ``f[d]``: the population's variance (floored away from 0),
    ones, or the given values (:class:`HMCMove`'s ``inverse_mass``)."""
    if how in ("population", "auto"):
        return jnp.maximum(params.var, 1e-8)
    if how == "identity":
        return jnp.ones_like(params.var)
    if len(how) != params.var.shape[0]:
        raise ConfigError(
            f"inverse_mass has {len(how)} values, but the space has {params.var.shape[0]} dimensions"
        )
    return jnp.asarray(how, params.var.dtype)


def _check_inverse_mass(how: Any) -> Any:
    """``"population"``, ``"identity"`` or a tuple of positive finite floats (hashable: a move keys
    the compile cache), else :class:`ConfigError`."""
    if isinstance(how, str) and how in ("population", "full", "auto", "identity"):
        return how
    try:
        values = tuple(float(v) for v in np.ravel(np.asarray(how, dtype=np.float64)))
    except (TypeError, ValueError):
        values = ()
    if isinstance(how, str) or not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise ConfigError(
            "inverse_mass must be 'auto', 'population', 'full', 'identity' or positive finite values "
            f"(one per dimension), got {how!r}"
        )
    return values


def _check_move(step_size: Any, target_acceptance: Any) -> None:
    check_positive("step_size", step_size)
    if target_acceptance is not None:
        check_fraction("target_acceptance", target_acceptance)
