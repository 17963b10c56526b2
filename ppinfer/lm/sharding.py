"""Tensor-parallel language models: the transformer's weights sharded over a mesh axis.

Megatron-style layout, expressed as ``NamedSharding`` s and left to XLA's SPMD partitioner: the
column-parallel projections (``q``, ``k``, ``v``, ``up``, ``gate``: output features, i.e. whole heads
and MLP columns) are split over the ``"model"`` axis, the row-parallel ones (``o``, ``down``: input
features) likewise, so each device holds ``1/M`` of every large matrix and the partitioner inserts
one all-reduce after each attention and MLP block. Embeddings, norms and the row-parallel biases are
replicated. Caches computed from sharded weights come out sharded over their head axis. The logits
equal the unsharded ones up to float round-off (the all-reduce sums in a different order).

A model larger than one device's memory is loaded shard by shard with ``jax.device_put(params,
shardings)``; combine with ``SMC(devices=...)`` on a second mesh axis for particle parallelism.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ppinfer import checks
from ppinfer.errors import ConfigError
from ppinfer.lm.config import TransformerConfig

__all__ = ["model_mesh", "param_shardings", "shard_params"]

_COLUMN = ("q", "k", "v", "up", "gate")
_ROW = ("o", "down")


def model_mesh(devices: int | list | None = None, axis: str = "model") -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (an int: the first that many; default: all) named ``axis``."""
    devices = jax.devices() if devices is None else checks.device_tuple(devices)
    return jax.sharding.Mesh(np.array(devices), (axis,))


def param_shardings(
    params: dict, config: TransformerConfig, mesh: jax.sharding.Mesh, axis: str = "model"
) -> Any:
    """A pytree of ``NamedSharding`` s matching ``params`` (see the module docstring).

    Raises :class:`ConfigError` unless the query heads, key/value heads and MLP width divide evenly
    over the ``axis`` size."""
    if axis not in mesh.shape:
        raise ConfigError(f"the mesh has no axis {axis!r} (its axes: {tuple(mesh.shape)}): pass axis=...")
    size = mesh.shape[axis]
    for what, value in (
        ("num_heads", config.num_heads),
        ("num_kv_heads", config.num_kv_heads),
        ("intermediate_size", config.intermediate_size),
    ):
        if value % size:
            raise ConfigError(f"{what}={value} is not divisible by the {size} devices of mesh axis {axis!r}")
    P = jax.sharding.PartitionSpec

    def spec(path, leaf) -> jax.sharding.NamedSharding:
        keys = [getattr(k, "key", None) for k in path]
        if len(keys) >= 3 and keys[0] == "layers":
            block, kind = keys[1], keys[2]
            if block in _COLUMN:
                last = P(*([None] * (leaf.ndim - 1)), axis)
                return jax.sharding.NamedSharding(mesh, last)
            if block in _ROW and kind == "w":
                return jax.sharding.NamedSharding(mesh, P(None, axis, None))
        return jax.sharding.NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(
    params: dict, config: TransformerConfig, mesh: jax.sharding.Mesh, axis: str = "model"
) -> dict:
    """``params`` placed on ``mesh`` with :func:`param_shardings`."""
    return jax.device_put(params, param_shardings(params, config, mesh, axis))
