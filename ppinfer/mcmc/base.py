"""The kernel interface and the Metropolis–Hastings accept/reject step shared by the MH kernels.

A :class:`Kernel` is a triple of pure, jit/vmap-able functions (BlackJAX's ``init``/``step`` layers):

    state = init(key, args)
    state, info = step(key, state, args)          # one transition; leaves the posterior invariant
    sample = position(state, args)                # site name → value, for the recorded draws

``args`` are the program's arguments (traced arrays under jit); ``functools.partial(step,
args=args)`` is the BlackJAX form ``kernel(key, state) -> (state, info)``
(:class:`ppinfer.kernels.mh.Kernel`). A kernel *factory* (e.g.
:class:`~ppinfer.mcmc.Regenerate`, :class:`~ppinfer.mcmc.NUTS`) builds a kernel for a program with
``build(program, num_warmup) -> Kernel``; :class:`~ppinfer.mcmc.MCMC` takes a factory.

MH kernels are built from a *proposal step* ``propose(key, trace, args) -> (new_trace, log_alpha)``
whose randomness is all in DSL ``sample`` sites and whose ``log_alpha`` is the exact log MH
acceptance ratio ``log [π(x') q(x | x') / (π(x) q(x' | x))]``. :func:`mh_step` adds the
accept/reject step (:func:`ppinfer.kernels.mh.accept`). Exposing ``propose`` lets ``semantics.mcmc``
enumerate a kernel's transition matrix exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ppinfer.errors import ConfigError
from ppinfer.kernels.mh import MHInfo, accept
from ppinfer.traced import Trace, generate

__all__ = ["Kernel", "MHState", "MHInfo", "mh_step", "mh_kernel", "init_trace", "cycle"]

Propose = Callable[[jax.Array, Trace, tuple], tuple[Trace, jax.Array]]


class Kernel(NamedTuple):
    """A Markov kernel for one program (see the module docstring).

    Attributes:
        init: ``init(key, args) -> state``.
        step: ``step(key, state, args) -> (state, info)``.
        position: ``position(state, args) -> dict`` of site values (latent and deterministic).
        propose: for MH kernels, the proposal step (``None`` otherwise).
        components: for a :func:`cycle`, the kernels applied in turn (empty otherwise).
        log_density: ``log_density(state, args) -> f[]``, the target's unnormalised log density at
            a state (``None`` if the kernel does not expose it): MCMC checks the chains' last states
            with it (all ``−inf``: no state of non-zero density was found; ``+inf``/NaN: the program
            is not a density there).
    """

    init: Callable[[jax.Array, tuple], Any]
    step: Callable[[jax.Array, Any, tuple], tuple[Any, Any]]
    position: Callable[[Any, tuple], dict]
    propose: Propose | None = None
    components: tuple = ()
    log_density: Callable[[Any, tuple], jax.Array] | None = None


class MHState(NamedTuple):
    """State of an MH chain: the current :class:`~ppinfer.traced.Trace`."""

    trace: Trace


def mh_step(key: jax.Array, state: MHState, args: tuple, propose: Propose) -> tuple[MHState, MHInfo]:
    """One MH transition: propose, then accept with probability ``min(1, exp(log_alpha))``
    (:func:`~ppinfer.kernels.mh.accept`; a NaN ratio, e.g. ``−inf − (−inf)``, rejects). The info is
    :class:`~ppinfer.kernels.mh.MHInfo`."""
    k_prop, k_acc = jax.random.split(key)
    new, log_alpha = propose(k_prop, state.trace, args)
    trace, info = accept(k_acc, log_alpha, new, state.trace)
    return MHState(trace), info


def mh_kernel(program: Callable[..., Any], propose: Propose) -> Kernel:
    """The MH :class:`Kernel` of ``program`` with proposal step ``propose``."""
    return Kernel(
        init=lambda key, args: MHState(init_trace(key, program, args)),
        step=lambda key, state, args: mh_step(key, state, args, propose),
        position=lambda state, args: {**state.trace.choices, **state.trace.deterministics},
        propose=propose,
        log_density=lambda state, args: state.trace.log_prior + state.trace.log_likelihood,
    )


def init_trace(key: jax.Array, program: Callable[..., Any], args: tuple, num_tries: int = 16) -> Trace:
    """A prior draw with finite score: the first of ``num_tries`` vmapped prior runs whose
    ``score`` is finite (the first run if none is), so constrained programs start in the support."""
    traces = jax.vmap(lambda k: generate(k, program, args)[0])(jax.random.split(key, num_tries))
    i = jnp.argmax(jnp.isfinite(traces.log_prior + traces.log_likelihood))
    return jax.tree.map(lambda x: x[i], traces)


def cycle(*kernels: Kernel) -> Kernel:
    """Apply ``kernels`` in turn (a systematic-scan composition; each must share the state type,
    e.g. :class:`MHState`). Valid when each component leaves the target invariant."""
    if not kernels:
        raise ConfigError("cycle needs at least one kernel")

    def step(key, state, args):
        infos = []
        for i, k in enumerate(kernels):
            state, info = k.step(jax.random.fold_in(key, i), state, args)
            infos.append(info)
        return state, tuple(infos)

    return Kernel(kernels[0].init, step, kernels[0].position, None, tuple(kernels), kernels[0].log_density)
