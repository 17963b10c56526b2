"""Parametric SMC proposals to learn with :class:`~ppinfer.vi.VSMC` (or any objective)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from ppinfer.errors import ModelError
from ppinfer.primitives import sample

__all__ = ["affine_gaussian_proposal"]


def affine_gaussian_proposal(
    site: str, features: Callable[..., jax.Array], num_features: int, prefix: str = "proposal"
) -> Callable[..., Any]:
    """A per-step proposal ``proposal(state, t, *args)`` sampling the scalar site ``site`` from
    ``N(w · [f, 1], softplus(v · [f, 1]))`` where ``f = features(state, t, *args): f32[F]`` (e.g.
    ``[x_{t−1}, y_t]``). Step 0 has its own ``w``/``v`` (the initial distribution differs from the
    transition). Parameters ``<prefix>_w``, ``<prefix>_v``: ``f32[2, F + 1]``, initialised to the
    proposal ``N(0, softplus(1)) ≈ N(0, 1.3)``."""

    def proposal(state, t, *args):
        w = numpyro.param(f"{prefix}_w", jnp.zeros((2, num_features + 1)))
        v = numpyro.param(f"{prefix}_v", jnp.zeros((2, num_features + 1)).at[:, -1].set(1.0))
        f = jnp.asarray(features(state, t, *args), jnp.float32)
        if f.shape != (num_features,):  # known when traced: checked once
            raise ModelError(
                f"affine_gaussian_proposal({site!r}): features(state, t, *args) returned shape "
                f"{f.shape}, but num_features={num_features} needs f32[{num_features}]"
            )
        f = jnp.append(f, 1.0)
        row = jnp.where(t == 0, 0, 1)
        scale = jax.nn.softplus(v[row] @ f) + 1e-4
        sample(site, dist.Normal(w[row] @ f, scale))

    return proposal
