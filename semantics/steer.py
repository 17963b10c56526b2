"""Exact validity check of Steer's without-replacement selection (Fearnhead–Clifford resampling).

:func:`ppinfer.algorithms.steer.select_from_uniforms` is a deterministic map from uniforms to
``(indices, new_log_weights)``; for a fixed weight vector it is piecewise constant in each uniform,
changing only where a position ``(j − L + u_j) / (n − L) · R`` crosses a cumulative weight of the
children below the threshold. :func:`select_outcomes` splits every uniform at those points and runs
the real implementation at each cell's midpoint (float64), which gives the exact distribution of the
output; :func:`check_select` compares the expected output measure with the input measure.

:func:`steer_replicates` runs many independent Steer runs (the real compiled core, vmapped) for the
statistical checks of the whole algorithm (``E[Ẑ] = Z`` with :func:`semantics.check_unbiased_evidence`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer.algorithms.steer import select_from_uniforms, steer_run, threshold
from ppinfer.program import SequentialProgram
from semantics.blocks import _cells
from semantics.measure import Measure

__all__ = ["select_outcomes", "check_select", "steer_replicates"]

_REPLICATE_OUTPUTS = ("log_evidence", "log_weights", "trajectories", "active")

SelectFn = Callable[[str, jax.Array, jax.Array, int], tuple[jax.Array, jax.Array, jax.Array]]


def select_outcomes(
    scheme: str, log_weights: Any, n: int, select_fn: SelectFn = select_from_uniforms
) -> list[tuple[float, tuple[int, ...], tuple[float, ...]]]:
    """The exact distribution of ``select_fn(scheme, U, log_weights, n)`` over ``U ~ Uniform``: a list
    of ``(probability, indices, new_log_weights)``."""
    with jax.enable_x64(True):
        lw = jnp.asarray(np.asarray(log_weights, np.float64))
        _, kept, _, s = threshold(lw, n)
        kept = int(kept)
        ref = float(s[0]) if np.isfinite(float(s[0])) else 0.0
        residual = np.where(np.arange(lw.shape[0]) >= kept, np.exp(np.asarray(s) - ref), 0.0)
        cdf = np.cumsum(residual)
        free = max(n - kept, 1)
        scale = free / cdf[-1] if cdf[-1] > 0 else 0.0

        def cuts(j: int) -> np.ndarray:
            return cdf * scale - (j - kept)

        if scheme == "systematic":
            cells = [_cells(np.concatenate([cuts(j) for j in range(kept, n)] or [np.zeros(0)]))]
        else:
            cells = [_cells(cuts(j)) if j >= kept else [(0.5, 1.0)] for j in range(n)]
        combos = list(itertools.product(*cells))
        mids = np.asarray([[m for m, _ in combo] for combo in combos])
        lengths = [math.prod(length for _, length in combo) for combo in combos]
        # Padded to a power of two so that weight vectors of one length share a compiled function.
        rows = 1 << (len(combos) - 1).bit_length()
        mids = np.concatenate([mids, np.full((rows - len(combos), mids.shape[1]), 0.5)])
        indices, new_lw, _ = _batched(select_fn, scheme, n)(jnp.asarray(mids), lw)
        return [
            (p, tuple(int(i) for i in idx), tuple(float(w) for w in nw))
            for p, idx, nw in zip(lengths, np.asarray(indices), np.asarray(new_lw), strict=False)
        ]


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


@functools.cache
def _batched(select_fn: SelectFn, scheme: str, n: int) -> Callable:
    return jax.jit(jax.vmap(lambda u, lw: select_fn(scheme, u, lw, n), in_axes=(0, None)))
