"""Waste-free SMC (Dau & Chopin 2022) for static programs, on the tempered-SMC annealing step.

At each temperature ``λ'`` the ``N`` reweighted particles are resampled down to ``M = N / P``
(systematic), and each selected particle starts a chain of ``P − 1`` ``π_λ'``-invariant moves;
**all** ``N = M · P`` states of the ``M`` chains form the next population, with equal weights. A
chain started from a (weighted) draw of ``π_λ'`` has every state distributed as ``π_λ'``, so each
state is a properly weighted particle (they are correlated within a chain, which the weights do not
need to know about), and ``log Ẑ`` accumulates ``log (1/N) Σ_n L_λ'/L_λ(x_n)`` over all ``N`` as for
tempered SMC. Compared with tempered SMC's ``num_moves`` moves per particle and temperature, the
``P − 1`` moves per chain cost about ``N`` move evaluations per temperature, and no state is thrown
away. :func:`~ppinfer.kernels.anneal.anneal_step` with ``num_selected=M``, ``num_moves=P − 1`` and
``keep_chain=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax

from ppinfer import checks
from ppinfer.algorithms.tempered import _check_common, _check_schedule, _run, _schedule
from ppinfer.errors import ConfigError
from ppinfer.result import Result

__all__ = ["WasteFreeSMC"]


@dataclass(frozen=True)
class WasteFreeSMC:
    """Waste-free tempered SMC (see the module docstring).

    Args:
        num_particles: N, a multiple of ``chain_length``.
        chain_length: P ≥ 2, the states kept per resampled particle (``P − 1`` moves).
        ess_target: adaptive schedule: each step's incremental-weight ESS is ``ess_target · N``.
        temperatures: a fixed increasing schedule ending at 1 (overrides the adaptive one).
        max_steps: cap on adaptive steps (the last step jumps to λ = 1).
        move: ``"rw"``, ``"hmc"``, ``"nuts"`` or a move object, as for
            :class:`~ppinfer.algorithms.tempered.TemperedSMC` (one transition per chain step).
        progress_bar: a tqdm bar over the steps, as for
            :class:`~ppinfer.algorithms.tempered.TemperedSMC` (``None``: on a terminal, for a run
            expected to last over a second); it does not change the draws.
    """

    num_particles: int = 1000
    chain_length: int = 10
    ess_target: float = 0.5
    temperatures: Sequence[float] | None = None
    max_steps: int = 100
    move: Any = "rw"
    progress_bar: bool | None = None

    name = "WasteFreeSMC"

    def __post_init__(self):
        p = checks.check_int("chain_length", self.chain_length, 2)
        _check_common(self, p - 1)
        if self.num_particles % p:
            raise ConfigError(
                f"num_particles ({self.num_particles}) must be a multiple of chain_length ({p})"
            )
        checks.check_probability("ess_target", self.ess_target)
        _check_schedule(self)

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        p = self.chain_length
        return _run(
            self,
            key,
            program,
            args,
            ("temper", None),
            _schedule(self),
            num_moves=p - 1,
            num_selected=self.num_particles // p,
            keep_chain=True,
        )
