"""Gradient estimators, chosen per sampled site of the guide.

- ``"reparam"`` (pathwise): the sample is a differentiable function of the parameters
  (``x = g(φ, ε)``); needs ``site.fn.has_rsample``.
- ``"reinforce"`` (score function): the sample is held fixed (``stop_gradient``) and the site's
  ``log q(x)`` enters the *score* ``S = Σ log q_φ(x)`` of the surrogate
  ``F + (stop_gradient(F) − b) · (S − stop_gradient(S))``, whose value is ``F`` and whose gradient
  ``∇F + (F − b)∇S`` is unbiased for any baseline ``b`` independent of the sample.
- ``"enumerate"``: a discrete site with finite support is summed over exactly: the expectation
  becomes ``Σ_v q_φ(v) · E[F | v]`` and its gradient is exact in that site.

The default picks ``"reparam"`` where the distribution has ``has_rsample`` and ``"reinforce"``
otherwise; ``estimators`` (a name → estimator dict, or one estimator for every site) overrides it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from numpyro.primitives import Messenger

from ppinfer.errors import ConfigError, EnumerationError

__all__ = [
    "REPARAM",
    "REINFORCE",
    "ENUMERATE",
    "ESTIMATORS",
    "Estimators",
    "choose_estimator",
    "check_estimators",
    "enumerate_values",
]

REPARAM = "reparam"
REINFORCE = "reinforce"
ENUMERATE = "enumerate"
ESTIMATORS = (REPARAM, REINFORCE, ENUMERATE)

Estimators = str | Mapping[str, str] | None


def check_estimators(estimators: Estimators) -> None:
    """Raise :class:`ConfigError` unless ``estimators`` is ``None``, one of :data:`ESTIMATORS`, or a
    dict site name → one of them."""
    values = [] if estimators is None else [estimators] if isinstance(estimators, str) else None
    if values is None:
        if not isinstance(estimators, Mapping):
            raise ConfigError(f"estimators must be a str or a dict name -> str, got {estimators!r}")
        values = list(estimators.values())
    for v in values:
        if v not in ESTIMATORS:
            raise ConfigError(f"unknown gradient estimator {v!r}; choose one of {ESTIMATORS}")


def choose_estimator(name: str, fn: Any, estimators: Estimators) -> str:
    """The estimator of guide site ``name`` with distribution ``fn`` (see the module docstring).

    Raises :class:`ConfigError` for ``"reparam"`` on a distribution without ``has_rsample`` and
    :class:`EnumerationError` for ``"enumerate"`` on one without finite support."""
    if isinstance(estimators, str):
        chosen = estimators
    elif estimators is not None and name in estimators:
        chosen = estimators[name]
    else:
        return REPARAM if getattr(fn, "has_rsample", False) else REINFORCE
    if chosen == REPARAM and not getattr(fn, "has_rsample", False):
        raise ConfigError(
            f"site {name!r}: {type(fn).__name__} is not reparameterisable; use 'reinforce' or 'enumerate'"
        )
    if chosen == ENUMERATE and not getattr(fn, "has_enumerate_support", False):
        raise EnumerationError(f"site {name!r}: {type(fn).__name__} has no finite support to enumerate")
    return chosen


def enumerate_values(name: str, fn: Any) -> np.ndarray:
    """All values of a finite site, stacked on a leading axis ``[M, *value_shape]`` (the joint
    values of a batched site). The support depends only on shapes, so it is computed eagerly even
    while tracing under ``jit``."""
    from ppinfer.algorithms.enumerate import support_values

    with jax.ensure_compile_time_eval():
        return np.stack([np.asarray(v) for v in support_values(name, fn)])


class choose_and_detach(Messenger):
    """Records each latent guide site's estimator in ``chosen`` and stops gradients through the
    sample of every site not estimated pathwise (all of them when ``fixed``). Enter it *outside*
    ``trace`` so that the trace records the detached value (NumPyro post-processes outermost
    first)."""

    def __init__(self, estimators: Estimators, fixed: bool = False):
        super().__init__()
        self.estimators, self.fixed = estimators, fixed
        self.chosen: dict[str, str] = {}
        self.fns: dict[str, Any] = {}

    def postprocess_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        name = msg["name"]
        self.chosen[name] = choose_estimator(name, msg["fn"], self.estimators)
        self.fns[name] = msg["fn"]
        if self.fixed or self.chosen[name] != REPARAM:
            msg["value"] = jax.lax.stop_gradient(msg["value"])
