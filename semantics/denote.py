"""The exact denotation of finite programs, and the measure an inference result represents."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ppinfer.algorithms.enumerate import enumerate_runs, unroll
from ppinfer.program import is_sequential
from ppinfer.result import Result
from semantics.measure import Measure, outcome_key

__all__ = ["denote", "measure_of"]


def denote(program: Any, *args: Any, proposal: Callable[..., Any] | None = None) -> Measure:
    """The exact unnormalised measure ``⟦program⟧`` over choice maps (latent and deterministic
    sites) of a program with finitely many discrete choices, by enumeration in float64.

    With ``proposal``, latent choices are drawn from it and weighted by ``p/q``: the result must equal
    the denotation without it (that is the validity of proposals). Sequential programs are unrolled;
    their sites are named ``init/<name>`` and ``<t>/<name>``."""
    with jax.enable_x64(True):
        if is_sequential(program):
            fn, fn_args = unroll(program, args), ()
        else:
            fn, fn_args = program, args
        branches = enumerate_runs(fn, fn_args, proposal=proposal)
        return Measure.from_log(
            (outcome_key(b.choices), b.log_prob + b.log_weight) for b in branches
        )


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
