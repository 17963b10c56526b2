"""IBIS (Chopin 2002): a particle posterior that absorbs data batches one at a time.

For a static program whose likelihood factorises over data batches ``y_1, y_2, …`` the target after
``t`` batches is ``π_t(θ) ∝ γ_t(θ) = p(θ) Π_{s ≤ t} p(y_s | θ)``, whose mass is the evidence
``Z_t = p(y_{1:t})``. One update (each tempered stage of one) is the one SMC step,
:func:`ppinfer.kernels.smc.step`, with a :class:`~ppinfer.kernels.smc.Reweighting` advance, a
systematic selection and a move:

- **reweight**: ``log_weights += log p(y_t | θ_i)`` (the incremental weight ``γ_t / γ_{t−1}``);
- **resample** (systematic) when ``ESS < ess_threshold · N``: the measure is unchanged in expectation;
- **move** (only after resampling): ``num_moves`` MH steps per particle targeting ``π_t`` in the
  unconstrained space of the latent sites (Jacobian included), alternating a Gaussian random walk
  with the particles' covariance (scaled by ``2.38²/d``) and an independent Gaussian proposal fitted
  to the particles (``_moves``, on :func:`ppinfer.kernels.anneal.rw_move`).
- **temper** (``IBIS(tempering_ess=0.5)``, the default): a batch whose one-step reweighting would
  leave a conditional ESS below ``tempering_ess · N`` is absorbed in stages ``p(y_t | θ)^{λ_k}``,
  ``λ_k ↑ 1`` chosen adaptively, each stage followed by resample and move (see
  :func:`update_state`). Without it, an informative batch (the first after a vague prior) collapses
  the particles onto a few prior draws and the moves cannot recover: on posteriordb's arK the
  posterior means end 3–125 posterior sds off; with it, within 0.11 sd of the reference
  (``benchmarks/bench_updates_posteriordb.py``).

The log weights carry the ``1/N``: ``logsumexp(log_weights) = log Ẑ_{1:t}``, and each update's
increment is ``log Ẑ(t | 1:t−1) = logsumexp(after reweight) − logsumexp(before)``, so
``log Ẑ_{1:T} = Σ_t log Ẑ(t | 1:t−1)`` with ``E[Ẑ_{1:T}] = Z_T``.

**What an update costs.** Reweighting evaluates the new batch's likelihood once per particle
(``O(N · |y_t|)``). A move step evaluates the whole target ``π_t`` ``N · num_moves`` times; how
much that costs depends on how the data so far is kept (a :class:`DataModel`):

- :func:`history_data` (default): every batch is kept (a buffer of ``2^⌈log₂ t⌉`` batches, so the
  compiled update is rebuilt only when the buffer doubles) and ``π_t`` is re-scored over all of
  them: a move costs ``O(N · num_moves · t · |y|)`` and memory grows ``O(t · |y|)``. Fine for
  hundreds of batches; it grows without bound (the minimum buffer is ``MIN_CAPACITY`` batches).
- :func:`statistics_data`: the program takes running *sufficient statistics* ``S_t`` as its
  arguments (``program(*S_t)``, its log likelihood exactly ``log p(y_{1:t} | θ)``), updated by
  ``S_t = combine(S_{t−1}, statistics(*y_t))``. A move costs ``O(N · num_moves)`` and memory
  ``O(|S|)``, both independent of ``t``; the reweight is ``ℓ(θ; S_t) − ℓ(θ; S_{t−1})``.

A tempered update costs one resample-and-move per stage (``Posterior.extras["stages"]``), plus a
bisection over ``N`` cached increments per stage; batches after the posterior has concentrated
usually take one stage.

On the host, each update also runs the program once eagerly on the new batch with argument
validation (milliseconds), so out-of-support data is a ``DataError`` rather than a silent −inf; and
the per-update diagnostics (``ess``, ``log_evidence_history``…) grow by one scalar each.

Requirements: the latent sites are continuous with fixed supports, and the prior does not depend on
the data (the program's arguments).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from ppinfer import checks
from ppinfer._compile import cached_jit, check_data, locked
from ppinfer._talk import interruptible
from ppinfer._talk import progress_bar as _progress_bar
from ppinfer.errors import ConfigError, DataError, ModelError
from ppinfer.kernels import smc
from ppinfer.kernels.anneal import Position, next_temperature, rw_move
from ppinfer.kernels.select import Systematic
from ppinfer.kernels.space import space_of
from ppinfer.population import ess
from ppinfer.program import is_sequential
from ppinfer.result import Result
from ppinfer.suspended import Particle
from ppinfer.traced import assess, generate

__all__ = [
    "IBIS",
    "Posterior",
    "IBISState",
    "UpdateInfo",
    "DataModel",
    "history_data",
    "statistics_data",
    "init_state",
    "update_state",
    "run_stream",
    "capacity_for",
    "constrained_samples",
]


# Fewer recompilations for short streams; masked entries cost one cheap likelihood evaluation each.
MIN_CAPACITY = 8


class IBISState(NamedTuple):
    """Everything an update needs (and everything a saved file holds).

    Attributes:
        particles: ``f32[N, d]``, each particle's latent sites in their unconstrained space, raveled.
        log_weights: ``f32[N]``, unnormalised, with the ``1/N``: ``logsumexp = log Ẑ_{1:t}``.
        key: ``u32[2]``, the key the next update splits.
        step: ``i32[]``, the number of batches absorbed so far (``t``).
        data: the data so far, as its :class:`DataModel` keeps it (a batch buffer ``[C, …]`` or the
            running statistics).
    """

    particles: jax.Array
    log_weights: jax.Array
    key: jax.Array
    step: jax.Array
    data: Any


class UpdateInfo(NamedTuple):
    """Diagnostics of one update: ``log_evidence_increment: f32[]`` (``log Ẑ(t | 1:t−1)``),
    ``ess: f32[]`` after reweighting (before resampling), ``resampled: bool[]``,
    ``acceptance_rate: f32[]`` of the moves (mean over the stages that moved; 0 when not
    resampled), ``stages: i32[]`` the number of tempering stages (1: the batch was absorbed at
    once), ``nan: bool[]`` whether the batch's log likelihood was NaN (or +inf) for some particle
    (that particle is given weight zero; :meth:`Posterior.update` raises a ``ModelError``)."""

    log_evidence_increment: jax.Array
    ess: jax.Array
    resampled: jax.Array
    acceptance_rate: jax.Array
    stages: jax.Array
    nan: jax.Array = False


class DataModel(NamedTuple):
    """How the data so far is kept and scored (pure functions; ``x`` a latent choice dict).

    Attributes:
        kind: ``"history"`` or ``"statistics"``.
        absorb: ``absorb(data, batch, step) -> data`` after adding ``batch`` (the args tuple of one
            batch) as batch number ``step``.
        log_joint: ``log_joint(x, data, step, batch) -> f32[]``, ``log p(x) + log p(y_{1:step} | x)``
            with ``step`` batches in ``data`` (``batch`` is the latest, for the prior's arguments).
        increment: ``increment(x, old, new, batch, step) -> f32[]``, ``log p(y_batch | x)``
            (``step`` batches in ``old``).
        empty: ``empty(batch) -> data`` with no batch absorbed, shaped for ``batch``.
    """

    kind: str
    absorb: Callable
    log_joint: Callable
    increment: Callable
    empty: Callable


def history_data(program: Callable[..., Any], capacity: int) -> DataModel:
    """Keep every batch in a buffer of ``capacity`` batches (each leaf ``[capacity, …]``); score
    ``π_t`` by a masked ``lax.scan`` over the buffer: ``O(capacity)`` per evaluation."""

    def absorb(data, batch, step):
        return jax.tree.map(lambda buf, b: buf.at[step].set(b), data, batch)

    def log_joint(x, data, step, batch):
        def body(total, xs):
            i, b = xs
            ll = assess(program, b, x).log_likelihood
            return total + jnp.where(i < step, ll, 0.0), None

        idx = jnp.arange(capacity, dtype=jnp.int32)
        total, _ = jax.lax.scan(body, jnp.zeros(()), (idx, data))
        return assess(program, batch, x).log_prior + total

    def increment(x, old, new, batch, step):
        return assess(program, batch, x).log_likelihood

    def empty(batch):
        return jax.tree.map(lambda b: jnp.zeros((capacity, *jnp.shape(b)), jnp.asarray(b).dtype), batch)

    return DataModel("history", absorb, log_joint, increment, empty)


def statistics_data(
    program: Callable[..., Any], statistics: Callable[..., tuple], combine: Callable | None = None
) -> DataModel:
    """Keep running sufficient statistics ``S_t = combine(S_{t−1}, statistics(*batch))`` (default
    ``combine``: leafwise sum); the program is called as ``program(*S_t)`` and its log likelihood must
    be exactly ``log p(y_{1:t} | x)``. ``O(1)`` per evaluation and in memory."""
    combine = combine or (lambda a, b: jax.tree.map(jnp.add, a, b))

    def absorb(data, batch, step):
        new = _as_tuple(statistics(*batch))
        return jax.tree.map(lambda a, b: jnp.where(step == 0, b, a), combine(data, new), new)

    def log_joint(x, data, step, batch):
        return assess(program, data, x).score

    def increment(x, old, new, batch, step):
        before = jnp.where(step == 0, 0.0, assess(program, old, x).log_likelihood)
        return assess(program, new, x).log_likelihood - before

    def empty(batch):
        shapes = _as_tuple(jax.eval_shape(statistics, *batch))
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    return DataModel("statistics", absorb, log_joint, increment, empty)


@dataclass(frozen=True)
class IBIS:
    """Iterated batch importance sampling: ``infer(program, *batch_1, algorithm=IBIS(...))`` returns
    a :class:`Posterior`; ``posterior.update(*batch_2)`` absorbs the next batch.

    Args:
        num_particles: N ≥ 1.
        num_moves: RW-MH moves per particle after each resampling, ≥ 1.
        ess_threshold: resample (and move) when ``ESS < ess_threshold · N``; 1 resamples every update.
        sufficient_statistics: ``statistics(*batch) -> tuple`` of the program's arguments for that
            batch alone; given, the program is called on the running statistics (see
            :func:`statistics_data`); ``None`` keeps every batch (:func:`history_data`).
        combine: ``combine(S_old, S_batch) -> S_new`` (default leafwise sum).
        version: the program's version string, recorded in saved files and checked on load.
        tempering_ess: absorb a batch in tempered stages when reweighting by all of it at once
            would leave a conditional ESS below ``tempering_ess · N`` (see :func:`update_state`);
            a fraction in (0, 1), or ``None`` for plain IBIS (one reweighting per batch, which
            collapses to a handful of particles when a batch is informative, e.g. the first
            batch after a vague prior).
        max_stages: the most tempering stages per update, ≥ 1 (the last one jumps to the full
            batch; ``Posterior.extras["stages"]`` records how many each update used).
    """

    num_particles: int = 1000
    num_moves: int = 5
    ess_threshold: float = 0.5
    sufficient_statistics: Callable[..., tuple] | None = None
    combine: Callable | None = None
    version: str = ""
    tempering_ess: float | None = 0.5
    max_stages: int = 64

    name = "IBIS"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        checks.check_probability("ess_threshold", self.ess_threshold)
        if not isinstance(self.version, str):
            raise ConfigError(f"version must be a string (recorded in saved files), got {self.version!r}")
        checks.check_int("num_moves", self.num_moves, 1)
        checks.check_int("max_stages", self.max_stages, 1)
        for name in ("sufficient_statistics", "combine"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise ConfigError(f"{name} must be None or a function, got {fn!r}")
        if self.combine is not None and self.sufficient_statistics is None:
            raise ConfigError("combine merges sufficient statistics: give sufficient_statistics too")
        te = self.tempering_ess
        if te is not None and (isinstance(te, bool) or not isinstance(te, int | float) or not 0 < te < 1):
            raise ConfigError(f"tempering_ess must be None or a fraction in (0, 1), got {te!r}")

    def run(self, key: jax.Array, program: Any, args: tuple) -> Posterior:
        """Draw N particles from the prior, then absorb ``args`` (the first batch)."""
        if is_sequential(program) or not callable(program):
            raise ConfigError("IBIS needs a static program (a callable)")
        batch = _as_batch(args)
        _dry_run(program, self, batch)  # before the prior's draw traces the program on it
        fn = _compiled(self, program, "init", _batch_signature(batch))
        state = fn(jnp.asarray(key), batch)
        return Posterior.from_state(program, self, state).update(*args)


@dataclass(repr=False)
class Posterior(Result):
    """The IBIS posterior after ``t`` batches: a :class:`~ppinfer.Result` (samples of the latent
    and deterministic sites ``[N, …]``, ``log_weights``, ``log_evidence = log Ẑ_{1:t}``; ``ess``,
    ``resampled``, ``log_evidence_history`` are per update ``[t]``) that can absorb more data.

    Attributes:
        program: the static program.
        config: the :class:`IBIS` settings.
        ibis: the :class:`IBISState`.
    """

    program: Any = None
    config: IBIS | None = None
    ibis: IBISState | None = None

    @property
    def step(self) -> int:
        """The number of batches absorbed."""
        return int(self.ibis.step)

    @property
    def log_evidence_increments(self) -> np.ndarray:
        """``f[t]``: ``log Ẑ(s | 1:s−1)`` of each update (they sum to ``log_evidence``)."""
        return np.diff(np.asarray(self.log_evidence_history), prepend=0.0)

    def update_all(self, batches: Iterable[Any], progress_bar: bool | None = None) -> Posterior:
        """Absorb ``batches`` in turn (an iterable; each item one batch: a tuple of
        :meth:`update`'s arguments, or a single argument) and return the last posterior.

        Equal to calling :meth:`update` on each (each update is one compiled call). A tqdm bar
        on stderr counts the updates (``None``: shown on a terminal when the iterable has a length
        and the updates are expected to last over a second); Ctrl-C between two updates raises
        ``KeyboardInterrupt`` and leaves this posterior as it was."""
        items = list(batches) if not isinstance(batches, Iterator) else batches
        total = len(items) if isinstance(items, list) else None
        post = self
        with ExitStack() as stack:
            interrupted = stack.enter_context(interruptible())
            bar, t0 = None, time.perf_counter()
            for i, batch in enumerate(items):
                post = post.update(*(batch if isinstance(batch, tuple) else (batch,)))
                interrupted()
                if bar is None and progress_bar is not False:
                    per_update = (time.perf_counter() - t0) / (i + 1)
                    if progress_bar or (total is not None and per_update * total > 1.0):
                        bar = stack.enter_context(_progress_bar(total, "IBIS updates", progress_bar))
                        bar.update(i)
                if bar is not None:
                    bar.update(1)
        return post

    @locked  # thread-safe, like infer
    def update(self, *batch: Any) -> Posterior:
        """Absorb one more batch (the program's arguments for that batch; with
        ``sufficient_statistics``, that function's arguments) and return the new posterior.

        Raises :class:`~ppinfer.errors.DataError` for NaN or out-of-support data or a batch whose
        shapes differ from the first one's, :class:`~ppinfer.errors.ZeroEvidenceError` when every
        particle gets weight zero."""
        t0 = time.perf_counter()
        check_data(batch)
        cfg, program, state = self.config, self.program, self.ibis
        if state.log_weights.dtype != jnp.result_type(float):
            raise ConfigError(
                f"this posterior holds {state.log_weights.dtype} particles, but JAX now computes in "
                f"{jnp.result_type(float)} (jax_enable_x64 was switched since it was built): switch it "
                "back, or start the posterior again"
            )
        b = _as_batch(batch)
        _check_batch(b, state, cfg)
        step = int(state.step)
        if cfg.sufficient_statistics is None:
            if step == 0:
                state = state._replace(data=history_data(program, 1).empty(b))
            state = state._replace(data=_grow(state.data, capacity_for(step + 1)))
        elif step == 0:
            state = state._replace(data=statistics_data(program, cfg.sufficient_statistics).empty(b))
        _dry_run(program, cfg, b)
        fn = _compiled(cfg, program, "update", _batch_signature(b))
        state, info, samples = fn(state, b)
        if bool(info.nan):
            raise ModelError(
                f"IBIS: the log likelihood of batch {step + 1} is NaN or +inf for some particles (a "
                "distribution given an invalid parameter there?): the posterior is not defined"
            )
        log_z = float(logsumexp(state.log_weights))
        checks.raise_if_dead(log_z, f"after batch {step + 1}", cfg.num_particles)
        hist = {
            "ess": self.ess,
            "resampled": self.resampled,
            "log_evidence_history": self.log_evidence_history,
            "acceptance_rate": self.extras.get("acceptance_rate"),
            "stages": self.extras.get("stages"),
        }
        new = jax.device_get(
            {
                "ess": info.ess,
                "resampled": info.resampled,
                "log_evidence_history": logsumexp(state.log_weights),
                "acceptance_rate": info.acceptance_rate,
                "stages": info.stages,
            }
        )
        # Host-side numpy: appending to a device array would compile a new concatenation per length.
        hist = {k: np.append(np.asarray(hist[k]), new[k]) for k in hist}
        return Posterior(
            samples=samples,
            log_weights=state.log_weights,
            log_evidence=log_z,
            algorithm="IBIS",
            ess=hist["ess"],
            resampled=hist["resampled"],
            log_evidence_history=hist["log_evidence_history"],
            wall_time=time.perf_counter() - t0,
            extras={"acceptance_rate": hist["acceptance_rate"], "stages": hist["stages"]},
            program=program,
            config=cfg,
            ibis=state,
        )

    @classmethod
    def from_state(
        cls, program: Any, config: IBIS, state: IBISState, history: dict | None = None
    ) -> Posterior:
        """A posterior from a state and its per-update histories (``ess``, ``resampled``,
        ``log_evidence_history``, ``acceptance_rate``, ``stages``; empty when ``None``)."""
        history = history or {}
        get = lambda k, dt: np.asarray(history.get(k, np.zeros((0,), dt)))
        samples = {}
        if state.data is not None:
            samples = _compiled(config, program, "samples", None)(state.particles, state.data, state.step)
        return cls(
            samples=samples,
            log_weights=state.log_weights,
            log_evidence=float(logsumexp(state.log_weights)),
            algorithm="IBIS",
            ess=get("ess", np.float32),
            resampled=get("resampled", bool),
            log_evidence_history=get("log_evidence_history", np.float32),
            extras={"acceptance_rate": get("acceptance_rate", np.float32), "stages": get("stages", np.int32)},
            program=program,
            config=config,
            ibis=state,
        )


def init_state(key: jax.Array, program: Callable[..., Any], args: tuple, num_particles: int) -> IBISState:
    """N particles from the prior of ``program(*args)`` (``generate`` with ``fold_in(k_init, i)``;
    ``args`` one batch's program arguments: the prior must not depend on them), log weights ``−log N``,
    ``step = 0`` and no data (``data = None``; the :class:`DataModel` fills it). Pure."""
    k_init, k_next = jax.random.split(key)
    space = _space(program, args)
    draw = lambda i: generate(jax.random.fold_in(k_init, i), program, args)[0].choices
    x = jax.vmap(draw)(jnp.arange(num_particles))
    flat = jax.vmap(space.unconstrain)(x)
    lw = jnp.full((num_particles,), -jnp.log(num_particles), flat.dtype)
    return IBISState(flat, lw, k_next, jnp.zeros((), jnp.int32), None)


def update_state(
    state: IBISState,
    batch: tuple,
    program: Callable[..., Any],
    data_model: DataModel,
    num_moves: int,
    ess_threshold: float,
    tempering_ess: float | None = None,
    max_stages: int = 64,
) -> tuple[IBISState, UpdateInfo]:
    """One IBIS update (module docstring): reweight by ``log p(batch | θ)``, and if
    ``ESS < ess_threshold · N`` resample and move. Pure, jit/vmap-able; ``batch`` is the args tuple
    of one batch (its prior arguments in statistics mode are the new statistics).

    With ``tempering_ess`` (a fraction in (0, 1)), a batch whose full reweighting would leave
    a conditional ESS below ``tempering_ess · N`` is absorbed in stages ``0 = λ_0 < λ_1 < … = 1``
    (adaptive tempering): stage ``k`` reweights by ``(λ_k − λ_{k−1}) · log p(batch | θ)`` with
    ``λ_k`` chosen by bisection so that the conditional ESS is ``tempering_ess · N``, then resamples
    and moves targeting ``π_{t−1}(θ) p(batch | θ)^{λ_k}``; at most ``max_stages`` stages (the last
    one jumps to ``λ = 1``). Each stage leaves its target invariant and the log evidence increment is
    the sum of the stages' ``log Σ w`` ratios, so ``log Ẑ_{1:t}`` still accumulates (the adaptive
    choice of ``λ_k`` from the same particles adds an ``O(1/N)`` bias, as in every adaptive SMC
    sampler). ``None``: one stage, as plain IBIS."""
    n = state.log_weights.shape[0]
    key, k_step = jax.random.split(state.key)
    step = state.step
    new_data = data_model.absorb(state.data, batch, step)
    prior_args = new_data if data_model.kind == "statistics" else batch
    space = _space(program, prior_args)

    def raw_increment(v):
        x, _ = space.constrain(v)
        return data_model.increment(x, state.data, new_data, batch, step)

    def increment(v):
        out = raw_increment(v)
        return jnp.where(jnp.isnan(out), -jnp.inf, out)

    def log_target(v):
        x, log_det = space.constrain(v)
        out = data_model.log_joint(x, new_data, step + 1, batch) + log_det
        return jnp.where(jnp.isnan(out), -jnp.inf, out)

    def smc_step(k, flat, lw_old, lw_new, select_now, target, carried=(), after_move=None):
        """The one SMC step (:func:`ppinfer.kernels.smc.step`): advance by reweighting to
        ``lw_new``, then, where ``select_now``, systematic selection and ``num_moves`` moves
        targeting ``target`` (``after_move(flat)`` recomputes the carried values of moved
        particles). Returns ``(flat, log_weights, acceptance rate or 0, carried)``."""

        def moves(k_move, s):
            moved, rate = _moves(k_move, s.particles.state, target, num_moves)
            carried = s.carried if after_move is None else after_move(moved)
            return s._replace(particles=Particle(moved, s.particles.done), carried=carried), rate

        before = smc.SMCState(Particle(flat, jnp.zeros(n, bool)), lw_old, step, carried)
        after, info = smc.step(
            k, before, smc.Reweighting(lw_new), (), selection=Systematic(), select_now=select_now, move=moves
        )
        return after.particles.state, after.log_weights, info.move, after.carried

    raw = jax.vmap(raw_increment)(state.particles)
    nan = jnp.any(jnp.isnan(raw) | (raw == jnp.inf))
    inc = jnp.where(jnp.isnan(raw), -jnp.inf, raw)
    lw = state.log_weights + inc
    ess_t = ess(lw)
    if tempering_ess is None:
        do = (ess_t < ess_threshold * n) | (ess_threshold >= 1.0)
        flat, lw_out, rate, _ = smc_step(k_step, state.particles, state.log_weights, lw, do, log_target)
        info = UpdateInfo(
            logsumexp(lw) - logsumexp(state.log_weights), ess_t, do, rate, jnp.ones((), jnp.int32), nan
        )
        return IBISState(flat, lw_out, key, step + 1, new_data), info

    def stage_target(lam):
        def target(v):
            # π_{t−1} · p(batch | θ)^λ, summed directly: at small λ the batch's log likelihood can be
            # −1e9 for a prior draw, and log π_t − (1 − λ) log p(batch | θ) would lose every digit.
            x, log_det = space.constrain(v)
            before = jnp.where(
                step == 0,
                assess(program, prior_args, x).log_prior,
                data_model.log_joint(x, state.data, step, batch),
            )
            inc = data_model.increment(x, state.data, new_data, batch, step)
            out = before + log_det + jnp.where(inc == -jnp.inf, -jnp.inf, lam * inc)
            return jnp.where(jnp.isnan(out), -jnp.inf, out)

        return target

    def cond_fn(c):
        # Stop early if every particle has weight zero (the caller raises ZeroEvidenceError).
        return (c["lam"] < 1.0) & jnp.isfinite(logsumexp(c["lw"]))

    def body(c):
        last = c["stage"] >= max_stages - 1
        lam = next_temperature(c["lw"], c["inc"], c["lam"], tempering_ess, conditional=True)
        lam = jnp.where(last, 1.0, lam)
        lw = c["lw"] + jnp.where(c["inc"] == -jnp.inf, -jnp.inf, (lam - c["lam"]) * c["inc"])
        do = (lam < 1.0) | (ess(lw) < ess_threshold * n) | (ess_threshold >= 1.0)
        k = jax.random.fold_in(k_step, c["stage"])
        moved_inc = jax.vmap(increment)
        flat, lw, rate, inc = smc_step(k, c["flat"], c["lw"], lw, do, stage_target(lam), c["inc"], moved_inc)
        return {
            "flat": flat,
            "lw": lw,
            "inc": inc,
            "lam": lam,
            "stage": c["stage"] + 1,
            "resampled": c["resampled"] | do,
            "rate_sum": c["rate_sum"] + rate,
            "moved": c["moved"] + do.astype(jnp.int32),
        }

    init = {
        "flat": state.particles,
        "lw": state.log_weights,
        "inc": inc,
        "lam": jnp.zeros((), lw.dtype),
        "stage": jnp.zeros((), jnp.int32),
        "resampled": jnp.zeros((), bool),
        "rate_sum": jnp.zeros((), lw.dtype),
        "moved": jnp.zeros((), jnp.int32),
    }
    c = jax.lax.while_loop(cond_fn, body, init)
    rate = c["rate_sum"] / jnp.maximum(c["moved"], 1)
    info = UpdateInfo(
        logsumexp(c["lw"]) - logsumexp(state.log_weights), ess_t, c["resampled"], rate, c["stage"], nan
    )
    return IBISState(c["flat"], c["lw"], key, step + 1, new_data), info


def _moves(key, flat, log_target: Callable, num_moves: int):
    """``num_moves`` MH steps of every particle (rows of ``flat: f32[N, d]``), alternating a Gaussian
    random walk ``N(v, (2.38²/d) Σ̂)`` and an independent proposal ``N(m̂, Σ̂)``, with ``m̂, Σ̂`` the
    particles' mean and covariance (regularised; the diagonal alone if the Cholesky factor fails):
    the walk follows the posterior's scale and correlations, the independent step jumps across a
    near-Gaussian posterior in one move. Both are :func:`~ppinfer.kernels.anneal.rw_move` (``ρ = 1``
    and ``ρ = 0``; one target evaluation per step), each leaving ``log_target`` invariant (``Σ̂, m̂``
    are fixed during the moves). Returns ``(flat, mean acceptance probability)``."""
    n, d = flat.shape
    mean = jnp.mean(flat, axis=0)
    centred = flat - mean
    cov = centred.T @ centred / max(n - 1, 1)
    var = jnp.maximum(jnp.diag(cov), 1e-8)
    chol = jnp.linalg.cholesky(cov + 1e-6 * jnp.diag(var) + 1e-10 * jnp.eye(d, dtype=flat.dtype))
    chol = jnp.where(jnp.all(jnp.isfinite(chol)), chol, jnp.diag(jnp.sqrt(var)))

    def move(position, xs):
        k, i = xs
        independent = (i % 2) == 1
        scale = jnp.where(independent, chol, 2.38 / jnp.sqrt(d) * chol)
        position, rate = rw_move(k, position, log_target, scale, mean, jnp.where(independent, 0.0, 1.0))
        return position, jnp.mean(rate)

    start = Position(flat, jax.vmap(log_target)(flat), None)
    xs = (jax.random.split(key, num_moves), jnp.arange(num_moves))
    position, rates = jax.lax.scan(move, start, xs)
    return position.u, jnp.mean(rates)


def run_stream(
    key: jax.Array, program: Callable[..., Any], batches: tuple, config: IBIS
) -> tuple[IBISState, UpdateInfo]:
    """IBIS over ``T`` batches given at once (every leaf of ``batches`` has leading axis ``T``): the
    same blocks as :meth:`Posterior.update`, in one ``lax.scan``; pure and vmap-able (for
    replicated validity checks). Returns the final state and the per-update infos ``[T]``."""
    first = jax.tree.map(lambda b: b[0], batches)
    num_batches = jax.tree.leaves(batches)[0].shape[0]
    state = init_state(key, program, _batch_args(config, first), config.num_particles)
    dm = _data_model(config, program, num_batches)
    state = state._replace(data=dm.empty(first))

    def body(state, batch):
        return update_state(state, batch, program, dm, *_update_settings(config))

    return jax.lax.scan(body, state, batches)


def capacity_for(num_batches: int) -> int:
    """The history buffer's capacity for ``num_batches`` batches: the next power of two, at least
    ``MIN_CAPACITY`` (a function of the step count alone, so a resumed run compiles and computes
    exactly what the original did)."""
    return max(MIN_CAPACITY, 1 << max(int(num_batches) - 1, 0).bit_length())


def constrained_samples(program, particles, args) -> dict:
    """Site name → ``[N, …]``: the latent sites of ``particles: f32[N, d]`` (constrained) and the
    program's ``deterministic`` sites, evaluated on ``args`` (the latest batch, or the statistics)."""
    space = _space(program, args)

    def one(v):
        x, _ = space.constrain(v)
        return {**x, **assess(program, args, x).deterministics}

    return jax.vmap(one)(particles)


def _update_settings(config: IBIS) -> tuple:
    """``update_state``'s settings from the config."""
    return config.num_moves, config.ess_threshold, config.tempering_ess, config.max_stages


def _data_model(config: IBIS, program, capacity: int) -> DataModel:
    if config.sufficient_statistics is None:
        return history_data(program, capacity)
    return statistics_data(program, config.sufficient_statistics, config.combine)


def _compiled(config: IBIS, program, what: str, signature) -> Callable:
    """The jitted ``init``/``update``/``samples`` function for this program and settings (cached)."""

    def build():
        if what == "init":
            return lambda key, batch: init_state(
                key, program, _batch_args(config, batch), config.num_particles
            )
        if what == "samples":
            return lambda particles, data, step: constrained_samples(
                program, particles, _prior_args(config, data, step)
            )

        def update(state, batch):
            capacity = jax.tree.leaves(state.data)[0].shape[0] if config.sufficient_statistics is None else 0
            dm = _data_model(config, program, capacity)
            state, info = update_state(state, batch, program, dm, *_update_settings(config))
            prior_args = state.data if dm.kind == "statistics" else batch
            return state, info, constrained_samples(program, state.particles, prior_args)

        return update

    fn, _ = cached_jit(("ibis", what, program, config, signature), build)
    return fn


def _batch_args(config: IBIS, batch: tuple) -> tuple:
    """The program's arguments for one batch alone: the batch, or its statistics."""
    if config.sufficient_statistics is None:
        return batch
    return _as_tuple(config.sufficient_statistics(*batch))


def _prior_args(config: IBIS, data, step):
    """The program's arguments after ``step`` batches: the statistics, or the latest batch."""
    if config.sufficient_statistics is not None:
        return data
    return jax.tree.map(lambda b: b[step - 1], data)


def _space(program, args):
    """The unconstrained space of the program's latent sites (all continuous, at least one)."""
    return space_of(program, args, what="IBIS")


def _as_batch(args: tuple) -> tuple:
    """A batch's arguments as a tuple of arrays (every leaf becomes an array: traced, not static)."""
    try:
        return tuple(jax.tree.map(jnp.asarray, tuple(args)))
    except TypeError as e:
        raise DataError(f"IBIS batches must be arrays or pytrees of arrays: {e}") from e


def _batch_signature(batch: tuple):
    leaves, treedef = jax.tree.flatten(batch)
    return treedef, tuple((x.shape, str(x.dtype)) for x in leaves)


def _check_batch(batch: tuple, state: IBISState, cfg: IBIS) -> None:
    if int(state.step) == 0 or cfg.sufficient_statistics is not None:
        return
    first = jax.tree.map(lambda b: b[0], state.data)
    if _batch_signature(batch) != _batch_signature(first):
        raise DataError(
            "every batch must have the shapes and dtypes of the first one (the history is a stacked "
            f"buffer): got {_batch_signature(batch)[1]}, expected {_batch_signature(first)[1]}; pad "
            "batches or use sufficient_statistics"
        )


def _dry_run(program, cfg: IBIS, batch: tuple) -> None:
    """Run the program once eagerly on this batch (or its statistics) with argument validation, so
    out-of-support data is a DataError naming the site rather than a silent −inf (once per batch
    value: the first batch is checked before the prior is drawn, and not again by its update)."""
    args = _batch_args(cfg, batch)
    check = lambda: checks.dry_run(program, args, None, "running the program on the new batch")
    checks.once_per_data(("ibis", program, cfg), args, check)


def _grow(data, capacity: int):
    """The history buffer padded with zeros to ``capacity`` batches (unchanged if already that big)."""
    size = jax.tree.leaves(data)[0].shape[0]
    if size >= capacity:
        return data
    pad = lambda b: jnp.concatenate([b, jnp.zeros((capacity - size, *b.shape[1:]), b.dtype)])
    return jax.tree.map(pad, data)


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, tuple | list) else (x,)
