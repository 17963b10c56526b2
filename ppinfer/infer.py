"""``infer(program, *args, algorithm=..., key=...)``: the single entry point."""

from __future__ import annotations

from typing import Any, Protocol

import jax
import numpy as np

from ppinfer._compile import check_data
from ppinfer.algorithms import SMC, Importance
from ppinfer.errors import ConfigError, ModelError
from ppinfer.program import is_sequential
from ppinfer.result import Result

__all__ = ["infer", "Algorithm"]


class Algorithm(Protocol):
    """What ``infer`` needs of an algorithm: a name and ``run(key, program, args) -> Result``."""

    name: str

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result: ...


def infer(program: Any, *args: Any, algorithm: Algorithm | None = None, key: Any = 0) -> Result:
    """Run ``algorithm`` on ``program(*args)`` and return a :class:`~ppinfer.Result`.

    Args:
        program: a static program (any NumPyro model) or a :class:`~ppinfer.SequentialProgram`.
        *args: the program's arguments: arrays and floats are traced (new values reuse the
            compiled code), other Python values are static.
        algorithm: e.g. ``SMC(num_particles=256)``, ``Importance(1000)``, ``Enumerate()``; default
            ``SMC(1000)`` for sequential programs and ``Importance(1000)`` otherwise.
        key: an ``int`` seed or a ``jax.random`` key.
    """
    if not callable(program) and not is_sequential(program):
        raise ModelError(f"program must be a callable or a SequentialProgram, got {type(program)}")
    if algorithm is None:
        algorithm = SMC(1000) if is_sequential(program) else Importance(1000)
    if not hasattr(algorithm, "run"):
        raise ConfigError(
            f"algorithm must be an inference algorithm (e.g. SMC(...)), got {algorithm!r}"
        )
    check_data(args)
    return algorithm.run(_as_key(key), program, args)


def _as_key(key: Any) -> jax.Array:
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return jax.random.PRNGKey(int(key))
    if isinstance(key, jax.Array) and key.shape == (2,) and key.dtype == np.uint32:
        return key
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    raise ConfigError(f"key must be an int seed or a jax.random key, got {key!r}")
