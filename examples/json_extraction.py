"""JSON extraction with a schema on the embedded LM, in one call: every weighted particle is a JSON
document valid under the schema, and ``log Ẑ`` estimates the probability that the LM alone would
have written one. Also a small arithmetic grammar (Lark syntax, run by llguidance on the host).

    python examples/json_extraction.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ppinfer as pp  # noqa: E402
from ppinfer import tokens as tk  # noqa: E402
from ppinfer.constraints import Grammar, JSONSchema, Regex  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "module": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["function", "class", "constant"]},
        "line": {"type": "integer", "minimum": 1, "maximum": 9999},
        "public": {"type": "boolean"},
    },
    "required": ["module", "kind", "line", "public"],
}

# Sums and products of small integers, brackets allowed: e.g. "(3 + 4) * 12".
ARITHMETIC = r"""
start: expr
expr: term (" + " term)*
term: factor (" * " factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]?/
"""


def merged(texts):
    """``[(text, total weight), …]`` of the distinct texts, heaviest first."""
    total: dict = {}
    for text, w in texts:
        total[text] = total.get(text, 0.0) + w
    return sorted(total.items(), key=lambda kv: -kv[1])


def main(num_particles: int = 32, max_new_tokens: int = 48, grammar_tokens: int = 12) -> dict:
    """Prints the heaviest outputs of each run; returns, per run, ``log_z`` and ``texts``
    (``[(text, weight), …]`` of the particles of positive weight, heaviest first)."""
    lm = load_default()
    out = {}

    # 1. A JSON schema, compiled to a token automaton on device: one call builds the program.
    p = tk.prompt(lm, "<|endoftext|>entry = ", max_new_tokens=max_new_tokens)
    schema = JSONSchema(SCHEMA)
    result = pp.infer(tk.constrained(p, schema), algorithm=pp.SMC(num_particles), key=0)
    texts = tk.texts(result)
    print(f"JSON schema: log Ẑ {result.log_evidence:.1f}, {len(texts)} weighted particles")
    for text, w in merged(texts)[:3]:
        print(f"  {w:.3f}  {text}   valid: {schema.validate(text)}  → {json.loads(text)['kind']}")
    out["json"] = {"log_z": float(result.log_evidence), "texts": texts}

    # 2. A context-free grammar, and a constraint combined with & (a regex on the length).
    p = tk.prompt(lm, "<|endoftext|>x = ", max_new_tokens=grammar_tokens)
    arithmetic = Grammar(ARITHMETIC) & Regex(r".{1,14}")
    result = pp.infer(tk.constrained(p, arithmetic), algorithm=pp.SMC(num_particles), key=0)
    texts = tk.texts(result)
    print(f"arithmetic grammar: log Ẑ {result.log_evidence:.1f}, {len(texts)} weighted particles")
    for text, w in merged(texts)[:3]:
        print(f"  {w:.3f}  x = {text}   = {eval(text)}   valid: {arithmetic.validate(text)}")
    out["grammar"] = {"log_z": float(result.log_evidence), "texts": texts}
    return out


if __name__ == "__main__":
    main()
