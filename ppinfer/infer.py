"""``infer(program, *args, algorithm=..., key=...)``: the single entry point."""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

import jax

from ppinfer import checks
from ppinfer._bounds import check_step_indices
from ppinfer._compile import TRACE_LOCK, MemoryEstimateError, check_data
from ppinfer.algorithms import SMC, Importance
from ppinfer.errors import ConfigError, InferenceError, ModelError, PPInferError
from ppinfer.program import is_sequential
from ppinfer.result import Result

__all__ = ["infer", "Algorithm"]


class Algorithm(Protocol):
    """What ``infer`` needs of an algorithm: a name and ``run(key, program, args) -> Result``."""

    name: str

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result: ...


def infer(
    program: Any, *args: Any, algorithm: Algorithm | None = None, key: Any = 0, **kwargs: Any
) -> Result:
    """Run ``algorithm`` on ``program(*args, **kwargs)`` and return a :class:`~ppinfer.Result`.

    Args:
        program: a static program (any NumPyro model) or a :class:`~ppinfer.SequentialProgram`.
        *args: the program's arguments: arrays and floats are traced (new values reuse the
            compiled code), other Python values are static: part of the compiled program, keyed
            by type and value (``True`` and ``1`` compile apart), or by identity where a value is
            unhashable or hashes by identity (an object mutated between calls keeps the program
            compiled for its old contents: pass a new object, as for ``jax.jit``'s static
            arguments).
        algorithm: e.g. ``SMC(num_particles=256)``, ``Importance(1000)``, ``Enumerate()``; default
            ``SMC(1000)`` for sequential programs and ``Importance(1000)`` otherwise.
        key: an ``int`` seed or a ``jax.random`` key.
        **kwargs: keyword arguments of a static program (``infer(model, y=y)``), passed to it (and
            to the algorithm's proposal, if it has one) by name, treated like ``*args``.

    Thread-safe: concurrent calls from several threads give the results they give one at a time
    (tracing and compilation take a process-wide lock; compiled runs execute in parallel).
    """
    if isinstance(program, type):
        raise ModelError(
            f"program must be a function (a NumPyro model) or a SequentialProgram, got the class "
            f"{program.__name__}"
        )
    if not callable(program) and not is_sequential(program):
        raise ModelError(f"program must be a callable or a SequentialProgram, got {type(program)}")
    if algorithm is None:
        algorithm = SMC(1000) if is_sequential(program) else Importance(1000)
    _check_algorithm(algorithm)
    if kwargs:
        if is_sequential(program):
            raise ConfigError(
                f"keyword arguments {sorted(kwargs)} cannot be passed to a sequential program: "
                "pass its arguments positionally (init(*args), step(state, t, *args))"
            )
        check_data(kwargs)  # by name, before binding folds them into the positional arguments
        program, algorithm, args = _bind_keywords(program, algorithm, args, kwargs)
    check_data(args)
    key = checks.as_key(key)
    with TRACE_LOCK:
        if is_sequential(program):
            check_step_indices(program, args)  # num_steps longer than the data, before compiling
        try:
            result = algorithm.run(key, program, args)
            _check_state(getattr(result, "state", None))
            return result
        except CONCRETE_VALUE_ERRORS as e:
            raise ModelError(concrete_value_message(e)) from e
        except MemoryEstimateError as e:
            n = getattr(algorithm, "num_particles", None)
            what = f" with num_particles={n}" if n is not None else ""
            name = getattr(algorithm, "name", type(algorithm).__name__)
            raise MemoryEstimateError(f"{name}{what}: {e}", e.needed, e.available) from None
        except jax.errors.JaxRuntimeError as e:
            host_error = host_callback_error(e)
            if host_error is not None:
                raise host_error from e
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            n = getattr(algorithm, "num_particles", None)
            what = f" with num_particles={n}" if n is not None else ""
            raise InferenceError(
                f"{getattr(algorithm, 'name', type(algorithm).__name__)}{what} ran out of device "
                f"memory: use fewer particles (or shorter programs / smaller data per particle). "
                f"XLA said: {str(e).strip().splitlines()[0][:300]}"
            ) from e
        except (ValueError, RuntimeError) as e:  # how XLA may re-raise a host callback's failure
            host_error = None if isinstance(e, PPInferError) else host_callback_error(e)
            if host_error is None:
                raise
            raise host_error from e


def host_callback_error(e: BaseException) -> ModelError | None:
    """The :class:`ModelError` for a Python function that the compiled program calls on the host (a
    reward, critic, scorer or constraint through ``jax.pure_callback``) and that raised: XLA stops
    the run and reports the Python traceback as text, whose last line names the exception and whose
    last frame is where it was raised. ``None`` when ``e`` is not such a failure."""
    text = str(e)
    if "callback" not in text.lower() or "Traceback" not in text:
        return None
    lines = text.strip().splitlines()
    last = lines[-1].strip()
    kind, _, message = last.partition(": ")
    if kind.rsplit(".", 1)[-1] in _OWN_ERRORS and message:  # a ppinfer error says what failed itself
        return ModelError(message)
    frames = [ln.strip() for ln in lines if ln.strip().startswith('File "')]
    where = ""
    if frames:  # 'File "/path/x.py", line 12, in fn' -> ' (x.py:12, in fn)'
        path, _, rest = frames[-1][len('File "') :].partition('", line ')
        where = f" ({os.path.basename(path)}:{rest})"
    return ModelError(
        "a Python function that the program calls on the host (a reward, critic, scorer or "
        f"constraint) raised {last}{where}"
    )


def _error_names(cls: type) -> set[str]:
    return {cls.__name__}.union(*(_error_names(c) for c in cls.__subclasses__()))


_OWN_ERRORS = frozenset(_error_names(PPInferError))


class _QuietOwnErrors(logging.Filter):
    """Drops JAX's log of a host callback that raised a ppinfer error: :func:`infer` raises that error
    itself, with the same message (a user's own exception keeps JAX's logged traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], PPInferError))


logging.getLogger("jax._src.callback").addFilter(_QuietOwnErrors())


# JAX's errors for Python control flow or conversions on a traced value inside a program.
CONCRETE_VALUE_ERRORS = (
    jax.errors.ConcretizationTypeError,  # includes TracerBoolConversionError
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


def _check_state(state: Any) -> None:
    """Raise if a node of the final state reports that the run was invalid (a state node with a
    ``raise_if_exhausted`` method: the paged KV cache whose block pool ran out, a token context
    that overflowed)."""
    if state is None:
        return
    has_check = lambda x: callable(getattr(type(x), "raise_if_exhausted", None))
    if has_check(state):
        state.raise_if_exhausted()
    for node in jax.tree.leaves(state, is_leaf=lambda x: x is not state and has_check(x)):
        if has_check(node):  # and the nodes inside it (a token context holds a paged cache)
            _check_state(node)


def concrete_value_message(e: BaseException) -> str:
    """The :class:`ModelError` message for one of :data:`CONCRETE_VALUE_ERRORS` raised while
    tracing a program: where in the user's code, and how to write it instead."""
    where = _user_frame(e.__traceback__)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (
        f"the program uses a traced value (a sampled value, or a step's index t) where Python needs "
        f"a concrete one{where}: {type(e).__name__}: {first} The program runs compiled, for all "
        "particles at once, so a Python `if`/`while`, `int()`/`float()`, a NumPy call or indexing a "
        "Python list cannot look at such a value: use jnp.where(cond, a, b) or jax.lax.cond for "
        "branches, jnp functions for arithmetic, and pass data as arrays (jnp.asarray(ys))."
    )


def _user_frame(tb: Any) -> str:
    """`` at file:line (function)`` of the innermost traceback frame outside jax/numpyro/ppinfer."""
    found = ""
    skip = ("jax", "jaxlib", "numpyro", "ppinfer")
    while tb is not None:
        code = tb.tb_frame.f_code
        parts = set(os.path.normpath(code.co_filename).split(os.sep))
        if not parts & set(skip) and "site-packages" not in parts and "<" not in code.co_filename:
            found = f" at {os.path.basename(code.co_filename)}:{tb.tb_lineno} (in {code.co_name})"
        tb = tb.tb_next
    return found


def _check_algorithm(algorithm: Any) -> None:
    if isinstance(algorithm, type):
        raise ConfigError(
            f"algorithm must be an instance, not the class {algorithm.__name__}: write "
            f"algorithm={algorithm.__name__}(...) (e.g. SMC(num_particles=256))"
        )
    if not hasattr(algorithm, "run") and (hasattr(algorithm, "build") or hasattr(algorithm, "build_for")):
        name = type(algorithm).__name__
        raise ConfigError(
            f"{name}() is an MCMC kernel, not an inference algorithm: wrap it in MCMC, e.g. "
            f"algorithm=pp.MCMC({name}(), num_samples=1000)"
        )
    if not hasattr(algorithm, "run"):
        raise ConfigError(f"algorithm must be an inference algorithm (e.g. SMC(...)), got {algorithm!r}")


class _KeywordProgram:
    """``program`` called with its last ``len(names)`` positional arguments passed by name.

    Equal (and equally hashed) for the same program and names, so the compile cache, which keys on
    the program, is hit again by the next call with the same keywords."""

    def __init__(self, program: Any, names: tuple[str, ...]):
        self.program, self.names = program, names
        self.__qualname__ = getattr(program, "__qualname__", type(program).__name__)
        self.__module__ = getattr(program, "__module__", None)
        self.__name__ = getattr(program, "__name__", self.__qualname__)

    def __call__(self, *args: Any) -> Any:
        k = len(args) - len(self.names)
        return self.program(*args[:k], **dict(zip(self.names, args[k:], strict=True)))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _KeywordProgram) and other.program == self.program and other.names == self.names
        )

    def __hash__(self) -> int:
        return hash((_KeywordProgram, self.program, self.names))

    def __repr__(self) -> str:
        return f"{self.program!r} with keywords {self.names}"


def _bind_keywords(program: Any, algorithm: Any, args: tuple, kwargs: dict) -> tuple:
    names = tuple(sorted(kwargs))
    args = tuple(args) + tuple(kwargs[n] for n in names)
    proposal = getattr(algorithm, "proposal", None)
    if callable(proposal):
        import dataclasses

        if not dataclasses.is_dataclass(algorithm):
            raise ConfigError(
                f"{type(algorithm).__name__} has a proposal: pass the program's arguments "
                "positionally, not by keyword"
            )
        algorithm = dataclasses.replace(algorithm, proposal=_KeywordProgram(proposal, names))
    return _KeywordProgram(program, names), algorithm, args
