"""Structured-generation constraints (``ppinfer.constraints``) and ``tokens.constrained``.

References, none of them the code under test:
- Python's ``re`` (``re.fullmatch`` on the decoded text), a hand-written checker of balanced
  brackets of depth ≤ 3 (and Lark's Earley parser), and ``json`` + ``jsonschema``;
- the exact target by brute force: every token sequence of at most T tokens, weighted by the n-gram
  LM's probability, kept when it ends with EOS and its text passes the reference checker;
- ``semantics.denote`` / ``semantics.check_exact`` (the reference interpreter) for the regex program.

The allowed-set function is checked against brute force: token ``v`` is allowed after prefix ``p``
iff some sequence ``p + v + s`` (``s`` of at most K further tokens, K large enough for every case
here) is a complete valid text, and EOS iff ``p`` itself is.

Statistical bounds (fixed seeds). TV(SMC, exact) < 0.02 at N = 40,000 particles (locally
constrained proposal) and N = 200,000 (bootstrap: only ~8% of its particles survive the regex). The
Monte Carlo floor measured on these posteriors (19–58 outcomes, 8 seeds each, at N = 40,000) is
TV 0.0027–0.0066 (sd ≤ 0.0020) for the locally constrained runs and 0.0080 (sd 0.0050) for the
bootstrap one, which at 5× the particles becomes ≈ 0.0036 (sd ≈ 0.0022): 0.02 is ≥ 6.5 standard
deviations above the mean floor everywhere, a false-failure rate below 1e-6 per check.
E[Ẑ] = Z: ``check_unbiased_evidence`` (CLT on Ẑ/Z over 1,000 replicates of N = 16), false-failure
rate 1e-3 per check.
"""

import itertools
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppinfer as pp
from ppinfer import _regex
from ppinfer import tokens as tk
from ppinfer.constraints import Grammar, JSONSchema, Predicate, Regex, TokenAutomaton
from ppinfer.lm import NGramLM
from semantics import Measure, check_exact, check_unbiased_evidence, denote, smc_log_evidence_replicates

EOS = 0
N_TV = 40_000
TV_BOUND = 0.02


# --- reference checkers ------------------------------------------------------------------------------


def brackets_ok(text: str) -> bool:
    """Balanced brackets, depth ≤ 3 (written by hand: the grammar's meaning)."""
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
            if depth > 3:
                return False
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return False
        else:
            return False
    return depth == 0


BRACKETS = """start: s3
s3: ("(" s2 ")")*
s2: ("(" s1 ")")*
s1: ("(" ")")*
"""

ARRAY_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 12}, "maxItems": 2}


def json_ok(text: str) -> bool:
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return jsonschema.Draft202012Validator(ARRAY_SCHEMA).is_valid(value) and json.dumps(value) == text


def regex_ok(pattern):
    return lambda text: re.fullmatch(pattern, text) is not None


# Each case: a byte vocabulary (token 0 is EOS), the constraint, its reference checker, the number of
# new tokens T, and K: enough extra tokens to complete any viable prefix.
CASES = {
    "regex-unicode": (
        [b"<eos>", b"x", b"\xc3", b"\xa9", b"\xc3\xa9", b"y"],
        lambda: Regex(r"(x|é)+"),
        regex_ok(r"(x|é)+"),
        4,
        1,
    ),
    "grammar-brackets": (
        [b"<eos>", b"(", b")", b"()", b"))"],
        lambda: Grammar(BRACKETS),
        brackets_ok,
        6,
        3,
    ),
    "json-array": (
        [b"<eos>", b"[", b"]", b", ", b"1", b"2", b"12", b"[1"],
        lambda: JSONSchema(ARRAY_SCHEMA),
        json_ok,
        6,
        2,
    ),
}


def decode(vocab, seq):
    try:
        return b"".join(vocab[t] for t in seq).decode("utf-8")
    except UnicodeDecodeError:
        return None


def lm_for(vocab, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(len(vocab), 1.5), size=len(vocab))
    return probs, NGramLM.from_probs(probs, bos_id=EOS)


def exact_posterior(vocab, probs, ok, T) -> Measure:
    """The target by brute force: sequences (EOS included) of at most T tokens whose text is valid."""
    V, out = len(vocab), {}
    for k in range(1, T + 1):
        for body in itertools.product(range(1, V), repeat=k - 1):
            text = decode(vocab, body)
            if text is None or not ok(text):
                continue
            seq, prev, pr = body + (EOS,), EOS, 1.0
            for t in seq:
                pr *= probs[prev, t]
                prev = t
            out[seq] = pr
    return Measure(out.items())


def sequence_measure(result) -> Measure:
    toks = np.asarray(result.samples["tok"])
    active = np.asarray(result.extras["active"])
    w = np.asarray(result.weights, np.float64)
    return Measure((tuple(toks[i][active[i]].tolist()), w[i]) for i in range(len(w))).normalized()


def program(case, proposal="local", T=None, seed=0):
    vocab, make, _ok, T0, _K = CASES[case]
    probs, lm = lm_for(vocab, seed)
    p = tk.prompt(lm, [EOS], T or T0)
    return tk.constrained(p, make(), proposal=proposal, vocab_bytes=vocab, eos_id=EOS), probs


# --- UTF-8 and the byte automaton against Python's re -------------------------------------------------


def test_utf8_sequences_partition_the_scalar_values():
    seqs = _regex.utf8_sequences(_regex.UNIVERSE)
    boundaries = [0x7F, 0x80, 0x7FF, 0x800, 0xD7FF, 0xE000, 0xFFFF, 0x10000, 0x10FFFF]
    rng = np.random.default_rng(0)
    cps = list(range(0x900)) + boundaries + rng.integers(0, 0x110000, 20_000).tolist()
    for cp in cps:
        if 0xD800 <= cp <= 0xDFFF:
            continue
        b = chr(cp).encode()
        hits = [
            s
            for s in seqs
            if len(s) == len(b) and all(lo <= x <= hi for x, (lo, hi) in zip(b, s, strict=True))
        ]
        assert len(hits) == 1, hex(cp)
    # and every sequence spells only valid UTF-8
    for s in seqs:
        for corner in itertools.product(*[(lo, hi) for lo, hi in s]):
            bytes(corner).decode("utf-8")


UNICODE_PATTERNS = [
    r"(x|é)+",
    r"(日本|😀)+",
    r"[à-ÿ]+ ?\w*",
    r"(?i)straße|école",
    r"[^a-z]{2,4}",
    r"\d+(\.\d+)?",
    r".{1,3}",
    r"(Ω|ω)*[α-ω]",
    r"[\u4e00-\u9fff]{1,2}😀?",
    r"^\s*\S+$",
]
ALPHABET = "xyzé日本😀aAßSsÉÈΩωαβ٣5. \n\t中"


@pytest.mark.parametrize("pattern", UNICODE_PATTERNS)
def test_byte_automaton_matches_python_re(pattern):
    dfa = Regex(pattern).dfa
    rng = np.random.default_rng(1)
    texts = ["".join(t) for n in range(3) for t in itertools.product(ALPHABET, repeat=n)]
    texts += ["".join(rng.choice(list(ALPHABET), size=rng.integers(3, 8))) for _ in range(2000)]
    texts += ["日本😀日本", "éxé", "straSSe", "ÉCOLE", "12.5", "😀"]
    for text in texts:
        assert dfa.fullmatch(text.encode()) == (re.fullmatch(pattern, text) is not None), (pattern, text)


def test_unicode_regex_on_a_byte_level_vocabulary():
    """Tokens that split a character are allowed when a match can follow: every byte split of a
    matching text runs through the token automaton, and a non-matching one is refused or unfinished."""
    vocab = (
        [b"<eos>"] + [bytes([b]) for b in range(256)] + ["日".encode(), "本".encode()[:2], "😀".encode()[1:]]
    )
    auto = Regex(r"(日本|😀)+").compile(vocab, EOS)
    index = {b: i for i, b in enumerate(vocab)}

    def run(chunks):
        s = auto.init()
        for ch in chunks:
            if not bool(auto.allowed(s)[index[ch]]):
                return None
            s = auto.advance(s, index[ch])
        return bool(auto.allowed(s)[EOS])

    data = "日本😀日本".encode()
    rng = np.random.default_rng(2)
    for _ in range(30):
        cuts = sorted(set(rng.integers(1, len(data), rng.integers(0, 6)).tolist()))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        chunks = [c if c in index else None for c in chunks]
        if None in chunks:
            chunks = [bytes([b]) for b in data]
        assert run(chunks) is True
    assert run([bytes([b]) for b in "日本😀日".encode()]) is False  # a prefix: allowed, not complete
    assert run([bytes([b]) for b in "日😀".encode()]) is None  # leaves the language
    assert run([b"\xe6"]) is False  # a lone lead byte of 日: allowed (a match can follow)


def test_accented_alternative_is_not_lost():
    """The bug of the old compiler: ``(x|é)+`` silently became ``x+`` on byte-level tokens."""
    vocab = [b"<eos>", b"x", b"\xc3", b"\xa9", b"\xc3\xa9"]
    auto = Regex(r"(x|é)+").compile(vocab, EOS)
    np.testing.assert_array_equal(auto.allowed(auto.init()), [False, True, True, False, True])
    s = auto.advance(auto.init(), 2)  # first byte of é
    np.testing.assert_array_equal(auto.allowed(s), [False, False, False, True, False])
    s = auto.advance(s, 3)
    np.testing.assert_array_equal(auto.allowed(s), [True, True, True, False, True])


# --- the allowed-set function against brute force ------------------------------------------------------


def viable_prefixes(vocab, ok, max_len):
    """Every token prefix of a valid text of at most ``max_len`` tokens, and the valid sequences."""
    viable, valid, cache = set(), set(), {}
    for n in range(max_len + 1):
        for seq in itertools.product(range(1, len(vocab)), repeat=n):
            data = b"".join(vocab[t] for t in seq)
            if data not in cache:
                text = decode(vocab, seq)
                cache[data] = text is not None and ok(text)
            if cache[data]:
                valid.add(seq)
                viable.update(seq[:k] for k in range(n + 1))
    return viable, valid


@pytest.mark.parametrize("case", list(CASES))
def test_allowed_set_matches_brute_force(case):
    vocab, make, ok, _T, K = CASES[case]
    L = 3
    viable, valid = viable_prefixes(vocab, ok, L + 1 + K)
    compiled = make().compile(vocab, EOS)
    V = len(vocab)
    prefixes = [seq for n in range(L + 1) for seq in itertools.product(range(1, V), repeat=n)]
    if isinstance(compiled, TokenAutomaton):
        table = np.asarray(compiled.next_state)
        final = np.asarray(compiled.final)

        def mask(seq):
            s = int(compiled.initial)
            for t in seq:
                s = int(table[s, t]) if s >= 0 else -1
            m = np.zeros(V, bool) if s < 0 else table[s] >= 0
            m = m.copy()
            m[EOS] = s >= 0 and bool(final[s])
            return m

        masks = np.stack([mask(p) for p in prefixes])
        # the JAX methods agree with the table walk
        for p in prefixes[:: max(1, len(prefixes) // 40)]:
            s = compiled.init()
            for t in p:
                s = compiled.advance(s, t)
            np.testing.assert_array_equal(np.asarray(compiled.allowed(s)), mask(p))
    else:
        masks = compiled.host_masks(prefixes)
    for p, m in zip(prefixes, masks, strict=True):
        expect = np.array([(p + (v,)) in viable for v in range(V)])
        expect[EOS] = p in valid
        if p not in viable:
            expect[:] = False
        np.testing.assert_array_equal(m, expect, err_msg=f"{case}: prefix {p}")


# --- exact posterior and evidence ----------------------------------------------------------------------

TV_RUNS = [
    ("regex-unicode", "local"),
    ("regex-unicode", "bootstrap"),
    ("grammar-brackets", "local"),
    ("json-array", "local"),
]


@pytest.mark.parametrize("case,proposal", TV_RUNS, ids=[f"{c}-{p}" for c, p in TV_RUNS])
def test_smc_posterior_matches_exact(case, proposal):
    vocab, _make, ok, T, _K = CASES[case]
    prog, probs = program(case, proposal)
    exact = exact_posterior(vocab, probs, ok, T)
    r = pp.infer(prog, algorithm=pp.SMC(N_TV if proposal == "local" else 5 * N_TV), key=0)
    tv = sequence_measure(r).tv(exact.normalized())
    print(
        f"\n{case}/{proposal}: TV {tv:.4f}, log Ẑ {r.log_evidence:.4f} vs log Z {np.log(exact.total()):.4f}"
    )
    assert tv < TV_BOUND
    # every particle of positive weight is valid text
    for text, w in tk.texts(r):
        assert w > 0 and ok(text), text


EVIDENCE_RUNS = [("regex-unicode", "local"), ("grammar-brackets", "local"), ("json-array", "local")]


@pytest.mark.parametrize("case,proposal", EVIDENCE_RUNS, ids=[f"{c}-{p}" for c, p in EVIDENCE_RUNS])
def test_evidence_is_unbiased(case, proposal):
    vocab, _make, ok, T, _K = CASES[case]
    prog, probs = program(case, proposal)
    log_z = float(np.log(exact_posterior(vocab, probs, ok, T).total()))
    lz = smc_log_evidence_replicates(prog, (), 1000, 16)
    assert check_unbiased_evidence(lz, log_z)


def test_regex_program_denotes_the_exact_target():
    """The reference interpreter's ⟦program⟧ (locally constrained and bootstrap) equals the brute-force
    target, and SMC's exact expected output (every value of its randomness, N = 2) equals ⟦program⟧."""
    vocab, _make, ok, _T, _K = CASES["regex-unicode"]
    T = 3
    with jax.enable_x64(True):
        for proposal in ("local", "bootstrap"):
            prog, probs = program("regex-unicode", proposal, T=T)
            exact = exact_posterior(vocab, probs, ok, T)
            measure = denote(prog)
            by_seq: dict = {}
            for key, mass in measure.mass.items():
                seq = tuple(int(v) for k, v in key if k.endswith("/tok"))
                seq = seq[: seq.index(EOS) + 1] if EOS in seq else seq
                by_seq[seq] = by_seq.get(seq, 0.0) + mass
            assert Measure(by_seq.items()).max_abs_diff(exact) < 1e-6
    prog, _ = program("regex-unicode", "local", T=T)
    report = check_exact(prog, algorithm=pp.SMC(2, ess_threshold=1.0), tol=1e-6)
    assert report.ok, report


def _two_a(text):
    return text.count("a") >= 2


REQUIRE_EOS_CASES = {  # vocabulary, constraint, validity of a finished text
    "regex": (CASES["regex-unicode"][0], CASES["regex-unicode"][1], CASES["regex-unicode"][2]),
    "predicate": ([b"<eos>", b"a", b"b"], lambda: Predicate(_two_a), _two_a),
}


@pytest.mark.parametrize("case", list(REQUIRE_EOS_CASES))
def test_require_eos_false_also_keeps_complete_texts_that_fill_the_budget(case):
    """``require_eos=False`` (no test ran it before): the target adds the T-token texts without EOS
    whose text is complete, and ⟦program⟧ (both proposals) equals it by brute force; SMC's exact
    expected output equals ⟦program⟧. A regex automaton masks by the budget left; a predicate has
    no such mask, so only the program's completeness condition keeps its incomplete texts out."""
    vocab, make, ok = REQUIRE_EOS_CASES[case]
    T = 3
    with jax.enable_x64(True):
        for proposal in ("local", "bootstrap"):
            probs, lm = lm_for(vocab, 0)
            p = tk.prompt(lm, [EOS], T)
            prog = tk.constrained(
                p, make(), proposal=proposal, vocab_bytes=vocab, eos_id=EOS, require_eos=False
            )
            target = dict(exact_posterior(vocab, probs, ok, T).mass)
            for body in itertools.product(range(1, len(vocab)), repeat=T):
                text = decode(vocab, body)
                if text is not None and ok(text):
                    target[body] = float(
                        np.prod([probs[a, b] for a, b in zip((EOS,) + body[:-1], body, strict=True)])
                    )
            by_seq: dict = {}
            for key, mass in denote(prog).mass.items():
                seq = tuple(int(v) for k, v in key if k.endswith("/tok"))
                seq = seq[: seq.index(EOS) + 1] if EOS in seq else seq
                by_seq[seq] = by_seq.get(seq, 0.0) + mass
            assert Measure(by_seq.items()).max_abs_diff(Measure(target.items())) < 1e-6
            assert any(EOS not in seq for seq in by_seq)  # the new texts are there
        report = check_exact(prog, algorithm=pp.SMC(2, ess_threshold=1.0), tol=1e-6)
    assert report.ok, report


# --- outputs validate across seeds ---------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_every_output_validates_across_seeds(case):
    vocab, make, ok, _T, _K = CASES[case]
    prog, _ = program(case, "local")
    for seed in range(16):
        out = tk.texts(pp.infer(prog, algorithm=pp.SMC(256), key=seed))
        assert out and abs(sum(w for _, w in out) - 1.0) < 1e-4
        assert [w for _, w in out] == sorted((w for _, w in out), reverse=True)
        for text, _w in out:
            assert prog.constraint.validate(text) and ok(text), (seed, text)


# --- combination, predicates, errors -------------------------------------------------------------------


def test_predicate_and_combination():
    vocab = [b"<eos>", b"a", b"b", b"ab", b"ba"]
    no_bb = Predicate(lambda text: "bb" not in text, prefix=lambda text: "bb" not in text)
    both = Regex(r"[ab]{2,5}") & no_bb & Predicate(lambda text: text.count("a") >= 2)
    compiled = both.compile(vocab, EOS)
    probs, lm = lm_for(vocab, 3)
    T = 5

    def ok(text):
        return re.fullmatch(r"[ab]{2,5}", text) is not None and "bb" not in text and text.count("a") >= 2

    prog = tk.constrained(tk.prompt(lm, [EOS], T), both, vocab_bytes=vocab, eos_id=EOS)
    assert prog.compiled is not None and compiled is not None
    r = pp.infer(prog, algorithm=pp.SMC(N_TV), key=1)
    exact = exact_posterior(vocab, probs, ok, T)
    assert sequence_measure(r).tv(exact.normalized()) < TV_BOUND
    assert all(ok(t) for t, _ in tk.texts(r))


def test_a_predicate_that_raises_is_a_model_error():
    # A Python check run on the host inside the compiled run: its exception stops the run and
    # infer names it (not a JAX runtime error).
    vocab = [b"<eos>", b"a", b"b"]

    def fragile(text):
        if "b" in text:
            raise KeyError("no b please")
        return True

    _, lm = lm_for(vocab, 3)
    prog = tk.constrained(
        tk.prompt(lm, [EOS], 4), Predicate(fragile, prefix=fragile), vocab_bytes=vocab, eos_id=EOS
    )
    with pytest.raises(
        pp.ModelError,
        match=r"calls on the host .* raised KeyError: 'no b please' \(test_constraints.py:\d+, in fragile\)",
    ):
        pp.infer(prog, algorithm=pp.SMC(16), key=0)


def test_blow_up_fails_fast_and_clearly():
    t = time.perf_counter()
    with pytest.raises(pp.ConstraintError, match="automaton states"):
        _ = Regex(r"(a|b)*a(a|b){20}").dfa
    assert time.perf_counter() - t < 10.0


@pytest.mark.parametrize(
    "pattern,message",
    [
        (r"(a)\1", "back-references"),
        (r"a(?=b)b", "look"),
        (r"\bword", "anchors"),
        (r"(unclosed", "regular expression"),
    ],
)
def test_unsupported_or_invalid_regex(pattern, message):
    with pytest.raises(pp.ConstraintError, match=message):
        _ = Regex(pattern).dfa
    assert issubclass(pp.ConstraintError, pp.ConfigError)


def test_size_limits():
    with pytest.raises(pp.ConstraintError, match="entries"):
        Regex(r"[a-z]{1,30}", max_table_entries=50).compile([b"<eos>", b"a", b"b"], EOS)
    with pytest.raises(pp.ConstraintError, match="NFA states"):
        _regex.compile_regex(r"(abc){1000}", max_nfa_states=1000)


def test_grammar_and_schema_errors():
    with pytest.raises(pp.ConstraintError, match="grammar"):
        Grammar("start: undefined_rule").compile([b"<eos>", b"a"], EOS)
    with pytest.raises(pp.ConstraintError, match="multipleOf"):
        _ = JSONSchema({"type": "integer", "multipleOf": 3}).regex
    with pytest.raises(pp.ConstraintError, match="not valid JSON"):
        JSONSchema("{not json")


def test_recursive_schema_runs_on_llguidance():
    schema = {
        "$defs": {"node": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "$ref": "#/$defs/node",
    }
    c = JSONSchema(schema)
    assert c.regex is None
    vocab = [b"<eos>", b"[", b"]", b", ", b"[]"]
    masks = c.compile(vocab, EOS).host_masks([(), (1,), (1, 2), (4,), (1, 4, 3)])
    np.testing.assert_array_equal(
        masks,
        [
            [0, 1, 0, 0, 1],
            [0, 1, 1, 0, 1],
            [1, 0, 0, 0, 0],
            [1, 0, 0, 0, 0],
            [0, 1, 0, 0, 1],
        ],
    )


def test_json_schema_regex_agrees_with_jsonschema():
    """A schema with nesting, enums, bounds and optional properties: documents written by
    ``json.dumps`` match iff ``jsonschema`` accepts them."""
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 6},
            "age": {"type": "integer", "minimum": -3, "maximum": 120},
            "role": {"enum": ["admin", "user"]},
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
            "zip": {"type": "string", "pattern": "^[0-9]{3}$"},
            "ok": {"type": ["boolean", "null"]},
        },
        "required": ["name", "age"],
    }
    values = {
        "name": ["", "é", "Ann", "日本😀", "toolongname", 'a"b'],
        "age": [-4, -3, 0, 7, 120, 121, 1.5],
        "role": ["admin", "user", "root"],
        "score": [0, 0.5, 10, 10.5, -1, 3.25],
        "tags": [[], ["a"], ["a", "bcd"], ["abcd"], ["a", "b", "c"]],
        "zip": ["123", "12", "abc"],
        "ok": [True, False, None, 1],
    }
    _assert_regex_agrees_with_jsonschema(schema, values, seed=4, keep=0.7)


def _assert_regex_agrees_with_jsonschema(schema, values, seed, keep):
    """1,500 documents, each property drawn from ``values`` with probability ``keep`` and written by
    ``json.dumps``: the schema's regular expression matches iff ``jsonschema`` accepts the document
    (both outcomes seen more than 20 times)."""
    import jsonschema

    dfa = _regex.compile_regex(JSONSchema(schema).regex)
    validator = jsonschema.Draft202012Validator(schema)
    rng = np.random.default_rng(seed)
    seen = {True: 0, False: 0}
    for _ in range(1500):
        doc = {k: v[rng.integers(len(v))] for k, v in values.items() if rng.random() < keep}
        text = json.dumps(doc, ensure_ascii=bool(rng.random() < 0.3))
        expected = validator.is_valid(doc)
        assert dfa.fullmatch(text.encode()) == expected, text
        seen[expected] += 1
    assert min(seen.values()) > 20


def test_json_schema_composition_keywords_agree_with_jsonschema():
    """The keywords the first schema does not use (coverage: never run): ``anyOf``, ``oneOf`` with
    disjoint branches, a one-element ``allOf``, ``$ref`` into ``$defs``, ``const``, ``prefixItems``
    with and without further ``items``, ``minItems``, exclusive integer bounds and a schema whose
    type is inferred from its keywords: documents match iff ``jsonschema`` accepts them."""
    schema = {
        "$defs": {"small": {"type": "integer", "exclusiveMinimum": -2, "exclusiveMaximum": 3}},
        "type": "object",
        "properties": {
            "id": {"anyOf": [{"$ref": "#/$defs/small"}, {"type": "string", "maxLength": 2}]},
            "kind": {"oneOf": [{"const": "a"}, {"type": "integer", "minimum": 10, "maximum": 12}]},
            "wrapped": {"allOf": [{"type": "boolean"}]},
            "pair": {
                "type": "array",
                "prefixItems": [{"type": "integer"}, {"type": "string"}],
                "items": False,
            },
            "head": {
                "type": "array",
                "prefixItems": [{"const": 1}],
                "items": {"type": "boolean"},
                "minItems": 2,
                "maxItems": 3,
            },
            "inferred": {"maxLength": 1},  # a string, by its keyword
        },
        "required": ["id"],
    }
    values = {
        "id": [-2, -1, 0, 2, 3, "", "ab", "abc", None, 1.5],
        "kind": ["a", "b", 9, 10, 12, 13],
        "wrapped": [True, False, 0, [True]],
        "pair": [[], [1], [1, "x"], [1, "x", 2], ["x", 1], [1, 2]],
        "head": [[1], [1, True], [1, True, False], [1, True, False, True], [2, True], [1, 1]],
        "inferred": ["", "a", "ab"],
    }
    _assert_regex_agrees_with_jsonschema(schema, values, seed=5, keep=0.75)


def test_enum_and_const_keep_only_values_valid_under_the_keywords_beside_them():
    """``enum``/``const`` beside ``type``, bounds or each other: the regular expression holds exactly
    the values ``jsonschema`` accepts (it used to hold every listed value: ``{"type": "string",
    "enum": ["a", 1]}`` generated ``1``, which ``validate`` rejects)."""
    import jsonschema

    cases = [
        ({"type": "string", "enum": ["qw", 1]}, ["qw", 1]),
        ({"type": "integer", "enum": [1, 5, 10], "minimum": 4}, [1, 5, 10]),
        ({"type": ["string", "null"], "enum": ["a", None, 3]}, ["a", None, 3]),
        ({"enum": ["a", 5, 2], "minimum": 4}, ["a", 5, 2]),  # minimum: numbers only; "a" stays
        ({"const": 2, "enum": [1, 2, 3]}, [1, 2, 3]),
    ]
    for schema, values in cases:
        dfa = _regex.compile_regex(JSONSchema(schema).regex)
        for v in values:
            expected = jsonschema.Draft202012Validator(schema).is_valid(v)
            assert dfa.fullmatch(json.dumps(v).encode()) == expected, (schema, v)
    with pytest.raises(pp.ConstraintError, match="no value of const"):
        _ = JSONSchema({"const": 3, "type": "string"}).regex


def test_one_of_with_overlapping_branches_is_refused():
    """``oneOf`` needs exactly one branch to hold; a regular expression of the branches' union would
    also generate values valid under two of them (``0`` here, which ``validate`` rejects)."""
    overlapping = {
        "oneOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "number", "maximum": 9}]
    }
    with pytest.raises(pp.ConstraintError, match="oneOf branches 0 and 1 both accept '0'"):
        _ = JSONSchema(overlapping).regex
    disjoint = {"oneOf": [{"type": "integer"}, {"type": "string"}, {"const": None}]}
    assert _regex.compile_regex(JSONSchema(disjoint).regex).fullmatch(b"null")
    a, b = _regex.compile_regex("ab|c+"), _regex.compile_regex("c{2}|x")
    assert _regex.common_text(a, b) == b"cc"
    assert _regex.common_text(a, _regex.compile_regex("x")) is None


def test_schemas_that_would_be_narrowed_wrongly_are_refused_or_exact():
    """``anyOf`` beside a keyword its branch sets too (the branch used to replace it: ``minimum: 0``
    with a branch ``minimum: -5, maximum: -1`` generated ``-3``); an empty ``enum``/``anyOf``/``type``
    (they generated the empty text); ``prefixItems`` + ``items`` without ``maxItems`` (the tail could
    follow a partial prefix: ``[, true]``, not JSON)."""
    import jsonschema

    for schema, match in [
        ({"type": "integer", "minimum": 0, "anyOf": [{"minimum": -5, "maximum": -1}]}, r"set \['minimum'\]"),
        ({"type": "object", "properties": {"a": {}}, "anyOf": [{"properties": {"b": {}}}]}, "properties"),
        ({"enum": []}, "empty enum"),
        ({"anyOf": []}, "non-empty list"),
        ({"type": []}, "empty list of types"),
    ]:
        with pytest.raises(pp.ConstraintError, match=match):
            _ = JSONSchema(schema).regex
    schema = {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"type": "string"}],
        "items": {"type": "boolean"},
    }
    dfa = _regex.compile_regex(JSONSchema(schema).regex)
    for v in [[], [1], [1, "a"], [1, "a", True, False], [1, True], [True], [1, "a", 1]]:
        assert dfa.fullmatch(json.dumps(v).encode()) == jsonschema.Draft202012Validator(schema).is_valid(v), v
    assert not dfa.fullmatch(b"[, true]")
    # The same keyword with the same value beside and inside a branch is no conflict.
    same = {"type": "integer", "anyOf": [{"type": "integer", "maximum": 3}]}
    assert _regex.compile_regex(JSONSchema(same).regex).fullmatch(b"3")


def test_recursive_pydantic_schema_and_invalid_schemas():
    """A recursive model as pydantic writes it (a root ``$ref`` into ``$defs``) compiles on
    llguidance and closes every object, the nested ones included; an invalid schema is a
    ConstraintError in ``validate`` too."""
    schema = {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]},
                },
                "required": ["v"],
            }
        },
        "$ref": "#/$defs/Node",
    }
    vocab = [b"<eos>", b'{"v": 1', b"}", b', "next": ', b"null", b', "w": 2', b"{", b'"v"', b": ", b"1"]
    c = JSONSchema(schema)
    assert c.regex is None
    masks = c.compile(vocab, EOS).host_masks([(), (1,), (1, 3), (1, 3, 1), (1, 2)])
    np.testing.assert_array_equal(
        masks,
        [
            [0, 1, 0, 0, 0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0, 0, 0, 0, 1],  # no ', "w": 2'
            [0, 1, 0, 0, 1, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0, 0, 0, 0, 1],  # the nested object is closed too
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
    )
    assert c.validate('{"v": 1, "next": {"v": 1}}') and not c.validate('{"next": null}')
    with pytest.raises(pp.ConstraintError, match="not a valid JSON Schema"):
        JSONSchema({"type": "objct"}).validate("{}")


def test_texts_of_a_constrained_result():
    prog, _ = program("regex-unicode", "local")
    r = pp.infer(prog, algorithm=pp.SMC(64), key=0)
    out = tk.texts(r)
    w = np.asarray(r.weights)
    assert len(out) == int((w > 0).sum())
    assert pytest.approx(sum(x for _, x in out), abs=1e-5) == 1.0
    with pytest.raises(pp.ConfigError):
        tk.constrained(prog.prompt, Regex("x"), proposal="greedy", vocab_bytes=CASES["regex-unicode"][0])


def test_potentials_and_twist_keep_the_target():
    """A potential multiplies the target; a twist leaves it unchanged."""
    vocab, make, ok, T, _K = CASES["regex-unicode"]
    probs, lm = lm_for(vocab)
    p = tk.prompt(lm, [EOS], T)
    bonus = lambda ctx, tok: 0.5 * (tok == 1)  # likes "x"
    twist = lambda ctx: -0.3 * ctx.length.astype(jnp.float32)
    prog = tk.constrained(p, make(), potentials=[bonus], twist=twist, vocab_bytes=vocab, eos_id=EOS)
    exact = {}
    for seq, m in exact_posterior(vocab, probs, ok, T).mass.items():
        exact[seq] = m * np.exp(0.5 * sum(t == 1 for t in seq))
    exact = Measure(exact.items())
    r = pp.infer(prog, algorithm=pp.SMC(N_TV), key=3)
    assert sequence_measure(r).tv(exact.normalized()) < TV_BOUND


def test_llguidance_masks_allow_every_tokenisation_of_forced_bytes():
    """llguidance forced a byte string the grammar fixes as its canonical tokenisation: with tokens
    "a", "b", "ab" and ``start: "ab"`` only "ab" was allowed first, so SMC's log Ẑ was log 0.25
    where the exact value is log 0.5 (the "a", "b" path lost); a grammar whose lexemes overlap
    (``A: /a+/ B: /a/``) never returned its first mask. Masks against brute force, for a Lark grammar
    and a JSON schema on llguidance."""
    vocab = [b"<eos>", b"a", b"b", b"ab", b"c"]
    grammar = Grammar('start: "ab" "c"*')
    ok = lambda text: re.fullmatch("abc*", text) is not None
    viable, _ = viable_prefixes(vocab, ok, 5)
    prefixes = [seq for n in range(3) for seq in itertools.product(range(1, len(vocab)), repeat=n)]
    masks = grammar.compile(vocab, EOS).host_masks(prefixes)
    for p, m in zip(prefixes, masks, strict=True):
        expect = [(p + (v,)) in viable for v in range(len(vocab))]
        expect[EOS] = decode(vocab, p) is not None and ok(decode(vocab, p))
        assert list(m) == expect, (p, m)

    schema = JSONSchema(
        {"type": "object", "properties": {"a": {"type": "null"}}, "required": ["a"]}, engine="llguidance"
    )
    json_vocab = [b"<eos>", b"{", b'"', b'"a', b'"a"', b"a", b":", b": ", b" ", b"null", b"}"]
    first = schema.compile(json_vocab, EOS).host_masks([[1]])[0]
    assert {json_vocab[v] for v in np.flatnonzero(first)} == {b'"', b'"a', b'"a"'}

    # log Ẑ exactly: P("ab") + P("a")P("b" | "a") = 0.25 + 0.5 · 0.5.
    probs = np.array(
        [[0, 0.5, 0.25, 0.25, 0], [0.5, 0, 0.5, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    )
    lm = NGramLM.from_probs(probs, bos_id=EOS)
    prog = tk.constrained(tk.prompt(lm, [EOS], 3), Grammar('start: "ab"'), vocab_bytes=vocab, eos_id=EOS)
    assert check_exact(prog, algorithm=pp.SMC(1), tol=1e-6).ok

    hang = Grammar("start: A B\nA: /a+/\nB: /a/").compile([b"<eos>", b"a", b"b"], EOS)
    assert hang.host_masks([[]])[0].tolist() == [False, True, False]


def test_schema_keywords_that_constrain_listed_properties_are_checked():
    # propertyNames and patternProperties were ignored as annotations: 32 of 32 SMC particles wrote
    # {"a": …, "B": …} under propertyNames ^[a-z]+$ (and a string for an integer pattern property).
    names = {"type": "object", "properties": {"a": {"type": "integer"}, "B": {"type": "integer"}}}
    with pytest.raises(pp.ConstraintError, match="property 'B' is not allowed by propertyNames"):
        _ = JSONSchema({**names, "propertyNames": {"pattern": "^[a-z]+$"}}).regex
    pattern = {
        "type": "object",
        "properties": {"ab": {"type": "string"}},
        "patternProperties": {"^a": {"type": "integer"}},
    }
    with pytest.raises(pp.ConstraintError, match="patternProperties '\\^a' applies to property 'ab'"):
        _ = JSONSchema(pattern).regex
    with pytest.raises(pp.ConstraintError, match="patternProperties '\\(': missing \\)"):
        _ = JSONSchema({**names, "patternProperties": {"(": {}}}).regex  # a raw re.error before
    fine = {**names, "propertyNames": {"maxLength": 1}, "patternProperties": {"^x": {"type": "string"}}}
    assert JSONSchema(fine).validate('{"a": 1, "B": 2}')
    assert _regex.compile_regex(JSONSchema(fine).regex).fullmatch(b'{"a": 1, "B": 2}')
    # oneOf branches apart as texts but not as values (1 and 1.0): both texts were generated, and
    # both are invalid under oneOf.
    for branches in ([{"const": 1.0}, {"type": "integer"}], [{"const": 1}, {"const": 1.0}]):
        with pytest.raises(pp.ConstraintError, match="JSON compares numbers by value"):
            _ = JSONSchema({"oneOf": branches}).regex
    assert JSONSchema({"oneOf": [{"const": 1}, {"const": 2}, {"type": "string"}]}).regex
    # A negative max_whitespace built [ \t\n\r]{0,-1}, which re reads as literal text.
    with pytest.raises(pp.ConstraintError, match="max_whitespace must be an integer >= 0"):
        JSONSchema({"type": "null"}, whitespace="flexible", max_whitespace=-1)
    with pytest.raises(pp.ConstraintError, match="maxLength must be an integer >= 0, got 1.5"):
        _ = JSONSchema({"type": "string", "maxLength": 1.5}).regex


def test_integer_bounds_of_many_digits_compile_fast():
    # The digit-range regex doubled per digit: int64 bounds took 32 s to fail with a 23.7 MB message,
    # 10^25 did not return. Now linear in the digits; the automaton is checked on the edges.
    for lo, hi in ((0, 9_200_000_000_000_000_000), (-(10**25), 10**25 + 7), (10**15, None)):
        schema = {"type": "integer", "minimum": lo} | ({} if hi is None else {"maximum": hi})
        start = time.perf_counter()
        dfa = _regex.compile_regex(JSONSchema(schema).regex)
        assert time.perf_counter() - start < 5.0
        for n in (lo, lo + 1, lo - 1) + (() if hi is None else (hi, hi - 1, hi + 1)):
            inside = n >= lo and (hi is None or n <= hi)
            assert dfa.fullmatch(str(n).encode()) == inside, n


def test_regex_argument_and_anchor_messages():
    with pytest.raises(pp.ConstraintError, match="LOCALE"):
        _ = Regex("a", re.LOCALE).dfa
    with pytest.raises(pp.ConstraintError, match="max_states must be an integer"):
        _ = Regex("a", max_states="x").dfa
    with pytest.raises(pp.ConstraintError, match=r"not \\b"):
        _ = Regex(r"a\bb").dfa


BYTE_VOCAB = [b"<eos>"] + [bytes([b]) for b in range(256)]


def _spells(constraint, text):
    """Whether ``constraint``'s masks on a byte vocabulary allow ``text`` and then EOS."""
    compiled, tokens = constraint.compile(BYTE_VOCAB, 0), [1 + b for b in text.encode()]
    if isinstance(compiled, TokenAutomaton):
        table, s = np.asarray(compiled.next_state), int(compiled.initial)
        for t in tokens:
            s = int(table[s, t]) if s >= 0 else -1
        return bool(s >= 0 and np.asarray(compiled.final)[s])
    masks = compiled.host_masks([tokens[:i] for i in range(len(tokens) + 1)])
    return all(masks[i][t] for i, t in enumerate(tokens)) and bool(masks[-1][0])


def test_llguidance_json_path_generates_the_regex_engines_language():
    """Hunt 13, on the host engine: max_whitespace was ignored (7.7 % of an SMC posterior on texts
    with spaces under max_whitespace=0), objects reached through additionalProperties and items
    beyond prefixItems were written, \\u escapes refused, and a number just under an exclusive bound
    (0.99999999999999999 < 1) was generated though it reads as 1.0, which validate rejects."""
    obj = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    cases = [
        (obj, {"whitespace": "flexible", "max_whitespace": 0}, ['{"a":1}'], ['{"a": 1}', '{"a":\n1}']),
        (obj, {"whitespace": "flexible", "max_whitespace": 2}, ['{ "a":\t1}'], ['{"a":   1}']),
        (obj, {}, ['{"a": 1}'], ['{"a":1}', '{"a": 1, "b": 2}']),
        (
            {
                "type": "object",
                "additionalProperties": {"type": "object", "properties": {"x": {"type": "integer"}}},
            },
            {},
            ["{}"],
            ['{"k": {"x": 1}}'],
        ),
        ({"type": "array", "prefixItems": [{"type": "integer"}]}, {}, ["[1]", "[]"], ["[1, 2]"]),
        ({"type": "string"}, {}, ['"\\u0041"', '"\\u00e9"', '"a"'], ['"\\ud800"']),
    ]
    for schema, options, accepted, refused in cases:
        regex = JSONSchema(schema, engine="regex", **options)
        host = JSONSchema(schema, engine="llguidance", **options)
        for text in accepted + refused:
            assert _spells(regex, text) == _spells(host, text) == (text in accepted), (schema, options, text)
    with pytest.raises(pp.ConstraintError, match="exclusiveMinimum/exclusiveMaximum on a number"):
        JSONSchema({"type": "number", "exclusiveMaximum": 1}, engine="llguidance").compile(BYTE_VOCAB, 0)
    # A keyword llguidance lacks is said as the schema's error (it was "invalid grammar: at 2(8): …"
    # with the internal %json grammar dumped).
    unique = JSONSchema({"type": "array", "uniqueItems": True, "items": {"$ref": "#"}}, engine="llguidance")
    with pytest.raises(
        pp.ConstraintError, match=r"^JSONSchema: llguidance cannot compile the schema: .*uniqueItems"
    ):
        unique.compile(BYTE_VOCAB, 0)


def test_grammar_validate_and_messages_for_grammars_lark_cannot_build():
    # The tutorial's grammar (an empty alternative) raised Lark's raw GrammarError from validate;
    # such a grammar is now checked by the engine's own masks. Errors keep the user's line numbers.
    balanced = Grammar('start: "(" start ")" start | ""')
    assert balanced.validate("(()())") and balanced.validate("")
    assert not balanced.validate("(()") and not balanced.validate(")(")
    with pytest.raises(pp.ConstraintError, match=r"at 2\(\d+\): unknown name"):
        Grammar('start: x\nx: "a" y').compile(BYTE_VOCAB, 0)
    # A user's own %llguidance line cannot turn the exact masks off.
    vocab = [b"<eos>", b"a", b"b", b"ab"]
    first = Grammar('%llguidance {"no_forcing": false}\nstart: "ab"').compile(vocab, 0).host_masks([[]])[0]
    assert first.tolist() == [False, True, False, True]
