"""A small, self-contained reference interpreter of ppinfer's primitives.

:func:`interpret` computes the exact unnormalised measure of a program whose latent choices are
finitely many discrete values. It is written against the primitives' *messages* only (NumPyro's
``sample``/``deterministic`` messages and ppinfer's stop message) and shares no code with the
enumerator (:mod:`ppinfer.algorithms.enumerate`), the weighting code (:mod:`ppinfer.weighted`) or the
samplers, so comparing them with it is a real check.

Meaning of a program (the measure over choice maps):

- ``sample(name, d)`` without ``obs`` is a **latent** choice: every value ``x`` in ``d``'s finite
  support is taken, with probability ``d.prob(x)``; the value is recorded in the choice map. A site with
  a batch shape takes every joint value of its batch elements (the product of their supports).
- ``sample(name, d, obs=y)`` / ``observe`` multiplies the weight by ``d.prob(y)``; ``factor`` (a
  ``Unit`` site) by ``exp(log_factor)``; ``condition`` by 1 or 0.
- ``deterministic(name, v)`` records ``v`` in the choice map.
- A log density is that of NumPyro: ``d.log_prob(value)`` element-wise, zero where a message's
  ``mask`` is false (the ``mask`` handler masks the distribution itself), times the message's
  ``scale`` (the ``scale`` handler), then summed.
- An outcome's mass is ``Π_latent p(x) · Π_observed p(y)``. With a proposal ``q`` (called with the
  program's arguments), the latent sites ``q`` samples are taken over ``q``'s support with ``q``'s
  probabilities and weighted by ``p(x)/q(x)``; ``q``'s observations are ignored.
- A sequential program runs ``init`` then ``step`` for ``t = 0, 1, …`` and ends after a step (or
  ``init``) that called ``stop(when)`` with a true ``when``; its sites are named ``init/<name>`` and
  ``<t>/<name>``.

Enumeration is by re-execution, depth first: an execution replays a path (the values of the first
latent sites, in execution order) and takes the first possible value at every further latent site,
recording the other values there as paths still to run; each complete path is executed once. Values
of probability zero are never taken, and an execution whose weight becomes zero (``-inf`` in log
space, e.g. a false ``condition``) is abandoned at once: it and every path extending it have mass 0.
Everything runs eagerly in float64; log probabilities are accumulated in Python floats.

Not supported: continuous latent sites (:class:`~ppinfer.errors.EnumerationError`), sites whose value
a handler inside the program already set while leaving them latent (``substitute``), plate
subsampling (it needs a random key), and primitives called under ``jit``/``vmap``/``scan`` inside the
program (their values would be tracers).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.primitives import Messenger

from ppinfer.errors import EnumerationError
from ppinfer.primitives import STOP_MESSAGE
from ppinfer.program import SequentialProgram, is_sequential
from semantics.measure import Measure, outcome_key

__all__ = ["interpret", "MAX_PATHS"]

MAX_PATHS = 10**6


def interpret(
    program: Any,
    args: tuple = (),
    proposal: Callable[..., Any] | None = None,
    init_proposal: Callable[..., Any] | None = None,
    max_paths: int = MAX_PATHS,
) -> Measure:
    """The exact unnormalised measure of ``program(*args)`` over its choice maps (see the module
    docstring), keyed by :func:`~semantics.measure.outcome_key`; outcomes of mass zero are left out.

    Args:
        program: a static program (a callable) or a :class:`~ppinfer.SequentialProgram`.
        args: the program's arguments.
        proposal: for a static program, ``proposal(*args)``; for a sequential one, the step proposal
            ``proposal(state, t, *args)`` (as SMC takes it).
        init_proposal: for a sequential program, ``init_proposal(*args)``.
        max_paths: raise :class:`~ppinfer.errors.EnumerationError` rather than execute the program
            more than this many times.
    """
    items: list[tuple[tuple, float]] = []
    pending: list[tuple[_Choice, ...]] = [()]
    executions = 0
    with jax.enable_x64(True):
        while pending:
            path = pending.pop()
            executions += 1
            run = _Execution(path, max_paths)
            try:
                run.execute(program, args, proposal, init_proposal)
                alive = True
            except _ZeroMass:
                alive = False
            new = sum(len(alternatives) for _, alternatives in run.branch_points)
            if executions + len(pending) + new > max_paths:
                raise EnumerationError(
                    f"more than max_paths={max_paths} executions needed to enumerate the program"
                )
            for position, alternatives in run.branch_points:
                stem = tuple(run.taken[:position])
                pending.extend(stem + (choice,) for choice in reversed(alternatives))
            if alive:
                items.append((outcome_key(run.choices), math.exp(run.log_prob + run.log_weight)))
    return Measure(items)


class _Choice(NamedTuple):
    """A latent value taken on a path: the site (tagged ``p`` or ``q``), the value and its log
    probability (under the distribution it was enumerated from)."""

    site: tuple[str, str]
    value: np.ndarray
    log_prob: float


class _ZeroMass(Exception):
    """Raised inside an execution whose mass is certainly zero (its weight became ``-inf``, or a
    latent site has no value of positive probability)."""


class _Execution(Messenger):
    """One execution of a path: handles the primitives' messages."""

    def __init__(self, path: tuple[_Choice, ...], max_paths: int):
        super().__init__()
        self.path, self.max_paths = path, max_paths
        self.taken: list[_Choice] = []  # the latent values of this execution, in order
        self.branch_points: list[tuple[int, list[_Choice]]] = []  # (position, other values)
        self.log_prob = 0.0  # Σ log probability of the latent values taken
        self.log_weight = 0.0  # Σ observations, factors, and log p/q of proposed values
        self.choices: dict[str, np.ndarray] = {}
        self.stopped = False
        self.scope = ""
        self.tag = "p"
        self.proposed: dict[str, tuple[np.ndarray, float]] = {}
        self.names: set[str] = set()  # the program's sites in this execution
        self.q_names: set[str] = set()  # the current proposal call's sites

    # -- running -------------------------------------------------------------------------------

    def execute(self, program, args, proposal, init_proposal) -> None:
        if not is_sequential(program):
            self._call(program, args, proposal)
            return
        seq: SequentialProgram = program
        self.scope = "init"
        state = self._call(seq.init, args, init_proposal)
        state = jax.tree.map(jnp.asarray, state)
        for t in range(seq.steps_for(args)):
            if self.stopped:
                break
            self.scope = str(t)
            step_args = (state, jnp.asarray(t, jnp.int32), *args)
            state = self._call(seq.step, step_args, proposal)

    def _call(self, fn, fn_args, proposal):
        self.proposed = {}
        if proposal is not None:
            self.tag, self.q_names = "q", set()
            with self:
                proposal(*fn_args)
        self.tag = "p"
        with self:
            value = fn(*fn_args)
        if self.proposed:
            raise ValueError(
                f"the proposal samples site(s) {sorted(self.proposed)} that the program does not "
                "sample in this execution"
            )
        return value

    # -- messages ------------------------------------------------------------------------------

    def process_message(self, msg):
        kind = msg["type"]
        if kind == STOP_MESSAGE:
            if self.tag == "p":
                self.stopped = self.stopped or bool(np.any(np.asarray(msg["args"][0])))
        elif kind == "deterministic":
            if self.tag == "p":
                self.choices[self._name(msg)] = np.asarray(msg["value"])
        elif kind == "sample":
            if msg["is_observed"]:
                self._observed(msg)
            else:
                self._latent(msg)

    def _name(self, msg) -> str:
        name = f"{self.scope}/{msg['name']}" if self.scope else msg["name"]
        names = self.q_names if self.tag == "q" else self.names
        if name in names:
            raise ValueError(f"site {name!r} appears twice in one execution")
        names.add(name)
        return name

    def _observed(self, msg) -> None:
        name = self._name(msg)
        if self.tag == "q":
            return  # a proposal's observations are not part of the weight
        if name in self.proposed:
            raise ValueError(f"the proposal samples site {name!r}, which the program observes")
        self._add_weight(float(np.sum(_log_density(msg, msg["value"]))))

    def _latent(self, msg) -> None:
        name = self._name(msg)
        if msg["value"] is not None:
            raise EnumerationError(
                f"latent site {name!r} already has a value (set by a handler inside the program): "
                "not supported by the reference interpreter"
            )
        if self.tag == "p" and name in self.proposed:
            value, log_q = self.proposed.pop(name)
            log_p = float(np.sum(_log_density(msg, value)))
            msg["value"] = jnp.asarray(value)
            self.choices[name] = value
            self._add_weight(log_p - log_q)
            return
        choice = self._choose((self.tag, name), msg)
        msg["value"] = jnp.asarray(choice.value)
        self.log_prob += choice.log_prob
        if self.tag == "q":
            self.proposed[name] = (choice.value, choice.log_prob)
        else:
            self.choices[name] = choice.value

    def _choose(self, site, msg) -> _Choice:
        position = len(self.taken)
        if position < len(self.path):
            choice = self.path[position]
            if choice.site != site:
                raise RuntimeError(
                    f"the program is not deterministic given its choices: site {site[1]!r} where "
                    f"an earlier execution had {choice.site[1]!r}"
                )
        else:
            values = _support(site, msg, self.max_paths)
            if not values:
                raise _ZeroMass
            choice = values[0]
            if len(values) > 1:
                self.branch_points.append((position, values[1:]))
        self.taken.append(choice)
        return choice

    def _add_weight(self, log_w: float) -> None:
        self.log_weight += log_w
        if self.log_weight == -math.inf:
            raise _ZeroMass


def _distribution(msg):
    fn = msg["fn"]
    sample_shape = tuple(msg["kwargs"].get("sample_shape", ()) or ())
    return fn.expand(sample_shape + tuple(fn.batch_shape)) if sample_shape else fn


def _log_density(msg, value) -> np.ndarray:
    """Element-wise log density of ``value`` at the site of ``msg``, masked and scaled (float64)."""
    lp = np.asarray(_distribution(msg).log_prob(jnp.asarray(value)), np.float64)
    mask = msg.get("mask")
    if mask is not None:
        lp = np.where(np.asarray(mask, bool), lp, 0.0)
    scale = msg.get("scale")
    if scale is not None:
        lp = np.asarray(scale, np.float64) * lp
    return lp


def _support(site: tuple[str, str], msg, max_paths: int) -> list[_Choice]:
    """Every value of positive probability of the latent ``site``, with its log probability; a
    batched site's values are the joint values of its elements."""
    name = site[1]
    fn = _distribution(msg)
    if not getattr(fn, "has_enumerate_support", False):
        raise EnumerationError(
            f"latent site {name!r} has distribution {type(fn).__name__}, whose support is not "
            "finite: the reference interpreter enumerates discrete finite choices only"
        )
    support = np.asarray(fn.enumerate_support(expand=True))  # [k, *batch, *event]
    k = support.shape[0]
    table = _log_density(msg, support)  # [k, *batch]
    table = np.broadcast_to(table, (k, *fn.batch_shape))
    size = math.prod(fn.batch_shape)
    table = table.reshape(k, size)
    values = support.reshape(k, size, *support.shape[1 + len(fn.batch_shape) :])
    possible = [[i for i in range(k) if table[i, j] != -math.inf] for j in range(size)]
    count = math.prod(len(p) for p in possible)
    if count > max_paths:
        raise EnumerationError(
            f"latent site {name!r} has {count} joint values: more than max_paths={max_paths}"
        )
    shape = support.shape[1:]
    cols = np.arange(size)
    out = []
    for combo in itertools.product(*possible):
        rows = np.asarray(combo, int)
        value = values[rows, cols].reshape(shape)
        out.append(_Choice(site, value, math.fsum(table[rows, cols].tolist())))
    return out
