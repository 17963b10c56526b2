"""Sequential Bayesian updates: a posterior that absorbs data batches as they arrive.

- :class:`IBIS` / :class:`Posterior`: the particle representation (Chopin 2002),
  ``posterior = infer(program, *batch_1, algorithm=IBIS(...))`` then ``posterior.update(*batch_2)``.
- :func:`to_parametric` / :class:`ParametricPosterior`: a moment-matched Gaussian as the next prior,
  with the divergence each refit introduces reported (an approximation).
- :func:`save` / :func:`load`: a posterior state in one safetensors file (no pickle), resumable
  bit for bit.
"""

from ppinfer.updates.gaussian import (
    Gaussian,
    ParametricPosterior,
    fit_gaussian,
    gaussian_prior_program,
    projection_kl,
    to_parametric,
)
from ppinfer.updates.ibis import (
    IBIS,
    DataModel,
    IBISState,
    Posterior,
    UpdateInfo,
    capacity_for,
    constrained_samples,
    history_data,
    init_state,
    run_stream,
    statistics_data,
    update_state,
)
from ppinfer.updates.store import load, program_identity, save

__all__ = [
    "Gaussian",
    "ParametricPosterior",
    "fit_gaussian",
    "gaussian_prior_program",
    "projection_kl",
    "to_parametric",
    "save",
    "load",
    "program_identity",
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
