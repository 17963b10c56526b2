"""Exact validity check of Steer's without-replacement selection (Fearnhead–Clifford resampling).

:func:`ppinfer.algorithms.steer.select_from_uniforms` is a deterministic map from uniforms to
``(indices, new_log_weights)``, piecewise constant in each uniform. :func:`select_outcomes` finds
its cells from its outputs alone (:func:`semantics.check.selection_outcomes`) and so gives the exact
distribution of the output; :func:`check_select` compares the expected output measure with the
input measure.

:func:`steer_replicates` runs many independent Steer runs (the real compiled core, vmapped) for the
statistical checks of the whole algorithm (``E[Ẑ] = Z`` with :func:`semantics.check_unbiased_evidence`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer.algorithms.steer import select_from_uniforms, steer_run
from ppinfer.program import SequentialProgram
from semantics.check import selection_outcomes
from semantics.measure import Measure

__all__ = ["select_outcomes", "check_select", "steer_replicates"]

_REPLICATE_OUTPUTS = ("log_evidence", "log_weights", "trajectories", "active")

SelectFn = Callable[[str, jax.Array, jax.Array, int], tuple[jax.Array, jax.Array, jax.Array]]


def select_outcomes(
    scheme: str, log_weights: Any, n: int, select_fn: SelectFn = select_from_uniforms
) -> list[tuple[float, tuple[int, ...], tuple[float, ...]]]:
    """The exact distribution of ``select_fn(scheme, U, log_weights, n)`` over ``U ~ Uniform``: a list
    of ``(probability, indices, new_log_weights)``, from the function's own outputs
    (:func:`semantics.check.selection_outcomes`)."""
    return selection_outcomes(_AsSelection(select_fn, scheme), log_weights, n)


def check_select(scheme: str, log_weights: Any, n: int, select_fn: SelectFn = select_from_uniforms) -> float:
    """Exact check of ``E[⟦select(pop)⟧] = ⟦pop⟧`` for a population whose particles are their own
    indices: the max abs difference between the expected output measure and the input measure."""
    lw = np.asarray(log_weights, np.float64)
    before = Measure.from_log(enumerate(lw))
    after = Measure(
        (i, p * math.exp(w))
        for p, idx, nw in select_outcomes(scheme, lw, n, select_fn)
        for i, w in zip(idx, nw, strict=True)
    )
    return before.max_abs_diff(after)


def steer_replicates(
    program: SequentialProgram,
    args: tuple,
    num_replicates: int,
    num_particles: int,
    num_extensions: int,
    key: int = 0,
    scheme: str = "systematic",
    proposal: Callable[..., Any] | None = None,
) -> dict:
    """Part of :func:`~ppinfer.algorithms.steer.steer_run`'s output for ``R`` independent runs (keys
    ``split(PRNGKey(key), R)``), every array with a leading axis R: ``log_evidence: f[R]``,
    ``log_weights: f[R, N]``, ``trajectories`` (site → ``[R, N, T, …]``) and ``active: bool[R, N,
    T]`` (only these are computed)."""
    num_steps = program.steps_for(args)
    args = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, args)

    @jax.jit
    def run(keys):
        def one(k):
            out = steer_run(k, program, args, num_particles, num_extensions, num_steps, scheme, proposal)
            return {name: out[name] for name in _REPLICATE_OUTPUTS}

        return jax.vmap(one)(keys)

    return jax.device_get(run(jax.random.split(jax.random.PRNGKey(key), num_replicates)))


@dataclass(frozen=True)
class _AsSelection:
    """``select_fn(scheme, u, log_weights, n)`` as a selection ``(u: f[n], log_weights)``."""

    select_fn: SelectFn
    scheme: str

    def __call__(self, u, log_weights):
        uniforms = u[:1] if self.scheme == "systematic" else u
        indices, new_log_weights, _ = self.select_fn(self.scheme, uniforms, log_weights, u.shape[0])
        return indices, new_log_weights
