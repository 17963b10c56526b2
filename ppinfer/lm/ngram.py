"""An exact n-gram language model with the transformer's interface.

Tiny and exact: a token-level program run on it can be enumerated, so inference results can be
compared with exact posteriors. Its "cache" is the last n−1 tokens. Like
:class:`~ppinfer.lm.LanguageModel` it has the step interface (``prefill``, ``init_particle_cache``,
``step``, ``decode``), ``eos_id``, ``encode``, a ``tokenizer`` (:class:`NGramTokenizer`) with
``vocab_bytes``, and ``generate``/``complete``.

Start distribution: contexts are left-padded with ``bos_id``, so the table's row
``log_probs[bos, …, bos]`` is the distribution of the first token (:attr:`NGramLM.start_log_probs`;
``from_probs(..., start=...)`` sets it). ``encode`` puts ``bos_id`` first, so ``tk.prompt(lm, "")``
starts there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer import checks
from ppinfer.errors import ConfigError, DataError, ModelError, TokenizerError


class NGramCache(NamedTuple):
    """The last n−1 tokens, context: i32[n-1] (oldest first; BOS-padded at the start).

    A batch has a leading particle axis (context: i32[N, n-1]); the prompt cache has none.
    """

    context: jax.Array


class NGramTokenizer:
    """A tokenizer over an n-gram model's vocabulary: ``vocab_bytes[i]`` is token i's bytes.

    ``encode`` is greedy longest match (ambiguous vocabularies get one of their tokenisations, the
    same every time); ``decode`` joins the bytes, leaving out BOS and EOS (``skip_special``)."""

    def __init__(self, vocab_bytes, eos_id: int | None, bos_id: int):
        self.vocab_bytes = [bytes(b) for b in vocab_bytes]
        self.eos_id, self.bos_id = eos_id, bos_id
        self.special_ids = frozenset(i for i in (eos_id, bos_id) if i is not None)
        self._by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(self.vocab_bytes):
            if b and i not in self.special_ids:
                self._by_bytes.setdefault(b, i)
        self._longest = max((len(b) for b in self._by_bytes), default=0)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab_bytes)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (BOS first if ``add_special_tokens``); :class:`TokenizerError` if
        some part of the text is no token's bytes."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode str, got {type(text).__name__}")
        data, ids, i = text.encode("utf-8"), [], 0
        while i < len(data):
            for size in range(min(self._longest, len(data) - i), 0, -1):
                tok = self._by_bytes.get(data[i : i + size])
                if tok is not None:
                    ids.append(tok)
                    i += size
                    break
            else:
                raise TokenizerError(f"no token of the vocabulary spells {data[i:]!r} (at byte {i})")
        return [self.bos_id, *ids] if add_special_tokens else ids

    def decode_bytes(self, ids, skip_special: bool = True) -> bytes:
        return b"".join(
            self.vocab_bytes[int(t)] for t in ids if not (skip_special and int(t) in self.special_ids)
        )

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True, eq=False)
class NGramLM:
    """``log_probs: f32[V, ..., V]`` (n axes): ``log_probs[c_1, ..., c_{n-1}, t]`` is
    log p(t | c_1 … c_{n-1}); contexts shorter than n−1 are left-padded with ``bos_id``.

    ``eos_id``: the end-of-sequence token (None: the model has none, and ``tk.prompt(...).eos_id``
    raises instead of comparing tokens with None). ``vocab``: each token's bytes (default: token i
    is the text ``"<i>"``; BOS and EOS are specials, left out by ``decode``)."""

    log_probs: jax.Array
    bos_id: int = 0
    eos_id: int | None = None
    vocab: tuple[bytes, ...] | None = None

    def __post_init__(self):
        shape = getattr(self.log_probs, "shape", None)
        if not shape:  # rebuilt by a pytree operation with placeholder leaves: nothing to check
            return
        V = shape[-1]
        for name in ("bos_id", "eos_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, np.integer)) and 0 <= value < V):
                raise ModelError(f"{name} must be a token id in [0, {V}), got {value!r}")
        if self.vocab is not None:
            if len(self.vocab) != V:
                raise ModelError(f"vocab has {len(self.vocab)} entries, the table {V} tokens")
            vocab = tuple(v.encode() if isinstance(v, str) else bytes(v) for v in self.vocab)
            object.__setattr__(self, "vocab", vocab)

    @classmethod
    def from_probs(cls, probs, bos_id: int = 0, eos_id: int | None = None, vocab=None, start=None) -> NGramLM:
        """Build from a probability table ``probs: f[V]*n`` whose last axis sums to one.

        ``eos_id``, ``vocab`` (V strings or bytes): see the class. ``start: f[V]`` (optional): the
        distribution of the first token, written into the row of the all-BOS context (n ≥ 2)."""
        probs = np.array(probs, dtype=np.float64)
        vocab_size = probs.shape[-1]
        if probs.ndim < 2:
            raise ModelError(f"an n-gram table needs order n >= 2, shape (V,)*n; got shape {probs.shape}")
        if any(size != vocab_size for size in probs.shape) or not 0 <= bos_id < vocab_size:
            raise ModelError(
                f"an n-gram table must have shape (V,)*n with 0 <= bos_id < V, "
                f"got {probs.shape} and bos_id={bos_id}"
            )
        if start is not None:
            start = np.asarray(start, np.float64)
            if probs.ndim < 2 or start.shape != (vocab_size,):
                raise ModelError(f"start must have shape ({vocab_size},) on a table of order >= 2")
            probs[(bos_id,) * (probs.ndim - 1)] = start
        if (probs < 0).any() or not np.allclose(probs.sum(-1), 1.0, atol=1e-6):
            raise ModelError("n-gram probabilities (and start) must be non-negative and sum to one")
        with np.errstate(divide="ignore"):
            log_probs = np.log(probs)
        return cls(log_probs=jnp.asarray(log_probs, jnp.float32), bos_id=bos_id, eos_id=eos_id, vocab=vocab)

    @property
    def start_log_probs(self) -> jax.Array:
        """``f32[V]``: log-probabilities of the first token (the all-BOS context's row)."""
        return self._next(jnp.full((self.order - 1,), self.bos_id, jnp.int32))

    @functools.cached_property
    def tokenizer(self) -> NGramTokenizer:
        return NGramTokenizer(self.vocab_bytes, self.eos_id, self.bos_id)

    @property
    def vocab_bytes(self) -> list[bytes]:
        """Bytes of every token (``vocab``, or ``b"<i>"`` for token i)."""
        if self.vocab is not None:
            return list(self.vocab)
        return [f"<{i}>".encode() for i in range(self.vocab_size)]

    def encode(self, prompt) -> jax.Array:
        """Prompt ids i32[Lp]: text is tokenised with BOS first (``tk.prompt(lm, "")`` is the start
        distribution; BOS in front changes no n-gram context, since contexts are BOS-padded); ids are
        checked and kept as given."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else prompt
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise DataError(f"a prompt is text or a 1-D sequence of integer token ids, got {prompt!r}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"token ids must lie in [0, {self.vocab_size}), got {arr.tolist()}")
        return jnp.asarray(arr, jnp.int32)

    def generate(self, prompt, key: jax.Array | int = 0, num_particles: int = 1, max_new_tokens: int = 32):
        """Sample ``num_particles`` continuations of ``prompt`` (text or ids), each stopping at EOS:
        a :class:`~ppinfer.lm.Generation` (tokens i32[N, T], EOS included, then padding)."""
        from ppinfer.lm.model import Generation

        if int(max_new_tokens) < 1 or int(num_particles) < 1:
            raise ConfigError("num_particles and max_new_tokens must be >= 1")
        key = jax.random.wrap_key_data(checks.as_key(key))  # an int seed or a key; else ConfigError
        logits, prompt_cache = self.prefill(self.encode(prompt))
        cache = self.init_particle_cache(prompt_cache, int(num_particles))
        eos = -1 if self.eos_id is None else self.eos_id
        logits = jnp.broadcast_to(logits[-1], (int(num_particles), self.vocab_size))

        def body(carry, key):
            logits, cache, done = carry
            token = jnp.where(done, max(eos, 0), jax.random.categorical(key, logits).astype(jnp.int32))
            logits, cache = self.decode(prompt_cache, cache, token, ~done)
            return (logits, cache, done | (token == eos)), (token, done)

        done = jnp.zeros((int(num_particles),), bool)
        keys = jax.random.split(key, int(max_new_tokens))
        _, (tokens, was_done) = jax.lax.scan(body, (logits, cache, done), keys)
        return Generation(tokens=tokens.T, lengths=jnp.sum(~was_done, axis=0).astype(jnp.int32))

    def complete(self, prompt, **kwargs) -> list[str]:
        """Text of :meth:`generate`'s continuations (EOS left out)."""
        tokens, lengths = jax.device_get(self.generate(prompt, **kwargs))
        return [self.tokenizer.decode(row[:n]) for row, n in zip(tokens, lengths, strict=True)]

    @property
    def order(self) -> int:
        return self.log_probs.ndim

    @property
    def vocab_size(self) -> int:
        return self.log_probs.shape[-1]

    def prefill(self, prompt) -> tuple[jax.Array, NGramCache]:
        """Log-probabilities f32[Lp, V] of each prompt position's next token, and the prompt's
        context (the initial context of every particle)."""
        if not isinstance(prompt, jax.core.Tracer):  # concrete ids: checked as encode checks them
            self.encode(np.asarray(prompt))
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
