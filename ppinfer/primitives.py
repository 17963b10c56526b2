"""Effect primitives of the ppinfer DSL.

A ppinfer program is a plain Python function that calls these primitives. ``sample``, ``factor``,
``deterministic`` and ``plate`` *are* NumPyro's primitives, so every NumPyro model is a ppinfer program
and NumPyro's handlers (``seed``, ``trace``, ``condition``, ``substitute``, ``mask``, ``scale``…) apply.
ppinfer adds three effects NumPyro lacks:

- :func:`observe` — an explicit observation: ``observe(name, d, value)`` multiplies the program's
  weight by the likelihood ``d.prob(value)`` (a ``sample`` site with ``obs=value``).
- :func:`condition` — a hard constraint: weight × 1 if the predicate holds, × 0 (log weight −inf)
  otherwise.
- :func:`stop` — in the ``step`` of a sequential program, ends this particle after the current step.

Weights are in log space throughout: every effect adds to the particle's log weight.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.primitives import Messenger, apply_stack, deterministic, factor, plate, sample

from ppinfer.errors import DataError, ModelError

__all__ = ["sample", "factor", "deterministic", "plate", "observe", "condition", "stop"]

STOP_MESSAGE = "ppinfer_stop"


_PRIOR_PREDICTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ppinfer_prior_predictive", default=False
)


@contextlib.contextmanager
def prior_predictive() -> Iterator[None]:
    """Inside, ``observe(name, fn, None)`` samples the site from ``fn`` (the program's prior
    predictive, as NumPyro's ``obs=None``) instead of raising: for checks that simulate data from
    the program, e.g. :func:`semantics.mcmc.check_joint_invariance`."""
    token = _PRIOR_PREDICTIVE.set(True)
    try:
        yield
    finally:
        _PRIOR_PREDICTIVE.reset(token)


def observe(name: str, fn: Any, value: Any) -> Any:
    """Observe ``value`` from distribution ``fn``: adds ``fn.log_prob(value)`` (summed) to the log
    weight and returns ``value``.

    A concrete ``value`` containing NaN raises :class:`~ppinfer.errors.DataError` (NaN data would
    otherwise turn every weight into NaN silently: replace missing entries by any value in the
    support and leave them out with ``fn.mask(observed)``); ``value=None`` raises
    :class:`~ppinfer.errors.ModelError` (NumPyro's ``sample(name, fn, obs=None)`` would sample the
    site instead, silently turning the model into its prior).
    """
    if value is None and not _PRIOR_PREDICTIVE.get():
        raise ModelError(
            f"observe({name!r}): the observed value is None — pass the data (a model(x, y=None) called "
            f"without y?), or use pp.sample({name!r}, ...) for a latent site"
        )
    if not isinstance(value, jax.core.Tracer):
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
            raise DataError(
                f"observe({name!r}): the observed value contains NaN — for missing data, put any "
                "value of the support there and leave those entries out with fn.mask(observed)"
            )
    return sample(name, fn, obs=value)


def condition(name: str, predicate: Any) -> None:
    """Hard constraint: keep executions where ``predicate`` (a boolean array, all elements must hold)
    is true; executions where it is false get log weight −inf and are dropped at resampling.

    Raises :class:`~ppinfer.errors.ModelError` unless ``predicate`` is a boolean (a Python ``bool``
    or an array of dtype ``bool``, e.g. ``x > 0``): a function, a number or a string is refused
    rather than counted as true."""
    ok = jnp.all(_as_bool(predicate, f"condition({name!r}, predicate)", "the predicate"))
    factor(name, jnp.where(ok, 0.0, -jnp.inf))


def stop(when: Any = True) -> None:
    """End this particle after the current step of a sequential program (when ``when`` is true).

    A stopped particle keeps its state and weight for the remaining steps. Outside a sequential
    engine the call has no effect. ``when`` is a scalar boolean (one flag per particle)."""
    flag = _as_bool(when, "stop(when)", "when")
    if jnp.ndim(flag) != 0:
        raise ModelError(
            f"stop(when): when must be a scalar boolean (this particle's flag), got shape "
            f"{jnp.shape(flag)}; reduce it, e.g. jnp.any(...)"
        )
    apply_stack(
        {
            "type": STOP_MESSAGE,
            "fn": lambda x: x,
            "args": (flag,),
            "kwargs": {},
            "value": None,
        }
    )


def _as_bool(value: Any, call: str, what: str) -> jax.Array:
    """``value`` as a boolean array, or :class:`ModelError` if it is not boolean."""
    if callable(value) and not isinstance(value, jax.Array | np.ndarray):
        raise ModelError(
            f"{call}: {what} must be a boolean (array), got the function {value!r}; call it "
            "(e.g. pred(x)) and pass the result"
        )
    if isinstance(value, bool | np.bool_):
        return jnp.asarray(value)
    dtype = getattr(value, "dtype", None)
    if dtype is None or not (dtype == np.bool_):
        got = f"an array of dtype {dtype}" if dtype is not None else f"{type(value).__name__} {value!r}"
        raise ModelError(
            f"{call}: {what} must be a boolean (a bool or a bool array such as x > 0), got {got}"
        )
    return jnp.asarray(value)


class watch_messages(Messenger):
    """Records (at trace time) whether a message of type ``msg_type`` passed, e.g. a
    :func:`stop` (``STOP_MESSAGE``) or a ``numpyro.prng_key()`` draw (``"prng_key"``)."""

    def __init__(self, msg_type: str):
        super().__init__()
        self.msg_type = msg_type
        self.seen = False

    def process_message(self, msg):
        self.seen |= msg["type"] == self.msg_type


class collect_stops(Messenger):
    """Handler that records the OR of every :func:`stop` flag raised while it is active."""

    def __init__(self, fn=None):
        super().__init__(fn)
        self.stopped = jnp.asarray(False)

    def process_message(self, msg):
        if msg["type"] == STOP_MESSAGE:
            self.stopped = jnp.logical_or(self.stopped, msg["args"][0])
