"""Parameters of guides (and models): the ``numpyro.param`` sites of a program.

A guide is a program in the DSL whose tunable numbers are ``numpyro.param(name, init, constraint=…)``
sites (NumPyro's autoguides are such programs). The optimiser works on *unconstrained* values ``u``
(a dict name → array); the program sees the constrained values ``biject_to(constraint)(u)``, set with
NumPyro's ``substitute`` handler, exactly as NumPyro's SVI does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from ppinfer.checks import PROGRAM_ERRORS
from ppinfer.errors import ConfigError, ModelError, PPInferError

__all__ = ["ParamSpec", "find_params", "constrain", "unconstrain", "bind_params"]


class ParamSpec(NamedTuple):
    """The parameters of one or more programs.

    Attributes:
        init: name → unconstrained initial value (array).
        constraints: name → the NumPyro constraint of the site (static; ``real`` when none given).
    """

    init: dict[str, jax.Array]
    constraints: dict[str, Any]


def find_params(key: jax.Array, runs: list[tuple[Callable[..., Any], tuple]]) -> ParamSpec:
    """Run each ``fn(*args)`` of ``runs`` once (eagerly, seeded by ``key``) and collect its ``param``
    sites; the first program to declare a name sets its initial value and constraint."""
    init, cons = {}, {}
    for i, (fn, args) in enumerate(runs):
        with handlers.trace() as tr, handlers.seed(rng_seed=jax.random.fold_in(key, i)):
            try:
                fn(*args)
            except PPInferError:
                raise
            except PROGRAM_ERRORS as e:
                params = {n: s["value"] for n, s in tr.items() if s["type"] == "param"}
                raise ModelError(
                    f"running {getattr(fn, '__name__', 'the guide')} once at its initial parameters "
                    f"{params} failed: {type(e).__name__}: {e}"
                ) from e
        for name, site in tr.items():
            if site["type"] != "param" or name in init:
                continue
            c = site["kwargs"].get("constraint", constraints.real)
            cons[name] = c
            init[name] = unconstrain(site["value"], c)
    return ParamSpec(init, cons)


def constrain(unconstrained: dict[str, jax.Array], constraints_: dict[str, Any]) -> dict:
    """name → constrained value ``biject_to(constraint)(u)`` (differentiable in ``u``)."""
    return {name: biject_to(constraints_[name])(u) for name, u in unconstrained.items()}


def unconstrain(value: Any, constraint: Any) -> jax.Array:
    """The unconstrained value ``biject_to(constraint).inv(value)`` of a constrained ``value``."""
    return biject_to(constraint).inv(jax.numpy.asarray(value))


def bind_params(fn: Callable[..., Any], params: dict[str, jax.Array]) -> Callable[..., Any]:
    """``fn`` with its ``param`` sites fixed to the *constrained* ``params`` (e.g. a fitted
    proposal to pass to :class:`~ppinfer.SMC`)."""

    if not isinstance(params, Mapping):
        raise ConfigError(
            f"bind_params needs a dict name -> value of param sites, got {type(params).__name__}"
        )

    def value(site: dict) -> Any:
        if site["type"] != "param":
            return None
        if site["name"] not in params:  # the initial value would stand in for a fitted one
            raise ModelError(
                f"bind_params: the program's param site {site['name']!r} has no value in params "
                f"(given: {sorted(params)[:8]}; a fit's values are result.extras['params'])"
            )
        return params[site["name"]]

    def bound(*args, **kwargs):
        with handlers.substitute(substitute_fn=value):
            return fn(*args, **kwargs)

    return bound
