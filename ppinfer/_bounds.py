"""Out-of-range indexing in a sequential program's ``step``, found before it runs.

JAX clamps an out-of-range index instead of failing: ``ys[t]`` with ``t ≥ len(ys)`` reads the last
element again, so a program whose ``num_steps`` is longer than its data silently reuses the last
data point (and a write ``buf.at[t].set(x)`` past the end is silently dropped). The engine cannot
see the index at run time without a cost on every step, so :func:`check_step_indices` finds it
*before* the run: it traces one particle's ``step`` to a jaxpr (abstractly, nothing runs), then
evaluates on the host, with NumPy, only the small integer arithmetic that depends on nothing but the
step counter ``t`` and the program's arguments (the data) — everything that depends on the state or a
random draw stays unknown — and checks every slice, gather and scatter whose index is then known, at
``t = 0`` and ``t = num_steps − 1``.

What it catches: indices that are functions of ``t`` and the data (``ys[t]``, ``ys[t + 1]``,
``ys[:, t]``, ``ys[idx[t]]``, ``buf.at[t].set(x)``), including inside ``jax.jit``-ed helpers and the
taken branch of a ``lax.cond`` on ``t``. What it does not: indices computed from the particle's
state or from random choices, and code inside ``lax.scan``/``while_loop`` bodies. A step that reads
past the end on purpose (the value discarded by a ``jnp.where``) must clamp the index itself
(``ys[jnp.minimum(t + 1, n - 1)]``), which says so and passes the check.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from ppinfer.errors import ModelError

__all__ = ["check_step_indices"]

_MAX_KNOWN = 1 << 16  # values with more elements than this are never evaluated on the host
_CHECKED: OrderedDict = OrderedDict()  # programs and argument signatures already checked
_CHECKED_SIZE = 256


class _Unknown:
    __slots__ = ()


_U = _Unknown()


class _OutOfRange(Exception):
    def __init__(self, op: str, axis: int, index: int, size: int, extent: int):
        super().__init__(op, axis, index, size, extent)
        self.op, self.axis, self.index, self.size, self.extent = op, axis, index, size, extent


def check_step_indices(program: Any, args: tuple) -> None:
    """Raise :class:`~ppinfer.errors.ModelError` if ``program.step`` (a
    :class:`~ppinfer.SequentialProgram`) indexes an array out of range at ``t = 0`` or
    ``t = num_steps − 1`` with an index known from ``t`` and ``args`` alone (see the module
    docstring). A program whose step cannot be traced here is left to the run to report."""
    from ppinfer._compile import split_args

    try:
        num_steps = program.steps_for(args)
    except Exception:  # an algorithm that passes the program other arguments (PMMH, SMC², PG)
        return
    dyn, static_key, rebuild = split_args(args)
    try:
        key = (program, num_steps, static_key, tuple(_leaf_key(x) for x in dyn))
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _CHECKED:
        _CHECKED.move_to_end(key)
        return
    _check(program, dyn, rebuild, num_steps)  # raises ModelError when out of range
    if key is not None:  # passed (or not checkable here): not traced again for these shapes
        _CHECKED[key] = True
        if len(_CHECKED) > _CHECKED_SIZE:
            _CHECKED.popitem(last=False)


def _check(program: Any, dyn: list, rebuild: Callable, num_steps: int) -> None:
    try:
        closed, n_dyn = _step_jaxpr(program, dyn, rebuild)
    except Exception:  # the run traces the same code and reports its own error
        return
    for t in sorted({0, num_steps - 1}):
        known = [np.asarray(t, np.int32)] + [_small(x) for x in dyn]
        known += [_U] * (len(closed.jaxpr.invars) - 1 - n_dyn)
        try:
            _walk(closed.jaxpr, [_small(c) for c in closed.consts], known)
        except _OutOfRange as e:
            raise ModelError(_message(e, t, num_steps)) from None
        except Exception:  # a primitive this walk does not model: no verdict
            return


def _message(e: _OutOfRange, t: int, num_steps: int) -> str:
    verb = "writes" if e.op == "write" else "reads"
    what = f"element {e.index}" if e.extent == 1 else f"elements {e.index}..{e.index + e.extent - 1}"
    too_long = (
        f" num_steps={num_steps} is longer than the {'array' if e.op == 'write' else 'data'} "
        f"({e.size} along that axis)."
        if e.extent == 1 and e.index == t and num_steps > e.size
        else ""
    )
    return (
        f"step t={t} (of num_steps={num_steps}) {verb} {what} of an array axis {e.axis} of length "
        f"{e.size}: out of range.{too_long} JAX would silently clamp the index (reusing the last "
        f"element) {'or drop the write ' if e.op == 'write' else ''}instead of failing. Make "
        f"num_steps match the data (e.g. num_steps=lambda ys: len(ys)); a step that reads past the "
        f"end on purpose must clamp the index itself (jnp.minimum(i, n - 1))."
    )


def _leaf_key(x: Any) -> Any:
    shape = x.shape if hasattr(x, "shape") else np.shape(x)
    dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)
    if dtype.kind in "iu" and math.prod(shape) <= 4096:
        return shape, dtype, np.asarray(x).tobytes()  # integer data may be indices
    return shape, dtype


def _step_jaxpr(program: Any, dyn: list, rebuild: Callable) -> tuple[ClosedJaxpr, int]:
    """The jaxpr of one particle's step, inputs ``(t, *dyn, *state leaves, key)``."""
    from ppinfer.weighted import simulate

    key = jax.random.PRNGKey(0)

    def init(dyn):
        w, _ = simulate(key, program.init, rebuild(dyn))
        return jax.tree.map(jnp.asarray, w.value)

    state = jax.eval_shape(init, dyn)

    def step(t, dyn, state, key):
        args = rebuild(dyn)
        w, info = simulate(key, lambda s: program.step(s, t, *args), (state,))
        return w.log_weight, info.stopped

    closed = jax.make_jaxpr(step)(jnp.zeros((), jnp.int32), dyn, state, key)
    return closed, len(dyn)


def _small(x: Any) -> Any:
    """``x`` as a NumPy array if it is small enough to evaluate with, else unknown."""
    if isinstance(x, Literal):
        x = x.val
    if isinstance(x, jax.core.Tracer):
        return _U
    try:
        if int(np.prod(np.shape(x))) > _MAX_KNOWN:
            return _U
        return np.asarray(x)
    except Exception:
        return _U


def _walk(jaxpr: Jaxpr, consts: list, inputs: list) -> list:
    env: dict = {}
    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, inputs, strict=True):
        env[v] = x

    def read(v):
        return _small(v) if isinstance(v, Literal) else env.get(v, _U)

    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        outs = _eval(eqn, vals)
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _eval(eqn: Any, vals: list) -> list:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    unknown = [_U] * n_out
    _check_bounds(name, eqn, vals)
    if name == "cond":
        which = vals[0]
        if isinstance(which, _Unknown):
            return unknown  # either branch may run: none is checked
        branches = eqn.params["branches"]
        b = branches[int(np.clip(int(which), 0, len(branches) - 1))]
        return _walk(b.jaxpr, [_small(c) for c in b.consts], vals[1:])
    sub = _sub_jaxpr(eqn)
    if sub is not None:
        inner, consts = sub
        if len(inner.invars) != len(vals):
            return unknown
        return _walk(inner, consts, vals)
    if any(isinstance(x, _Unknown) for x in vals) or name not in _NUMPY:
        return unknown
    if any(int(np.prod(v.aval.shape)) > _MAX_KNOWN for v in eqn.outvars):
        return unknown
    out = _NUMPY[name](*vals, **eqn.params)
    return [np.asarray(out, dtype=eqn.outvars[0].aval.dtype)]


def _sub_jaxpr(eqn: Any) -> tuple[Jaxpr, list] | None:
    """The inner jaxpr of a call-like primitive (``jit``, ``custom_jvp_call``, …), else ``None``
    (loops are not entered)."""
    if eqn.primitive.name in ("scan", "while", "cond"):
        return None
    for p in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(p)
        if isinstance(inner, ClosedJaxpr):
            return inner.jaxpr, [_small(c) for c in inner.consts]
        if isinstance(inner, Jaxpr):
            return inner, []
    return None


def _check_bounds(name: str, eqn: Any, vals: list) -> None:
    if name == "dynamic_slice":
        operand = eqn.invars[0].aval.shape
        sizes = eqn.params["slice_sizes"]
        _check_starts("read", operand, sizes, vals[1 : 1 + len(operand)])
    elif name == "dynamic_update_slice":
        operand = eqn.invars[0].aval.shape
        sizes = eqn.invars[1].aval.shape
        _check_starts("write", operand, sizes, vals[2 : 2 + len(operand)])
    elif name == "gather":
        if eqn.params["mode"] != jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS:
            return  # fill/clip asked for explicitly: out-of-range indices are meant
        dn = eqn.params["dimension_numbers"]
        if dn.operand_batching_dims:
            return
        operand = eqn.invars[0].aval.shape
        _check_indices("read", operand, eqn.params["slice_sizes"], dn.start_index_map, vals[1])
    elif name == "scatter" or name.startswith("scatter-") or name.startswith("scatter_"):
        dn = eqn.params["dimension_numbers"]
        if dn.operand_batching_dims:
            return
        operand = eqn.invars[0].aval.shape
        updates = eqn.invars[2].aval.shape
        window, it = [], iter(dn.update_window_dims)
        for d in range(len(operand)):
            window.append(1 if d in dn.inserted_window_dims else updates[next(it)])
        _check_indices("write", operand, window, dn.scatter_dims_to_operand_dims, vals[1])


def _check_starts(op: str, operand: tuple, sizes: tuple, starts: list) -> None:
    for axis, (dim, size, start) in enumerate(zip(operand, sizes, starts, strict=False)):
        if isinstance(start, _Unknown):
            continue
        s = int(start)
        if s < 0 or s + size > dim:
            raise _OutOfRange(op, axis, s, dim, size)


def _check_indices(op: str, operand: tuple, sizes: Any, index_map: tuple, indices: Any) -> None:
    if isinstance(indices, _Unknown):
        return
    idx = np.asarray(indices).reshape(-1, np.shape(indices)[-1] if np.ndim(indices) else 1)
    for j, axis in enumerate(index_map):
        col = idx[:, j]
        if col.size == 0:
            continue
        dim, size = operand[axis], sizes[axis]
        bad = (col < 0) | (col + size > dim)
        if bad.any():
            raise _OutOfRange(op, axis, int(col[bad][0]), dim, size)


def _div(a, b, **_):
    if np.issubdtype(np.result_type(a, b), np.integer):
        return np.fix(np.true_divide(a, b)).astype(np.result_type(a, b))
    return np.true_divide(a, b)


def _dynamic_slice(x, *starts, slice_sizes, **_):
    idx = tuple(
        slice(int(np.clip(int(s), 0, d - n)), int(np.clip(int(s), 0, d - n)) + n)
        for s, d, n in zip(starts, x.shape, slice_sizes, strict=False)
    )
    return x[idx]


def _broadcast_in_dim(x, shape, broadcast_dimensions, **_):
    expanded = np.reshape(
        x,
        [
            x.shape[broadcast_dimensions.index(d)] if d in broadcast_dimensions else 1
            for d in range(len(shape))
        ],
    )
    return np.broadcast_to(expanded, shape)


_NUMPY: dict[str, Callable[..., Any]] = {
    "add": lambda a, b, **_: np.add(a, b),
    "sub": lambda a, b, **_: np.subtract(a, b),
    "mul": lambda a, b, **_: np.multiply(a, b),
    "div": _div,
    "rem": lambda a, b, **_: np.fmod(a, b),
    "neg": lambda a, **_: np.negative(a),
    "abs": lambda a, **_: np.abs(a),
    "sign": lambda a, **_: np.sign(a),
    "max": lambda a, b, **_: np.maximum(a, b),
    "min": lambda a, b, **_: np.minimum(a, b),
    "lt": lambda a, b, **_: np.less(a, b),
    "le": lambda a, b, **_: np.less_equal(a, b),
    "gt": lambda a, b, **_: np.greater(a, b),
    "ge": lambda a, b, **_: np.greater_equal(a, b),
    "eq": lambda a, b, **_: np.equal(a, b),
    "ne": lambda a, b, **_: np.not_equal(a, b),
    "and": lambda a, b, **_: np.bitwise_and(a, b),
    "or": lambda a, b, **_: np.bitwise_or(a, b),
    "not": lambda a, **_: np.invert(a),
    "select_n": lambda which, *cases, **_: np.choose(np.asarray(which).astype(np.int32), cases),
    "clamp": lambda lo, x, hi, **_: np.clip(x, lo, hi),
    "convert_element_type": lambda x, new_dtype, **_: np.asarray(x).astype(new_dtype),
    "squeeze": lambda x, dimensions, **_: np.squeeze(x, axis=tuple(dimensions)),
    "reshape": lambda x, *_dyn, new_sizes, **_: np.reshape(x, new_sizes),
    "broadcast_in_dim": lambda x, *_dyn, shape, broadcast_dimensions, **_: _broadcast_in_dim(
        x, shape, tuple(broadcast_dimensions)
    ),
    "concatenate": lambda *xs, dimension, **_: np.concatenate(xs, axis=dimension),
    "dynamic_slice": _dynamic_slice,
    "copy": lambda x, **_: np.array(x),
    "copy_p": lambda x, **_: np.array(x),
}
