"""Variational SMC (Naesseth et al. 2018; Le et al.; Maddison et al.): the log evidence estimate of
an SMC run with a parameterised proposal, a lower bound ``E[log Ẑ] ≤ log Z`` since ``E[Ẑ] = Z``.

The guide is the SMC proposal ``proposal(state, t, *args)`` of a sequential program (its
``numpyro.param`` sites are the parameters). The gradient is taken pathwise through the proposal's
reparameterised samples and the weights, and *not* through the resampling's discrete ancestor
choices: the standard (slightly biased) VSMC gradient, which drops the resampling score terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import jax
from numpyro import handlers

from ppinfer import checks
from ppinfer.algorithms.smc import Loop, run_loop, smc_selection
from ppinfer.errors import ConfigError
from ppinfer.program import SequentialProgram, is_sequential
from ppinfer.resample import check_scheme
from ppinfer.vi.estimators import Estimators

__all__ = ["VSMC"]


@dataclass(frozen=True, eq=False)
class VSMC:
    """The variational-SMC objective ``E[log Ẑ_SMC]`` (maximised).

    Args:
        num_particles: N ≥ 1 particles of each SMC run.
        resampling: resampling scheme of the run.
        ess_threshold: as in :class:`~ppinfer.SMC` (1.0: resample after every step).
        init_proposal: an optional parameterised proposal for ``init``.
    """

    num_particles: int = 16
    resampling: str = "multinomial"
    ess_threshold: float = 1.0
    init_proposal: Callable[..., Any] | None = None
    name = "vsmc"
    full_coverage = False

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        check_scheme(self.resampling)
        checks.check_probability("ess_threshold", self.ess_threshold)

    def surrogate(
        self,
        key: jax.Array,
        model: SequentialProgram,
        guide: Callable[..., Any],
        params: dict[str, jax.Array],
        args: tuple = (),
        estimators: Estimators = None,
        baseline: jax.Array | float = 0.0,
    ) -> tuple[jax.Array, jax.Array]:
        """``(log Ẑ, log Ẑ)`` of one SMC run with proposal ``guide`` at ``params`` (constrained);
        differentiate the first. ``estimators`` and ``baseline`` are unused (pathwise only)."""
        if not is_sequential(model):
            raise ConfigError("the VSMC objective needs a sequential program (ppinfer.sequential)")
        with handlers.substitute(data=params):
            # early_exit=False: run_loop's scan path, which reverse-mode differentiation goes through.
            selection = smc_selection(self.resampling, self.ess_threshold)
            loop = Loop(self.num_particles, model.steps_for(args), selection, guide, self.init_proposal)
            out = run_loop(key, model, args, replace(loop, early_exit=False, history=False))
        log_z = out["log_evidence"]
        return log_z, jax.lax.stop_gradient(log_z)
