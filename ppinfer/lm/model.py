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
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from ppinfer import checks
from ppinfer._compile import cached_jit
from ppinfer.errors import CheckpointError, ConfigError, DataError
from ppinfer.lm import paged
from ppinfer.lm.checkpoint import load_params, read_config
from ppinfer.lm.config import TransformerConfig
from ppinfer.lm.quantize import check_mode, quantize_params
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
        """The first end-of-sequence token id (config first, then the tokenizer's special tokens);
        generation stops on any of :attr:`eos_ids`."""
        if self.config.eos_token_id is not None:
            return self.config.eos_token_id
        return self.tokenizer.eos_id if self.tokenizer else None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every token id that ends a sequence, :attr:`eos_id` first: the ids ``config.json`` and
        ``generation_config.json`` list (Llama 3 Instruct: ``<|end_of_text|>``, ``<|eot_id|>``…),
        else the one :attr:`eos_id`; ``()`` if none is known."""
        if self.config.eos_token_ids:
            return tuple(self.config.eos_token_ids)
        return () if self.eos_id is None else (self.eos_id,)

    @property
    def vocab_bytes(self) -> list[bytes]:
        """Bytes of every token id the logits cover (``config.vocab_size`` entries): ids past the
        tokenizer's vocabulary (embedding padding, as in Qwen2) map to ``b""``."""
        if self.tokenizer is None:
            raise CheckpointError(
                "this model has no tokenizer, so its tokens have no bytes: pass vocab_bytes"
            )
        table = self.tokenizer.vocab_bytes
        return table[: self.config.vocab_size] + [b""] * (self.config.vocab_size - len(table))

    @property
    def dtype(self) -> jnp.dtype:
        return self.params["embed"].dtype

    def quantize(self, mode: str = "int8") -> LanguageModel:
        """A copy of this model with weight-only quantised linear layers (``"int8"``: int8
        weights with per-output-channel scales, see :mod:`ppinfer.lm.quantize`). Raises
        :class:`ConfigError` for an unknown mode or a model already quantised."""
        return dataclasses.replace(self, params=quantize_params(self.params, mode))

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
        each at the first token of :attr:`eos_ids`: one batched decode step per token for all
        sequences (:func:`ppinfer.lm.transformer.batched_step`, ``attention="auto"``: blocked
        attention up to the longest sequence once ``max_new_tokens >= 64``), in one jitted loop that
        ends once every sequence has ended (no Python loop over tokens); ``cache="paged"`` runs it on
        a :class:`~ppinfer.lm.paged.PagedCache` instead (pool factor 1: independent sequences share
        no blocks, so this saves nothing; ``"auto"`` is ``"dense"``)."""
        key = jax.random.wrap_key_data(checks.as_key(key))  # an int seed or a key; else ConfigError
        eos = self.eos_ids or (-1,)
        ok = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
        if not (ok and 0.0 <= float(temperature) < float("inf")):
            raise ConfigError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
        num_particles = checks.check_num_particles(num_particles)
        max_new_tokens = checks.check_int("max_new_tokens", max_new_tokens, 1)
        ids = self.encode(prompt)
        if ids.ndim != 1 or ids.shape[0] == 0:
            raise DataError(
                f"generate needs a prompt of at least one token (a 1-D sequence), got shape {ids.shape}"
            )
        self._check_room(int(ids.shape[0]), max_new_tokens)
        # The one compile cache (its lock, memory check and compile notice), keyed by the settings.
        settings = (num_particles, max_new_tokens, float(temperature), eos, _cache_kind(cache) == "paged")
        build = lambda: functools.partial(_generate, config=self.config, settings=settings)
        run, _ = cached_jit(("generate", self.config, settings), build)
        return run(self.params, ids, key)

    def complete(self, prompt: str, **kwargs) -> list[str]:
        """Text of :meth:`generate`'s continuations, each cut before its EOS."""
        tokens, lengths = jax.device_get(self.generate(prompt, **kwargs))
        eos = set(self.eos_ids)
        return [
            self.tokenizer.decode([t for t in row[:n] if t not in eos])
            for row, n in zip(tokens, lengths, strict=True)
        ]


def load(
    path: str | Path, dtype: DTypeLike | None = jnp.float32, quantize: str | None = None
) -> LanguageModel:
    """Load a Hugging Face checkpoint folder (``config.json``, ``*.safetensors`` or a sharded
    ``model.safetensors.index.json``, ``tokenizer.json`` with ``tokenizer_config.json`` and the chat
    templates, ``generation_config.json``) as a :class:`LanguageModel` in ``dtype`` (``jnp.float32``,
    ``jnp.bfloat16``, ``jnp.float16``; None: the checkpoint's own dtype).

    The end-of-sequence ids are those of ``config.json`` then ``generation_config.json`` (each an
    int or a list), in that order without repeats (:attr:`LanguageModel.eos_ids`).
    ``quantize="int8"`` stores the linear layers' weights in int8 (see :meth:`LanguageModel.quantize`).

    Raises :class:`CheckpointError` for a missing/invalid config, unknown architecture, pickle-only
    weights, truncated files, missing tensors or wrong shapes, or EOS ids that are not token ids;
    the tokenizer is optional (a bad one is a :class:`~ppinfer.errors.TokenizerError`).
    """
    if not isinstance(path, str | os.PathLike):
        raise CheckpointError(f"load() takes a checkpoint folder path, got {type(path).__name__} {path!r}")
    _check_dtype(dtype)
    check_mode(quantize)
    path = Path(path)
    config, hf = read_config(path)
    eos_ids = _eos_ids(path, hf, config.vocab_size)
    config = dataclasses.replace(config, eos_token_id=eos_ids[0] if eos_ids else None, eos_token_ids=eos_ids)
    params = load_params(path, config, dtype)
    if quantize is not None:
        params = quantize_params(params, quantize)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_folder(
            path, eos_id=config.eos_token_id, bos_id=config.bos_token_id, model_vocab_size=config.vocab_size
        )
        if tokenizer.vocab_size > config.vocab_size:
            warnings.warn(
                f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary of "
                f"{config.vocab_size}: text that encodes to ids >= {config.vocab_size} is refused",
                stacklevel=2,
            )
    return LanguageModel(params=params, config=config, tokenizer=tokenizer)


def _check_dtype(dtype: Any) -> None:
    """:class:`ConfigError` unless ``dtype`` is None or a floating-point dtype (an integer dtype
    would truncate every weight)."""
    try:
        ok = dtype is None or jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ConfigError(
            f"dtype must be a floating-point dtype (jnp.float32, jnp.bfloat16, jnp.float16) or None "
            f"(the checkpoint's own), got {dtype!r}"
        )


def _eos_ids(path: Path, hf: dict, vocab_size: int) -> tuple[int, ...]:
    """The EOS ids of config.json then generation_config.json, without repeats."""
    sources = [("config.json", hf.get("eos_token_id"))]
    generation = path / "generation_config.json"
    if generation.is_file():
        try:
            gen = json.loads(generation.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{generation} is not valid JSON: {error}") from None
        if not isinstance(gen, dict):
            raise CheckpointError(f"{generation} must hold a JSON object, got a {type(gen).__name__}")
        sources.append(("generation_config.json", gen.get("eos_token_id")))
    out: list[int] = []
    for name, value in sources:
        values = value if isinstance(value, list) else [] if value is None else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise CheckpointError(
                    f"{name}: eos_token_id must be a token id (an integer in [0, {vocab_size})) or a "
                    f"list of them, got {value!r}"
                )
            if v >= vocab_size:
                # Common in small configs (GPT2Config's default 50256 with a smaller vocabulary):
                # a token the model can never emit stops nothing, so it is left out, loudly.
                warnings.warn(
                    f"{name}: eos_token_id {v} is outside the vocabulary ({vocab_size} tokens): ignored",
                    stacklevel=3,
                )
                continue
            if v not in out:
                out.append(v)
    return tuple(out)


@functools.cache
def load_default(dtype: DTypeLike = jnp.float32, quantize: str | None = None) -> LanguageModel:
    """The small GPT-2 trained by ``models/train_default_lm.py`` and committed in
    ``models/default_lm`` (cached: loaded once per process); ``quantize`` as in :func:`load`."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise CheckpointError(
            f"the default model folder {DEFAULT_MODEL_DIR} is missing: ppinfer must be installed "
            "from a checkout of the repository (pip install -e .), which holds models/default_lm"
        )
    return load(DEFAULT_MODEL_DIR, dtype, quantize)


def _cache_kind(cache: str) -> str:
    if cache not in CACHE_KINDS:
        raise ConfigError(f"cache must be one of {CACHE_KINDS}, got {cache!r}")
    return cache


def _generate(
    params: Params, prompt: jax.Array, key: jax.Array, *, config: TransformerConfig, settings: tuple
) -> Generation:
    """One batched decode per token for all sequences (:func:`batched_step`, the step SMC's token
    programs use), in a ``while_loop`` that ends once every sequence has emitted EOS. ``settings``
    is ``(num_particles, max_new_tokens, temperature, eos_ids, use_paged)``. Step ``i`` draws with
    ``jax.random.split(key, max_new_tokens)[i]``; a finished sequence is fed (and records)
    ``max(eos_ids[0], 0)``; a sequence ends at any of ``eos_ids``. Pure; compiled by
    :meth:`LanguageModel.generate` through :func:`~ppinfer._compile.cached_jit`."""
    num_particles, max_new_tokens, temperature, eos_ids, use_paged = settings
    logits, prompt_cache = prefill(params, config, prompt)
    logits = jnp.broadcast_to(logits[-1], (num_particles, config.vocab_size))
    dtype = params["embed"].dtype
    if use_paged:
        cache = paged.init_paged_cache(config, num_particles, max_new_tokens, dtype)
        step = paged.decode_batch
    else:
        cache = init_particle_cache(config, num_particles, max_new_tokens, dtype)
        step = batched_step
    keys = jax.random.split(key, max_new_tokens)
    pad = max(eos_ids[0], 0)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, logits, cache, done, tokens, lengths = carry
        if temperature == 0.0:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            token = jax.random.categorical(keys[i], logits / temperature).astype(jnp.int32)
        token = jnp.where(done, pad, token)
        logits, cache = step(params, config, prompt_cache, cache, token)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, i, axis=1)
        done_now = done | jnp.isin(token, jnp.asarray(eos_ids))
        return i + 1, logits, cache, done_now, tokens, lengths + (~done).astype(jnp.int32)

    done = jnp.zeros((num_particles,), bool)
    tokens = jnp.full((num_particles, max_new_tokens), pad, jnp.int32)
    lengths = jnp.zeros((num_particles,), jnp.int32)
    carry = (jnp.zeros((), jnp.int32), logits, cache, done, tokens, lengths)
    _, _, _, _, tokens, lengths = jax.lax.while_loop(cond, body, carry)
    return Generation(tokens=tokens, lengths=lengths)
