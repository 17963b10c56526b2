"""Token-level constraints compiled for the device: regular expressions as token automata.

A regular expression is compiled (by ``interegular``, pure Python) to a character DFA, then to a
*token* automaton: ``next_state[s, v]`` is the DFA state after reading token ``v``'s text from state
``s``, or −1 if that text leaves the language or leads to a state from which no match is reachable.
The automaton state is part of the particle state; the allowed-token mask of a whole population is
one gather, ``next_state[states] >= 0``, computed on device.

Why interegular: it exposes the DFA itself (states, alphabet classes, transitions, finals), which is
all that is needed to build a dense ``[S, V]`` table once per (pattern, vocabulary); it is pure
Python, so it installs everywhere. For the 2k–50k-token vocabularies used here the one-off build
takes about a second. (``outlines-core`` builds a sparser index in Rust and is the choice for very
large vocabularies and complex patterns; its index maps onto the same ``[S, V]`` interface.)

Tokens whose bytes are not complete UTF-8 (byte-fallback fragments) are disallowed under a regex
constraint: the constrained target is over sequences of whole-character tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer.errors import ConfigError

__all__ = ["TokenAutomaton", "regex_automaton"]


class TokenAutomaton(NamedTuple):
    """A token-level automaton (a pytree of arrays; pass it to a program as an argument).

    Attributes:
        next_state: ``i32[S, V]``, −1 where token ``v`` is not allowed in state ``s``.
        final: ``bool[S]``, states where the text so far is a complete match (EOS allowed).
        initial: ``i32[]``, the start state.
        eos_id: ``i32[]``, the EOS token (−1 if none): allowed exactly in final states and leaves
            the state unchanged.
    """

    next_state: jax.Array
    final: jax.Array
    initial: jax.Array
    eos_id: jax.Array

    def allowed(self, state: jax.Array) -> jax.Array:
        """``bool[V]``: the tokens allowed in ``state: i32[]``."""
        mask = self.next_state[state] >= 0
        is_eos = jnp.arange(mask.shape[-1]) == self.eos_id
        return jnp.where(is_eos, self.final[state], mask)

    def advance(self, state: jax.Array, token: jax.Array) -> jax.Array:
        """The state after ``token`` (unchanged by EOS; −1 if the token was not allowed)."""
        nxt = self.next_state[state, token]
        return jnp.where(token == self.eos_id, state, nxt).astype(jnp.int32)

    def accepts(self, state: jax.Array) -> jax.Array:
        """Whether the text read so far is a complete match."""
        return self.final[jnp.maximum(state, 0)] & (state >= 0)


def regex_automaton(pattern: str, vocab_bytes: list[bytes], eos_id: int | None = None) -> TokenAutomaton:
    """Compile ``pattern`` (full match) over a vocabulary (``vocab_bytes[v]`` = bytes of token ``v``)."""
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
