"""Program forms understood by :func:`ppinfer.infer`.

- A **static program** is any Python callable using the primitives (a NumPyro model).
- A **sequential program** (:class:`SequentialProgram`) is an ``init`` program and a ``step`` program,
  each written for ONE particle: ``state = init(*args)`` then ``state = step(state, t, *args)`` for
  ``t = 0 … num_steps − 1``. The engine vmaps them over particles, suspends the population after every
  step (the :class:`~ppinfer.suspended.Sequential` representation), and lets a step end its particle
  with :func:`~ppinfer.primitives.stop`. State-space models and token-level LM programs take this form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ppinfer.errors import ModelError

__all__ = ["SequentialProgram", "sequential", "is_sequential"]


@dataclass(frozen=True)
class SequentialProgram:
    """A program suspended at each step boundary. Two programs of the same ``init``, ``step`` and
    ``num_steps`` are equal (and hash alike), so ``pp.sequential(init, step, T)`` rebuilt for each
    call reuses the compiled run (it compiled on every call when programs compared by identity).

    Attributes:
        init: ``init(*args) -> state``; may sample and observe.
        step: ``step(state, t, *args) -> state``; ``t`` is an ``i32`` scalar (traced under jit), and
            the returned state must have the structure, shapes and dtypes of ``init``'s.
        num_steps: the number of steps, an ``int`` or a function ``num_steps(*args) -> int``
            (e.g. ``lambda ys: len(ys)``), evaluated on the host before compilation.
    """

    init: Callable[..., Any]
    step: Callable[..., Any]
    num_steps: int | Callable[..., int]

    def __post_init__(self):
        if not callable(self.init) or not callable(self.step):
            raise ModelError("sequential(init, step, num_steps): init and step must be callables")
        if not callable(self.num_steps):
            # Kept as a Python int: it keys the compile cache (a JAX array cannot be hashed).
            object.__setattr__(self, "num_steps", _check_steps(self.num_steps))

    def steps_for(self, args: tuple) -> int:
        """The number of steps for these arguments (an ``int`` ≥ 1)."""
        if not callable(self.num_steps):
            return _check_steps(self.num_steps)
        try:
            n = self.num_steps(*args)
        except TypeError as e:  # e.g. a theta-first call (SMC2, PMMH) of num_steps(ys)
            raise ModelError(
                f"num_steps could not be called with the program's {len(args)} argument(s) (SMC2 and "
                f"PMMH pass theta first, as to init and step): {e}"
            ) from e
        except (IndexError, AttributeError, KeyError) as e:  # e.g. ys.shape[0] of a scalar or a list
            raise ModelError(
                f"num_steps({', '.join(type(a).__name__ for a in args)}) raised {type(e).__name__}: {e} "
                "(pass the data as an array with a leading time axis)"
            ) from e
        return _check_steps(n)


def _check_steps(n: Any) -> int:
    """``n`` as an ``int`` ≥ 1, or :class:`ModelError` (a float such as 2.5, a bool, an array)."""
    if type(n) is int and n >= 1:  # the usual case, checked on every call
        return n
    if isinstance(n, bool | np.bool_):
        raise ModelError(f"num_steps must be an int, got {n!r}")
    try:
        value = int(n)
    except (TypeError, ValueError) as e:
        raise ModelError(f"num_steps must be an int, got {n!r}") from e
    except Exception as e:  # a traced value (e.g. from a jitted num_steps function)
        raise ModelError(f"num_steps must be a concrete int known before compiling, got {n!r}") from e
    if np.ndim(n) != 0 or value != n:
        raise ModelError(f"num_steps must be a whole number of steps (an int), got {n!r}")
    if value < 1:
        raise ModelError(f"a sequential program needs num_steps >= 1, got {value}")
    return value


def sequential(
    init: Callable[..., Any], step: Callable[..., Any], num_steps: int | Callable[..., int]
) -> SequentialProgram:
    """Build a :class:`SequentialProgram` from its ``init`` and ``step`` functions."""
    return SequentialProgram(init, step, num_steps)


def is_sequential(program: Any) -> bool:
    return isinstance(program, SequentialProgram)
