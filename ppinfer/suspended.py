"""Sequential: a population of a sequential program suspended between two steps.

Meaning: the measure of the rest of the program, started from each particle's state and weighted by
its log weight. Blocks:

- :func:`start` runs ``init`` for N particles (a spawn followed by one weighted run each).
- :func:`advance` runs one ``step`` for every live particle, adding the step's *incremental* log
  weight ``log p/q`` (observations and factors of the step, plus ``log p − log q`` of the choices a
  proposal made) to ``log_weights``. Stopped particles keep their state and weight.
- :func:`finish` advances until every step has run.

All three are valid (``E[⟦advance(s)⟧] = ⟦s⟧``): each run is a :func:`ppinfer.weighted.simulate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer.errors import ModelError
from ppinfer.population import Population
from ppinfer.primitives import STOP_MESSAGE, watch_messages
from ppinfer.program import SequentialProgram
from ppinfer.weighted import simulate

__all__ = [
    "Particle",
    "Sequential",
    "StepInfo",
    "start",
    "advance",
    "finish",
    "match_state",
    "keep_finished",
    "register_keep",
    "can_stop",
]

# type → rule(done, new, old) for state nodes that restore a finished particle's state more cheaply
# than an element-wise select over every leaf (see :func:`register_keep`).
_KEEP_RULES: dict[type, Callable[[jax.Array, Any, Any], Any]] = {}


def register_keep(node_type: type, rule: Callable[[jax.Array, Any, Any], Any]) -> None:
    """Register how a state node of ``node_type`` keeps a finished particle's value:
    ``rule(done: bool[N], new, old)`` must return a node *equivalent* to ``old`` for particles with
    ``done`` and equal to ``new`` for the others — equivalent meaning that every later use of the
    node gives the same results. A KV cache, for instance, only restores its ``length``: the slot
    the finished particle's step wrote lies beyond that length, is masked out of attention and is
    overwritten by the next write, so the large key/value arrays are updated in place instead of
    being copied and selected each step."""
    _KEEP_RULES[node_type] = rule


def keep_finished(done: jax.Array, new: Any, old: Any) -> Any:
    """The next state pytree: ``old`` for particles with ``done: bool[N]``, ``new`` otherwise
    (leading particle axis N on every leaf), using a :func:`register_keep` rule where one exists."""

    def merge(n, o):
        rule = _KEEP_RULES.get(type(n))
        if rule is not None:
            return rule(done, n, o)
        return jnp.where(_expand(done, n), o, n)

    return jax.tree.map(merge, new, old, is_leaf=lambda x: type(x) in _KEEP_RULES)


class Particle(NamedTuple):
    """The per-particle state the engine carries: the program's ``state`` pytree and ``done``."""

    state: Any
    done: jax.Array


class Sequential(NamedTuple):
    """A suspended population: ``population.particles`` is a :class:`Particle` with leading axis N;
    ``t: i32[]`` is the number of steps taken so far."""

    population: Population
    t: jax.Array


class StepInfo(NamedTuple):
    """What one step produced, per particle (leading axis N, before any resampling).

    Attributes:
        choices: latent and deterministic site values of the step, name → ``[N, …]``.
        log_increments: ``f32[N]`` incremental log weights (0 for particles already stopped).
        nan_sites: site name → ``bool[]``, whether any particle's log density there was NaN.
        log_prob_draws: ``f32[N]`` the log probability of each particle's latent draws under the
            distributions they came from (the law of injected ``values``; see
            :func:`~ppinfer.weighted.simulate`).
    """

    choices: dict[str, jax.Array]
    log_increments: jax.Array
    nan_sites: dict[str, jax.Array]
    log_prob_draws: jax.Array | None = None


def start(
    key: jax.Array,
    program: SequentialProgram,
    args: tuple,
    num_particles: int,
    proposal: Callable[..., Any] | None = None,
    values: dict[str, jax.Array] | None = None,
    pinned: tuple[dict[str, jax.Array], jax.Array] | None = None,
) -> tuple[Sequential, StepInfo]:
    """Run ``init`` for ``num_particles`` particles; each weight is ``−log N + log p/q``. ``values``
    (site → ``[N, …]``) injects the latent draws (:func:`~ppinfer.weighted.simulate`);
    ``pinned = (values, on)`` gives particle 0 ONE particle's latent values where ``on: bool[]``
    holds (conditional SMC's reference)."""

    def one(i, v):
        pin = None if pinned is None else (pinned[0], pinned[1] & (i == 0))
        return simulate(key, program.init, args, proposal=proposal, particle=i, values=v, pinned=pin)

    weighted, info = jax.vmap(one)(jnp.arange(num_particles), values)
    state = jax.tree.map(jnp.asarray, weighted.value)
    done = info.stopped
    log_weights = weighted.log_weight - jnp.log(num_particles)
    pop = Population(Particle(state, done), log_weights)
    step_info = StepInfo(weighted.choices, weighted.log_weight, _any(info.nan_sites), info.log_prob_draws)
    return Sequential(pop, jnp.zeros((), jnp.int32)), step_info


def advance(
    key: jax.Array,
    seq: Sequential,
    program: SequentialProgram,
    args: tuple,
    proposal: Callable[..., Any] | None = None,
    may_stop: bool = True,
    values: dict[str, jax.Array] | None = None,
    pinned: tuple[dict[str, jax.Array], jax.Array] | None = None,
    reduce_nan: bool = True,
) -> tuple[Sequential, StepInfo]:
    """Run step ``seq.t`` for every particle (vmapped); see the module docstring. With
    ``may_stop=False`` — a promise that no particle has stopped or will (:func:`can_stop` is false)
    — the finished-particle masks are skipped: every particle takes its new state and increment.
    ``values`` (site → ``[N, …]``) injects the latent draws (:func:`~ppinfer.weighted.simulate`);
    ``pinned`` as in :func:`start`. With ``reduce_nan=False`` the returned ``nan_sites`` are per
    particle (``bool[N]``, false for a finished particle) for the caller to reduce."""
    particles: Particle = seq.population.particles
    n = seq.population.num_particles
    t = seq.t

    def one(i, state, v):
        step = lambda s: program.step(s, t, *args)
        prop = None if proposal is None else (lambda s: proposal(s, t, *args))
        pin = None if pinned is None else (pinned[0], pinned[1] & (i == 0))
        return simulate(key, step, (state,), proposal=prop, particle=i, values=v, pinned=pin)

    weighted, info = jax.vmap(one)(jnp.arange(n), particles.state, values)
    new_state = match_state(weighted.value, particles.state)
    done = particles.done
    state, increments, live, choices = new_state, weighted.log_weight, None, weighted.choices
    if may_stop:  # finished particles keep their state and weight; their flags are ignored
        state = keep_finished(done, new_state, particles.state)
        increments = jnp.where(done, 0.0, weighted.log_weight)
        # A step a particle did not run has no choices: zeros (as Enumerate records), not the
        # draws it made and discarded, which Result.mean would average in.
        choices = {k: jnp.where(_expand(done, c), jnp.zeros((), c.dtype), c) for k, c in choices.items()}
        live, done = ~done, done | info.stopped
    nan_sites = {name: flag if live is None else flag & live for name, flag in info.nan_sites.items()}
    if reduce_nan:
        nan_sites = _any(nan_sites)
    pop = Population(Particle(state, done), seq.population.log_weights + increments)
    step_info = StepInfo(choices, increments, nan_sites, info.log_prob_draws)
    return Sequential(pop, t + 1), step_info


def can_stop(
    program: SequentialProgram,
    args: tuple,
    proposal: Callable[..., Any] | None = None,
    init_proposal: Callable[..., Any] | None = None,
) -> bool:
    """Whether ``init`` or ``step`` can call :func:`~ppinfer.primitives.stop` — found by tracing one
    particle's init and step abstractly (``jax.eval_shape``, nothing is computed) and watching for a
    stop message. A program that never stops lets the engine drop its finished-particle masks (and
    the finished-population exit test): without them the step's draws feed the weight, the state
    and the records from one buffer, where the masks made XLA recompute a cheap sampler in each."""
    watch = watch_messages(STOP_MESSAGE)
    args = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, args)

    def trace_one():
        key = jax.random.PRNGKey(0)
        with watch:
            init, _ = simulate(key, program.init, args, proposal=init_proposal)
            state = jax.tree.map(jnp.asarray, init.value)
            t = jnp.zeros((), jnp.int32)
            step = lambda s: program.step(s, t, *args)
            prop = None if proposal is None else (lambda s: proposal(s, t, *args))
            simulate(key, step, (state,), proposal=prop)
        return jnp.zeros(())

    jax.eval_shape(trace_one)
    return watch.seen


def finish(
    key: jax.Array,
    seq: Sequential,
    program: SequentialProgram,
    args: tuple,
    num_steps: int,
    proposal: Callable[..., Any] | None = None,
) -> Sequential:
    """Advance ``seq`` until ``num_steps`` steps have run (a ``lax.fori_loop``)."""

    def body(i, s):
        return advance(jax.random.fold_in(key, i), s, program, args, proposal)[0]

    return jax.lax.fori_loop(seq.t, num_steps, body, seq)


def match_state(new: Any, old: Any) -> Any:
    """Check that ``step`` returned a state shaped like ``init``'s and cast it to the carried dtypes
    (so weakly typed Python scalars in ``init`` do not break the scan carry)."""
    new_leaves, new_def = jax.tree.flatten(new)
    old_leaves, old_def = jax.tree.flatten(old)
    if new_def != old_def:
        raise ModelError(f"step returned a state with structure {new_def}, but init returned {old_def}")
    for a, b in zip(new_leaves, old_leaves, strict=True):
        if jnp.shape(a) != jnp.shape(b):
            raise ModelError(
                f"step returned a state leaf of shape {jnp.shape(a)[1:]}, "
                f"but init returned shape {jnp.shape(b)[1:]}"
            )
    return jax.tree.unflatten(
        old_def,
        [jnp.asarray(a).astype(b.dtype) for a, b in zip(new_leaves, old_leaves, strict=True)],
    )


def _expand(mask: jax.Array, like: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (jnp.ndim(like) - 1))


def _any(flags: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: jnp.any(flag) for name, flag in flags.items()}
