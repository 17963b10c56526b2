"""Token-level language-model programs: LLM generation as a sequential program.

A token-level program is a :class:`~ppinfer.SequentialProgram` whose particle state holds one or
more LM :class:`Context` s (the generated tokens, the particle's KV cache and the next-token
log-probabilities). Its ``step`` samples a token and weights it, written for ONE particle::

    p = tokens.prompt(lm, "def ", max_new_tokens=32)      # run the prompt once, shared

    def init(p):
        return tokens.Context.start(p)

    def step(ctx, t, p):
        tok = pp.sample("tok", ctx.next_token())           # the LM is the prior over tokens
        pp.condition("no_e", ~has_e[tok])                   # constraints, potentials, twists…
        pp.stop(p.is_eos(tok))                              # end the particle at any EOS token
        return ctx.extend(p, tok)                           # feed the token to the LM

    result = pp.infer(pp.sequential(init, step, 32), p, algorithm=pp.SMC(64))

A chat model's prompt is its chat template rendered for a list of messages:
``tokens.prompt(lm, messages=[{"role": "user", "content": "Hi"}], max_new_tokens=32)``; the
particles then stop on any of the model's EOS ids (``p.is_eos(tok)``: Llama 3 Instruct ends its
turn with ``<|eot_id|>``).

Because the whole LM context is particle state, resampling gathers the KV caches with the
particles (a dense cache is copied; a paged one, ``prompt(..., cache="paged")``, copies only its
block tables and partial last block: :mod:`ppinfer.lm.paged`). The prompt's keys and values
(:class:`LMPrompt`) are computed once and shared by every particle; they and the LM's parameters are
traced arguments of the compiled program, not constants.

Target semantics at the length limit: the posterior is over sequences of at most ``num_steps``
tokens; a particle still running at the limit is kept as it is (the target is the *truncated*
process). To condition on finishing instead, call ``pp.condition("finished", stopped | (t < T−1))``
in the step (see :func:`require_eos`).

Weights: sampling ``tok`` from ``ctx.next_token()`` without a proposal adds nothing (it is the
prior); a proposal ``q`` for ``"tok"`` adds ``log p(tok) − log q(tok)``; ``condition``/``factor``/
``observe`` add their log factors; :func:`twist` adds ``ψ_t − ψ_{t−1}`` so that twists telescope and
the final target is unchanged.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from ppinfer.errors import ConfigError, DataError, InferenceError, ModelError
from ppinfer.primitives import condition, factor, sample, stop
from ppinfer.program import SequentialProgram

__all__ = [
    "LMPrompt",
    "Context",
    "prompt",
    "check_token_ids",
    "masked_next_token",
    "twist",
    "require_eos",
    "text_predicate",
    "text_value",
    "score_tokens",
    "texts",
    "constrained",
    "ConstrainedState",
    "ConstrainedProgram",
]


@jax.tree_util.register_pytree_node_class
class LMPrompt:
    """A language model with its prompt run once (shared by all particles; no particle axis).

    Pytree: the model's arrays, ``prompt_cache`` and ``first_logp: f32[V]`` (log-probabilities of
    the first new token) are traced; the model's structure, ``max_new_tokens``, the EOS ids and the
    particle cache's kind (``cache``: ``"dense"`` or ``"paged"``, and ``pool_factor``) are
    static. Works with :class:`ppinfer.lm.LanguageModel` and :class:`ppinfer.lm.NGramLM` (anything
    with ``prefill``, ``init_particle_cache`` and a one-particle ``step``).

    ``eos`` is one EOS id, several (a tuple: every one ends a sequence), or None. ``eos_ids`` is
    the tuple, ``eos_id`` its first element (None if there is none).
    """

    def __init__(
        self,
        lm,
        prompt_cache,
        first_logp,
        max_new_tokens: int,
        eos: int | Sequence[int] | None,
        cache: str = "dense",
        pool_factor: float | None = None,
    ):
        self.lm, self.prompt_cache, self.first_logp = lm, prompt_cache, first_logp
        self.max_new_tokens, self.eos_ids = max_new_tokens, _eos_tuple(eos)
        self.cache, self.pool_factor = cache, pool_factor

    @property
    def eos_id(self) -> int:
        """The LM's (first) end-of-sequence token; :class:`ConfigError` if it has none (so that
        ``pp.stop(tok == p.eos_id)`` cannot silently compare with None and never stop). A model
        with several EOS ids (``eos_ids``): stop with :meth:`is_eos`."""
        if not self.eos_ids:
            raise ConfigError(
                f"this {type(self.lm).__name__} has no EOS token (eos_id is None): give the model one "
                "(e.g. NGramLM.from_probs(..., eos_id=...)) or stop on another condition"
            )
        return self.eos_ids[0]

    @property
    def has_eos(self) -> bool:
        return bool(self.eos_ids)

    def is_eos(self, token: jax.Array) -> jax.Array:
        """``bool`` (shape of ``token``): whether ``token`` is one of the EOS ids (False if none)."""
        token = jnp.asarray(token)
        out = jnp.zeros(token.shape, jnp.bool_)
        for eos in self.eos_ids:
            out = out | (token == eos)
        return out

    def tree_flatten(self):
        field = _array_field(self.lm)
        children = (getattr(self.lm, field), self.prompt_cache, self.first_logp)
        aux = (_Template(self.lm), field, self.max_new_tokens, self.eos_ids, self.cache, self.pool_factor)
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        template, field, max_new_tokens, eos_ids, cache, pool_factor = aux
        arrays, prompt_cache, first_logp = children
        lm = dataclasses.replace(template.lm, **{field: arrays})
        return cls(lm, prompt_cache, first_logp, max_new_tokens, eos_ids, cache, pool_factor)

    def init_cache(self, num_particles: int) -> Any:
        """An empty particle cache of the chosen kind for ``num_particles`` particles."""
        if self.cache == "paged":
            return self.lm.init_particle_cache(
                self.prompt_cache, num_particles, self.max_new_tokens, cache="paged",
                pool_factor=self.pool_factor,
            )  # fmt: skip
        return self.lm.init_particle_cache(self.prompt_cache, num_particles, self.max_new_tokens)

    @property
    def vocab_size(self) -> int:
        return int(self.first_logp.shape[-1])

    def step(self, cache: Any, token: jax.Array) -> tuple[jax.Array, Any]:
        """Feed ``token: i32[]`` to one particle's ``cache``; returns next-token log-probs f32[V]."""
        logits, cache = self.lm.step(self.prompt_cache, cache, token)
        return jax.nn.log_softmax(logits.astype(jnp.float32)), cache


def prompt(
    lm: Any,
    text: str | Sequence[int] | None = None,
    max_new_tokens: int | None = None,
    cache: str = "auto",
    pool_factor: float | None = None,
    *,
    messages: Sequence[dict] | None = None,
    add_generation_prompt: bool | None = None,
    **template_kwargs: Any,
) -> LMPrompt:
    """Run a prompt through ``lm`` once and return the shared :class:`LMPrompt` for programs
    generating at most ``max_new_tokens`` tokens.

    The prompt is ``text`` (a string, encoded without BOS/EOS, or token ids) or ``messages``, a
    chat (``[{"role": "user", "content": "..."}, ...]``) rendered with the model's chat template
    (:meth:`ppinfer.lm.Tokenizer.apply_chat_template`, with ``add_generation_prompt=True`` by
    default so that the model writes the assistant's turn — or, with
    ``continue_final_message=True``, continues the last message, e.g. a partly written answer;
    ``template_kwargs`` such as ``tools``, ``chat_template`` or ``date_string`` go to the
    template) and encoded.

    ``cache``: the particles' KV cache. ``"dense"``: each particle owns ``max_new_tokens``
    positions (:class:`ppinfer.lm.ParticleCache`; resampling copies whole caches). ``"paged"``: a
    pool of blocks shared by the particles with per-particle block tables
    (:class:`ppinfer.lm.paged.PagedCache`; resampling copies tables and one partial block per
    particle, memory follows the distinct blocks), transformers only. ``"auto"``: paged for a
    transformer when ``max_new_tokens >= paged.AUTO_PAGED_MIN_TOKENS``, dense otherwise.
    ``pool_factor`` (paged only; default :data:`ppinfer.lm.paged.DEFAULT_POOL_FACTOR`, 1: never
    runs out): pool blocks per particle as a fraction of what a particle can fill; below 1 a run
    that needs more distinct blocks fails with :class:`~ppinfer.errors.InferenceError`.

    Raises, before anything is compiled: :class:`~ppinfer.errors.ConfigError` for a bad
    ``max_new_tokens``, both or neither of ``text``/``messages``, a prompt plus ``max_new_tokens``
    longer than the model's context, or ``messages`` for a model without a tokenizer;
    :class:`~ppinfer.errors.DataError` for token ids outside the vocabulary or a prompt longer than
    the context; :class:`~ppinfer.errors.TokenizerError` if the tokenizer has no chat template or
    the template fails.
    """
    if max_new_tokens is None:
        raise ConfigError("tokens.prompt needs max_new_tokens (the most tokens a particle generates)")
    try:
        count = None if isinstance(max_new_tokens, bool) else operator.index(max_new_tokens)
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_new_tokens = count
    cache, pool_factor = _cache_choice(lm, cache, pool_factor, max_new_tokens)
    if (text is None) == (messages is None):
        raise ConfigError("tokens.prompt takes a text (or token ids) or messages=[...], exactly one of them")
    if messages is not None:
        tokenizer = getattr(lm, "tokenizer", None)
        if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
            raise ConfigError(f"{type(lm).__name__} has no tokenizer with a chat template: pass token ids")
        if add_generation_prompt is None:
            add_generation_prompt = not template_kwargs.get("continue_final_message", False)
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, **template_kwargs
        )
    elif template_kwargs or add_generation_prompt is not None:
        names = sorted(template_kwargs) + ([] if add_generation_prompt is None else ["add_generation_prompt"])
        raise ConfigError(f"chat template arguments {names} need messages=[...]")
    else:
        ids = lm.encode(text) if isinstance(text, str) else text
    ids = check_token_ids(lm, ids, "the prompt")
    if ids.ndim != 1:
        raise DataError(f"the prompt must be a 1-D sequence of token ids, got shape {ids.shape}")
    if ids.shape[0] < 1:
        raise ModelError("the prompt must be at least one token (prefix it with BOS/EOS if empty)")
    if hasattr(lm, "_check_ids") and hasattr(lm, "_check_room"):  # a transformer: its context
        lm._check_ids(ids)
        lm._check_room(int(ids.shape[0]), int(max_new_tokens))
    logits, prompt_cache = lm.prefill(ids)
    eos = getattr(lm, "eos_ids", None)
    if eos is None:
        eos = getattr(lm, "eos_id", None)
    first = jax.nn.log_softmax(logits[-1].astype(jnp.float32))
    return LMPrompt(lm, prompt_cache, first, int(max_new_tokens), eos, cache, pool_factor)


def _cache_choice(lm: Any, cache: str, pool_factor: float | None, max_new_tokens: int):
    """``(cache, pool_factor)`` resolved: ``"dense"`` or ``"paged"`` (see :func:`prompt`)."""
    from ppinfer.lm import paged
    from ppinfer.lm.model import LanguageModel

    if cache not in ("auto", "dense", "paged"):
        raise ConfigError(f"cache must be 'auto', 'dense' or 'paged', got {cache!r}")
    can_page = isinstance(lm, LanguageModel) and not paged.paged_unsupported(lm.config)
    if cache == "paged" and not can_page:
        why = paged.paged_unsupported(lm.config) if isinstance(lm, LanguageModel) else []
        raise ConfigError(
            f"cache='paged' needs a transformer LanguageModel whose attention it implements, not "
            f"{type(lm).__name__}" + (f" with {', '.join(why)}" if why else "")
        )
    if cache == "auto":
        cache = "paged" if can_page and max_new_tokens >= paged.AUTO_PAGED_MIN_TOKENS else "dense"
    if cache == "dense":
        if pool_factor is not None:
            raise ConfigError("pool_factor applies to cache='paged' only")
        return "dense", None
    factor = paged.DEFAULT_POOL_FACTOR if pool_factor is None else pool_factor
    ok = isinstance(factor, numbers.Real) and not isinstance(factor, bool | np.bool_)
    if not (ok and 0 < factor < float("inf")):
        raise ConfigError(f"pool_factor must be a number > 0, got {pool_factor!r}")
    return "paged", float(factor)


def check_token_ids(lm: Any, ids: Any, what: str = "token ids") -> jax.Array:
    """``ids`` as ``i32`` if they are integers in ``[0, V)`` (``V``: the model's vocabulary size);
    else :class:`~ppinfer.errors.DataError` naming the first bad id. Traced ids (inside ``jit``)
    cannot be checked and pass unchanged."""
    if isinstance(ids, jax.core.Tracer):
        return ids
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be integer token ids, got {type(ids).__name__}") from None
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{what} must be integer token ids, got dtype {arr.dtype}")
    V = _vocab_size(lm)
    if arr.size and V is not None:
        bad = arr[(arr < 0) | (arr >= V)]
        if bad.size:
            raise DataError(
                f"{what}: token id {int(bad.flat[0])} is out of range for a vocabulary of {V} "
                f"(ids 0..{V - 1})"
            )
    return jnp.asarray(arr, jnp.int32)


def _vocab_size(lm: Any) -> int | None:
    if isinstance(lm, LMPrompt):
        return lm.vocab_size
    config = getattr(lm, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        return int(config.vocab_size)
    size = getattr(lm, "vocab_size", None)
    return None if size is None else int(size)


def _eos_tuple(eos: Any) -> tuple[int, ...]:
    if eos is None:
        return ()
    if isinstance(eos, (int, np.integer)) and not isinstance(eos, bool):
        return (int(eos),)
    if isinstance(eos, (tuple, list)) and all(
        isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in eos
    ):
        return tuple(dict.fromkeys(int(e) for e in eos))
    raise ConfigError(f"the EOS token must be an id, a list of ids or None, got {eos!r}")


class Context(NamedTuple):
    """One particle's LM context (a pytree; a population adds a leading particle axis).

    Attributes:
        tokens: ``i32[T]`` generated tokens (``T = max_new_tokens``), valid up to ``length``.
        length: ``i32[]`` number of generated tokens.
        cache: the particle's own KV cache (one particle).
        logp: ``f32[V]`` log-probabilities of the next token given the prompt and ``tokens``.
    """

    tokens: jax.Array
    length: jax.Array
    cache: Any
    logp: jax.Array

    @staticmethod
    def start(p: LMPrompt) -> Context:
        """The empty context right after the prompt."""
        cache = jax.tree.map(lambda x: x[0], p.init_cache(1))
        tokens = jnp.zeros((p.max_new_tokens,), jnp.int32)
        return Context(tokens, jnp.zeros((), jnp.int32), cache, p.first_logp)

    def next_token(self, temperature: float | jax.Array = 1.0) -> dist.Categorical:
        """The LM's distribution of the next token (tempered by ``temperature``: a finite number
        > 0; :class:`~ppinfer.errors.ConfigError` otherwise, checked when it is a concrete value)."""
        return dist.Categorical(logits=_finite(self.logp / check_temperature(temperature)))

    def extend(self, p: LMPrompt, token: jax.Array) -> Context:
        """Append ``token`` and run the LM one step (one forward pass for this particle). A concrete
        ``token`` outside the vocabulary is a :class:`~ppinfer.errors.DataError`."""
        token = check_token_ids(p, token, "Context.extend")
        logp, cache = p.step(self.cache, token)
        # A token drawn under float64 (x64: int64) is stored in the int32 record without a cast
        # warning (a future JAX error).
        at = jnp.minimum(self.length, self.tokens.shape[0] - 1)
        tokens = self.tokens.at[at].set(jnp.asarray(token).astype(self.tokens.dtype))
        return Context(tokens, self.length + 1, cache, logp)

    def raise_if_exhausted(self) -> None:
        """Raise :class:`~ppinfer.errors.InferenceError` if a particle appended more tokens than the
        context holds (``max_new_tokens``): the last slot and the LM's cache were overwritten, so
        the result is invalid. (:func:`ppinfer.infer` calls it on the final state.)"""
        room, longest = self.tokens.shape[-1], int(jnp.max(self.length))
        if longest > room:
            raise InferenceError(
                f"the token program appended {longest} tokens to a context that holds "
                f"max_new_tokens={room}: the extra tokens overwrote the last one and the LM's cache, "
                "so the result is invalid. Raise max_new_tokens in tokens.prompt(...), or end the "
                "program sooner (fewer steps, or pp.stop at EOS)"
            )


def masked_next_token(ctx: Context, mask: jax.Array, temperature: float = 1.0) -> dist.Categorical:
    """The LM's next-token distribution restricted to ``mask: bool[V]`` and renormalised — the
    *locally constrained* proposal. Used as a proposal for a site sampled from ``ctx.next_token()``
    and conditioned on ``mask[tok]``, its weight ``p/q`` is exactly the allowed mass
    ``log Σ_{v ∈ mask} p(v)``. If nothing is allowed it falls back to the unmasked LM (the target's
    condition then gives the particle weight zero). ``temperature``: as in
    :meth:`Context.next_token`."""
    logits = _finite(ctx.logp / check_temperature(temperature))
    masked = jnp.where(mask, logits, _IMPOSSIBLE)
    return dist.Categorical(logits=jnp.where(jnp.any(mask), masked, logits))


def twist(name: str, value: jax.Array, previous: jax.Array, final: jax.Array | bool = False) -> jax.Array:
    """Apply a twist ``ψ_t = value`` and remove the previous one: adds ``ψ_t − ψ_{t−1}`` to the log
    weight (``−ψ_{t−1}`` when ``final``, so the twists telescope to zero and the target is
    unchanged). Returns the twist to carry in the state (0 after the final step)."""
    if jnp.ndim(value) != 0:
        raise ModelError(
            f"the twist {name!r} must return one log value per particle (a scalar), got shape "
            f"{jnp.shape(value)}"
        )
    current = jnp.where(final, 0.0, value)
    factor(name, current - previous)
    return current


_apply_twist = twist


def require_eos(name: str, finished: jax.Array, t: jax.Array, num_steps: int) -> None:
    """Condition on the sequence having finished by the last step (instead of the truncated
    target): weight zero for a particle still running at step ``num_steps − 1``."""
    condition(name, finished | (t < num_steps - 1))


def text_value(
    fn: Callable[[str], Any],
    decode: Callable[[Sequence[int]], str],
    tokens: jax.Array,
    length: jax.Array,
    when: jax.Array | bool = True,
    default: Any = 0.0,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """``fn(text)`` of the decoded prefix ``tokens[:length]`` as a ``dtype`` scalar, evaluated on the
    host where ``when`` holds (``default`` elsewhere, without decoding). Under the engine's ``vmap``
    the callback receives the whole batch at once: one host call per step, not one per particle.
    For critics, scorers and rewards written in Python."""

    def host(toks, lens, whens):
        toks, lens, whens = np.asarray(toks), np.asarray(lens), np.asarray(whens)
        shape = np.broadcast_shapes(lens.shape, whens.shape)
        flat_t = np.broadcast_to(toks, shape + toks.shape[-1:]).reshape(-1, toks.shape[-1])
        flat_l = np.broadcast_to(lens, shape).reshape(-1)
        flat_w = np.broadcast_to(whens, shape).reshape(-1)
        out = [
            fn(decode([int(t) for t in row[:n]])) if w else default
            for row, n, w in zip(flat_t, flat_l, flat_w, strict=True)
        ]
        return np.asarray(out, dtype).reshape(shape)

    when = jnp.asarray(when, jnp.bool_)
    shape = jax.ShapeDtypeStruct(jnp.broadcast_shapes(jnp.shape(length), jnp.shape(when)), dtype)
    return jax.pure_callback(host, shape, tokens, length, when, vmap_method="expand_dims")


def text_predicate(
    predicate: Callable[[str], bool],
    decode: Callable[[Sequence[int]], str],
    tokens: jax.Array,
    length: jax.Array,
    when: jax.Array | bool = True,
) -> jax.Array:
    """``bool[]``: ``predicate(text)`` of the decoded prefix where ``when`` holds (True elsewhere);
    see :func:`text_value`."""
    return text_value(lambda text: bool(predicate(text)), decode, tokens, length, when, True, jnp.bool_)


def score_tokens(ctx: Context, p: LMPrompt, tokens: jax.Array) -> tuple[jax.Array, Context]:
    """``log p(tokens | context)`` by teacher forcing ``tokens: i32[K]`` through the LM (K forward
    passes, one ``lax.scan``), and the extended context. Used for suffix conditioning (infilling)
    and for scorer LMs; the context needs room for K more tokens."""

    def body(c, tok):
        return c.extend(p, tok), c.logp[tok]

    ctx, log_probs = jax.lax.scan(body, ctx, check_token_ids(p, tokens, "score_tokens"))
    return jnp.sum(log_probs), ctx


def texts(
    result: Any,
    tokenizer: Any = None,
    eos_id: int | Sequence[int] | None = None,
    *,
    all_particles: bool = False,
) -> list:
    """Decoded texts (EOS left out).

    - ``texts(result)`` or ``texts(result, tokenizer)`` — ``result`` a :class:`~ppinfer.Result` of a
      token-level program: ``[(text, normalised_weight), …]`` of the particles of **positive weight**,
      heaviest first (one entry per particle; resampled copies of a text appear once per copy). The
      LM context is the :class:`ConstrainedState` of a :func:`constrained` program (decoded with its
      own vocabulary: no tokenizer needed), the state itself if it is a :class:`Context`, else the
      first :class:`Context` in the state pytree (e.g. ``(context, automaton_state)``), which needs
      ``tokenizer``. ``all_particles=True``: every particle in particle order, zero weights included.
    - ``texts(contexts, tokenizer, eos_id)`` — every particle's text of a :class:`Context` with a
      leading particle axis (no weights), cut at its length and without EOS.

    ``eos_id`` is one id or several (``lm.eos_ids``); default ``tokenizer.eos_id``.
    """
    if eos_id is None and tokenizer is not None:
        eos_id = getattr(tokenizer, "eos_id", None)
    if hasattr(result, "log_weights") and hasattr(result, "state"):
        state = result.state
        if isinstance(state, ConstrainedState):
            contexts = state.ctx
            decode = state.decoder.decode if tokenizer is None else _tokenizer_decode(tokenizer, eos_id)
        else:
            contexts = _find_context(state)
            if contexts is None:
                raise ConfigError(
                    "texts(result): the result's state holds no tokens.Context (is it a token-level "
                    "program?); for a batch of contexts call texts(contexts, tokenizer, eos_id)"
                )
            if tokenizer is None:
                raise ConfigError(
                    "texts(result, tokenizer) needs the tokenizer (lm.tokenizer) for a program not made "
                    "by tokens.constrained"
                )
            decode = _tokenizer_decode(tokenizer, eos_id)
        toks, lens = jax.device_get((contexts.tokens, contexts.length))
        w = np.asarray(jax.device_get(result.weights), np.float64)
        out = [(decode(row[:n]), float(wi)) for row, n, wi in zip(toks, lens, w, strict=True)]
        if all_particles:
            return out
        return sorted([tw for tw in out if tw[1] > 0], key=lambda tw: -tw[1])
    if tokenizer is None:
        raise ConfigError(
            "texts(contexts, tokenizer, eos_id) needs a tokenizer (or pass the Result of a token program)"
        )
    contexts = result
    toks, lens = jax.device_get((contexts.tokens, contexts.length))
    decode = _tokenizer_decode(tokenizer, eos_id)
    return [decode(row[:n]) for row, n in zip(toks, lens, strict=True)]


def _tokenizer_decode(tokenizer: Any, eos_id: Any) -> Callable[[Sequence[int]], str]:
    eos = set(_eos_tuple(eos_id))

    def decode(ids) -> str:
        return tokenizer.decode([int(t) for t in ids if int(t) not in eos])

    return decode


def _find_context(state: Any) -> Context | None:
    """The first :class:`Context` in a state pytree (depth-first), or None."""
    found = [
        leaf
        for leaf in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, Context))
        if isinstance(leaf, Context)
    ]
    return found[0] if found else None


# --- constrained generation in one call -----------------------------------------------------------


class _Decoder:
    """Bytes of a vocabulary → text (static data of a :class:`ConstrainedState`, compared by identity)."""

    def __init__(self, vocab_bytes: Sequence[bytes], eos_ids: tuple[int, ...]):
        self.vocab = [bytes(b) for b in vocab_bytes]
        self.eos_ids = frozenset(eos_ids)

    def decode(self, ids) -> str:
        keep = [int(t) for t in ids if int(t) not in self.eos_ids and 0 <= int(t) < len(self.vocab)]
        data = b"".join(self.vocab[t] for t in keep)
        return data.decode("utf-8", errors="replace")

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return other is self


@jax.tree_util.register_pytree_node_class
class ConstrainedState:
    """The particle state of a :func:`constrained` program: the LM context, the constraint's state
    (one ``int32`` per automaton; a dummy for host constraints, whose state is keyed by the prefix)
    and the current twist value. The decoder rides along as static data, so that
    ``texts(result)`` can decode without being told the vocabulary."""

    def __init__(self, ctx: Context, cstate: Any, psi: jax.Array, decoder: _Decoder):
        self.ctx, self.cstate, self.psi, self.decoder = ctx, cstate, psi, decoder

    def tree_flatten(self):
        return (self.ctx, self.cstate, self.psi), self.decoder

    @classmethod
    def tree_unflatten(cls, decoder, children):
        return cls(*children, decoder)


@dataclasses.dataclass(frozen=True, eq=False)
class ConstrainedProgram(SequentialProgram):
    """A :class:`~ppinfer.SequentialProgram` made by :func:`constrained` (run it with no arguments).

    Attributes (beyond init, step, num_steps): ``prompt``, ``constraint`` (the constraint object),
    ``compiled`` (its compiled form), ``proposal``."""

    prompt: Any = None
    constraint: Any = None
    compiled: Any = None
    proposal: str = "local"


def constrained(
    prompt: LMPrompt,
    constraint: Any,
    proposal: str = "local",
    potentials: Sequence[Callable[[Context, jax.Array], jax.Array]] = (),
    twist: Callable[[Context], jax.Array] | None = None,
    *,
    require_eos: bool = True,
    temperature: float | jax.Array = 1.0,
    vocab_bytes: Sequence[bytes] | None = None,
    eos_id: int | Sequence[int] | None = None,
) -> ConstrainedProgram:
    """The LM's continuations of ``prompt`` conditioned on ``constraint``, as a sequential program:
    ``pp.infer(constrained(p, c), algorithm=pp.SMC(N), key=k)``; then ``texts(result)``.

    Target: ``p(x) ∏ potentials`` over token sequences ``x`` of at most ``prompt.max_new_tokens``
    tokens whose text satisfies ``constraint`` and that end with EOS (``require_eos=False``: a
    sequence still running at the limit is kept if its text is complete). ``log Ẑ`` estimates the log
    of its mass: with no potentials, the probability that the LM alone writes a valid, finished text.

    Args:
        prompt: from :func:`prompt` (``tk.prompt(lm, text, max_new_tokens=...)``).
        constraint: a :mod:`ppinfer.constraints` object (``Regex``, ``JSONSchema``, ``Grammar``,
            ``Predicate``, or several joined with ``&``), or an already compiled one.
        proposal: ``"local"`` (default) — the locally constrained proposal: the next token is drawn
            from the LM restricted to the allowed set and the particle is weighted by the allowed
            mass ``Σ_{v allowed} p(v)`` (exactly the target's p/q), so no particle breaks the
            constraint; ``"bootstrap"`` — the token is drawn from the LM and a particle whose token
            is not allowed gets weight zero.
        potentials: functions ``f(ctx, tok) -> f32[]`` (``ctx`` the context before ``tok``), each
            adding a log factor per step (rewards, length penalties, scorer LMs…).
        twist: optional ``ψ(ctx) -> f32[]`` of the context after each token, applied as a twist
            (:func:`twist`: ``ψ_t − ψ_{t−1}``, removed at the end, so the target is unchanged).
        require_eos: see Target.
        temperature: the LM's temperature in the target (1: the LM itself), a finite number > 0.
        vocab_bytes: the vocabulary's bytes; default ``prompt.lm.vocab_bytes`` with the
            tokenizer's special tokens (``<|start_header_id|>``…) left out: they are control
            tokens, never text a constraint can match.
        eos_id: the EOS token, or several; default ``prompt.eos_ids`` (the LM's). Every one of
            them ends a sequence exactly where the first one may (the constraint is compiled with
            the first; the others get its mask).
    """
    if proposal not in ("local", "bootstrap"):
        raise ConfigError(f"proposal must be 'local' or 'bootstrap', got {proposal!r}")
    temperature = check_temperature(temperature)
    if not isinstance(prompt, LMPrompt):
        raise ConfigError(
            "constrained(prompt, ...) needs the LMPrompt of tokens.prompt(lm, text, max_new_tokens)"
        )
    V = prompt.vocab_size
    control: frozenset[int] = frozenset()
    if vocab_bytes is None:
        vocab_bytes = getattr(prompt.lm, "vocab_bytes", None)
        if vocab_bytes is None:
            raise ConfigError(
                f"{type(prompt.lm).__name__} has no vocab_bytes: pass constrained(..., vocab_bytes=...)"
            )
        control = getattr(getattr(prompt.lm, "tokenizer", None), "special_ids", frozenset())
    vocab_bytes = list(vocab_bytes)
    if len(vocab_bytes) != V:
        raise ConfigError(f"vocab_bytes has {len(vocab_bytes)} tokens, the LM {V}")
    eos_ids = prompt.eos_ids if eos_id is None else _eos_tuple(eos_id)
    bad = [e for e in eos_ids if not 0 <= e < V]
    if bad:
        raise ConfigError(f"eos_id {bad[0]} is not a token id of this LM (vocabulary of {V})")
    eos = eos_ids[0] if eos_ids else None
    if eos is None and require_eos:
        raise ConfigError("require_eos=True needs an LM with an EOS token; pass require_eos=False")
    # Control tokens and the other EOS ids are not text: the constraint never allows them as such.
    hidden = (set(control) | set(eos_ids)) - {eos}
    if hidden:
        vocab_bytes = [b"" if i in hidden else b for i, b in enumerate(vocab_bytes)]
    from ppinfer.constraints import TokenAutomaton

    compiled = constraint.compile(vocab_bytes, eos) if hasattr(constraint, "compile") else constraint
    if not all(hasattr(compiled, m) for m in ("init", "allowed", "advance", "complete")):
        raise ConfigError(
            f"constraint must be a ppinfer.constraints object (Regex, JSONSchema, Grammar, Predicate, "
            f"or several joined with &) or a compiled one, got {constraint!r}"
        )
    if callable(potentials):
        potentials = (potentials,)
    if isinstance(potentials, str) or not isinstance(potentials, Sequence):
        raise ConfigError(f"potentials must be a sequence of functions f(ctx, tok), got {potentials!r}")
    potentials = tuple(potentials)
    bad = [p for p in potentials if not callable(p)]
    if bad:
        raise ConfigError(f"potentials must be functions f(ctx, tok) -> log factor, got {bad[0]!r}")
    decoder = _Decoder(vocab_bytes, eos_ids)
    num_steps = prompt.max_new_tokens
    is_eos = jnp.isin(jnp.arange(V), jnp.asarray(eos_ids if eos_ids else (-1,)))
    several_eos = len(eos_ids) > 1
    local = proposal == "local"

    def init():
        return ConstrainedState(Context.start(prompt), compiled.init(), jnp.zeros((), jnp.float32), decoder)

    def step(state, t):
        ctx, cs = state.ctx, state.cstate
        last = t == num_steps - 1
        budget = num_steps - 2 - t  # tokens left after this one, EOS excluded
        if not require_eos:
            budget = budget + 1
        if isinstance(compiled, TokenAutomaton):
            mask = compiled.allowed_within(cs, budget)
        elif hasattr(compiled, "allowed_within"):
            mask = compiled.allowed_within(cs, ctx.tokens, ctx.length, budget)
        else:
            mask = compiled.allowed(cs, ctx.tokens, ctx.length)
        if several_eos:  # every EOS id ends the text where the first may
            mask = jnp.where(is_eos, mask[..., eos], mask)
        if require_eos:
            mask = jnp.where(last, mask & is_eos, mask)
        logits = _finite(ctx.logp / temperature)
        if local:
            logp = jax.nn.log_softmax(logits)
            any_ok = jnp.any(mask)
            mass = jax.scipy.special.logsumexp(jnp.where(mask, logp, -jnp.inf))
            q = jnp.where(any_ok, jnp.where(mask, logits, _IMPOSSIBLE), logits)
            tok = sample("tok", dist.Categorical(logits=q))
            condition("constraint", any_ok)
            factor("allowed_mass", jnp.where(any_ok, mass, 0.0))
        else:
            tok = sample("tok", dist.Categorical(logits=logits))
            condition("constraint", mask[tok])
        for i, potential in enumerate(potentials):
            value = potential(ctx, tok)
            if jnp.ndim(value) != 0:
                raise ModelError(
                    f"potential {i} must return one log factor per particle (a scalar), got shape "
                    f"{jnp.shape(value)}"
                )
            factor(f"potential_{i}", value)
        done = is_eos[tok]
        new_ctx = ctx.extend(prompt, tok)
        ctok = jnp.where(done, eos, tok) if several_eos else tok  # the constraint sees one EOS id
        new_cs = compiled.advance(cs, ctok, ctx.tokens, ctx.length)
        if not require_eos:
            ok = compiled.complete(new_cs, new_ctx.tokens, new_ctx.length)
            condition("complete", done | ~last | ok)
        psi = state.psi
        if twist is not None:
            psi = _apply_twist("twist", jnp.asarray(twist(new_ctx), psi.dtype), psi, final=done | last)
        stop(done)
        return ConstrainedState(new_ctx, new_cs, psi, decoder)

    return ConstrainedProgram(
        init, step, num_steps, prompt=prompt, constraint=constraint, compiled=compiled, proposal=proposal
    )


# A logit of −1e30 has probability exactly 0 after normalisation yet passes NumPyro's validation
# (which rejects −inf logits), and sums of a few of them stay finite.
_IMPOSSIBLE = -1e30


def check_temperature(temperature: Any) -> Any:
    """``temperature`` if it is a finite number > 0 (a Python or NumPy number, or a scalar array),
    else :class:`~ppinfer.errors.ConfigError`: ``logp / T`` is no distribution for ``T <= 0`` (0
    divides by zero; a negative one favours the least likely tokens), NaN or ±inf. A traced value
    (inside a compiled function) cannot be checked and is passed through."""
    if isinstance(temperature, jax.core.Tracer):
        return temperature
    bad = isinstance(temperature, bool | np.bool_ | str | bytes)
    if not bad:
        try:
            value = np.asarray(temperature)
            bad = value.ndim != 0 or value.dtype.kind not in "iuf"
        except Exception:
            bad = True
    if bad or not (np.isfinite(value) and value > 0):
        raise ConfigError(
            f"temperature must be a finite number > 0, got {temperature!r} (a sampling distribution "
            "needs T > 0; for greedy decoding use lm.generate(..., temperature=0))"
        )
    return temperature


def _finite(logits: jax.Array) -> jax.Array:
    return jnp.maximum(logits, _IMPOSSIBLE)


class _Template:
    """Static stand-in for a model inside a pytree's aux data (compared by identity)."""

    def __init__(self, lm):
        self.lm = lm

    def __hash__(self):
        return id(self.lm)

    def __eq__(self, other):
        return isinstance(other, _Template) and other.lm is self.lm


def _array_field(lm) -> str:
    for field in ("params", "log_probs"):
        if hasattr(lm, field):
            return field
    raise ModelError(f"{type(lm).__name__} is not a supported language model (no params/log_probs)")
