"""Independence MH: proposals ``x'_S ~ q(·)`` that do not depend on the current state.

A :class:`~ppinfer.mcmc.ProgrammableMH` whose proposal ignores the choices, so
``log_alpha = log p(x', y) − log p(x, y) + log q(x_S) − log q(x'_S)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ppinfer.errors import ConfigError
from ppinfer.mcmc.base import Kernel
from ppinfer.mcmc.programmable import programmable_kernel

__all__ = ["IndependenceMH"]


@dataclass(frozen=True)
class IndependenceMH:
    """Independence MH with proposal program ``proposal(*args)`` (samples model site names)."""

    proposal: Callable[..., Any]

    def __post_init__(self):
        if not callable(self.proposal):
            raise ConfigError("IndependenceMH(proposal): proposal must be a callable program")

    def build(self, program: Callable[..., Any], num_warmup: int = 0, sites=None) -> Kernel:
        proposal = self.proposal
        return programmable_kernel(program, lambda choices, *args: proposal(*args))
