"""Token-level programs on the embedded default LM, used by the demo, benchmarks, examples and tests."""

from __future__ import annotations

from typing import Any

import ppinfer as pp
from ppinfer import tokens as tk
from ppinfer.constraints import regex_automaton

__all__ = ["PYTHON_DEF_PATTERN", "python_def", "parses_as_def"]

# A function header after the prompt "def": a name, parameters, a colon.
PYTHON_DEF_PATTERN = r" [a-z_]+\([a-z_, ]*\):"


def parses_as_def(text: str) -> bool:
    """Whether ``"def" + text`` followed by a body compiles as Python (rejects keywords as names,
    duplicate or empty parameters…)."""
    try:
        compile("def" + text + "\n    pass\n", "<generated>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def python_def(lm: Any, max_new_tokens: int = 24, prompt: str = "<|endoftext|>def"):
    """The posterior of ``lm``'s continuations of ``prompt`` that match
    :data:`PYTHON_DEF_PATTERN`, end with EOS within ``max_new_tokens`` tokens and parse with
    ``compile``. Returns ``(program, args, proposal)``: ``proposal`` is the locally constrained one
    (the LM masked by the regex automaton)."""
    p = tk.prompt(lm, prompt, max_new_tokens)
    automaton = regex_automaton(PYTHON_DEF_PATTERN, lm.vocab_bytes, lm.eos_id)
    decode = lm.tokenizer.decode

    def init(p, a):
        return tk.Context.start(p), a.initial

    def step(state, t, p, a):
        ctx, s = state
        tok = pp.sample("tok", ctx.next_token())
        pp.condition("regex", a.allowed(s)[tok])
        done = tok == p.eos_id
        ok = tk.text_predicate(parses_as_def, decode, ctx.tokens, ctx.length, when=done)
        pp.condition("parses", ok)
        tk.require_eos("finished", done, t, max_new_tokens)
        pp.stop(done)
        return ctx.extend(p, tok), a.advance(s, tok)

    def proposal(state, t, p, a):
        ctx, s = state
        pp.sample("tok", tk.masked_next_token(ctx, a.allowed(s)))

    return pp.sequential(init, step, max_new_tokens), (p, automaton), proposal
