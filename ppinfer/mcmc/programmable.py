"""Programmable MH: the proposal is a DSL program that reads the current choices.

``proposal(choices, *args)`` samples new values for some latent sites ``S`` of the model (sites named
as in the model). The kernel runs it forward (``x'_S ~ q(· | x)``), updates the trace, and runs it
in reverse — assessing the old values ``x_S`` under ``q(· | x')`` — so

    log_alpha = [log p(x', y) − log p(x, y)] + log q(x_S | x') − log q(x'_S | x).

:class:`IndependenceMH` is the special case where the proposal ignores the current choices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from ppinfer.errors import ConfigError, ModelError
from ppinfer.mcmc.base import Kernel, mh_kernel
from ppinfer.traced import Trace, assess, generate, update

__all__ = ["ProgrammableMH", "programmable_kernel", "programmable_propose"]


@dataclass(frozen=True)
class ProgrammableMH:
    """MH with a custom proposal program ``proposal(choices, *args)`` (see the module docstring)."""

    proposal: Callable[..., Any]

    def __post_init__(self):
        if not callable(self.proposal):
            raise ConfigError("ProgrammableMH(proposal): proposal must be a callable program")

    def build(self, program: Callable[..., Any], num_warmup: int = 0, sites=None) -> Kernel:
        return programmable_kernel(program, self.proposal)


def programmable_kernel(program: Callable[..., Any], proposal: Callable[..., Any]) -> Kernel:
    """The MH :class:`~ppinfer.mcmc.Kernel` with proposal program ``proposal(choices, *args)``."""
    return mh_kernel(
        program, lambda key, trace, args: programmable_propose(key, trace, args, program, proposal)
    )


def programmable_propose(
    key: jax.Array, trace: Trace, args: tuple, program: Callable[..., Any], proposal: Callable[..., Any]
) -> tuple[Trace, jax.Array]:
    """The proposal step: ``(new_trace, log_alpha)`` as in the module docstring."""
    try:
        forward, _ = generate(key, proposal, (trace.choices, *args))
    except KeyError as e:  # a misspelled site: traced once, so this costs nothing per step
        name = e.args[0] if e.args else None
        if not isinstance(name, str) or name in trace.choices:
            raise
        raise ModelError(
            f"the MH proposal reads choices[{name!r}], but the program has no latent site {name!r} "
            f"(its latent sites: {sorted(trace.choices)})"
        ) from None
    if not forward.choices:
        raise ModelError("the MH proposal program samples no site")
    extra = sorted(set(forward.choices) - set(trace.choices))
    if extra:  # an auxiliary variable would need its own reverse move: not part of this kernel
        raise ModelError(
            f"the MH proposal samples site(s) {extra} that the program does not have (its latent "
            f"sites: {sorted(trace.choices)}): a proposal samples new values for the program's own "
            "sites only (the reverse move assesses them): integrate auxiliary randomness into the "
            "proposal's distribution, e.g. a mixture (dist.MixtureSameFamily)"
        )
    for name, value in forward.choices.items():  # shapes are known when traced: checked once
        if name in trace.choices and jnp.shape(value) != jnp.shape(trace.choices[name]):
            raise ModelError(
                f"the MH proposal samples site {name!r} with shape {jnp.shape(value)}, but the "
                f"program's {name!r} has shape {jnp.shape(trace.choices[name])}"
            )
    new, log_ratio, discard = update(program, args, trace, forward.choices)
    reverse = assess(proposal, (new.choices, *args), discard)
    return new, log_ratio + reverse.log_prior - forward.log_prior
