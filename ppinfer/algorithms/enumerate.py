"""Exact enumeration: the reference semantics in executable form.

A program whose latent choices are finitely many discrete values denotes a finite weighted sum of
executions. :func:`enumerate_runs` visits every execution depth-first by re-running the program with a
prefix of fixed choices (a handler that branches at the first unfixed latent site), so control flow
may depend on earlier choices. Each :class:`Branch` records the probability of reaching it when the
latent choices are *sampled* from the prior and its :func:`~ppinfer.weighted.weight_from_traces`
weight — the very weight the sampling algorithms use — so the branch's mass
``exp(log_prob + log_weight)`` is its unnormalised posterior mass.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from numpyro import handlers
from numpyro.primitives import Messenger

from ppinfer.errors import ConfigError, EnumerationError, ModelError, PPInferError, ZeroEvidenceError
from ppinfer.primitives import STOP_MESSAGE, collect_stops, watch_messages
from ppinfer.program import SequentialProgram, is_sequential
from ppinfer.result import Result
from ppinfer.weighted import choices_of, site_log_prob, weight_from_traces

__all__ = ["Enumerate", "Branch", "enumerate_runs", "unroll", "support_values"]


class Branch(NamedTuple):
    """One complete execution.

    Attributes:
        choices: latent and deterministic site values (numpy arrays), name → value.
        log_prob: log probability of drawing this branch's latent choices when sampling.
        log_weight: the execution's log weight (its log likelihood: observations, factors).
        value: the program's return value.
        stopped: whether the program called :func:`~ppinfer.stop` (for sequential steps).
    """

    choices: dict[str, np.ndarray]
    log_prob: float
    log_weight: float
    value: Any
    stopped: bool = False


@dataclass(frozen=True)
class Enumerate:
    """Exact inference by enumeration (programs with finitely many discrete latent choices).

    Args:
        max_branches: stop with :class:`~ppinfer.errors.EnumerationError` beyond this many executions.
        max_seconds: stop with :class:`~ppinfer.errors.EnumerationError` when the enumeration has
            run this long (``None``: no time limit).

        batched: ``True``: run the executions level by level, each level (every partial
            execution that has fixed the same choices) as one compiled, vmapped batch; a
            sequential program that calls :func:`~ppinfer.stop` runs every step there, a stopped
            particle's later steps dormant (see :func:`unroll`). A program the batch cannot trace
            (Python control flow on a choice, a support that depends on earlier choices) falls
            back to one eager execution per branch; ``False`` forces that path. ``None`` (default): batched
            unless the tree is tiny (at most :data:`EAGER_NODES` executions by the product of the
            supports), where compiling costs more than running each branch eagerly.

    Branches whose weight is already zero before they are complete (a failed condition, an
    impossible observation or choice, a choice of probability zero) are not expanded further.
    The number of partial executions of the next level is known before it runs: more than
    ``max_branches`` is refused then, before running them.
    """

    max_branches: int = 100_000
    max_seconds: float | None = 300.0
    batched: bool | None = None
    name = "Enumerate"

    def __post_init__(self):
        from ppinfer.checks import check_int

        check_int("max_branches", self.max_branches, 1)
        if self.batched is not None and not isinstance(self.batched, bool):
            raise ConfigError(f"batched must be True, False or None (automatic), got {self.batched!r}")
        if self.max_seconds is not None and (
            isinstance(self.max_seconds, bool)
            or not isinstance(self.max_seconds, int | float)
            or not self.max_seconds > 0
        ):
            raise ConfigError(f"max_seconds must be a number > 0 or None, got {self.max_seconds!r}")

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        t0 = time.perf_counter()
        fn = _Unrolled(program) if is_sequential(program) else program
        runs = _enumerate(fn, args, {}, self.max_branches, True, self.max_seconds, self.batched)
        extras: dict[str, Any] = {"executions": runs.executions, "batched": runs.batched}
        if runs.num_branches == 0:  # every branch was pruned: each has weight zero
            raise ZeroEvidenceError(
                "every execution has weight zero (every branch fails a condition or an observation "
                "before it completes): the observations or conditions are impossible"
            )
        if isinstance(runs, _Stacked):
            log_masses = jnp.asarray(runs.log_prob + runs.log_weight)
            if is_sequential(program):
                samples, extras["active"], extras["site_kinds"] = _stacked_trajectories(
                    runs.choices, program.steps_for(args), runs.step_ran
                )
            else:
                samples = {k: jnp.asarray(v) for k, v in runs.choices.items()}
        else:
            branches = runs.branches
            log_masses = jnp.asarray([b.log_prob + b.log_weight for b in branches])
            if is_sequential(program):
                samples, extras["active"], extras["site_kinds"] = _as_trajectories(
                    [b.choices for b in branches], program.steps_for(args)
                )
            else:
                samples = _stack([b.choices for b in branches])
        bad = np.isnan(np.asarray(log_masses)) | (np.asarray(log_masses) == np.inf)
        if bad.any():
            raise ModelError(
                f"{int(bad.sum())} of {bad.size} executions have a NaN or +inf log weight (an infinite "
                "factor, or a NaN log density: a distribution given an invalid parameter): the "
                "measure is not defined"
            )
        log_z = float(logsumexp(log_masses))
        from ppinfer.checks import raise_if_dead

        raise_if_dead(log_z, "(every execution has zero weight)", runs.num_branches)
        return Result(
            samples=samples,
            log_weights=log_masses,
            log_evidence=log_z,
            algorithm=self.name,
            wall_time=time.perf_counter() - t0,
            extras=extras,
        )


def enumerate_runs(
    fn: Callable[..., Any],
    args: tuple = (),
    kwargs: dict | None = None,
    max_branches: int = 100_000,
    prune: bool = False,
    max_seconds: float | None = None,
    batched: bool | None = None,
) -> list[Branch]:
    """Every execution of ``fn(*args, **kwargs)`` with its sampling probability and weight, in
    lexicographic order of the choices' support indices.

    ``prune``: do not expand a partial execution whose mass is already zero (its choices so far
    have probability zero, or its observations/conditions so far weight zero), nor a choice of
    probability zero: every completion has mass zero, so only zero-mass branches are left out.
    ``max_seconds``: raise :class:`EnumerationError` when enumerating takes longer.
    ``batched``: run each level of the execution tree as one compiled vmapped batch (see
    :class:`Enumerate`) when the program can be traced; else one eager execution per branch."""
    runs = _enumerate(fn, args, kwargs or {}, max_branches, prune, max_seconds, batched)
    return runs.branches


class _Eager(NamedTuple):
    branches: list[Branch]
    executions: int
    batched: bool = False

    @property
    def num_branches(self) -> int:
        return len(self.branches)


class _Stacked(NamedTuple):
    """Every execution of a batched enumeration, stacked along a leading axis ``B`` (every one has
    the same sites: a traced program's control flow does not depend on its choices)."""

    choices: dict[str, np.ndarray]
    log_prob: np.ndarray
    log_weight: np.ndarray
    value: Any
    stopped: np.ndarray
    executions: int
    batched: bool = True
    step_ran: np.ndarray | None = None  # bool[B, T] for a sequential program: which steps ran

    @property
    def num_branches(self) -> int:
        return int(self.log_prob.shape[0])

    def _ran(self, site: str, i: int) -> bool:
        """Whether branch ``i`` ran the step of ``site`` (``<t>/<name>``; not a dormant step)."""
        step = site.split("/", 1)[0]
        return self.step_ran is None or not step.isdigit() or bool(self.step_ran[i, int(step)])

    @property
    def branches(self) -> list[Branch]:
        return [
            Branch(
                {k: v[i] for k, v in self.choices.items() if self._ran(k, i)},
                float(self.log_prob[i]),
                float(self.log_weight[i]),
                jax.tree.map(lambda x, i=i: x[i], self.value),
                bool(self.stopped[i]),
            )
            for i in range(self.num_branches)
        ]


EAGER_NODES = 16
"""With ``batched=None``, trees of at most this many executions (an upper bound from the product of
the supports) run eagerly: one compilation costs more than that many eager runs."""


def _enumerate(fn, args, kwargs, max_branches, prune, max_seconds, batched):
    start = time.perf_counter()
    if batched is not False:
        small = 0 if batched else EAGER_NODES
        # A sequential program runs every step in the batch, a stopped particle's later ones dormant.
        traced = _Unrolled(fn.program, dormant=True) if isinstance(fn, _Unrolled) else fn
        try:
            return _enumerate_batched(traced, args, kwargs, max_branches, prune, max_seconds, start, small)
        except PPInferError:
            raise
        except Exception:  # not traceable as one batch: one eager execution per branch
            pass
    return _enumerate_eager(fn, args, kwargs, max_branches, prune, max_seconds, start)


def _enumerate_eager(fn, args, kwargs, max_branches, prune, max_seconds, start) -> _Eager:
    from ppinfer.checks import PROGRAM_ERRORS

    branches: list[Branch] = []
    pending: list[dict] = [{}]
    executions = 0
    while pending:
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            raise EnumerationError(
                f"enumeration exceeded max_seconds={max_seconds} after {len(branches)} executions "
                f"({len(pending)} partial ones still pending): too many branches to enumerate "
                "exactly; use a sampling algorithm (SMC, Importance) or raise max_seconds"
            )
        prefix = pending.pop()
        executions += 1
        try:
            branches.append(_run_branch(fn, args, kwargs, prefix))
        except PROGRAM_ERRORS as e:
            shown = {k: np.asarray(v).tolist() for k, v in prefix.items()}
            raise ModelError(
                f"Enumerate: the program failed on the execution with choices {shown} (and the first "
                f"value of each later one): {type(e).__name__}: {e}"
            ) from e
        except _Branching as b:
            if prune and b.dead:
                continue
            values = [v for v, lp in zip(b.values, b.log_probs, strict=True) if not (prune and lp == -np.inf)]
            if len(branches) + len(pending) + len(values) > max_branches:
                raise EnumerationError(
                    f"more than max_branches={max_branches} executions to enumerate"
                ) from None
            pending.extend({**prefix, b.key: v} for v in reversed(values))
        if len(branches) > max_branches:
            raise EnumerationError(f"more than max_branches={max_branches} executions to enumerate")
    return _Eager(branches, executions)


_CHUNK_SIZES = (256, 1 << 14)  # rows per compiled call (padded up): at most two compilations


class _NotBatchable(Exception):
    pass


class _first_values(Messenger):
    """Records the latent sites in order (name, support, batch shape, masked/scaled) and gives each
    the first value of its support (the structure run of a batched enumeration)."""

    def __init__(self):
        super().__init__()
        self.sites: list[tuple[str, np.ndarray, tuple, bool]] = []

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        d = msg["fn"]
        if not getattr(d, "has_enumerate_support", False):
            support_values(msg["name"], d)  # raises the EnumerationError
        support = np.asarray(_support(msg["name"], d))
        own_mask = msg.get("mask") is not None and not msg.get("ppinfer_stop_mask", False)
        weighted = own_mask or msg.get("scale") is not None
        self.sites.append((msg["name"], support, tuple(d.batch_shape), weighted))
        msg["value"] = jnp.asarray(support[0])


class _given_values(Messenger):
    """Gives each latent site its value from ``values`` (name → value)."""

    def __init__(self, values: dict):
        super().__init__()
        self.values = values

    def process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]


def _full_run(fn, args, kwargs, sites) -> Callable:
    """A jitted function of every latent site's value (name → ``[B, …]``) running ``fn`` once per
    row: per row the log density of every sample site in trace order (``site_lp``), each latent
    site's distribution over its whole support (``support_lp``, ``[K, *batch]``) and support (to
    check that it does not depend on earlier choices), and the completed run's weights, choices,
    value and stop flag.

    The arguments' arrays are inputs of the compiled function, not constants, and it is cached
    (:func:`~ppinfer._compile.cached_jit`) under ``fn``, the static arguments and the sites' supports:
    enumerating the same program again, on new data of the same shapes, does not recompile."""
    from ppinfer._compile import _ById, cached_jit, split_args

    dyn, static_key, rebuild = split_args((args, kwargs))
    supports = tuple((n, sup.shape, str(sup.dtype), sup.tobytes(), w) for n, sup, _, w in sites)

    def one(values, dyn):
        a, kw = rebuild(dyn)
        stops, seen, flags = collect_stops(), watch_messages(STOP_MESSAGE), _step_flags()
        with handlers.trace() as tr, handlers.seed(rng_seed=0), _given_values(values), stops, seen, flags:
            value = fn(*a, **kw)
        samples = [s for s in tr.values() if s["type"] == "sample"]
        zero = jnp.zeros((), jnp.result_type(float))
        return {
            "site_lp": jnp.stack([site_log_prob(s).astype(zero.dtype) for s in samples]),
            "support_lp": {n: tr[n]["fn"].log_prob(jnp.asarray(sup)) for n, sup, _, _ in sites},
            "support": {n: _traced_support(tr[n]["fn"]) for n, _, _, _ in sites},
            "log_prob": sum((site_log_prob(s) for s in samples if _latent(s)), zero),
            "log_weight": weight_from_traces(tr, drawn_from_prior=False)[0],
            "choices": choices_of(tr),
            "value": value,
            "stopped": jnp.asarray(stops.stopped if seen.seen else False),
            "step_ran": dict(flags.ran),  # step t → whether it ran (not dormant), once a stop was seen
        }

    try:
        key = ("enumerate", fn, static_key, supports)
        hash(key)
    except TypeError:  # an unhashable program: compiled for this call only
        key = ("enumerate", _ById(fn), static_key, supports)
    run, _ = cached_jit(key, lambda: jax.vmap(one, in_axes=(0, None)))
    return lambda values: run(values, dyn)


def _run_rows(run, values: dict, rows: int, deadline: Callable[[], None]) -> dict:
    """``run`` over ``rows`` rows of ``values`` in chunks (padded to one of :data:`_CHUNK_SIZES`),
    outputs as NumPy arrays."""
    size = _CHUNK_SIZES[0] if rows <= _CHUNK_SIZES[0] else _CHUNK_SIZES[1]
    outs = []
    for lo in range(0, rows, size):
        deadline()
        idx = np.arange(lo, lo + size)
        idx[idx >= rows] = 0
        out = jax.tree.map(np.asarray, run({k: v[idx] for k, v in values.items()}))
        outs.append(jax.tree.map(lambda x, n=rows - lo: x[:n], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _enumerate_batched(fn, args, kwargs, max_branches, prune, max_seconds, start, small=0) -> _Stacked:
    """Breadth-first enumeration. One eager run finds the latent sites in order (giving each the
    first value of its support); then level ``d`` runs every partial execution that has fixed the
    first ``d`` choices — as rows of one compiled, vmapped run of the whole program, the later
    choices at their first value, which cannot change what comes before them — reads off each
    row's mass so far and the probabilities of choice ``d + 1``, and expands it. Raises
    :class:`_NotBatchable` when the tree has at most ``small`` executions (eager is quicker)."""
    structure = _first_values()
    with handlers.trace() as tr, handlers.seed(rng_seed=0), structure, collect_stops():
        fn(*args, **kwargs)
    sites = structure.sites
    nodes, width = 1, 1
    for _, sup, batch, _ in sites:
        width *= sup.shape[0] ** int(np.prod(batch))
        nodes += width
        if nodes > small:
            break
    if nodes <= small:
        raise _NotBatchable
    order = [n for n, s in tr.items() if s["type"] == "sample"]
    position = [order.index(n) for n, _, _, _ in sites]  # among the sample sites, in trace order
    run = _full_run(fn, args, kwargs, sites)
    pad = {n: sup[0] for n, sup, _, _ in sites}
    fixed: dict[str, np.ndarray] = {}
    rows, executions = 1, 0

    def deadline():
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            raise EnumerationError(
                f"enumeration exceeded max_seconds={max_seconds} after {executions} executions "
                f"(at choice {len(fixed) + 1} of {len(sites)}, {rows} partial executions): too many "
                "branches to enumerate exactly; use a sampling algorithm (SMC, Importance) or raise "
                "max_seconds"
            )

    for depth in range(len(sites) + 1):
        deadline()
        if rows == 0:
            return _Stacked({}, np.zeros(0), np.zeros(0), None, np.zeros(0, bool), executions)
        values = {n: fixed[n] if n in fixed else np.broadcast_to(pad[n], (rows,) + pad[n].shape) for n in pad}
        out = _run_rows(run, values, rows, deadline)
        executions += rows
        for n, sup, _, _ in sites:
            if not (out["support"][n] == sup[None]).all():
                raise _NotBatchable  # a support that depends on earlier choices
        if depth == len(sites):
            break
        name, support, batch, weighted = sites[depth]
        partial = out["site_lp"][:, : position[depth]].sum(1)
        k, size = support.shape[0], int(np.prod(batch))
        if k**size > 1_000_000:
            raise EnumerationError(f"site {name!r} has {k}^{size} joint values: too many to enumerate")
        combos = np.array(list(itertools.product(range(k), repeat=size)), np.int64).reshape(-1, size)
        pos = np.arange(size)
        flat = support.reshape((k, size) + support.shape[1 + len(batch) :])
        choice_values = flat[combos, pos].reshape((len(combos),) + support.shape[1:])
        joint = out["support_lp"][name].reshape(rows, k, size)[:, combos, pos].sum(-1)  # [rows, C]
        keep = np.ones(joint.shape, bool)
        # A dormant site (its particle stopped earlier) has no choice: its first value stands in.
        asleep = ~_ran_rows(out["step_ran"], name, rows)
        keep &= ~asleep[:, None] | (np.arange(len(combos)) == 0)[None, :]
        if prune:
            keep &= (partial > -np.inf)[:, None]
            if not weighted:
                keep &= (joint > -np.inf) | asleep[:, None]
        count = int(keep.sum())
        if count > max_branches:
            raise EnumerationError(
                f"more than max_branches={max_branches} executions to enumerate: choice {depth + 1} "
                f"of {len(sites)} (site {name!r}) alone has {count} partial executions"
            )
        b_idx, c_idx = np.nonzero(keep)  # prefix-major, value-minor: lexicographic order
        fixed = {n: v[b_idx] for n, v in fixed.items()}
        fixed[name] = choice_values[c_idx]
        rows = count
    ran = None
    if isinstance(fn, _Unrolled):
        steps = fn.program.steps_for(args)
        ran = np.stack([_ran_rows(out["step_ran"], f"{t}/", rows) for t in range(steps)], 1)
    return _Stacked(
        out["choices"], out["log_prob"], out["log_weight"], out["value"], out["stopped"], executions,
        step_ran=ran,
    )  # fmt: skip


def _ran_rows(step_ran: dict, site: str, rows: int) -> np.ndarray:
    """``bool[rows]``: whether each row ran the step of ``site`` (``<t>/<name>``: not dormant)."""
    step = site.split("/", 1)[0]
    flag = step_ran.get(int(step), True) if step.isdigit() else True
    return np.broadcast_to(np.asarray(flag, bool).reshape(-1), (rows,))


class _Unrolled:
    """``_Unrolled(program)(*args)`` runs :func:`unroll` ``(program, args)``; equal for the same
    program (and ``dormant``), so the batched enumeration's compiled run is reused across calls."""

    def __init__(self, program: SequentialProgram, dormant: bool = False):
        self.program, self.dormant = program, dormant

    def __call__(self, *args: Any) -> Any:
        return unroll(self.program, args, self.dormant)()

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Unrolled) and other.program is self.program and other.dormant == self.dormant
        )

    def __hash__(self) -> int:
        return hash((_Unrolled, id(self.program), self.dormant))


STEP_MESSAGE = "ppinfer_step_ran"
"""The message :func:`unroll` (with ``dormant=True``) sends before step ``t``: ``args = (t, ran)``,
``ran: bool[]`` whether the particle had not stopped before it."""


def unroll(program: SequentialProgram, args: tuple, dormant: bool = False) -> Callable[[], Any]:
    """A static program running ``init`` then every step (until the particle stops); sites are named
    ``init/<name>`` and ``<t>/<name>``.

    ``dormant=True`` (the batched enumeration, where whether a particle stopped is traced): every
    step runs, and once the particle has stopped the later steps are *dormant*: their sample sites
    are masked out (log density 0), and the state keeps its
    value (:func:`~ppinfer.suspended.keep_finished`, the SMC engine's rule for finished particles).
    Before each step a :data:`STEP_MESSAGE` says whether it ran. A program that never calls
    :func:`~ppinfer.stop` runs exactly as without ``dormant``."""
    num_steps = program.steps_for(args)

    def unrolled():
        stops, seen = collect_stops(), watch_messages(STOP_MESSAGE)
        with handlers.scope(prefix="init", divider="/"), stops, seen:
            state = program.init(*args)
        state = jax.tree.map(jnp.asarray, state)
        done = stops.stopped if seen.seen else None
        for t in range(num_steps):
            if not dormant and seen.seen and bool(stops.stopped):  # traced: not batchable
                break
            if dormant and done is not None:
                _step_ran(t, jnp.logical_not(done))
            stops, seen = collect_stops(), watch_messages(STOP_MESSAGE)
            with handlers.scope(prefix=str(t), divider="/"), stops, seen, _asleep(done if dormant else None):
                new = program.step(state, jnp.asarray(t, jnp.int32), *args)
            if dormant and done is not None:
                new = _keep_one(done, jax.tree.map(jnp.asarray, new), state)
            state = new
            if dormant and seen.seen:
                done = stops.stopped if done is None else jnp.logical_or(done, stops.stopped)
        return state

    return unrolled


def _step_ran(t: int, ran: jax.Array) -> None:
    from numpyro.primitives import apply_stack

    apply_stack({"type": STEP_MESSAGE, "fn": lambda *a: None, "args": (t, ran), "kwargs": {}, "value": None})


def _keep_one(done: jax.Array, new: Any, old: Any) -> Any:
    """:func:`~ppinfer.suspended.keep_finished` for one particle (no particle axis)."""
    from ppinfer.suspended import keep_finished

    add = lambda tree: jax.tree.map(lambda x: jnp.asarray(x)[None], tree)
    return jax.tree.map(lambda x: x[0], keep_finished(jnp.reshape(done, (1,)), add(new), add(old)))


class _asleep(Messenger):
    """Masks every sample site out where ``done`` (a stopped particle's later steps: log density
    0); ``ppinfer_stop_mask`` says the mask is only this one (not the program's own).
    ``done=None``: nothing to do."""

    def __init__(self, done: jax.Array | None):
        super().__init__()
        self.done = done

    def process_message(self, msg):
        if self.done is None or msg["type"] != "sample":
            return
        awake = jnp.logical_not(self.done)
        msg["ppinfer_stop_mask"] = msg.get("mask") is None
        msg["mask"] = awake if msg.get("mask") is None else jnp.logical_and(msg["mask"], awake)


class _step_flags(Messenger):
    """Collects :data:`STEP_MESSAGE` s: ``ran[t]`` for each step that sent one."""

    def __init__(self):
        super().__init__()
        self.ran: dict[int, jax.Array] = {}

    def process_message(self, msg):
        if msg["type"] == STEP_MESSAGE:
            t, ran = msg["args"]
            self.ran[t] = ran


class _Branching(Exception):
    def __init__(self, key, values, log_probs):
        self.key, self.values, self.log_probs = key, values, log_probs
        self.dead = False  # whether the partial execution before this site already has mass zero


class _fix_choices(Messenger):
    """Fixes latent sites from ``prefix``; raises :class:`_Branching` at the first one not in it."""

    def __init__(self, prefix: dict):
        super().__init__()
        self.prefix = prefix

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        key = msg["name"]
        if key in self.prefix:
            msg["value"] = self.prefix[key]
        else:
            values = support_values(msg["name"], msg["fn"])
            weighted = msg.get("mask") is not None or msg.get("scale") is not None
            log_probs = [0.0 if weighted else float(jnp.sum(msg["fn"].log_prob(v))) for v in values]
            raise _Branching(key, values, log_probs)


def _run_branch(fn, args, kwargs, prefix) -> Branch:
    stops = collect_stops()
    p_trace: dict = {}
    try:
        with handlers.trace() as p_trace, handlers.seed(rng_seed=0), _fix_choices(prefix), stops:
            value = fn(*args, **kwargs)
    except _Branching as b:
        b.dead = _partial_mass(p_trace) == -np.inf
        raise
    log_prob = sum((float(site_log_prob(s)) for s in p_trace.values() if _latent(s)), 0.0)
    log_weight = float(weight_from_traces(p_trace, None, drawn_from_prior=False)[0])
    choices = {k: np.asarray(v) for k, v in choices_of(p_trace).items()}
    return Branch(choices, log_prob, log_weight, value, bool(stops.stopped))


def _partial_mass(trace: dict) -> float:
    """log p of the sample sites (latent and observed) run so far: −inf means every completion of
    this partial execution has mass zero (later sites only add their own log densities)."""
    total = 0.0
    for site in trace.values():
        if site["type"] == "sample":
            total += float(site_log_prob(site))
    return total


def _support(name: str, fn) -> Any:
    """``fn.enumerate_support(expand=True)``, or :class:`EnumerationError` where NumPyro cannot
    enumerate it (a discrete site with an event dimension, ``.to_event``)."""
    try:
        return fn.enumerate_support(expand=True)
    except NotImplementedError:
        raise EnumerationError(
            f"site {name!r} has distribution {type(fn).__name__} (event shape {tuple(fn.event_shape)}), "
            "whose support NumPyro cannot enumerate: Enumerate takes discrete sites whose elements "
            "are batch elements (a plate, or no .to_event)"
        ) from None


def _traced_support(fn) -> Any:
    """The support in the batched run: where NumPyro cannot enumerate it there, its parameters
    come from earlier choices (``DiscreteUniform(0, n)``; the eager structure run found it
    enumerable): the program runs eagerly instead (:class:`_NotBatchable`)."""
    try:
        return fn.enumerate_support(expand=True)
    except NotImplementedError:
        raise _NotBatchable from None


def support_values(name: str, fn) -> list:
    """Every value of site ``name``'s distribution ``fn`` (the joint values of its batch elements);
    :class:`EnumerationError` if the support is not finite or too large."""
    if not getattr(fn, "has_enumerate_support", False):
        raise EnumerationError(
            f"site {name!r} has distribution {type(fn).__name__} without finite support: "
            "Enumerate needs every latent choice to be discrete and finite"
        )
    support = np.asarray(_support(name, fn))
    k, batch = support.shape[0], tuple(fn.batch_shape)
    if not batch:
        return [support[i] for i in range(k)]
    size = int(np.prod(batch))
    flat = support.reshape((k, size) + support.shape[1 + len(batch) :])
    if k**size > 1_000_000:
        raise EnumerationError(f"site {name!r} has {k}^{size} joint values: too many to enumerate")
    pos = np.arange(size)
    return [
        flat[np.asarray(combo), pos].reshape(support.shape[1:])
        for combo in itertools.product(range(k), repeat=size)
    ]


def _latent(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"]


def _stack(dicts: list[dict]) -> dict:
    names = [n for n in dicts[0] if all(n in d for d in dicts)]
    return {n: jnp.asarray(np.stack([d[n] for d in dicts])) for n in names}


def _stacked_trajectories(
    choices: dict, num_steps: int, ran: np.ndarray | None = None
) -> tuple[dict, jax.Array, dict]:
    """:func:`_as_trajectories` for stacked choices of a batched enumeration: every branch ran
    every step, a stopped particle's later steps dormant (``ran: bool[B, T]`` false there); as in
    the eager path those steps are zero-filled and marked inactive."""
    from ppinfer.algorithms.smc import sample_names

    rows = next(iter(choices.values())).shape[0] if choices else 0
    ran = np.ones((rows, num_steps), bool) if ran is None else ran
    init = {k[5:]: jnp.asarray(v) for k, v in choices.items() if k.startswith("init/")}
    names = {k.split("/", 1)[1] for k in choices if not k.startswith("init/")}

    def trajectory(n):
        values = np.stack([choices[f"{t}/{n}"] for t in range(num_steps)], 1)
        asleep = ~ran.reshape(ran.shape + (1,) * (values.ndim - 2))
        return jnp.asarray(np.where(asleep, np.zeros_like(values), values))

    steps = {n: trajectory(n) for n in names}
    samples, kinds = sample_names(init, steps)
    return samples, jnp.asarray(ran), kinds


def _as_trajectories(choices: list[dict], num_steps: int) -> tuple[dict, jax.Array, dict]:
    """Per-branch ``init/x`` and ``<t>/x`` values → samples named as
    :func:`ppinfer.algorithms.smc.sample_names`, step sites as trajectories ``[B, T, …]``; steps a
    branch did not reach (its particle stopped) are zero-filled and marked inactive."""
    from ppinfer.algorithms.smc import sample_names

    like: dict[str, np.ndarray] = {}
    for c in choices:
        for k, v in c.items():
            if not k.startswith("init/"):
                like.setdefault(k.split("/", 1)[1], v)
    init = _stack([{k[5:]: v for k, v in c.items() if k.startswith("init/")} for c in choices])
    steps = {
        name: jnp.asarray(
            np.stack(
                [
                    np.stack([c.get(f"{t}/{name}", np.zeros_like(ref)) for t in range(num_steps)])
                    for c in choices
                ]
            )
        )
        for name, ref in like.items()
    }
    active = np.array([[any(k.startswith(f"{t}/") for k in c) for t in range(num_steps)] for c in choices])
    samples, kinds = sample_names(init, steps)
    return samples, jnp.asarray(active), kinds
