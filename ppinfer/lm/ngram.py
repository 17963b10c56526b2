"""An exact n-gram language model with the transformer's step interface.

Tiny and exact: a token-level program run on it can be enumerated, so inference results can be
compared with exact posteriors. Its "cache" is the last n−1 tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer.errors import ModelError


class NGramCache(NamedTuple):
    """The last n−1 tokens, context: i32[n-1] (oldest first; BOS-padded at the start).

    A batch has a leading particle axis (context: i32[N, n-1]); the prompt cache has none.
    """

    context: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class NGramLM:
    """``log_probs: f32[V, ..., V]`` (n axes): ``log_probs[c_1, ..., c_{n-1}, t]`` is
    log p(t | c_1 … c_{n-1}); contexts shorter than n−1 are left-padded with ``bos_id``."""

    log_probs: jax.Array
    bos_id: int = 0

    @classmethod
    def from_probs(cls, probs, bos_id: int = 0) -> NGramLM:
        """Build from a probability table ``probs: f[V]*n`` whose last axis sums to one."""
        probs = np.asarray(probs, dtype=np.float64)
        vocab = probs.shape[-1]
        if any(size != vocab for size in probs.shape) or not 0 <= bos_id < vocab:
            raise ModelError(
                f"an n-gram table must have shape (V,)*n with 0 <= bos_id < V, "
                f"got {probs.shape} and bos_id={bos_id}"
            )
        if (probs < 0).any() or not np.allclose(probs.sum(-1), 1.0, atol=1e-6):
            raise ModelError("n-gram probabilities must be non-negative and sum to one")
        with np.errstate(divide="ignore"):
            log_probs = np.log(probs)
        return cls(log_probs=jnp.asarray(log_probs, jnp.float32), bos_id=bos_id)

    @property
    def order(self) -> int:
        return self.log_probs.ndim

    @property
    def vocab_size(self) -> int:
        return self.log_probs.shape[-1]

    def prefill(self, prompt) -> tuple[jax.Array, NGramCache]:
        """Log-probabilities f32[Lp, V] of each prompt position's next token, and the prompt's
        context (the initial context of every particle)."""
        prompt = jnp.asarray(prompt, jnp.int32)
        padded = jnp.concatenate([jnp.full((self.order - 1,), self.bos_id, jnp.int32), prompt])
        windows = jnp.stack([padded[i + 1 : i + 1 + prompt.shape[0]] for i in range(self.order - 1)], axis=-1)
        logits = jax.vmap(self._next)(windows)
        return logits, NGramCache(context=padded[padded.shape[0] - (self.order - 1) :])

    def init_particle_cache(
        self, prompt_cache: NGramCache, num_particles: int, max_new_tokens: int | None = None
    ) -> NGramCache:
        """Every particle starts from the prompt's context (``max_new_tokens`` is not needed)."""
        del max_new_tokens
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_particles, *x.shape)), prompt_cache)

    def step(
        self, prompt_cache: NGramCache, particle_cache: NGramCache, token: jax.Array
    ) -> tuple[jax.Array, NGramCache]:
        """One particle: append token, return log p(· | last n−1 tokens) f32[V] and the cache."""
        del prompt_cache
        context = jnp.concatenate([particle_cache.context, jnp.asarray(token, jnp.int32)[None]])
        context = context[1:]
        return self._next(context), NGramCache(context=context)

    @functools.partial(jax.jit, static_argnums=0)
    def decode(
        self,
        prompt_cache: NGramCache,
        particle_cache: NGramCache,
        tokens: jax.Array,
        active: jax.Array | None = None,
    ) -> tuple[jax.Array, NGramCache]:
        """All particles: logits f32[N, V]; inactive particles keep their context."""
        logits, cache = jax.vmap(self.step, in_axes=(None, 0, 0))(prompt_cache, particle_cache, tokens)
        if active is not None:
            cache = NGramCache(jnp.where(active[:, None], cache.context, particle_cache.context))
        return logits, cache

    def _next(self, context: jax.Array) -> jax.Array:
        return self.log_probs[tuple(context[i] for i in range(self.order - 1))]
