"""A loaded language model: params, config and tokenizer, with the step interface of the LM layer.

Every language model of ``ppinfer.lm`` (this transformer, :class:`~ppinfer.lm.ngram.NGramLM`)
offers the same methods, so a token-level program does not care which one it runs:

- ``prefill(prompt) -> (logits f32[Lp, V], prompt_cache)`` — once, shared by all particles;
- ``init_particle_cache(prompt_cache, num_particles, max_new_tokens) -> particle_cache`` (leading
  particle axis on every leaf; resampling is :func:`ppinfer.population.gather`: ``x[ancestors]``
  on every leaf, or the cache's own ``reindex(ancestors)`` where its type has one — the paged
  cache of :mod:`ppinfer.lm.paged` copies block tables, not keys and values);
- ``step(prompt_cache, particle_cache, token) -> (logits f32[V], particle_cache)`` for ONE
  particle, pure, to be ``jax.vmap``-ped over the particle cache and tokens;
- ``decode(prompt_cache, particle_cache, tokens, active=None)`` — the batched, jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from ppinfer.errors import CheckpointError, ConfigError, DataError
from ppinfer.lm import paged
from ppinfer.lm.checkpoint import load_params, read_config
from ppinfer.lm.config import TransformerConfig
from ppinfer.lm.tokenizer import Tokenizer
from ppinfer.lm.transformer import (
    Params,
    ParticleCache,
    PromptCache,
    batched_step,
    decode,
    init_particle_cache,
    lm_step,
    prefill,
)

CACHE_KINDS = ("auto", "dense", "paged")

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "default_lm"


class Generation(NamedTuple):
    """Sampled continuations: tokens i32[N, T] and lengths i32[N] (EOS included, then padding)."""

    tokens: jax.Array
    lengths: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class LanguageModel:
    """A transformer checkpoint in JAX: ``params`` pytree, static ``config``, ``tokenizer``."""

    params: Params
    config: TransformerConfig
    tokenizer: Tokenizer | None = None

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence token id (config first, then the tokenizer's special tokens)."""
        if self.config.eos_token_id is not None:
            return self.config.eos_token_id
        return self.tokenizer.eos_id if self.tokenizer else None

    @property
    def vocab_bytes(self) -> list[bytes]:
        """Bytes of every token id the logits cover (``config.vocab_size`` entries): ids past the
        tokenizer's vocabulary (embedding padding, as in Qwen2) map to ``b""``."""
        table = self.tokenizer.vocab_bytes
        return table[: self.config.vocab_size] + [b""] * (self.config.vocab_size - len(table))

    @property
    def dtype(self) -> jnp.dtype:
        return self.params["embed"].dtype

    def encode(self, prompt: str | Sequence[int]) -> jax.Array:
        """Prompt ids i32[Lp] from text (through the tokenizer) or from ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise CheckpointError("this model has no tokenizer: pass token ids")
            prompt = self.tokenizer.encode(prompt)
        return jnp.asarray(self._check_ids(prompt), jnp.int32)

    def _check_ids(self, ids):
        """``ids`` if every id is an integer in ``[0, vocab_size)`` and there are at most
        ``max_position_embeddings`` of them (the context); else :class:`DataError`. Traced ids
        (inside jit) cannot be checked here and pass."""
        if isinstance(ids, jax.core.Tracer):
            return ids
        arr = np.asarray(ids)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"token ids must be integers, got dtype {arr.dtype}")
        vocab, context = self.config.vocab_size, self.config.max_position_embeddings
        if arr.size and (arr.min() < 0 or arr.max() >= vocab):
            bad = int(arr.max()) if arr.max() >= vocab else int(arr.min())
            raise DataError(
                f"token id {bad} is out of range for a vocabulary of {vocab} (ids 0..{vocab - 1})"
            )
        if arr.ndim == 1 and arr.shape[0] > context:
            raise DataError(
                f"the prompt has {arr.shape[0]} tokens, more than the model's context of {context} "
                "(max_position_embeddings): shorten it"
            )
        return ids

    def _check_room(self, prompt_len: int, max_new_tokens: int) -> None:
        context = self.config.max_position_embeddings
        if prompt_len + int(max_new_tokens) > context:
            raise ConfigError(
                f"a prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                f"model's context of {context} tokens (max_position_embeddings): lower "
                f"max_new_tokens to at most {max(context - prompt_len, 0)}"
            )

    def prefill(
        self, prompt: str | Sequence[int], length: jax.Array | None = None
    ) -> tuple[jax.Array, PromptCache]:
        """See :func:`ppinfer.lm.transformer.prefill`."""
        return prefill(self.params, self.config, self.encode(prompt), length)

    def init_particle_cache(
        self,
        prompt_cache: PromptCache,
        num_particles: int,
        max_new_tokens: int,
        cache: str = "dense",
        pool_factor: float = paged.DEFAULT_POOL_FACTOR,
    ) -> ParticleCache | paged.PagedCache:
        """An empty particle cache for N particles (the prompt lives in prompt_cache):
        ``cache="dense"`` a :class:`ParticleCache`, ``"paged"`` a
        :class:`~ppinfer.lm.paged.PagedCache` whose pool holds ``pool_factor`` times the blocks
        the particles can fill (``"auto"`` is dense: the choice for SMC is made by
        :func:`ppinfer.tokens.prompt`). :meth:`step` and :meth:`decode` take either.

        Raises :class:`~ppinfer.errors.ConfigError` if the prompt and ``max_new_tokens`` together
        exceed the model's context, or for an unknown ``cache``."""
        self._check_room(int(prompt_cache.k.shape[2]), max_new_tokens)
        if _cache_kind(cache) == "paged":
            return paged.init_paged_cache(
                self.config, num_particles, max_new_tokens, self.dtype, pool_factor=pool_factor
            )
        return init_particle_cache(self.config, num_particles, max_new_tokens, self.dtype)

    def step(
        self, prompt_cache: PromptCache, particle_cache: ParticleCache, token: jax.Array
    ) -> tuple[jax.Array, ParticleCache]:
        """One particle, one token: :func:`ppinfer.lm.transformer.lm_step` (or
        :func:`ppinfer.lm.paged.step` for a paged cache)."""
        if isinstance(particle_cache, paged.PagedCache):
            return paged.step(self.params, self.config, prompt_cache, particle_cache, token)
        return lm_step(self.params, self.config, prompt_cache, particle_cache, token)

    def decode(
        self,
        prompt_cache: PromptCache,
        particle_cache: ParticleCache,
        tokens: jax.Array,
        active: jax.Array | None = None,
    ) -> tuple[jax.Array, ParticleCache]:
        """All particles, one token: :func:`ppinfer.lm.transformer.decode` or
        :func:`ppinfer.lm.paged.decode` (donates the cache)."""
        if isinstance(particle_cache, paged.PagedCache):
            return paged.decode(self.params, self.config, prompt_cache, particle_cache, tokens, active)
        return decode(self.params, self.config, prompt_cache, particle_cache, tokens, active)

    def generate(
        self,
        prompt: str | Sequence[int],
        key: jax.Array | int = 0,
        num_particles: int = 1,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        cache: str = "auto",
    ) -> Generation:
        """Sample ``num_particles`` continuations (greedy when ``temperature == 0``), stopping
        each at EOS. One jitted scan; no Python loop over tokens. Each step is the batched step of
        :func:`ppinfer.lm.transformer.batched_step` (``attention="auto"``: blocked attention up to
        the longest sequence once ``max_new_tokens >= 64``); ``cache="paged"`` runs it on a
        :class:`~ppinfer.lm.paged.PagedCache` instead (pool factor 1: independent sequences
        share no blocks, so this saves nothing; ``"auto"`` is ``"dense"``)."""
        key = jax.random.key(key) if isinstance(key, int) else key
        eos = -1 if self.eos_id is None else self.eos_id
        ok = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
        if not (ok and 0.0 <= float(temperature) < float("inf")):
            raise ConfigError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
        ids = self.encode(prompt)
        self._check_room(int(ids.shape[0]), max_new_tokens)
        return _generate(
            self.params,
            self.config,
            ids,
            key,
            num_particles,
            max_new_tokens,
            float(temperature),
            eos,
            _cache_kind(cache) == "paged",
        )

    def complete(self, prompt: str, **kwargs) -> list[str]:
        """Text of :meth:`generate`'s continuations, each cut before its EOS."""
        tokens, lengths = jax.device_get(self.generate(prompt, **kwargs))
        eos = self.eos_id
        return [
            self.tokenizer.decode([t for t in row[:n] if t != eos])
            for row, n in zip(tokens, lengths, strict=True)
        ]


def load(path: str | Path, dtype: DTypeLike = jnp.float32) -> LanguageModel:
    """Load a Hugging Face checkpoint folder (``config.json``, ``*.safetensors`` or a sharded
    ``model.safetensors.index.json``, ``tokenizer.json``) as a :class:`LanguageModel` in ``dtype``
    (``jnp.float32`` or ``jnp.bfloat16``).

    Raises :class:`CheckpointError` for a missing/invalid config, unknown architecture, pickle-only
    weights, truncated files, missing tensors or wrong shapes; the tokenizer is optional.
    """
    path = Path(path)
    config, _ = read_config(path)
    params = load_params(path, config, dtype)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(
            path / "tokenizer.json", eos_id=config.eos_token_id, bos_id=config.bos_token_id
        )
    if config.eos_token_id is None and (path / "generation_config.json").is_file():
        eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
        if eos is not None:
            config = dataclasses.replace(config, eos_token_id=eos[0] if isinstance(eos, list) else eos)
    return LanguageModel(params=params, config=config, tokenizer=tokenizer)


@functools.cache
def load_default(dtype: DTypeLike = jnp.float32) -> LanguageModel:
    """The small GPT-2 trained by ``models/train_default_lm.py`` and committed in
    ``models/default_lm`` (cached: loaded once per process)."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise CheckpointError(
            f"the default model folder {DEFAULT_MODEL_DIR} is missing: ppinfer must be installed "
            "from a checkout of the repository (pip install -e .), which holds models/default_lm"
        )
    return load(DEFAULT_MODEL_DIR, dtype)


def _cache_kind(cache: str) -> str:
    if cache not in CACHE_KINDS:
        raise ConfigError(f"cache must be one of {CACHE_KINDS}, got {cache!r}")
    return cache


@functools.partial(jax.jit, static_argnums=(1, 4, 5, 6, 7, 8))
def _generate(
    params: Params,
    config: TransformerConfig,
    prompt: jax.Array,
    key: jax.Array,
    num_particles: int,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    use_paged: bool = False,
) -> Generation:
    logits, prompt_cache = prefill(params, config, prompt)
    logits = jnp.broadcast_to(logits[-1], (num_particles, config.vocab_size))
    dtype = params["embed"].dtype
    if use_paged:
        cache = paged.init_paged_cache(config, num_particles, max_new_tokens, dtype)
        step = paged.decode_batch
    else:
        cache = init_particle_cache(config, num_particles, max_new_tokens, dtype)
        step = batched_step

    def body(carry, key):
        logits, cache, done = carry
        if temperature == 0.0:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            token = jax.random.categorical(key, logits / temperature).astype(jnp.int32)
        token = jnp.where(done, max(eos_id, 0), token)
        logits, cache = step(params, config, prompt_cache, cache, token)
        return (logits, cache, done | (token == eos_id)), (token, done)

    done = jnp.zeros((num_particles,), bool)
    _, (tokens, was_done) = jax.lax.scan(body, (logits, cache, done), jax.random.split(key, max_new_tokens))
    lengths = jnp.sum(~was_done, axis=0).astype(jnp.int32)
    return Generation(tokens=tokens.T, lengths=lengths)
