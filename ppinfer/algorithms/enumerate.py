"""Exact enumeration: the reference semantics in executable form.

A program whose latent choices are finitely many discrete values denotes a finite weighted sum of
executions. :func:`enumerate_runs` visits every execution depth-first by re-running the program with a
prefix of fixed choices (a handler that branches at the first unfixed latent site), so control flow
may depend on earlier choices. Each :class:`Branch` records the probability of reaching it when the
latent choices are *sampled* (from the proposal where it makes them, else from the prior) and its
:func:`~ppinfer.weighted.weight_from_traces` weight — the very weight the sampling algorithms use —
so the branch's mass ``exp(log_prob + log_weight)`` is its unnormalised posterior mass.
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

from ppinfer.errors import ConfigError, EnumerationError, ZeroEvidenceError
from ppinfer.primitives import collect_stops
from ppinfer.program import SequentialProgram, is_sequential
from ppinfer.result import Result
from ppinfer.weighted import choices_of, site_log_prob, weight_from_traces

__all__ = ["Enumerate", "Branch", "enumerate_runs", "unroll", "support_values"]


class Branch(NamedTuple):
    """One complete execution.

    Attributes:
        choices: latent and deterministic site values (numpy arrays), name → value.
        log_prob: log probability of drawing this branch's latent choices when sampling.
        log_weight: the execution's log weight (log p/q of proposed choices + log likelihood).
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

    Branches whose weight is already zero before they are complete (a failed condition, an
    impossible observation or choice) are not expanded further.
    """

    max_branches: int = 100_000
    max_seconds: float | None = 300.0
    name = "Enumerate"

    def __post_init__(self):
        from ppinfer.checks import check_int

        check_int("max_branches", self.max_branches, 1)
        if self.max_seconds is not None and (
            isinstance(self.max_seconds, bool)
            or not isinstance(self.max_seconds, int | float)
            or not self.max_seconds > 0
        ):
            raise ConfigError(f"max_seconds must be a number > 0 or None, got {self.max_seconds!r}")

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        t0 = time.perf_counter()
        fn, fn_args = (unroll(program, args), ()) if is_sequential(program) else (program, args)
        branches = enumerate_runs(
            fn, fn_args, max_branches=self.max_branches, prune=True, max_seconds=self.max_seconds
        )
        if not branches:  # every branch was pruned: each has weight zero
            raise ZeroEvidenceError(
                "every execution has weight zero (every branch fails a condition or an observation "
                "before it completes): the observations or conditions are impossible"
            )
        log_masses = jnp.asarray([b.log_prob + b.log_weight for b in branches])
        extras = {}
        if is_sequential(program):
            samples, extras["active"], extras["site_kinds"] = _as_trajectories(
                [b.choices for b in branches], program.steps_for(args)
            )
        else:
            samples = _stack([b.choices for b in branches])
        log_z = float(logsumexp(log_masses))
        from ppinfer.checks import raise_if_dead

        raise_if_dead(log_z, "(every execution has zero weight)", len(branches))
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
    proposal: Callable[..., Any] | None = None,
    max_branches: int = 100_000,
    prune: bool = False,
    max_seconds: float | None = None,
) -> list[Branch]:
    """Every execution of ``fn(*args, **kwargs)`` with its sampling probability and weight; latent
    choices made by ``proposal`` (same arguments) are drawn from it. Eager (not jitted).

    ``prune``: do not expand a partial execution whose mass is already zero (its choices so far
    have probability zero, or its observations/conditions so far weight zero): every completion
    has mass zero, so only zero-mass branches are left out. ``max_seconds``: raise
    :class:`EnumerationError` when enumerating takes longer."""
    kwargs = kwargs or {}
    branches: list[Branch] = []
    pending: list[dict] = [{}]
    start = time.perf_counter()
    while pending:
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            raise EnumerationError(
                f"enumeration exceeded max_seconds={max_seconds} after {len(branches)} executions "
                f"({len(pending)} partial ones still pending): too many branches to enumerate "
                "exactly; use a sampling algorithm (SMC, Importance) or raise max_seconds"
            )
        prefix = pending.pop()
        try:
            branches.append(_run_branch(fn, args, kwargs, proposal, prefix))
        except _Branching as b:
            if prune and b.dead:
                continue
            if len(branches) + len(pending) + len(b.values) > max_branches:
                raise EnumerationError(
                    f"more than max_branches={max_branches} executions to enumerate"
                ) from None
            pending.extend({**prefix, b.key: v} for v in reversed(b.values))
        if len(branches) > max_branches:
            raise EnumerationError(f"more than max_branches={max_branches} executions to enumerate")
    return branches


def unroll(program: SequentialProgram, args: tuple) -> Callable[[], Any]:
    """A static program running ``init`` then every step (until the particle stops); sites are named
    ``init/<name>`` and ``<t>/<name>``."""
    num_steps = program.steps_for(args)

    def unrolled():
        stops = collect_stops()
        with handlers.scope(prefix="init", divider="/"), stops:
            state = program.init(*args)
        state = jax.tree.map(jnp.asarray, state)
        for t in range(num_steps):
            if bool(stops.stopped):
                break
            stops = collect_stops()
            with handlers.scope(prefix=str(t), divider="/"), stops:
                state = program.step(state, jnp.asarray(t, jnp.int32), *args)
        return state

    return unrolled


class _Branching(Exception):
    def __init__(self, key, values):
        self.key, self.values = key, values
        self.dead = False  # whether the partial execution before this site already has mass zero


class _fix_choices(Messenger):
    """Fixes latent sites from ``prefix``; raises :class:`_Branching` at the first one not in it."""

    def __init__(self, prefix: dict, tag: str, skip: frozenset = frozenset()):
        super().__init__()
        self.prefix, self.tag, self.skip = prefix, tag, skip

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"] or msg["name"] in self.skip:
            return
        key = (self.tag, msg["name"])
        if key in self.prefix:
            msg["value"] = self.prefix[key]
        else:
            raise _Branching(key, support_values(msg["name"], msg["fn"]))


def _run_branch(fn, args, kwargs, proposal, prefix) -> Branch:
    q_trace, q_values = None, {}
    log_prob = 0.0
    if proposal is not None:
        with handlers.trace() as q_trace, handlers.seed(rng_seed=0), _fix_choices(prefix, "q"):
            proposal(*args, **kwargs)
        q_values = {n: s["value"] for n, s in q_trace.items() if _latent(s)}
        log_prob += sum(float(site_log_prob(s)) for s in q_trace.values() if _latent(s))
    stops = collect_stops()
    p_trace: dict = {}
    try:
        with (
            handlers.trace() as p_trace,
            handlers.seed(rng_seed=0),
            handlers.substitute(data=q_values),
            _fix_choices(prefix, "p", frozenset(q_values)),
            stops,
        ):
            value = fn(*args, **kwargs)
    except _Branching as b:
        b.dead = _partial_mass(p_trace) == -np.inf
        raise
    log_prob += sum(float(site_log_prob(s)) for n, s in p_trace.items() if _latent(s) and n not in q_values)
    log_weight = float(weight_from_traces(p_trace, q_trace)[0])
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


def support_values(name: str, fn) -> list:
    """Every value of site ``name``'s distribution ``fn`` (the joint values of its batch elements);
    :class:`EnumerationError` if the support is not finite or too large."""
    if not getattr(fn, "has_enumerate_support", False):
        raise EnumerationError(
            f"site {name!r} has distribution {type(fn).__name__} without finite support: "
            "Enumerate needs every latent choice to be discrete and finite"
        )
    support = np.asarray(fn.enumerate_support(expand=True))
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
