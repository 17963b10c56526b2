"""JSON Schema → regular expression (Python ``re`` syntax), for schemas without recursion.

The regular expression matches exactly the JSON texts, in one output format, whose value is valid
under the schema: separators ``", "``/``": "`` (``json.dumps``' defaults; ``whitespace="flexible"``:
up to ``max_whitespace`` JSON whitespace characters wherever JSON allows them), object properties in
the schema's order and none beyond them, integers without exponent or ``-0``, strings with raw
characters or JSON escapes (a surrogate pair's two ``\\uXXXX`` escapes count as one character,
lone surrogate escapes are excluded, so that a string's length is its number of code points, as
``jsonschema`` counts it), ``enum``/``const`` values written as
``json.dumps(value, ensure_ascii=False)`` writes them.

Supported: ``type`` (one or a list), ``properties``/``required`` (``additionalProperties`` and
``patternProperties`` are never generated), ``items``/``prefixItems``/``minItems``/``maxItems``,
``minLength``/``maxLength``, ``pattern`` (fully anchored ``^…$``, and matching no character that
JSON must escape), integer bounds (inclusive or exclusive), number bounds that are integers
(inclusive), ``enum``, ``const`` (with keywords beside them: the values valid under the whole schema),
``anyOf``, ``oneOf`` (when its branches accept no common text; overlapping branches raise
:class:`~ppinfer.errors.ConstraintError`), a one-element ``allOf``, and local ``$ref`` (``#``, ``#/$defs/…``,
``#/definitions/…``). A ``$ref`` that reaches itself raises :class:`NotRegular` (the caller then uses a
grammar engine); a keyword that cannot be enforced raises :class:`~ppinfer.errors.ConstraintError`.

Narrower than JSON Schema, on purpose (every generated text is valid; some valid texts are never
generated): a schema without ``type`` is read as the one type its keywords name (``{"maxLength":
1}`` generates strings only), ``prefixItems`` without ``items`` allows no items beyond the prefix,
and objects have no properties beyond ``properties``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ppinfer.errors import ConstraintError

__all__ = ["NotRegular", "schema_to_regex", "int_range_regex"]

ANNOTATIONS = {
    "title",
    "description",
    "examples",
    "default",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "format",
    "contentMediaType",
    "contentEncoding",
    "$defs",
    "definitions",
    "additionalProperties",
    "unevaluatedProperties",
}
"""Keywords that constrain nothing this compiler generates (it writes only the listed properties, so
``additionalProperties`` and ``unevaluatedProperties`` always hold). ``patternProperties`` and
``propertyNames`` do constrain listed properties: :meth:`_Builder.t_object` checks them."""

# One character of a JSON string: raw (not '"', '\\' or a control character), an escape, or the \u
# escapes of a surrogate pair (one code point, as json.loads decodes it); a lone surrogate escape is
# excluded, so that the count of these units is the string's length as jsonschema counts it.
STRING_CHAR = (
    r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-CefEF][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2})'
    r"|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)
SAFE_CHARS = r'[^"\\\x00-\x1f]*'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
NON_INTEGER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+[eE][+-]?[0-9]+|\.[0-9]+|[eE][+-]?[0-9]+)"


class NotRegular(Exception):
    """The schema is recursive: its language is not regular."""


def schema_to_regex(schema: Any, whitespace: str = "compact", max_whitespace: int = 2) -> str:
    """The regular expression of ``schema``'s JSON texts (see the module docstring)."""
    return _Builder(schema, whitespace, max_whitespace).build(schema, ())


class _Builder:
    def __init__(self, root: Any, whitespace: str, max_whitespace: int):
        self.root = root
        if whitespace == "compact":
            self.ws, self.item_sep, self.key_sep = "", re.escape(", "), re.escape(": ")
        else:
            w = rf"[ \t\n\r]{{0,{int(max_whitespace)}}}"
            self.ws, self.item_sep, self.key_sep = w, f"{w},{w}", f"{w}:{w}"
        self.flexible = whitespace != "compact"
        self._validator = None

    def build(self, s: Any, refs: tuple) -> str:
        if s is True or s == {}:
            raise NotRegular("any JSON value (unbounded nesting)")
        if s is False:
            raise ConstraintError("JSONSchema: the schema 'false' accepts nothing")
        if not isinstance(s, dict):
            raise ConstraintError(f"JSONSchema: a schema must be an object, got {s!r}")
        if "$ref" in s:
            ref = s["$ref"]
            if ref in refs:
                raise NotRegular(f"recursive $ref {ref}")
            rest = {k: v for k, v in s.items() if k != "$ref" and k not in ANNOTATIONS}
            if rest:
                raise ConstraintError(f"JSONSchema: keywords beside $ref are not supported: {sorted(rest)}")
            return self.build(self.resolve(ref), refs + (ref,))
        if "allOf" in s:
            parts = s["allOf"]
            rest = {k: v for k, v in s.items() if k != "allOf" and k not in ANNOTATIONS}
            if len(parts) != 1 or rest:
                raise ConstraintError(
                    "JSONSchema: allOf is supported with exactly one schema and nothing beside it"
                )
            return self.build(parts[0], refs)
        for key in ("anyOf", "oneOf"):
            if key in s:
                if not isinstance(s[key], list) or not s[key]:
                    raise ConstraintError(
                        f"JSONSchema: {key} needs a non-empty list of schemas, got {s[key]!r}"
                    )
                rest = {k: v for k, v in s.items() if k != key}
                alts = [self.build(_merged(rest, alt, key), refs) for alt in s[key]]
                if key == "oneOf":
                    _check_disjoint(alts)
                return _alt(alts)
        if "const" in s or "enum" in s:
            used = "const" if "const" in s else "enum"
            values = [s["const"]] if used == "const" else list(s["enum"])
            if not values:
                raise ConstraintError("JSONSchema: an empty enum accepts nothing")
            if any(k != used and k not in ANNOTATIONS for k in s):
                # The keywords beside (type, bounds, the other of enum/const) hold too: keep the
                # values valid under the whole schema.
                values = [v for v in values if self.valid(v, s)]
                if not values:
                    raise ConstraintError(
                        f"JSONSchema: no value of {used} satisfies the keywords beside it: "
                        f"{json.dumps(s)[:200]}"
                    )
            return _alt([self.literal(v) for v in values])
        types = s.get("type")
        if types is None:
            inferred = [
                t
                for t, keys in (
                    ("object", ("properties", "required")),
                    ("array", ("items", "prefixItems", "minItems", "maxItems")),
                    ("string", ("minLength", "maxLength", "pattern")),
                    ("number", ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")),
                )
                if any(k in s for k in keys)
            ]
            if len(inferred) != 1:
                raise NotRegular("a schema without a type accepts any JSON value")
            types = inferred
        if isinstance(types, str):
            types = [types]
        if not types:
            raise ConstraintError("JSONSchema: an empty list of types accepts nothing")
        return _alt([self.typed(t, s, refs) for t in types])

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise ConstraintError(f"JSONSchema: only local $ref are supported, got {ref!r}")
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise ConstraintError(f"JSONSchema: $ref {ref!r} not found")
            node = node[part]
        return node

    def valid(self, value: Any, schema: dict) -> bool:
        """Whether ``value`` is valid under ``schema`` (a part of the root: its ``$ref`` resolve there)."""
        import jsonschema

        if self._validator is None:
            self._validator = jsonschema.Draft202012Validator(self.root)
        return self._validator.evolve(schema=schema).is_valid(value)

    def literal(self, value: Any) -> str:
        if self.flexible and isinstance(value, dict | list) and value:
            raise ConstraintError("JSONSchema: enum/const objects and arrays need whitespace='compact'")
        return re.escape(json.dumps(value, ensure_ascii=False))

    def typed(self, t: str, s: dict, refs: tuple) -> str:
        known = {
            "object": {"type", "properties", "required", "patternProperties", "propertyNames"},
            "array": {"type", "items", "prefixItems", "minItems", "maxItems"},
            "string": {"type", "minLength", "maxLength", "pattern"},
            "integer": {"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
            "number": {"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
            "boolean": {"type"},
            "null": {"type"},
        }
        if t not in known:
            raise ConstraintError(f"JSONSchema: unknown type {t!r}")
        allowed = set().union(*known.values()) if isinstance(s.get("type"), list) else known[t]
        unknown = sorted(k for k in s if k not in allowed and k not in ANNOTATIONS)
        if unknown:
            raise ConstraintError(f"JSONSchema: keywords not supported for type {t!r}: {unknown}")
        return getattr(self, "t_" + t)(s, refs)

    def t_null(self, s, refs):
        return "null"

    def t_boolean(self, s, refs):
        return "(?:true|false)"

    def t_string(self, s, refs):
        for k in ("minLength", "maxLength"):
            v = s.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConstraintError(f"JSONSchema: {k} must be an integer >= 0, got {v!r}")
        lo, hi = int(s.get("minLength", 0)), s.get("maxLength")
        if "pattern" in s:
            if "minLength" in s or "maxLength" in s:
                raise ConstraintError(
                    "JSONSchema: pattern together with minLength/maxLength is not supported"
                )
            return '"' + _string_pattern(s["pattern"]) + '"'
        return '"' + STRING_CHAR + _counts(lo, None if hi is None else int(hi)) + '"'

    def t_integer(self, s, refs):
        lo, hi = _int_bounds(s)
        if lo is None and hi is None:
            return INTEGER
        return int_range_regex(lo, hi)

    def t_number(self, s, refs):
        if not any(k in s for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            return NUMBER
        if "exclusiveMinimum" in s or "exclusiveMaximum" in s:
            raise ConstraintError("JSONSchema: exclusive bounds on numbers are not supported (use integers)")
        lo, hi = s.get("minimum"), s.get("maximum")
        for b in (lo, hi):
            if b is not None and (
                isinstance(b, bool)
                or not isinstance(b, int | float)
                or not math.isfinite(b)
                or float(b) != int(b)
            ):
                raise ConstraintError("JSONSchema: number bounds must be whole numbers")
        lo = None if lo is None else int(lo)
        hi = None if hi is None else int(hi)
        if lo is not None and hi is not None and lo > hi:
            raise ConstraintError(f"JSONSchema: minimum {lo} > maximum {hi}")
        parts = []
        if hi is None or hi >= 0:  # x >= 0
            parts.append(_decimal_range(max(lo, 0) if lo is not None else 0, hi))
        if lo is None or lo < 0:  # x <= 0, written -y with y in [max(-hi, 0), -lo]
            parts.append(
                "-" + _decimal_range(max(-hi, 0) if hi is not None else 0, None if lo is None else -lo)
            )
        return _alt(parts)

    def t_array(self, s, refs):
        prefix = s.get("prefixItems", [])
        items = s.get("items", None if prefix else True)
        lo, hi = int(s.get("minItems", 0)), s.get("maxItems")
        hi = None if hi is None else int(hi)
        if hi is not None and hi < lo:
            raise ConstraintError(f"JSONSchema: minItems {lo} > maxItems {hi}")
        open_, close, sep = r"\[" + self.ws, self.ws + r"\]", self.item_sep
        if prefix:
            n = len(prefix)
            regs = [self.build(p, refs) for p in prefix]
            if items is False or items is None:
                hi = n if hi is None else min(hi, n)
            if lo > n and (items is False or items is None):
                raise ConstraintError("JSONSchema: minItems exceeds prefixItems with items: false")
            rest = None if (items is False or items is None) else self.build(items, refs)
            if hi is None and lo > n:
                raise ConstraintError("JSONSchema: minItems beyond prefixItems needs maxItems")
            # k items: the first min(k, n) from prefix, the rest from ``items``; without maxItems,
            # any number of ``items`` follow a whole prefix (and only a whole one)
            alts = []
            for k in range(lo, (hi if hi is not None else n) + 1):
                seq = [regs[i] for i in range(min(k, n))] + [rest] * max(k - n, 0)
                piece = sep.join(f"(?:{r})" for r in seq)
                if hi is None and k == n:
                    piece += f"(?:{sep}(?:{rest}))*"
                alts.append(piece)
            return open_ + (_alt(alts) if alts else "") + close
        if items is False:
            if lo > 0:
                raise ConstraintError("JSONSchema: items: false with minItems > 0 accepts nothing")
            return open_ + close
        item = self.build(items, refs)
        if hi == 0:
            return open_ + close
        more = _counts(max(lo - 1, 0), None if hi is None else hi - 1)
        body = f"(?:{item})(?:{sep}(?:{item})){more}"
        if lo == 0:
            body = f"(?:{body})?"
        return open_ + body + close

    def t_object(self, s, refs):
        props = s.get("properties", {})
        required = set(s.get("required", []))
        missing = required - set(props)
        if missing:
            raise ConstraintError(
                f"JSONSchema: required properties without a schema in 'properties': {sorted(missing)}"
            )
        for k in props:  # they constrain the listed properties (else they hold: nothing else is written)
            if "propertyNames" in s and not self.valid(k, s["propertyNames"]):
                raise ConstraintError(f"JSONSchema: property {k!r} is not allowed by propertyNames")
            for pattern in s.get("patternProperties", {}):
                try:
                    applies = re.search(pattern, k) is not None
                except re.error as e:
                    raise ConstraintError(f"JSONSchema: patternProperties {pattern!r}: {e}") from e
                if applies:
                    raise ConstraintError(
                        f"JSONSchema: patternProperties {pattern!r} applies to property {k!r}, which is "
                        f"not supported: put its constraints in properties[{k!r}]"
                    )
        entries = [
            (
                re.escape(json.dumps(k, ensure_ascii=False)) + self.key_sep + f"(?:{self.build(v, refs)})",
                k in required,
            )
            for k, v in props.items()
        ]
        sep = self.item_sep
        # after(i, started): the entries from i on, given whether one was already written
        after_started = [""] * (len(entries) + 1)
        for i in range(len(entries) - 1, -1, -1):
            kv, req = entries[i]
            piece = f"{sep}{kv}"
            after_started[i] = (piece if req else f"(?:{piece})?") + after_started[i + 1]
        after_fresh = [""] * (len(entries) + 1)
        for i in range(len(entries) - 1, -1, -1):
            kv, req = entries[i]
            take = kv + after_started[i + 1]
            after_fresh[i] = (
                take if req else _alt([take, after_fresh[i + 1]]) if after_fresh[i + 1] else f"(?:{take})?"
            )
        return r"\{" + self.ws + f"(?:{after_fresh[0]})" + self.ws + r"\}"


def _merged(rest: dict, branch: Any, key: str) -> Any:
    """A branch of ``anyOf``/``oneOf`` together with the keywords beside it (both must hold). A
    keyword in both with different values would need the two combined (bounds intersected,
    ``properties`` merged…), which is refused rather than letting one replace the other."""
    if branch is True:
        return rest or True
    if not isinstance(branch, dict):
        return branch  # false, or not a schema: build reports it
    both = sorted(k for k in rest.keys() & branch.keys() if k not in ANNOTATIONS and rest[k] != branch[k])
    if both:
        raise ConstraintError(
            f"JSONSchema: {key} branch and the schema around it both set {both}: combining them is not "
            f"supported; move those keywords into each branch"
        )
    return {**rest, **branch}


def _check_disjoint(alts: list[str]) -> None:
    """Raise :class:`ConstraintError` if two ``oneOf`` branches (their regular expressions) accept a
    common text: generation cannot exclude a value valid under two branches."""
    from ppinfer._regex import common_text, compile_regex

    dfas = [compile_regex(a) for a in alts]
    for i in range(len(dfas)):
        for j in range(i + 1, len(dfas)):
            both = common_text(dfas[i], dfas[j])
            if both is not None:
                text = both.decode("utf-8", "replace")
                raise ConstraintError(
                    f"JSONSchema: oneOf branches {i} and {j} both accept {text!r}, "
                    "and oneOf allows a value valid under exactly one branch, which generation cannot "
                    "enforce: make the branches disjoint, or write anyOf if overlap is meant"
                )
    # Texts apart are values apart, except numbers: 1 and 1.0 are one JSON value. Canonical integers
    # (one spelling each) are safe; a branch that also writes fractions or exponents is refused.
    number, spelled = compile_regex(NUMBER), compile_regex(NON_INTEGER)
    numeric = [i for i, d in enumerate(dfas) if common_text(d, number) is not None]
    for i in numeric if len(numeric) > 1 else ():
        text = common_text(dfas[i], spelled)
        if text is not None:
            raise ConstraintError(
                f"JSONSchema: oneOf branches {numeric} accept numbers, and branch {i} writes "
                f"{text.decode()!r}: JSON compares numbers by value (1 equals 1.0), so the branches may "
                "overlap in a way this check cannot rule out — use anyOf, or integer-only branches"
            )


def _alt(parts: list[str]) -> str:
    uniq = list(dict.fromkeys(parts))
    if len(uniq) == 1:
        return f"(?:{uniq[0]})"
    return "(?:" + "|".join(uniq) + ")"


def _counts(lo: int, hi: int | None) -> str:
    if hi is None:
        return "*" if lo == 0 else ("+" if lo == 1 else f"{{{lo},}}")
    if hi < lo:
        raise ConstraintError(f"JSONSchema: minimum count {lo} > maximum {hi}")
    return "" if lo == hi == 1 else f"{{{lo},{hi}}}"


def _int_bounds(s: dict) -> tuple[int | None, int | None]:
    for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        b = s.get(k)
        if b is not None and (isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b)):
            raise ConstraintError(f"JSONSchema: {k} must be a finite number, got {b!r}")
    lo = hi = None
    if "minimum" in s:
        lo = math.ceil(s["minimum"])
    if "exclusiveMinimum" in s:
        e = math.floor(s["exclusiveMinimum"]) + 1
        lo = e if lo is None else max(lo, e)
    if "maximum" in s:
        hi = math.floor(s["maximum"])
    if "exclusiveMaximum" in s:
        e = math.ceil(s["exclusiveMaximum"]) - 1
        hi = e if hi is None else min(hi, e)
    if lo is not None and hi is not None and lo > hi:
        raise ConstraintError(f"JSONSchema: no integer between the bounds ({lo} > {hi})")
    return lo, hi


def int_range_regex(lo: int | None, hi: int | None) -> str:
    """Integers n with lo <= n <= hi (None: unbounded), written without leading zeros, ``+`` or ``-0``."""
    parts = []
    if hi is None or hi >= 0:
        parts.append(_nonneg_range(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        a = max(-hi, 1) if hi is not None else 1
        b = None if lo is None else -lo
        parts.append("-" + _nonneg_range(a, b))
    return _alt(parts)


def _nonneg_range(a: int, b: int | None) -> str:
    """Non-negative integers in [a, b] (b None: unbounded), canonical decimal spelling."""
    if b is None:
        # [a, 10^d − 1] with d = digits of a, then every longer number
        d = len(str(a))
        head = _nonneg_range(a, 10**d - 1)
        return _alt([head, f"[1-9][0-9]{{{d},}}"])
    if a > b:
        raise ConstraintError(f"JSONSchema: empty integer range [{a}, {b}]")
    alts = []
    for lo, hi in _split_by_length(a, b):
        alts.extend(_same_length(str(lo), str(hi)))
    return _alt(alts)


def _split_by_length(a: int, b: int):
    while a <= b:
        top = 10 ** len(str(a)) - 1
        yield a, min(b, top)
        a = min(b, top) + 1


def _same_length(lo: str, hi: str) -> list[str]:
    """Regexes of the decimal strings between lo and hi (same length) inclusive."""
    if lo == hi:
        return [re.escape(lo)]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    if lo == "0" * len(lo) and hi == "9" * len(hi):  # every digit string: without this the two
        return [f"[0-9]{{{len(lo)}}}"]  # recursions below each split it again (2^digits terms)
    if lo[0] == hi[0]:
        return [lo[0] + r for r in _same_length(lo[1:], hi[1:])]
    n = len(lo) - 1
    out = []
    # lo[0] followed by [lo[1:], 9…9]
    out += [lo[0] + r for r in _same_length(lo[1:], "9" * n)]
    if int(hi[0]) - int(lo[0]) > 1:
        mid = f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}]"
        out.append(mid + f"[0-9]{{{n}}}")
    out += [hi[0] + r for r in _same_length("0" * n, hi[1:])]
    return out


def _decimal_range(a: int, b: int | None) -> str:
    """Decimals x (no exponent) with a <= x <= b, a and b whole (b None: unbounded)."""
    frac = r"(?:\.[0-9]+)?"
    if b is None:
        return f"(?:{_nonneg_range(a, None)}){frac}"
    parts = []
    if b - 1 >= a:
        parts.append(f"(?:{_nonneg_range(a, b - 1)}){frac}")
    parts.append(re.escape(str(b)) + r"(?:\.0+)?")
    return _alt(parts)


def _string_pattern(pattern: str) -> str:
    if not (pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$")):
        raise ConstraintError(
            f"JSONSchema: string pattern {pattern!r} must be anchored (^…$): an unanchored pattern "
            "is a search, which is supported only as ^.*(…).*$ written out"
        )
    inner = pattern[1:-1]
    from ppinfer import _regex

    dfa = _regex.compile_regex(inner)
    safe = _regex.compile_regex(SAFE_CHARS)
    if not _included(dfa, safe):
        raise ConstraintError(
            f"JSONSchema: string pattern {pattern!r} can match '\"', '\\\\' or control characters, "
            "which JSON writes escaped; not supported"
        )
    return f"(?:{inner})"


def _included(a, b) -> bool:
    """Whether every byte string that ``a`` accepts ``b`` accepts (product search)."""
    seen = {(0, 0)}
    stack = [(0, 0)]
    while stack:
        x, y = stack.pop()
        if a.final[x] and (y < 0 or not b.final[y]):
            return False
        for byte in range(256):
            nx = int(a.delta[x, byte])
            if nx < 0:
                continue
            ny = int(b.delta[y, byte]) if y >= 0 else -1
            if (nx, ny) not in seen:
                seen.add((nx, ny))
                stack.append((nx, ny))
    return True
