"""Re-scoring a sequential program's history: the exact log joint of a particle's init choices and
step choices, for MCMC moves on static parameters (used by resample-move SMC and particle Gibbs).

A particle's history is its init latent choices and, for each step ``s``, the step's latent choices
``[T, …]`` and whether the step ran (``active: bool[T]``). :func:`log_joint` re-runs ``init`` then
every active step up to ``t`` with those choices substituted, so a change of a static parameter is
propagated into every state: it returns ``(log p(x_{init}, x_{0:t}, y_{0:t}), state_t)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ppinfer.program import SequentialProgram
from ppinfer.suspended import match_state
from ppinfer.traced import assess

__all__ = ["log_joint"]


def log_joint(
    program: SequentialProgram,
    args: tuple,
    init_choices: dict,
    step_choices: dict,
    active: jax.Array,
    t: jax.Array,
) -> tuple[jax.Array, Any]:
    """``(f32[], state)``: the log joint density of one particle's history through step ``t``
    (steps ``s ≤ t`` with ``active[s]``) and its state after step ``t``. ``step_choices`` leaves are
    ``[T, …]`` (latent sites only); ``active: bool[T]``."""
    init = assess(program.init, args, init_choices)
    state0 = jax.tree.map(jnp.asarray, init.value)

    def body(carry, xs):
        state, total = carry
        s, choices, on = xs
        tr = assess(lambda st: program.step(st, s, *args), (state,), choices)
        use = on & (s <= t)
        new_state = _match(tr.value, state)
        state = jax.tree.map(lambda a, b: jnp.where(use, a, b), new_state, state)
        return (state, total + jnp.where(use, tr.score, 0.0)), None

    steps = jnp.arange(active.shape[0], dtype=jnp.int32)
    (state, total), _ = jax.lax.scan(body, (state0, init.score), (steps, step_choices, active))
    return total, state


def _match(new, old):
    batched = lambda tree: jax.tree.map(lambda x: jnp.asarray(x)[None], tree)
    return jax.tree.map(lambda x: x[0], match_state(batched(new), batched(old)))
