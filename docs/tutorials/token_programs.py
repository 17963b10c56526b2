"""Tutorial: steering the embedded language model with SMC."""

import re

import numpy as np

import ppinfer as pp
from ppinfer import tokens as tk
from ppinfer.constraints import regex_automaton
from ppinfer.lm import load_default

lm = load_default()  # a 1.6M-parameter GPT-2 trained by the project (models/default_lm)
T = 16
p = tk.prompt(lm, "<|endoftext|>def", max_new_tokens=T)  # the prompt runs once, shared
pattern = r" [a-z_]+\([a-z_, ]*\):"
automaton = regex_automaton(pattern, lm.vocab_bytes, lm.eos_id)


def init(p, a):
    return tk.Context.start(p), a.initial  # the particle state: LM context + automaton state


def step(state, t, p, a):
    ctx, s = state
    tok = pp.sample("tok", ctx.next_token())  # the LM is the prior over the next token
    pp.condition("regex", a.allowed(s)[tok])  # the constraint: weight 0 if the token breaks it
    done = p.is_eos(tok)
    tk.require_eos("finished", done, t, T)  # target: complete matches within T tokens
    pp.stop(done)
    return ctx.extend(p, tok), a.advance(s, tok)


def locally_constrained(state, t, p, a):
    ctx, s = state
    pp.sample("tok", tk.masked_next_token(ctx, a.allowed(s)))  # weight p/q = allowed mass


program = pp.sequential(init, step, T)
result = pp.infer(program, p, automaton, algorithm=pp.SMC(32, proposal=locally_constrained), key=0)
print(result)

texts = tk.texts(result.state[0], lm.tokenizer, lm.eos_ids)
weights = np.asarray(result.weights)
z = np.exp(result.log_evidence)
print(f"log Z = {result.log_evidence:.2f}: P(the LM writes such a header unaided) ≈ {z:.1e}")
for text, w in sorted(zip(texts, weights, strict=True), key=lambda kv: -kv[1])[:3]:
    print(f"{w:.3f}  def{text}   matches: {bool(re.fullmatch(pattern, text))}")
