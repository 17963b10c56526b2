"""Regular expressions compiled to byte-level automata, with Python's ``re`` syntax and meaning.

A pattern is parsed by Python's own parser (``re._parser``), so the syntax and every character class
are exactly those of ``re.fullmatch(pattern, text)``: ``\\w``, ``\\d``, ``\\s``, case-insensitive
matching and ``.`` are not re-implemented but *measured*, by running the compiled class over every
Unicode scalar value once (cached). Each character class becomes the UTF-8 byte sequences of its
code points (split into byte ranges), so the automaton reads bytes: a token that ends inside a
multi-byte character simply leaves the automaton in the middle of that character, and a text is a
full match only at the end of a whole character. The byte NFA is made deterministic (subset
construction, under a state limit and a deadline: :class:`~ppinfer.errors.ConstraintError`),
minimised (Moore partition refinement, numpy) and numbered canonically (breadth first from the start,
bytes in ascending order), so the result does not depend on hash seeds or construction order.

Not regular (or not exactly representable), and refused with a ``ConstraintError``: back-references,
look-around, ``\\b``/``\\B``, anchors other than a leading ``^``/``\\A`` and a trailing ``$``/``\\Z``,
atomic groups and possessive repeats (they can change the language).
"""

from __future__ import annotations

import functools
import re
import time
from re import _compiler, _parser
from re import _constants as C

import numpy as np

from ppinfer.errors import ConstraintError

__all__ = ["ByteDFA", "common_text", "compile_regex", "token_table", "utf8_sequences"]

MAX_UNICODE = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
# The code points a UTF-8 text can contain: every Unicode scalar value (no surrogates).
UNIVERSE = ((0, SURROGATES[0] - 1), (SURROGATES[1] + 1, MAX_UNICODE))


class ByteDFA:
    """A minimal deterministic automaton over bytes.

    Attributes:
        delta: ``i32[S, 256]``: the next state, −1 where no match can follow (dead).
        final: ``bool[S]``: states in which the bytes read so far are a complete match.
        Every state is live (some completion reaches a final state); state 0 is the start.
    """

    def __init__(self, delta: np.ndarray, final: np.ndarray):
        self.delta, self.final = delta, final

    @property
    def num_states(self) -> int:
        return int(self.delta.shape[0])

    def run(self, data: bytes, state: int = 0) -> int:
        """The state after ``data`` from ``state`` (−1 if no match can follow)."""
        for b in data:
            if state < 0:
                return -1
            state = int(self.delta[state, b])
        return state

    def fullmatch(self, data: bytes) -> bool:
        s = self.run(data)
        return s >= 0 and bool(self.final[s])


def common_text(a: ByteDFA, b: ByteDFA, max_pairs: int = 200_000) -> bytes | None:
    """A shortest byte string both automata accept (breadth first over state pairs), or ``None``
    when their languages are disjoint. Raises :class:`ConstraintError` past ``max_pairs`` pairs."""
    start = (0, 0)
    parent: dict = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for pair in frontier:
            if a.final[pair[0]] and b.final[pair[1]]:
                out = bytearray()
                while parent[pair] is not None:
                    pair, byte = parent[pair]
                    out.append(byte)
                return bytes(reversed(out))
            both = np.flatnonzero((a.delta[pair[0]] >= 0) & (b.delta[pair[1]] >= 0))
            for byte in both.tolist():
                q = (int(a.delta[pair[0], byte]), int(b.delta[pair[1], byte]))
                if q not in parent:
                    parent[q] = (pair, byte)
                    nxt.append(q)
        if len(parent) > max_pairs:
            raise ConstraintError("comparing two regular expressions took too many automaton states")
        frontier = nxt
    return None


# --- character sets: sorted disjoint inclusive code-point ranges -----------------------------------


def _normalize(ranges) -> tuple:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if lo > hi:
            continue
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return _intersect(tuple((a, b) for a, b in out), UNIVERSE)


def _intersect(a, b) -> tuple:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def _complement(ranges) -> tuple:
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_UNICODE:
        out.append((nxt, MAX_UNICODE))
    return _intersect(tuple(out), UNIVERSE)


@functools.cache
def _all_scalars() -> str:
    """Every Unicode scalar value once, in order (index i is code point i, or i + 0x800 past the
    surrogates)."""
    return "".join(map(chr, range(SURROGATES[0]))) + "".join(
        map(chr, range(SURROGATES[1] + 1, MAX_UNICODE + 1))
    )


def _index_to_cp(i: int) -> int:
    return i if i < SURROGATES[0] else i + (SURROGATES[1] - SURROGATES[0] + 1)


_SCAN_CACHE: dict = {}


def _scan(op, av, flags: int) -> tuple:
    """The exact set of code points that the one-character item ``(op, av)`` matches under ``flags``,
    as Python's ``re`` decides it: the item repeated (``+``) is run over every scalar value."""
    key = (op, repr(av), flags)
    if key not in _SCAN_CACHE:
        state = _parser.State()
        state.flags = flags
        item = _parser.SubPattern(state, [(op, av)])
        rep = _parser.SubPattern(state, [(C.MAX_REPEAT, (1, C.MAXREPEAT, item))])
        rx = _compiler.compile(rep, flags)
        ranges = [(_index_to_cp(m.start()), _index_to_cp(m.end() - 1)) for m in rx.finditer(_all_scalars())]
        _SCAN_CACHE[key] = _normalize(ranges)
    return _SCAN_CACHE[key]


def _charset(op, av, flags: int) -> tuple:
    """The code points a one-character item matches."""
    icase = bool(flags & C.SRE_FLAG_IGNORECASE)
    if op is C.LITERAL and not icase:
        return _normalize([(av, av)])
    if op is C.NOT_LITERAL and not icase:
        return _complement(_normalize([(av, av)]))
    if op is C.ANY:
        return UNIVERSE if flags & C.SRE_FLAG_DOTALL else _complement(((10, 10),))
    if op is C.IN and not icase and all(o in (C.LITERAL, C.RANGE, C.NEGATE) for o, _ in av):
        ranges = [(a, a) if o is C.LITERAL else a for o, a in av if o is not C.NEGATE]
        s = _normalize(ranges)
        return _complement(s) if any(o is C.NEGATE for o, _ in av) else s
    return _scan(op, av, flags)


# --- UTF-8: code-point ranges as byte-range sequences ------------------------------------------------


def utf8_sequences(ranges) -> list[tuple]:
    """Byte-range sequences ``((lo₁, hi₁), (lo₂, hi₂), …)`` whose byte strings are exactly the UTF-8
    encodings of the code points in ``ranges`` (each encoding matched by exactly one sequence)."""
    out = []
    for lo, hi in ranges:
        for a, b in ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, MAX_UNICODE)):
            x, y = max(lo, a), min(hi, b)
            if x <= y:
                _split(x, y, out)
    return out


def _split(lo: int, hi: int, out: list) -> None:
    """Split [lo, hi] (one encoding length, no surrogates) until every piece is a product of byte
    ranges: a continuation byte that is not fixed must run over its whole range 80–BF."""
    stack = [(lo, hi)]
    while stack:
        lo, hi = stack.pop()
        n = len(chr(lo).encode())
        for i in range(1, n):
            m = (1 << (6 * i)) - 1
            if lo & ~m != hi & ~m:
                if lo & m:
                    stack += [((lo | m) + 1, hi), (lo, lo | m)]
                    break
                if hi & m != m:
                    stack += [(hi & ~m, hi), (lo, (hi & ~m) - 1)]
                    break
        else:
            out.append(tuple(zip(chr(lo).encode(), chr(hi).encode(), strict=True)))


# --- the byte NFA ------------------------------------------------------------------------------------


class _NFA:
    def __init__(self, max_states: int, pattern: str):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int, int]]] = []
        self.max_states, self.pattern = max_states, pattern

    def new(self) -> int:
        if len(self.eps) >= self.max_states:
            raise ConstraintError(
                f"regular expression {_short(self.pattern)} is too large: its byte automaton needs more "
                f"than {self.max_states} NFA states (bound the repetitions, or split the constraint)"
            )
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def chars(self, ranges) -> tuple[int, int]:
        s, e = self.new(), self.new()
        memo: dict = {}

        def node(suffix):  # the state from which reading ``suffix`` reaches e (shared suffixes)
            if not suffix:
                return e
            if suffix not in memo:
                n, tgt = self.new(), node(suffix[1:])
                self.edges[n].append((suffix[0][0], suffix[0][1], tgt))
                memo[suffix] = n
            return memo[suffix]

        for seq in _sequences(ranges):
            self.edges[s].append((seq[0][0], seq[0][1], node(seq[1:])))
        return s, e

    def seq(self, items, flags: int, top: bool = False) -> tuple[int, int]:
        start = cur = self.new()
        items = list(items)
        for i, (op, av) in enumerate(items):
            if op is C.AT:
                leading = top and i == 0 and av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING)
                trailing = top and i == len(items) - 1 and av in (C.AT_END, C.AT_END_STRING)
                if not (leading or trailing):
                    kind = {C.AT_BOUNDARY: r"\b", C.AT_NON_BOUNDARY: r"\B"}.get(av, "an inner anchor")
                    raise ConstraintError(
                        f"regular expression {_short(self.pattern)}: only a leading ^ and a trailing $ "
                        f"are supported as anchors (the whole text is matched), not {kind}"
                    )
                continue
            s, e = self.item(op, av, flags)
            self.eps[cur].append(s)
            cur = e
        return start, cur

    def item(self, op, av, flags: int) -> tuple[int, int]:
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN, C.CATEGORY):
            return self.chars(_charset(op, av, flags))
        if op is C.BRANCH:
            s, e = self.new(), self.new()
            for alt in av[1]:
                a, b = self.seq(alt, flags)
                self.eps[s].append(a)
                self.eps[b].append(e)
            return s, e
        if op is C.SUBPATTERN:
            _group, add, rem, sub = av
            return self.seq(sub, (flags | add) & ~rem)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi, sub = av
            return self.repeat(lo, hi, sub, flags)
        what = {
            C.GROUPREF: "back-references",
            C.GROUPREF_EXISTS: "conditional groups",
            C.ASSERT: "look-ahead/look-behind",
            C.ASSERT_NOT: "negative look-around",
            C.POSSESSIVE_REPEAT: "possessive repeats",
            C.ATOMIC_GROUP: "atomic groups",
        }.get(op, str(op))
        raise ConstraintError(
            f"regular expression {_short(self.pattern)}: {what} are not supported (not regular)"
        )

    def repeat(self, lo: int, hi, sub, flags: int) -> tuple[int, int]:
        start = cur = self.new()
        for _ in range(lo):
            a, b = self.seq(sub, flags)
            self.eps[cur].append(a)
            cur = b
        if hi is C.MAXREPEAT or hi == C.MAXREPEAT:
            a, b = self.seq(sub, flags)
            end = self.new()
            self.eps[cur] += [a, end]
            self.eps[b] += [a, end]
            return start, end
        end = self.new()
        for _ in range(hi - lo):
            a, b = self.seq(sub, flags)
            self.eps[cur] += [a, end]
            cur = b
        self.eps[cur].append(end)
        return start, end


@functools.lru_cache(maxsize=256)
def _sequences(ranges) -> list[tuple]:
    return utf8_sequences(ranges)


# --- determinise, minimise, number canonically -----------------------------------------------------


def _determinize(nfa: _NFA, start: int, accept: int, max_states: int, deadline: float, pattern: str):
    closures: dict = {}

    def closure(states) -> frozenset:
        key = frozenset(states)
        if key in closures:
            return closures[key]
        seen, stack = set(key), list(key)
        while stack:
            for t in nfa.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        # keep only states that matter: those with byte edges, and the accepting one
        out = frozenset(s for s in seen if nfa.edges[s] or s == accept)
        closures[key] = out
        return out

    first = closure([start])
    index = {first: 0}
    sets = [first]
    rows = []
    i = 0
    while i < len(sets):
        if time.monotonic() > deadline:
            raise ConstraintError(
                f"regular expression {_short(pattern)}: compiling took longer than the time limit "
                f"({len(sets)} DFA states so far; raise timeout, or simplify the pattern)"
            )
        edges = [e for s in sorted(sets[i]) for e in nfa.edges[s]]
        row = np.full(256, -1, np.int32)
        if edges:
            points = sorted({lo for lo, _, _ in edges} | {hi + 1 for _, hi, _ in edges})
            for a, b in zip(points[:-1], points[1:], strict=False):
                targets = [t for lo, hi, t in edges if lo <= a and b - 1 <= hi]
                if not targets:
                    continue
                nxt = closure(targets)
                j = index.get(nxt)
                if j is None:
                    if len(sets) >= max_states:
                        raise ConstraintError(
                            f"regular expression {_short(pattern)} needs more than {max_states} automaton "
                            f"states (its deterministic automaton blows up; e.g. '(a|b)*a(a|b){{20}}' "
                            f"needs 2^21). Raise max_states, or rewrite the pattern"
                        )
                    j = index[nxt] = len(sets)
                    sets.append(nxt)
                row[a:b] = j
        rows.append(row)
        i += 1
    delta = np.stack(rows)
    final = np.array([accept in s for s in sets])
    return delta, final


def _minimize(delta: np.ndarray, final: np.ndarray) -> ByteDFA:
    """Merge language-equivalent states (the dead ones into the sink), drop the sink (→ −1) and number
    the states breadth first from the start."""
    S = delta.shape[0]
    D = np.concatenate([np.where(delta < 0, S, delta), np.full((1, 256), S, np.int32)])
    fin = np.concatenate([final, [False]])
    cols, inverse = np.unique(D.T, axis=0, return_inverse=True)  # byte classes
    Dc = cols.T  # [S+1, C]
    labels = fin.astype(np.int64)
    count = len(np.unique(labels))
    while True:
        sig = np.concatenate([labels[:, None], labels[Dc]], axis=1)
        _, new = np.unique(sig, axis=0, return_inverse=True)
        new = new.reshape(-1)
        n = int(new.max()) + 1
        labels = new
        if n == count:
            break
        count = n
    dead = labels[S]
    rep = np.zeros(count, np.int64)
    rep[labels[::-1]] = np.arange(S, -1, -1)  # first state of each class
    cdelta = labels[D[rep]]  # [count, 256]
    cfinal = fin[rep]
    # canonical numbering, breadth first from the start class
    order, seen = [], {}
    if labels[0] != dead:
        order.append(int(labels[0]))
        seen[int(labels[0])] = 0
        k = 0
        while k < len(order):
            for nxt in cdelta[order[k]]:
                nxt = int(nxt)
                if nxt != dead and nxt not in seen:
                    seen[nxt] = len(order)
                    order.append(nxt)
            k += 1
    remap = np.full(count, -1, np.int32)
    for c, i in seen.items():
        remap[c] = i
    out = remap[cdelta[order]] if order else np.zeros((0, 256), np.int32)
    return ByteDFA(out.astype(np.int32), cfinal[order].astype(bool) if order else np.zeros(0, bool))


def _short(pattern: str, limit: int = 200) -> str:
    """``pattern`` quoted for a message, cut to ``limit`` characters (a generated one can be MBs)."""
    text = repr(pattern)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(pattern):,} characters)"


def compile_regex(
    pattern: str,
    flags: int = 0,
    *,
    max_states: int = 20_000,
    max_nfa_states: int = 500_000,
    timeout: float = 20.0,
) -> ByteDFA:
    """The minimal byte automaton of ``re.fullmatch(pattern, ·, flags)`` on UTF-8 text.

    Raises :class:`ConstraintError` for an invalid or unsupported pattern, and when the compilation
    needs more than ``max_states`` deterministic states, more than ``max_nfa_states`` NFA states, or
    more than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for name, value in (("max_states", max_states), ("max_nfa_states", max_nfa_states)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConstraintError(f"{name} must be an integer >= 1, got {value!r}")
    try:
        parsed = _parser.parse(pattern, flags)
    except (re.error, TypeError, OverflowError, ValueError) as e:  # ValueError: LOCALE with a str
        raise ConstraintError(f"cannot compile regular expression {_short(pattern)}: {e}") from e
    nfa = _NFA(max_nfa_states, pattern)
    start, accept = nfa.seq(parsed.data, parsed.state.flags | flags, top=True)
    delta, final = _determinize(nfa, start, accept, max_states, deadline, pattern)
    dfa = _minimize(delta, final)
    if dfa.num_states == 0:
        raise ConstraintError(f"regular expression {_short(pattern)} matches no UTF-8 text")
    return dfa


def token_table(
    dfa: ByteDFA,
    vocab_bytes,
    disallowed=(),
    *,
    max_entries: int = 1 << 26,
) -> np.ndarray:
    """``i32[S, V]``: the state after reading token ``v``'s bytes from state ``s`` (−1 if that leaves
    the language — no completion possible — or ``v`` is empty or in ``disallowed``)."""
    S, V = dfa.num_states, len(vocab_bytes)
    if S * V > max_entries:
        raise ConstraintError(
            f"the token automaton would have {S} states × {V} tokens = {S * V:,} entries, more than "
            f"the limit {max_entries:,} (raise max_table_entries, or simplify the constraint)"
        )
    lens = np.array([len(b) for b in vocab_bytes], np.int64)
    L = int(lens.max()) if V else 0
    mat = np.zeros((V, max(L, 1)), np.int64)
    for v, b in enumerate(vocab_bytes):
        mat[v, : len(b)] = np.frombuffer(bytes(b), np.uint8)
    D = np.concatenate([np.where(dfa.delta < 0, S, dfa.delta), np.full((1, 256), S, np.int32)])
    table = np.empty((S, V), np.int32)
    chunk = max(1, (1 << 22) // max(S, 1))
    for a in range(0, V, chunk):
        b = min(V, a + chunk)
        cur = np.broadcast_to(np.arange(S, dtype=np.int32)[:, None], (S, b - a)).copy()
        for j in range(L):
            active = lens[a:b] > j
            if not active.any():
                break
            nxt = D[cur, mat[a:b, j][None, :]]
            cur = np.where(active[None, :], nxt, cur)
        table[:, a:b] = np.where(cur == S, -1, cur)
    table[:, lens == 0] = -1
    for v in disallowed:
        if 0 <= v < V:
            table[:, v] = -1
    return table
