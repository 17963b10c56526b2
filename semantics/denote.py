"""The exact denotation of finite programs, and the measure an inference result represents."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ppinfer._compile import locked
from ppinfer.result import Result
from semantics.interpret import interpret
from semantics.measure import Measure, outcome_key

__all__ = ["denote", "measure_of"]


@locked  # NumPyro's handler stack is one per process: a thread tracing a program meanwhile would see it
def denote(program: Any, *args: Any, proposal: Callable[..., Any] | None = None) -> Measure:
    """The exact unnormalised measure ``⟦program⟧`` over choice maps (latent and deterministic
    sites) of a program with finitely many discrete choices, by enumeration in float64.

    Computed by the independent reference interpreter :func:`semantics.interpret.interpret`, which
    shares no code with :class:`~ppinfer.Enumerate` or the samplers (so comparing them with it is a
    real check). Outcomes of mass zero are left out.

    With ``proposal``, latent choices are drawn from it and weighted by ``p/q``: the result must equal
    the denotation without it (that is the validity of proposals); for a sequential program it is the
    step proposal ``proposal(state, t, *args)``. Sequential programs are unrolled; their sites are
    named ``init/<name>`` and ``<t>/<name>``. Raises :class:`~ppinfer.errors.EnumerationError` for a
    continuous latent site or beyond :data:`semantics.interpret.MAX_PATHS` executions."""
    return interpret(program, args, proposal=proposal)


def measure_of(result: Result) -> Measure:
    """The measure ``Σ_i exp(log_weights[i]) δ(choices_i)`` of an inference result, with outcomes keyed
    as in :func:`denote` (sequential trajectories are split into ``<t>/<name>`` entries for the steps
    each particle was active)."""
    samples = {k: np.asarray(v) for k, v in result.samples.items()}
    log_w = np.asarray(result.log_weights, np.float64)
    kinds = result.extras.get("site_kinds")
    active = None if kinds is None else np.asarray(result.extras["active"])
    items = []
    for i in range(result.num_particles):
        if kinds is None:
            choices = {k: v[i] for k, v in samples.items()}
        else:
            choices = {}
            for name, (kind, site) in kinds.items():
                if kind == "init":
                    choices[f"init/{site}"] = samples[name][i]
                else:
                    for t in np.flatnonzero(active[i]):
                        choices[f"{t}/{site}"] = samples[name][i, t]
        items.append((outcome_key(choices), log_w[i]))
    return Measure.from_log(items)
