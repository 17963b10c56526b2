"""Weight-only int8 quantisation of a transformer's linear layers.

Each projection of every layer (``q``, ``k``, ``v``, ``o``, ``up``, ``gate``, ``down``), whose
params are ``{"w": [Lyr, in, out] float, "b"?: [Lyr, out]}``, becomes::

    {"w": int8[Lyr, in, out], "w_scale": [Lyr, out] (the weight's float dtype), "b"?: unchanged}

with symmetric per-output-channel scales: ``scale[o] = max_i |w[i, o]| / 127`` and ``w_int8 =
round(w / scale)`` in ``[-127, 127]``, so ``w ≈ w_int8 * scale`` with an absolute error of at most
``scale / 2`` per entry. The transformer's matmul helper (``transformer._dense``) recognises the
``w_scale`` entry and computes ``(x @ w_int8) * scale`` — the int8 weight is converted to the
activations' dtype inside the jitted matmul, so the stored weights take a quarter of their fp32
bytes (half of bf16). Activations, the KV cache, norms, biases, embeddings (and the untied
``lm_head``) stay in the model's float dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer.errors import ConfigError
from ppinfer.lm.transformer import Params

QUANTIZE_MODES = ("int8",)
LINEAR_BLOCKS = ("q", "k", "v", "o", "up", "gate", "down")
"""The per-layer projections that :func:`quantize_params` quantises."""


def check_mode(quantize: str | None) -> None:
    """ConfigError unless ``quantize`` is None or one of :data:`QUANTIZE_MODES`."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be None or one of {QUANTIZE_MODES}, got {quantize!r}")


def is_quantized(params: Params) -> bool:
    """Whether any linear layer of ``params`` holds int8 weights."""
    layers = params.get("layers", {})
    return any("w_scale" in layers[name] for name in LINEAR_BLOCKS if name in layers)


def quantize_linear(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(w_int8, scale)`` of a float weight ``w: [..., in, out]``: int8 of the same shape and
    per-output-channel scales ``[..., out]`` in ``w``'s dtype (an all-zero column gets scale 1).
    The int8 values are rounded against the scale as stored (``amax / 127`` rounded up in ``w``'s
    dtype, so no value needs more than ±127): ``|w − q · scale| ≤ scale / 2`` per entry in bfloat16
    too (rounded against the float32 scale, a bfloat16 scale's own rounding added up to about
    ``scale / 2`` more)."""
    w32 = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=-2)
    exact = jnp.where(amax > 0, amax / 127.0, 1.0)
    scale = exact.astype(w.dtype)
    scale = jnp.where(
        scale.astype(jnp.float32) < exact, jnp.nextafter(scale, jnp.asarray(jnp.inf, w.dtype)), scale
    )
    q = jnp.clip(jnp.round(w32 / scale.astype(jnp.float32)[..., None, :]), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize_linear(q: jax.Array, scale: jax.Array) -> jax.Array:
    """The float weight ``q * scale`` ([..., in, out]) that a quantised layer stands for."""
    return q.astype(scale.dtype) * scale[..., None, :]


def quantize_params(params: Params, mode: str = "int8") -> Params:
    """A copy of ``params`` with every linear layer of :data:`LINEAR_BLOCKS` quantised (module
    docstring). Raises :class:`ConfigError` for an unknown ``mode``, params already quantised, or
    linear weights that are not floating point."""
    check_mode(mode)
    if mode is None:
        return params
    if is_quantized(params):
        raise ConfigError("these params are already quantised")
    layers = dict(params["layers"])
    for name in LINEAR_BLOCKS:
        if name not in layers:
            continue
        block = dict(layers[name])
        if not jnp.issubdtype(block["w"].dtype, jnp.floating):
            raise ConfigError(f"layer weight {name!r} has dtype {block['w'].dtype}; expected floating point")
        block["w"], block["w_scale"] = quantize_linear(block["w"])
        layers[name] = block
    return {**params, "layers": layers}


def params_bytes(params: Params, linear_only: bool = False) -> int:
    """Bytes of the arrays of ``params`` (``linear_only``: of the :data:`LINEAR_BLOCKS` weights and
    their scales only, biases excluded)."""
    if linear_only:
        layers = params["layers"]
        leaves = [
            layers[name][key]
            for name in LINEAR_BLOCKS
            if name in layers
            for key in ("w", "w_scale")
            if key in layers[name]
        ]
    else:
        leaves = jax.tree.leaves(params)
    return int(sum(np.dtype(x.dtype).itemsize * x.size for x in leaves))
