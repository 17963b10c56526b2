"""Generation constraints: regular expressions, JSON schemas, grammars and Python predicates.

A constraint is an object (:class:`Regex`, :class:`JSONSchema`, :class:`Grammar`, :class:`Predicate`;
``a & b`` for both) that, compiled for a byte-level vocabulary (``vocab_bytes[v]`` = the bytes of token
``v``), gives per particle and step the **exact set of allowed next tokens** — those after which some
completion of the text is in the language — and whether the text so far is **complete** (then, and
only then, EOS is allowed). Tokens are byte strings: a token that ends inside a multi-byte UTF-8
character is allowed when the character (and a match) can still be completed.

Two engines, chosen per constraint (see ``docs/design.md``, "Structured generation"):

- **On device, a token automaton** (:class:`TokenAutomaton`) for regular constraints — :class:`Regex`,
  and every :class:`JSONSchema` that is regular (no recursion): the pattern is compiled to a minimal
  byte DFA with Python's ``re`` semantics (:mod:`ppinfer._regex`), then to a dense table
  ``next_state: i32[S, V]``. The parser state of a particle is one ``int32``; the allowed set of the
  whole population is one gather; resampling copies the state with the rest of the particle.
- **On the host, llguidance** for context-free constraints — :class:`Grammar` (Lark syntax) and
  recursive JSON schemas — and Python for :class:`Predicate`: a ``jax.pure_callback`` per step
  computes the masks of all particles from their token prefixes (particle state, so it follows the
  ancestors at every resampling); the parser state of each distinct prefix is cached, derived from
  its parent prefix's by one ``deep_copy`` + ``consume_token``.

Compilation has limits (states, table entries, time); exceeding one raises
:class:`~ppinfer.errors.ConstraintError` quickly instead of running out of memory.

Use them with :func:`ppinfer.tokens.constrained`, or by hand: ``c = Regex(p).compile(vocab, eos)``,
then in a step ``mask = c.allowed(s, ctx.tokens, ctx.length)``, ``s = c.advance(s, tok)``.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer import _regex, checks
from ppinfer.errors import ConfigError, ConstraintError

__all__ = [
    "Constraint",
    "Regex",
    "JSONSchema",
    "Grammar",
    "Predicate",
    "All",
    "TokenAutomaton",
    "HostConstraint",
    "regex_automaton",
]


# --- compiled forms ---------------------------------------------------------------------------------


class TokenAutomaton(NamedTuple):
    """A token-level automaton (a pytree of arrays; its state is one ``int32`` per particle).

    Attributes:
        next_state: ``i32[S, V]``, −1 where token ``v`` is not allowed in state ``s``.
        final: ``bool[S]``, states where the text so far is a complete match (EOS allowed).
        initial: ``i32[]``, the start state.
        eos_id: ``i32[]``, the EOS token (−1 if none): allowed exactly in final states and leaves
            the state unchanged.
        distance: ``i32[S]`` or None: the fewest tokens that lead from each state to a final one
            (so a token is worth taking with ``r`` tokens left only if ``distance[next] <= r``).
    """

    next_state: jax.Array
    final: jax.Array
    initial: jax.Array
    eos_id: jax.Array
    distance: jax.Array | None = None

    # the compiled-constraint interface (``tokens``/``length`` are not needed on device)
    def init(self) -> jax.Array:
        return self.initial

    def allowed(self, state: jax.Array, tokens: Any = None, length: Any = None) -> jax.Array:
        """``bool[V]``: the tokens allowed in ``state: i32[]`` (EOS iff the text is complete)."""
        safe = jnp.maximum(state, 0)
        mask = (self.next_state[safe] >= 0) & (state >= 0)
        is_eos = jnp.arange(mask.shape[-1]) == self.eos_id
        return jnp.where(is_eos, self.accepts(state), mask)

    def advance(
        self, state: jax.Array, token: jax.Array, tokens: Any = None, length: Any = None
    ) -> jax.Array:
        """The state after ``token`` (unchanged by EOS; −1 if the token was not allowed)."""
        nxt = jnp.where(state >= 0, self.next_state[jnp.maximum(state, 0), token], -1)
        return jnp.where(token == self.eos_id, state, nxt).astype(jnp.int32)

    def allowed_within(self, state: jax.Array, budget: jax.Array) -> jax.Array:
        """``bool[V]``: the allowed tokens after which a complete text is at most ``budget`` more
        tokens away (EOS: iff complete). Without ``distance``, :meth:`allowed`."""
        mask = self.allowed(state)
        if self.distance is None:
            return mask
        nxt = self.next_state[jnp.maximum(state, 0)]
        near = self.distance[jnp.maximum(nxt, 0)] <= budget
        is_eos = jnp.arange(mask.shape[-1]) == self.eos_id
        return mask & (near | is_eos)

    def accepts(self, state: jax.Array) -> jax.Array:
        """Whether the text read so far is a complete match."""
        return self.final[jnp.maximum(state, 0)] & (state >= 0)

    def complete(self, state: jax.Array, tokens: Any = None, length: Any = None) -> jax.Array:
        return self.accepts(state)

    @property
    def num_states(self) -> int:
        return int(self.next_state.shape[0])


class HostConstraint:
    """A compiled constraint evaluated on the host from each particle's token prefix.

    ``masks(tokens: i32[n, T], lengths: i32[n]) -> bool[n, V]`` (host; EOS allowed iff the text is
    complete) is called through one ``jax.pure_callback`` per step for the whole population (the
    engine's ``vmap`` batches it). The state carried by the particle is a dummy ``int32``: the prefix
    ``tokens[:length]`` (particle state) keys the parser state, so it follows the ancestors at every
    resampling; equal prefixes share one parser state and one mask.
    """

    def __init__(self, masks: Callable[[np.ndarray, np.ndarray], np.ndarray], vocab_size: int, eos_id: int):
        self._masks, self.vocab_size, self.eos_id = masks, int(vocab_size), int(eos_id)

    def init(self) -> jax.Array:
        return jnp.zeros((), jnp.int32)

    def allowed(self, state: jax.Array, tokens: jax.Array, length: jax.Array) -> jax.Array:
        V = self.vocab_size

        def host(toks, lens):
            toks, lens = np.asarray(toks), np.asarray(lens)
            shape = np.broadcast_shapes(toks.shape[:-1], lens.shape)
            flat_t = np.broadcast_to(toks, shape + toks.shape[-1:]).reshape(-1, toks.shape[-1])
            flat_l = np.broadcast_to(lens, shape).reshape(-1)
            out = self._masks(np.ascontiguousarray(flat_t, np.int32), flat_l.astype(np.int64))
            return np.asarray(out, np.bool_).reshape(shape + (V,))

        out = jax.ShapeDtypeStruct(jnp.shape(length) + (V,), jnp.bool_)
        return jax.pure_callback(host, out, tokens, length, vmap_method="expand_dims")

    def advance(self, state, token, tokens=None, length=None):
        return state

    def complete(self, state, tokens, length) -> jax.Array:
        return self.allowed(state, tokens, length)[self.eos_id]

    def host_masks(self, prefixes: Sequence[Sequence[int]]) -> np.ndarray:
        """``bool[n, V]``: the masks after each token prefix, computed on the host (no JAX)."""
        width = max([len(p) for p in prefixes] + [1])
        toks = np.zeros((len(prefixes), width), np.int32)
        for i, p in enumerate(prefixes):
            toks[i, : len(p)] = p
        return np.asarray(self._masks(toks, np.array([len(p) for p in prefixes], np.int64)), np.bool_)


def _by_prefix(one: Callable[[bytes], np.ndarray], V: int):
    """``masks(tokens, lengths)`` from ``one(key)``, ``key`` = the prefix's int32 bytes; equal prefixes
    are computed once per call."""

    def masks(toks: np.ndarray, lens: np.ndarray) -> np.ndarray:
        n = toks.shape[0]
        out = np.zeros((n, V), np.bool_)
        done: dict = {}
        for i in range(n):
            key = toks[i, : max(int(lens[i]), 0)].tobytes()
            m = done.get(key)
            if m is None:
                m = done[key] = one(key)
            out[i] = m
        return out

    return masks


class _Both:
    """The conjunction of compiled constraints: state is the tuple of their states."""

    def __init__(self, parts):
        self.parts = tuple(parts)

    def init(self):
        return tuple(p.init() for p in self.parts)

    def allowed(self, state, tokens, length):
        masks = [p.allowed(s, tokens, length) for p, s in zip(self.parts, state, strict=True)]
        out = masks[0]
        for m in masks[1:]:
            out = out & m
        return out

    def allowed_within(self, state, tokens, length, budget):
        out = None
        for p, s in zip(self.parts, state, strict=True):
            m = p.allowed_within(s, budget) if isinstance(p, TokenAutomaton) else p.allowed(s, tokens, length)
            out = m if out is None else out & m
        return out

    def advance(self, state, token, tokens=None, length=None):
        return tuple(p.advance(s, token, tokens, length) for p, s in zip(self.parts, state, strict=True))

    def complete(self, state, tokens, length):
        out = jnp.asarray(True)
        for p, s in zip(self.parts, state, strict=True):
            out = out & p.complete(s, tokens, length)
        return out


# --- constraint objects -----------------------------------------------------------------------------


class Constraint:
    """Base class: ``compile(vocab_bytes, eos_id)`` gives the compiled form; ``a & b`` requires both."""

    def compile(self, vocab_bytes: Sequence[bytes], eos_id: int | None):  # pragma: no cover - abstract
        raise NotImplementedError

    def __and__(self, other: Constraint) -> All:
        if not isinstance(other, Constraint):
            return NotImplemented
        return All(self, other)

    def validate(self, text: str) -> bool:  # pragma: no cover - abstract
        """Whether a complete ``text`` satisfies the constraint (host, pure Python)."""
        raise NotImplementedError


class Regex(Constraint):
    """The text must match ``pattern`` in full, with Python ``re`` syntax and meaning
    (``re.fullmatch(pattern, text, flags)``), Unicode included.

    Args:
        pattern: the regular expression. Back-references, look-around, word boundaries, inner
            anchors, atomic groups and possessive repeats are refused (not regular).
        flags: ``re`` flags (``re.IGNORECASE``, ``re.DOTALL``, ``re.ASCII`` …).
        max_states: most states of the byte automaton during its construction (default 20,000).
        max_table_entries: most entries ``states × vocabulary`` of the token table (default 2^26,
            256 MiB of ``int32``).
        timeout: seconds allowed for the compilation (default 20).
    """

    def __init__(
        self,
        pattern: str,
        flags: int = 0,
        *,
        max_states: int = 20_000,
        max_table_entries: int = 1 << 26,
        timeout: float = 20.0,
    ):
        if not isinstance(pattern, str):
            raise ConstraintError(f"Regex needs a str pattern, got {type(pattern).__name__}")
        if isinstance(flags, bool) or not isinstance(flags, int):  # re's flags are an int (IntFlag)
            raise ConstraintError(f"Regex flags must be re flags (an int, e.g. re.IGNORECASE), got {flags!r}")
        self.pattern, self.flags = pattern, int(flags)
        if not (checks.is_number(timeout) and 0 < timeout < float("inf")):
            raise ConstraintError(f"Regex timeout must be a finite number of seconds > 0, got {timeout!r}")
        self.max_states, self.max_table_entries, self.timeout = max_states, max_table_entries, timeout
        self._dfa: _regex.ByteDFA | None = None
        self._compiled: dict = {}

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"

    @property
    def dfa(self) -> _regex.ByteDFA:
        """The minimal byte automaton (compiled once)."""
        if self._dfa is None:
            self._dfa = _regex.compile_regex(
                self.pattern, self.flags, max_states=self.max_states, timeout=self.timeout
            )
        return self._dfa

    def compile(self, vocab_bytes: Sequence[bytes], eos_id: int | None) -> TokenAutomaton:
        key = (_vocab_key(vocab_bytes), eos_id)
        if key not in self._compiled:
            table = _regex.token_table(
                self.dfa, vocab_bytes, () if eos_id is None else (eos_id,), max_entries=self.max_table_entries
            )
            self._compiled[key] = TokenAutomaton(
                jnp.asarray(table),
                jnp.asarray(self.dfa.final),
                jnp.asarray(0, jnp.int32),
                jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),
                jnp.asarray(_token_distance(table, self.dfa.final)),
            )
        return self._compiled[key]

    def validate(self, text: str) -> bool:
        import re

        return re.fullmatch(self.pattern, text, self.flags) is not None


class JSONSchema(Constraint):
    """The text must be a JSON document valid under ``schema`` (a dict, or a JSON string).

    Output format: ``json.dumps``' separators (``", "`` and ``": "``) unless ``whitespace="flexible"``
    (any JSON whitespace between tokens, up to ``max_whitespace`` characters at a place); object
    properties in the schema's order; no properties beyond ``properties`` (generation treats
    ``additionalProperties`` as false).

    Engine: a schema without recursion is translated to a regular expression
    (:func:`ppinfer._jsonschema.schema_to_regex`) and compiled to a token automaton on device, exactly;
    a recursive schema (or ``engine="llguidance"``) runs on the host through llguidance. Keywords that
    cannot be enforced exactly raise :class:`~ppinfer.errors.ConstraintError`; annotations
    (``title``, ``description``, ``examples``, ``default``…) and ``format`` are ignored, as JSON Schema
    validators do by default.
    """

    def __init__(
        self,
        schema: dict | str,
        *,
        whitespace: str = "compact",
        max_whitespace: int = 2,
        engine: str = "auto",
        **limits: Any,
    ):
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"JSONSchema: the schema is not valid JSON: {e}") from e
        if not isinstance(schema, dict | bool):
            raise ConstraintError(f"JSONSchema needs a dict (or a JSON string), got {type(schema).__name__}")
        if whitespace not in ("compact", "flexible"):
            raise ConstraintError(f"whitespace must be 'compact' or 'flexible', got {whitespace!r}")
        if engine not in ("auto", "regex", "llguidance"):
            raise ConstraintError(f"engine must be 'auto', 'regex' or 'llguidance', got {engine!r}")
        if isinstance(max_whitespace, bool) or not isinstance(max_whitespace, int) or max_whitespace < 0:
            raise ConstraintError(f"max_whitespace must be an integer >= 0, got {max_whitespace!r}")
        self.schema, self.whitespace, self.engine = schema, whitespace, engine
        self.max_whitespace = int(max_whitespace)
        self._limits = limits
        self._regex: Regex | None = None
        self._grammar: Grammar | None = None
        self._regular: bool | None = None
        self._validator: Any = None

    def __repr__(self) -> str:
        return f"JSONSchema({json.dumps(self.schema)[:60]})"

    @property
    def regex(self) -> str | None:
        """The equivalent regular expression, or None if the schema is recursive (not regular)."""
        self._choose()
        return None if self._regex is None else self._regex.pattern

    def _choose(self) -> None:
        if self._regular is not None:
            return
        from ppinfer import _jsonschema

        if self.engine == "llguidance":
            self._regular = False
        else:
            try:
                pattern = _jsonschema.schema_to_regex(
                    self.schema, whitespace=self.whitespace, max_whitespace=self.max_whitespace
                )
            except _jsonschema.NotRegular:
                if self.engine == "regex":
                    raise ConstraintError(
                        "JSONSchema: the schema is recursive, not a regular language"
                    ) from None
                self._regular = False
            else:
                self._regex = Regex(pattern, **self._limits)
                self._regular = True
        if not self._regular:
            self._grammar = Grammar(
                _llg_json_grammar(self.schema, self.whitespace, self.max_whitespace), _raw=True
            )

    def compile(self, vocab_bytes: Sequence[bytes], eos_id: int | None):
        self._choose()
        if self._regex is not None:
            return self._regex.compile(vocab_bytes, eos_id)
        try:
            return self._grammar.compile(vocab_bytes, eos_id)
        except ConstraintError as e:  # said as the schema's error, not the internal grammar's
            message = str(e).splitlines()[0].removeprefix("invalid grammar: ")
            message = message.split("failed to compile JSON schema: ", 1)[-1]
            raise ConstraintError(f"JSONSchema: llguidance cannot compile the schema: {message}") from None

    def validate(self, text: str) -> bool:
        """Valid JSON, valid under the schema (``jsonschema``), and in the output format."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        import jsonschema

        if self._validator is None:
            try:
                jsonschema.Draft202012Validator.check_schema(self.schema)
            except jsonschema.SchemaError as e:
                raise ConstraintError(f"JSONSchema: not a valid JSON Schema: {e.message}") from None
            self._validator = jsonschema.Draft202012Validator(self.schema)
        if not self._validator.is_valid(value):
            return False
        self._choose()
        if self._regex is not None:
            return self._regex.validate(text)
        return True


_BYTE_VOCAB = [b"<eos>"] + [bytes([b]) for b in range(256)]


class Grammar(Constraint):
    """The text must be in the language of a context-free grammar in Lark syntax (llguidance's
    Lark dialect: ``start: …`` rules, ``UPPER: …`` terminals, ``%import common.NUMBER``, regex
    terminals ``/…/``), run on the host by llguidance with exact masks (every token whose bytes can
    continue the text). Generation follows llguidance's reading: a terminal named in ``%ignore`` is
    allowed between lexemes, not before the first or after the last (``validate``, by Lark, accepts
    it there too).

    Args:
        text: the grammar.
        max_cached_states: parser states kept (one per distinct prefix, least recently used first out).
    """

    def __init__(self, text: str, *, max_cached_states: int = 200_000, _raw: bool = False):
        if not isinstance(text, str):
            raise ConstraintError(f"Grammar needs the grammar text (a str), got {type(text).__name__}")
        self.text, self.max_cached_states, self._raw = text, int(max_cached_states), _raw
        self._compiled: dict = {}
        self._parser = None  # the Lark parser validate() uses, built on its first call

    def __repr__(self) -> str:
        return f"Grammar({self.text[:60]!r})"

    def compile(self, vocab_bytes: Sequence[bytes], eos_id: int | None) -> HostConstraint:
        if eos_id is None:
            raise ConstraintError("Grammar needs a vocabulary with an EOS token (to end a complete text)")
        key = (_vocab_key(vocab_bytes), eos_id)
        if key not in self._compiled:
            grammar = self.text if self._raw else _llg_lark_grammar(self.text)
            engine = _LLGuidance(grammar, list(vocab_bytes), int(eos_id), self.max_cached_states)
            self._compiled[key] = HostConstraint(engine.masks, len(vocab_bytes), int(eos_id))
        return self._compiled[key]

    def validate(self, text: str) -> bool:
        """Whether Lark (Earley) parses ``text`` with this grammar (requires ``lark``); for a
        grammar Lark cannot build (an empty terminal ``""``, a zero-width regex, llguidance-only
        syntax), whether the engine's own masks spell ``text`` byte by byte and then allow EOS."""
        import lark

        if self._parser is None:  # building it is most of the cost of one call (~7 ms)
            try:
                self._parser = lark.Lark(self.text, start="start", parser="earley")
            except lark.exceptions.LarkError:
                self._parser = False
        if self._parser is False:
            return self._spelled_by_masks(text.encode("utf-8"))
        try:
            self._parser.parse(text)
        except lark.exceptions.LarkError:
            return False
        return True

    def _spelled_by_masks(self, data: bytes) -> bool:
        """Whether the engine, on a vocabulary of EOS and the 256 single bytes, allows ``data``
        byte by byte and then EOS (the language generation samples from)."""
        engine = self.compile(_BYTE_VOCAB, 0)
        tokens = [1 + b for b in data]
        masks = engine.host_masks([tokens[:i] for i in range(len(tokens) + 1)])
        return all(masks[i][t] for i, t in enumerate(tokens)) and bool(masks[len(tokens)][0])


class Predicate(Constraint):
    """A Python function of the decoded text, evaluated on the host.

    Args:
        complete: ``complete(text) -> bool``: whether a finished text is acceptable (EOS is allowed
            exactly when it holds).
        prefix: optional ``prefix(text) -> bool``: False when *no* completion of ``text`` can be
            acceptable; it makes the predicate prefix-aware (a token is then allowed iff ``prefix``
            holds after it: V calls per particle per step). ``text`` may end inside a character: the
            incomplete character is left out. Without it, every non-EOS token is allowed and only the
            complete text is checked (a particle whose text cannot finish acceptably dies at EOS or
            at the length limit).

    Both functions see every text a particle has generated so far (the empty text included),
    whatever the other constraints of an ``&`` say about it — ``Regex("[0-9]+") & Predicate(lambda
    t: int(t) % 2 == 0)`` calls ``int("")`` —, so they should return False, not raise, on a text
    they do not accept: an exception stops the run as a :class:`~ppinfer.errors.ModelError` naming it.
    """

    def __init__(self, complete: Callable[[str], bool], prefix: Callable[[str], bool] | None = None):
        if not callable(complete) or (prefix is not None and not callable(prefix)):
            raise ConstraintError("Predicate(complete, prefix=None) takes functions of the text")
        self.fn, self.prefix = complete, prefix

    def __repr__(self) -> str:
        return f"Predicate({getattr(self.fn, '__name__', self.fn)})"

    def compile(self, vocab_bytes: Sequence[bytes], eos_id: int | None) -> HostConstraint:
        if eos_id is None:
            raise ConstraintError("Predicate needs a vocabulary with an EOS token")
        vocab = [bytes(b) for b in vocab_bytes]
        V, eos = len(vocab), int(eos_id)
        fn, prefix_fn = self.fn, self.prefix
        cache: OrderedDict = OrderedDict()
        nonempty = np.array([len(b) > 0 for b in vocab], np.bool_)

        def one(key: bytes) -> np.ndarray:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
            prefix = np.frombuffer(key, np.int32)
            if np.any((prefix == eos) | (prefix < 0) | (prefix >= V)):
                mask = np.zeros(V, np.bool_)
            else:
                data = b"".join(vocab[t] for t in prefix.tolist())
                if prefix_fn is None:
                    mask = nonempty.copy()
                else:
                    mask = np.array(
                        [len(b) > 0 and bool(prefix_fn((data + b).decode("utf-8", "ignore"))) for b in vocab],
                        np.bool_,
                    )
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    ok = False
                else:
                    ok = bool(fn(text))
                mask[eos] = ok
            cache[key] = mask
            if len(cache) > 100_000:
                cache.popitem(last=False)
            return mask

        by_prefix, lock = _by_prefix(one, V), threading.Lock()

        def masks(toks: np.ndarray, lens: np.ndarray) -> np.ndarray:
            with lock:  # two threads' runs of one program share the cache (and the user's functions)
                return by_prefix(toks, lens)

        return HostConstraint(masks, V, eos)

    def validate(self, text: str) -> bool:
        return bool(self.fn(text))


class All(Constraint):
    """Every one of ``constraints`` (``a & b & c``): the allowed sets intersect, the text is complete
    when it is complete for each."""

    def __init__(self, *constraints: Constraint):
        parts: list[Constraint] = []
        for c in constraints:
            if not isinstance(c, Constraint):
                raise ConstraintError(f"All(...) takes constraints, got {type(c).__name__}")
            parts.extend(c.parts if isinstance(c, All) else [c])
        if not parts:
            raise ConstraintError("All() needs at least one constraint")
        self.parts = tuple(parts)

    def __repr__(self) -> str:
        return " & ".join(map(repr, self.parts))

    def compile(self, vocab_bytes: Sequence[bytes], eos_id: int | None):
        compiled = [c.compile(vocab_bytes, eos_id) for c in self.parts]
        return compiled[0] if len(compiled) == 1 else _Both(compiled)

    def validate(self, text: str) -> bool:
        return all(c.validate(text) for c in self.parts)


def _token_distance(table: np.ndarray, final: np.ndarray) -> np.ndarray:
    """``i32[S]``: the fewest tokens from each state to a final state (a large number if none)."""
    big = np.iinfo(np.int32).max // 2
    d = np.where(final, 0, big).astype(np.int64)
    safe = np.maximum(table, 0)
    dead = table < 0
    while True:
        step = np.where(dead, big, d[safe]).min(axis=1) + 1 if table.shape[1] else np.full_like(d, big)
        new = np.minimum(d, step)
        if np.array_equal(new, d):
            return np.minimum(d, big).astype(np.int32)
        d = new


def regex_automaton(pattern: str, vocab_bytes: list[bytes], eos_id: int | None = None) -> TokenAutomaton:
    """Legacy: compile ``pattern`` (full match, interegular's syntax) over a vocabulary through a
    *character* DFA. Tokens that are not whole UTF-8 characters are never allowed, so patterns
    beyond ASCII can lose matches (``(x|é)+`` acts as ``x+`` on byte tokens); there is no size
    limit. Kept unchanged for the programs, twists and benchmarks built on its state numbering; new
    code should use :class:`Regex` (Python ``re`` semantics, byte-level, limited)."""
    import interegular
    from interegular.fsm import anything_else

    try:
        fsm = interegular.parse_pattern(pattern).to_fsm()
    except Exception as e:  # interegular raises several exception types for bad patterns
        raise ConfigError(f"cannot compile regular expression {pattern!r}: {e}") from e
    states = _canonical_states(fsm, anything_else)
    index = {s: i for i, s in enumerate(states)}
    live = _live_states(fsm)
    other = fsm.alphabet[anything_else] if anything_else in fsm.alphabet else None

    def step(state, char):
        cls = fsm.alphabet[char] if char in fsm.alphabet else other
        nxt = fsm.map.get(state, {}).get(cls)
        return nxt if nxt in live else None

    texts = [_text(b) for b in vocab_bytes]
    table = np.full((len(states), len(vocab_bytes)), -1, np.int32)
    for s in states:
        if s not in live:
            continue
        for v, text in enumerate(texts):
            if not text or v == eos_id:
                continue
            cur = s
            for ch in text:
                cur = step(cur, ch)
                if cur is None:
                    break
            if cur is not None:
                table[index[s], v] = index[cur]
    final = np.array([s in fsm.finals for s in states])
    return TokenAutomaton(
        jnp.asarray(table),
        jnp.asarray(final),
        jnp.asarray(index[fsm.initial], jnp.int32),
        jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),
    )


def _canonical_states(fsm, anything_else) -> list:
    """The DFA's states in an order that depends only on the language: breadth-first from the
    initial state, each state's moves taken in the order of their smallest character (the
    any-other-character class last); unreachable states after, sorted. ``interegular`` numbers states
    and character classes in set-iteration order, which varies with Python's hash seed — so without
    this the same pattern gave different state indices (hence different twist features, different
    random streams) from one process to the next."""

    def rank(cls):
        chars = [c for c in fsm.alphabet.by_transition.get(cls, []) if c is not anything_else]
        return (0, min(chars)) if chars else (1, "")

    order, seen = [fsm.initial], {fsm.initial}
    for state in order:  # the list grows while it is walked: a breadth-first search
        moves = fsm.map.get(state, {})
        for cls in sorted(moves, key=rank):
            if moves[cls] not in seen:
                seen.add(moves[cls])
                order.append(moves[cls])
    return order + sorted(s for s in fsm.states if s not in seen)


def _live_states(fsm) -> set:
    """States from which a final state is reachable."""
    live = set(fsm.finals)
    changed = True
    while changed:
        changed = False
        for s, moves in fsm.map.items():
            if s not in live and any(n in live for n in moves.values()):
                live.add(s)
                changed = True
    return live


def _text(token: bytes) -> str | None:
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return None


# --- llguidance (host engine for grammars) ----------------------------------------------------------


class _GreedyTokenizer:
    """The minimal tokenizer llguidance asks for: the vocabulary's bytes and a greedy encoder."""

    def __init__(self, vocab: list[bytes], eos_id: int):
        self.tokens = [b if i != eos_id else b"<|eos|>" for i, b in enumerate(vocab)]
        self.eos_token_id, self.bos_token_id = eos_id, None
        self.special_token_ids = [eos_id]
        self._index = {b: i for i, b in enumerate(self.tokens) if b and i != eos_id}
        self._longest = max((len(b) for b in self._index), default=1)

    def __call__(self, data: bytes) -> list[int]:
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                t = self._index.get(data[i : i + n])
                if t is not None:
                    out.append(t)
                    i += n
                    break
            else:
                i += 1  # a byte the vocabulary cannot spell is skipped
        return out


class _LLGuidance:
    """Masks from llguidance matchers, one per distinct token prefix (LRU cache); the matcher of a
    prefix is its parent's ``deep_copy`` that consumed the last token."""

    def __init__(self, grammar: str, vocab: list[bytes], eos_id: int, max_cached: int):
        try:
            import llguidance
            import llguidance.numpy as llnp
        except ImportError as e:  # pragma: no cover - llguidance is a dependency
            raise ConstraintError("Grammar constraints need the 'llguidance' package") from e
        self.V, self.eos = len(vocab), eos_id
        tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_GreedyTokenizer(vocab, eos_id)))
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ConstraintError(f"invalid grammar: {'; '.join(map(str, messages))}")
        root = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if root.is_error():
            raise ConstraintError(f"invalid grammar: {root.get_error()}")
        self._llnp = llnp
        self._words = -(-self.V // 32)
        self._root = root
        self._cache: OrderedDict = OrderedDict({b"": root})
        self._by_prefix = _by_prefix(self._mask, self.V)
        self._masks: OrderedDict = OrderedDict()
        self._max = max_cached
        self._lock = threading.Lock()

    def _matcher(self, key: bytes):
        """The matcher after the prefix ``key`` (None: the prefix left the language, or ended)."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        k = len(key)
        while key[:k] not in self._cache:  # nearest cached ancestor (the root always is)
            k -= 4
        m = self._cache[key[:k]]
        for j in range(k, len(key), 4):
            tok = int.from_bytes(key[j : j + 4], "little", signed=True)
            if m is not None:
                if not 0 <= tok < self.V or tok == self.eos:
                    m = None
                else:
                    m = m.deep_copy()
                    m.consume_token(tok)
                    if m.is_error():
                        m = None
            self._cache[key[: j + 4]] = m
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        if b"" not in self._cache:
            self._cache[b""] = self._root
        return m

    def _mask(self, key: bytes) -> np.ndarray:
        hit = self._masks.get(key)
        if hit is not None:
            self._masks.move_to_end(key)
            return hit
        m = self._matcher(key)
        if m is None:
            mask = np.zeros(self.V, np.bool_)
        elif m.is_stopped():  # the grammar admits nothing more: only EOS, if the text is complete
            mask = np.zeros(self.V, np.bool_)
            mask[self.eos] = m.is_accepting()
        else:
            bits = np.zeros((1, self._words), np.int32)
            self._llnp.fill_next_token_bitmask(m, bits, 0)
            mask = np.unpackbits(bits.view(np.uint8), bitorder="little")[: self.V].astype(np.bool_)
            if m.is_error():
                mask[:] = False
        self._masks[key] = mask
        while len(self._masks) > self._max:
            self._masks.popitem(last=False)
        return mask

    def masks(self, toks: np.ndarray, lens: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._by_prefix(toks, lens)


# llguidance forces a byte string the grammar fixes as its canonical tokenisation, so its mask drops
# every other token that spells those bytes: with tokens "a", "b", "ab" and the grammar "ab", only
# "ab" was allowed first — the "a", "b" path lost, and log Z off by log 2. The exact mask (every token
# whose bytes can continue the text) is what weighting by allowed mass needs.
_EXACT_MASKS = '%llguidance {"no_forcing": true}\n'


def _llg_lark_grammar(text: str) -> str:
    return text + "\n" + _EXACT_MASKS  # last: the user's line numbers stay, and it overrides theirs


def _llg_json_grammar(schema: Any, whitespace: str, max_whitespace: int) -> str:
    import llguidance

    # The regex engine's language: compact ", " and ": ", or up to max_whitespace JSON whitespace
    # characters wherever JSON allows them; \uXXXX escapes in strings (not \/, which llguidance
    # has no option for).
    if whitespace == "compact":
        options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    elif max_whitespace == 0:
        options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    else:
        options = {"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{1,{max_whitespace}}}"}
    options["json_allow_general_unicode_escapes"] = True
    schema = _narrowed(schema)
    try:
        top = json.loads(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options))
    except Exception as e:  # llguidance raises ValueError-like errors for bad schemas
        raise ConstraintError(f"JSONSchema: llguidance cannot compile the schema: {e}") from e
    # The same schema (with its options) as a Lark grammar, for the grammar options line.
    return "start: %json " + json.dumps(top["grammars"][0]["json_schema"]) + "\n" + _EXACT_MASKS


_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _narrowed(schema: Any) -> Any:
    """A copy of ``schema`` narrowed as the regex engine generates, and refused where it refuses a
    number's exclusive bounds: every object schema (one with ``properties``,
    ``additionalProperties`` or type ``object``) has ``additionalProperties: false`` (no properties
    beyond ``properties``) and an array with ``prefixItems`` but no ``items`` has ``items: false``,
    wherever it sits: in ``$defs``, array items, ``anyOf`` branches… (walked keyword by keyword: a
    property *named* ``properties`` is not a schema keyword)."""
    if not isinstance(schema, dict):
        return schema
    types = schema.get("type")
    is_number = types == "number" or (isinstance(types, list) and "number" in types)
    if is_number and ("exclusiveMinimum" in schema or "exclusiveMaximum" in schema):
        # As the regex engine: a text just inside the bound (0.99999999999999999 under
        # exclusiveMaximum 1) is a float on it, which validate (and any JSON reader) rejects.
        raise ConstraintError(
            "JSONSchema: exclusiveMinimum/exclusiveMaximum on a number is not supported (a text just "
            "inside the bound reads as a float on it); use minimum/maximum"
        )
    out = dict(schema)
    for k in _SUBSCHEMA:
        if k in out:
            out[k] = _narrowed(out[k])
    for k in _SUBSCHEMA_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [_narrowed(v) for v in out[k]]
    for k in _SUBSCHEMA_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: _narrowed(v) for name, v in out[k].items()}
    is_object = types == "object" or (isinstance(types, list) and "object" in types)
    if "properties" in out or "additionalProperties" in out or is_object:
        # As the regex engine writes them: no property beyond ``properties`` (an object reached
        # through ``additionalProperties`` is then never written, as there).
        out["additionalProperties"] = False
    if "prefixItems" in out and "items" not in out:
        out["items"] = False  # no array items beyond prefixItems unless items allows them
    return out


def _vocab_key(vocab_bytes: Sequence[bytes]) -> int:
    if not all(isinstance(b, bytes | bytearray) for b in vocab_bytes):
        bad = next(b for b in vocab_bytes if not isinstance(b, bytes | bytearray))
        raise ConfigError(f"vocab_bytes must hold each token's bytes, got a {type(bad).__name__}: {bad!r}")
    return hash(tuple(bytes(b) for b in vocab_bytes))
