"""Compilation cache: program arguments split into traced arrays and static Python values.

Arrays and floats are passed to the compiled function as traced inputs, so calling ``infer`` again
with new data of the same shapes reuses the compiled code; ints, strings, callables and other Python
values are static (part of the cache key). Also the host-side data checks on those arguments.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import jax
import numpy as np

from ppinfer.errors import DataError

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64


def split_args(args: Any) -> tuple[list, Hashable, Callable[[list], Any]]:
    """``(dynamic_leaves, static_key, rebuild)`` for a pytree of program arguments."""
    leaves, treedef = jax.tree.flatten(args)
    dynamic = tuple(_is_dynamic(x) for x in leaves)
    static = tuple(None if d else _hashable(x) for x, d in zip(leaves, dynamic, strict=True))
    dyn_leaves = [x for x, d in zip(leaves, dynamic, strict=True) if d]
    static_values = [None if d else x for x, d in zip(leaves, dynamic, strict=True)]

    def rebuild(values: list) -> Any:
        it = iter(values)
        full = [next(it) if d else x for x, d in zip(static_values, dynamic, strict=True)]
        return jax.tree.unflatten(treedef, full)

    return dyn_leaves, (treedef, static, dynamic), rebuild


def cached_jit(key: Hashable, build: Callable[[], Callable]) -> tuple[Callable, bool]:
    """The jitted function cached under ``key`` (built by ``build()`` on a miss) and whether it was
    new."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key], False
    fn = jax.jit(build())
    _CACHE[key] = fn
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return fn, True


def forget(key: Hashable) -> None:
    """Drop ``key`` from the cache (e.g. when the program failed its checks after compilation)."""
    _CACHE.pop(key, None)


def check_data(args: Any) -> None:
    """Raise :class:`DataError` if a floating-point array or scalar argument contains NaN."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(args)[0]:
        if isinstance(leaf, jax.core.Tracer) or not _is_dynamic(leaf):
            continue
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
            where = jax.tree_util.keystr(path) or "argument"
            raise DataError(f"program argument {where} contains NaN")


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | float | np.floating)


class _ById:
    """Hash an unhashable static value by identity (and keep it alive while cached)."""

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ById) and other.value is self.value


def _hashable(x: Any) -> Hashable:
    try:
        hash(x)
    except TypeError:
        return _ById(x)
    return x
