"""Tutorial: structured generation — regexes, JSON schemas and grammars as exact constraints."""

import json

import ppinfer as pp
from ppinfer import tokens as tk
from ppinfer.constraints import Grammar, JSONSchema, Predicate, Regex
from ppinfer.lm import load_default

lm = load_default()  # byte-level BPE vocabulary of 2,048 tokens

# 1. A regular expression, Unicode included: a token may end inside "é" (its bytes are c3 a9).
p = tk.prompt(lm, "<|endoftext|>name = '", max_new_tokens=12)
result = pp.infer(tk.constrained(p, Regex(r"[a-zé]{2,8}")), algorithm=pp.SMC(16), key=0)
print("regex:", result.log_evidence, tk.texts(result)[:3])

# 2. A JSON schema: compiled to a token automaton on device (its state is one int per particle).
schema = {
    "type": "object",
    "properties": {
        "op": {"enum": ["add", "mul"]},
        "args": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
    },
    "required": ["op", "args"],
}
p = tk.prompt(lm, "<|endoftext|>call = ", max_new_tokens=32)
constraint = JSONSchema(schema)
result = pp.infer(tk.constrained(p, constraint), algorithm=pp.SMC(16), key=0)
for text, w in tk.texts(result)[:3]:
    print(f"json: {w:.3f} {text}  valid={constraint.validate(text)}  value={json.loads(text)}")

# 3. A context-free grammar (Lark syntax, llguidance on the host) combined with a Python predicate.
grammar = Grammar('start: "(" start ")" start | ""')
balanced = grammar & Predicate(lambda text: 2 <= len(text) <= 8)
p = tk.prompt(lm, "<|endoftext|>x = ", max_new_tokens=8)
result = pp.infer(tk.constrained(p, balanced), algorithm=pp.SMC(16), key=0)
print("grammar:", result.log_evidence, tk.texts(result)[:3])
