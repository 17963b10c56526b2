"""IBIS (Chopin 2002): a particle posterior that absorbs data batches one at a time.

For a static program whose likelihood factorises over data batches ``y_1, y_2, …`` the target after
``t`` batches is ``π_t(θ) ∝ γ_t(θ) = p(θ) Π_{s ≤ t} p(y_s | θ)``, whose mass is the evidence
``Z_t = p(y_{1:t})``. One update absorbs ``y_t`` by the blocks

- **reweight**: ``log_weights += log p(y_t | θ_i)`` (the incremental weight ``γ_t / γ_{t−1}``);
- **resample** (systematic) when ``ESS < ess_threshold · N``: the measure is unchanged in expectation;
- **move** (only after resampling): ``num_moves`` random-walk MH steps per particle targeting
  ``π_t`` in the unconstrained space of the latent sites (Jacobian included), the kernel of
  :mod:`ppinfer.algorithms.tempered` (scale ``2.38/√d`` × the particles' spread).

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

On the host, each update also runs the program once eagerly on the new batch with argument
validation (milliseconds), so out-of-support data is a ``DataError`` rather than a silent −inf; and
the per-update diagnostics (``ess``, ``log_evidence_history``…) grow by one scalar each.

Requirements: the latent sites are continuous with fixed supports, and the prior does not depend on
the data (the program's arguments).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.scipy.special import logsumexp
from numpyro.distributions import biject_to

from ppinfer import checks
from ppinfer._compile import cached_jit, check_data
from ppinfer.algorithms.rescore import constrain, unconstrain
from ppinfer.algorithms.tempered import _rw_moves
from ppinfer.errors import ConfigError, DataError, ModelError
from ppinfer.population import Population, ess
from ppinfer.program import is_sequential
from ppinfer.resample import resample
from ppinfer.result import Result
from ppinfer.traced import assess, generate, latent_sites

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
    ``acceptance_rate: f32[]`` of the moves (0 when not resampled)."""

    log_evidence_increment: jax.Array
    ess: jax.Array
    resampled: jax.Array
    acceptance_rate: jax.Array


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
    """

    num_particles: int = 1000
    num_moves: int = 5
    ess_threshold: float = 0.5
    sufficient_statistics: Callable[..., tuple] | None = None
    combine: Callable | None = None
    version: str = ""

    name = "IBIS"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        checks.check_probability("ess_threshold", self.ess_threshold)
        nm = self.num_moves
        if isinstance(nm, bool) or not isinstance(nm, int | np.integer) or nm < 1:
            raise ConfigError(f"num_moves must be an integer >= 1, got {nm!r}")

    def run(self, key: jax.Array, program: Any, args: tuple) -> Posterior:
        """Draw N particles from the prior, then absorb ``args`` (the first batch)."""
        if is_sequential(program) or not callable(program):
            raise ConfigError("IBIS needs a static program (a callable)")
        batch = _as_batch(args)
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

    def update(self, *batch: Any) -> Posterior:
        """Absorb one more batch (the program's arguments for that batch; with
        ``sufficient_statistics``, that function's arguments) and return the new posterior.

        Raises :class:`~ppinfer.errors.DataError` for NaN or out-of-support data or a batch whose
        shapes differ from the first one's, :class:`~ppinfer.errors.ZeroEvidenceError` when every
        particle gets weight zero."""
        t0 = time.perf_counter()
        check_data(batch)
        cfg, program, state = self.config, self.program, self.ibis
        b = _as_batch(batch)
        _check_batch(b, state, cfg)
        step = int(state.step)
        if cfg.sufficient_statistics is None:
            if step == 0:
                state = state._replace(data=history_data(program, 1).empty(b))
            state = state._replace(data=_grow(state.data, capacity_for(step + 1)))
        elif step == 0:
            state = state._replace(data=statistics_data(program, cfg.sufficient_statistics).empty(b))
        _dry_run(program, cfg, state, b)
        fn = _compiled(cfg, program, "update", _batch_signature(b))
        state, info, samples = fn(state, b)
        log_z = float(logsumexp(state.log_weights))
        checks.raise_if_dead(log_z, f"after batch {step + 1}", cfg.num_particles)
        hist = {
            "ess": self.ess,
            "resampled": self.resampled,
            "log_evidence_history": self.log_evidence_history,
            "acceptance_rate": self.extras.get("acceptance_rate"),
        }
        new = jax.device_get(
            {
                "ess": info.ess,
                "resampled": info.resampled,
                "log_evidence_history": logsumexp(state.log_weights),
                "acceptance_rate": info.acceptance_rate,
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
            extras={"acceptance_rate": hist["acceptance_rate"]},
            program=program,
            config=cfg,
            ibis=state,
        )

    @classmethod
    def from_state(
        cls, program: Any, config: IBIS, state: IBISState, history: dict | None = None
    ) -> Posterior:
        """A posterior from a state and its per-update histories (``ess``, ``resampled``,
        ``log_evidence_history``, ``acceptance_rate``; empty when ``None``)."""
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
            extras={"acceptance_rate": get("acceptance_rate", np.float32)},
            program=program,
            config=config,
            ibis=state,
        )


def init_state(key: jax.Array, program: Callable[..., Any], args: tuple, num_particles: int) -> IBISState:
    """N particles from the prior of ``program(*args)`` (``generate`` with ``fold_in(k_init, i)``;
    ``args`` one batch's program arguments: the prior must not depend on them), log weights ``−log N``,
    ``step = 0`` and no data (``data = None``; the :class:`DataModel` fills it). Pure."""
    k_init, k_next = jax.random.split(key)
    transforms = _transforms(program, args)
    draw = lambda i: generate(jax.random.fold_in(k_init, i), program, args)[0].choices
    x = jax.vmap(draw)(jnp.arange(num_particles))
    flat = jax.vmap(lambda d: ravel_pytree(unconstrain(transforms, d))[0])(x)
    lw = jnp.full((num_particles,), -jnp.log(num_particles), flat.dtype)
    return IBISState(flat, lw, k_next, jnp.zeros((), jnp.int32), None)


def update_state(
    state: IBISState,
    batch: tuple,
    program: Callable[..., Any],
    data_model: DataModel,
    num_moves: int,
    ess_threshold: float,
) -> tuple[IBISState, UpdateInfo]:
    """One IBIS update (module docstring): reweight by ``log p(batch | θ)``, and if
    ``ESS < ess_threshold · N`` resample and move. Pure, jit/vmap-able; ``batch`` is the args tuple
    of one batch (its prior arguments in statistics mode are the new statistics)."""
    n = state.log_weights.shape[0]
    key, k_res, k_move = jax.random.split(state.key, 3)
    step = state.step
    new_data = data_model.absorb(state.data, batch, step)
    prior_args = new_data if data_model.kind == "statistics" else batch
    transforms = _transforms(program, prior_args)
    unravel = _unraveler(program, prior_args, transforms)

    def increment(v):
        x, _ = constrain(transforms, unravel(v))
        return data_model.increment(x, state.data, new_data, batch, step)

    def log_target(v):
        x, log_det = constrain(transforms, unravel(v))
        out = data_model.log_joint(x, new_data, step + 1, batch) + log_det
        return jnp.where(jnp.isnan(out), -jnp.inf, out)

    inc = jax.vmap(increment)(state.particles)
    lw = state.log_weights + jnp.where(jnp.isnan(inc), -jnp.inf, inc)
    ess_t = ess(lw)
    do = (ess_t < ess_threshold * n) | (ess_threshold >= 1.0)

    def resample_move(operand):
        flat, lw = operand
        pop, _ = resample(k_res, Population(flat, lw), "systematic")
        flat, rate = _rw_moves(k_move, pop.particles, log_target, num_moves)
        return flat, pop.log_weights, rate

    def keep(operand):
        return operand[0], operand[1], jnp.zeros((), lw.dtype)

    flat, lw_out, rate = jax.lax.cond(do, resample_move, keep, (state.particles, lw))
    info = UpdateInfo(logsumexp(lw) - logsumexp(state.log_weights), ess_t, do, rate)
    return IBISState(flat, lw_out, key, step + 1, new_data), info


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
        return update_state(state, batch, program, dm, config.num_moves, config.ess_threshold)

    return jax.lax.scan(body, state, batches)


def capacity_for(num_batches: int) -> int:
    """The history buffer's capacity for ``num_batches`` batches: the next power of two, at least
    ``MIN_CAPACITY`` (a function of the step count alone, so a resumed run compiles and computes
    exactly what the original did)."""
    return max(MIN_CAPACITY, 1 << max(int(num_batches) - 1, 0).bit_length())


def constrained_samples(program, particles, args) -> dict:
    """Site name → ``[N, …]``: the latent sites of ``particles: f32[N, d]`` (constrained) and the
    program's ``deterministic`` sites, evaluated on ``args`` (the latest batch, or the statistics)."""
    transforms = _transforms(program, args)
    unravel = _unraveler(program, args, transforms)

    def one(v):
        x, _ = constrain(transforms, unravel(v))
        return {**x, **assess(program, args, x).deterministics}

    return jax.vmap(one)(particles)


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
            state, info = update_state(state, batch, program, dm, config.num_moves, config.ess_threshold)
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


def _transforms(program, args) -> dict:
    sites = latent_sites(program, args)
    discrete = sorted(k for k, d in sites.items() if d.support.is_discrete)
    if discrete:
        raise ModelError(f"IBIS moves continuous sites only; site(s) {discrete} are discrete")
    if not sites:
        raise ModelError("the program makes no random choice (no latent sample site): nothing to infer")
    return {k: biject_to(d.support) for k, d in sites.items()}


def _unraveler(program, args, transforms) -> Callable:
    x = generate(jax.random.PRNGKey(0), program, args)[0].choices
    return ravel_pytree(unconstrain(transforms, x))[1]


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


def _dry_run(program, cfg: IBIS, state: IBISState, batch: tuple) -> None:
    """Run the program once eagerly on this batch (or its statistics) with argument validation, so
    out-of-support data is a DataError naming the site rather than a silent −inf."""
    checks.dry_run(program, _batch_args(cfg, batch), None, "running the program on the new batch")


def _grow(data, capacity: int):
    """The history buffer padded with zeros to ``capacity`` batches (unchanged if already that big)."""
    size = jax.tree.leaves(data)[0].shape[0]
    if size >= capacity:
        return data
    pad = lambda b: jnp.concatenate([b, jnp.zeros((capacity - size, *b.shape[1:]), b.dtype)])
    return jax.tree.map(pad, data)


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, tuple | list) else (x,)
