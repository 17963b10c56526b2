"""NUTS and HMC over a program's continuous latent sites: NumPyro's own kernels, not a rewrite.

The program is handed to ``numpyro.infer.NUTS``/``HMC`` as a model: NumPyro derives the potential
``U(u) = −log p(T(u), y) − log |det J_T(u)|`` on the unconstrained space, adapts the step size and
(diagonal or dense) mass matrix during the first ``num_warmup`` steps, and maps draws back to the
constrained space (deterministic sites included). The wrapper makes the kernel a pure
``step(key, state, args)`` by swapping the key NumPyro carries in its state.

Every latent site must be continuous: a discrete site raises :class:`~ppinfer.errors.ModelError`
(use :class:`~ppinfer.mcmc.SingleSiteMH` or marginalise it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpyro.infer as ninfer

from ppinfer import checks
from ppinfer.errors import ConfigError, ModelError
from ppinfer.mcmc.base import Kernel

__all__ = ["NUTS", "HMC", "numpyro_kernel"]


@dataclass(frozen=True)
class NUTS:
    """No-U-Turn sampler (NumPyro's). ``init_strategy`` is a ``numpyro.infer.init_to_*``; the
    other options are passed to ``numpyro.infer.NUTS``."""

    target_accept_prob: float = 0.8
    max_tree_depth: int = 10
    dense_mass: bool = False
    step_size: float = 1.0
    init_strategy: Callable = ninfer.init_to_uniform
    options: tuple = field(default=())

    def __post_init__(self):
        checks.check_fraction("target_accept_prob", self.target_accept_prob)
        checks.check_positive("step_size", self.step_size)
        checks.check_int("max_tree_depth", self.max_tree_depth, 1)
        object.__setattr__(self, "dense_mass", _check_dense_mass(self.dense_mass))
        _check_init_strategy(self.init_strategy)
        object.__setattr__(self, "options", _options(self.options))

    def build(self, program: Callable[..., Any], num_warmup: int = 0, sites=None) -> Kernel:
        check_continuous(sites, "NUTS")
        nk = ninfer.NUTS(
            program,
            target_accept_prob=self.target_accept_prob,
            max_tree_depth=self.max_tree_depth,
            dense_mass=list(self.dense_mass) if isinstance(self.dense_mass, tuple) else self.dense_mass,
            step_size=self.step_size,
            init_strategy=self.init_strategy,
            **dict(self.options),
        )
        return numpyro_kernel(nk, num_warmup)


@dataclass(frozen=True)
class HMC:
    """Hamiltonian Monte Carlo with ``num_steps`` leapfrog steps per transition (NumPyro's), its step
    size adapted during warm-up towards ``target_accept_prob`` from ``step_size``."""

    num_steps: int = 10
    target_accept_prob: float = 0.8
    dense_mass: bool = False
    step_size: float = 1.0
    init_strategy: Callable = ninfer.init_to_uniform

    def __post_init__(self):
        checks.check_fraction("target_accept_prob", self.target_accept_prob)
        checks.check_positive("step_size", self.step_size)
        checks.check_int("num_steps", self.num_steps, 1)
        object.__setattr__(self, "dense_mass", _check_dense_mass(self.dense_mass))
        _check_init_strategy(self.init_strategy)

    def build(self, program: Callable[..., Any], num_warmup: int = 0, sites=None) -> Kernel:
        check_continuous(sites, "HMC")
        nk = ninfer.HMC(
            program,
            num_steps=self.num_steps,
            # No trajectory length: with both, NumPyro fixes the step size at 2π / num_steps and
            # neither adapts it nor reads ``step_size``.
            trajectory_length=None,
            target_accept_prob=self.target_accept_prob,
            dense_mass=list(self.dense_mass) if isinstance(self.dense_mass, tuple) else self.dense_mass,
            step_size=self.step_size,
            init_strategy=self.init_strategy,
        )
        return numpyro_kernel(nk, num_warmup)


def _check_init_strategy(strategy: Any) -> None:
    if not callable(strategy):
        raise ConfigError(
            f"init_strategy must be a NumPyro init strategy (e.g. numpyro.infer.init_to_median), "
            f"got {strategy!r}"
        )


def _check_dense_mass(dense_mass: Any) -> bool | tuple:
    """NumPyro's ``dense_mass``: a bool, or a list of tuples of site names (dense blocks), kept as
    a tuple (hashable: the kernel is part of a compile-cache key)."""
    if isinstance(dense_mass, bool | np.bool_):
        return bool(dense_mass)
    ok = isinstance(dense_mass, list | tuple) and all(
        isinstance(b, tuple) and all(isinstance(n, str) for n in b) for b in dense_mass
    )
    if not ok:
        raise ConfigError(
            f"dense_mass must be True, False or a list of tuples of site names, got {dense_mass!r}"
        )
    return tuple(dense_mass)


def _options(options: Any) -> tuple:
    """NUTS's extra ``numpyro.infer.NUTS`` options, a dict or ``(name, value)`` pairs, as a hashable
    tuple of pairs (the kernel is part of a compile-cache key)."""
    items = options.items() if isinstance(options, dict) else options
    try:
        pairs = tuple((k, v) for k, v in items)
        hash(pairs)
    except (TypeError, ValueError):
        raise ConfigError(
            f"options must be a dict (or (name, value) pairs) of hashable numpyro.infer.NUTS options, "
            f"got {options!r}"
        ) from None
    import inspect

    known = set(inspect.signature(ninfer.NUTS.__init__).parameters) - {"self", "model", "potential_fn"}
    unknown = sorted(str(k) for k, _ in pairs if k not in known)
    if unknown:
        raise ConfigError(f"options {unknown} are not numpyro.infer.NUTS options (it takes {sorted(known)})")
    return pairs


def numpyro_kernel(nk: Any, num_warmup: int) -> Kernel:
    """Wrap a NumPyro ``MCMCKernel`` built on a model as a pure :class:`~ppinfer.mcmc.Kernel`; its
    state is NumPyro's (``HMCState``: unconstrained ``z``, adaptation state), its info a dict of
    per-transition scalars: ``accept_prob`` (the Metropolis acceptance probability, averaged over
    the trajectory for NUTS), ``diverging``, ``num_steps`` (leapfrog steps), ``step_size`` (the one
    used), ``energy`` (the Hamiltonian at the new state), ``lp`` (``−`` the potential energy: the
    log joint on the unconstrained space, Jacobian included) and, for NUTS, ``tree_depth``
    (``⌊log₂ num_steps⌋ + 1``: a depth-``d`` tree has ``2^(d−1) … 2^d − 1`` leapfrog steps)."""
    import jax.numpy as jnp

    is_nuts = isinstance(nk, ninfer.NUTS)

    def init(key, args):
        return nk.init(key, int(num_warmup), model_args=tuple(args))

    def step(key, state, args):
        step_size = state.adapt_state.step_size
        state = nk.sample(state._replace(rng_key=key), tuple(args), {})
        info = {
            "accept_prob": state.accept_prob,
            "diverging": state.diverging,
            "num_steps": state.num_steps,
            "step_size": step_size,
            "energy": state.energy,
            "lp": -state.potential_energy,
        }
        if is_nuts:
            info["tree_depth"] = jnp.floor(jnp.log2(jnp.maximum(state.num_steps, 1))).astype(jnp.int32) + 1
        return state, info

    def position(state, args):
        return nk.postprocess_fn(tuple(args), {})(state.z)

    return Kernel(init, step, position, log_density=lambda state, args: -state.potential_energy)


def check_continuous(sites: dict | None, what: str) -> None:
    """Raise :class:`ModelError` unless ``sites`` (name → distribution) are all continuous and there
    is at least one."""
    if sites is None:
        return
    if not sites:
        raise ModelError(f"{what} needs at least one continuous latent site; the program has none")
    discrete = sorted(n for n, d in sites.items() if d.support.is_discrete)
    if discrete:
        raise ModelError(
            f"{what} moves continuous sites only, but site(s) {discrete} are discrete: marginalise "
            "them or use an MH kernel (SingleSiteMH, Regenerate)"
        )
