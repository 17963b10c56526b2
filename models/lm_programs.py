"""Token-level programs on the embedded default LM, used by the demo, benchmarks, examples and tests."""

from __future__ import annotations

from typing import Any

import ppinfer as pp
from ppinfer import tokens as tk
from ppinfer.constraints import regex_automaton

__all__ = [
    "PYTHON_DEF_PATTERN",
    "python_def",
    "parses_as_def",
    "regex_program",
    "regex_init",
    "regex_step",
    "regex_proposal",
]

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


def regex_init(p: tk.LMPrompt, a: Any):
    """``init`` of a regex-constrained token program: state ``(context, automaton state)``."""
    return tk.Context.start(p), a.initial


def regex_step(state, t, p: tk.LMPrompt, a: Any):
    """One token from the LM; weight 0 unless the text stays a prefix of a match (and EOS comes only
    after a full match: the automaton allows it only in final states); the particle ends at EOS."""
    ctx, s = state
    tok = pp.sample("tok", ctx.next_token())
    pp.condition("regex", a.allowed(s)[tok])
    pp.stop(p.is_eos(tok))
    return ctx.extend(p, tok), a.advance(s, tok)


def regex_proposal(state, t, p: tk.LMPrompt, a: Any):
    """The locally constrained proposal: the LM's next-token distribution masked by the automaton
    (its weight ``log p − log q`` is the log of the allowed mass)."""
    ctx, s = state
    pp.sample("tok", tk.masked_next_token(ctx, a.allowed(s)))


def regex_program(lm: Any, prompt: str, pattern: str, max_new_tokens: int):
    """The posterior of ``lm``'s continuations of ``prompt`` whose text matches ``pattern`` (a
    finished particle's text fully, an unfinished one as a prefix). Returns ``(program, args,
    proposal)`` with :func:`regex_proposal`."""
    p = tk.prompt(lm, prompt, max_new_tokens)
    automaton = regex_automaton(pattern, lm.vocab_bytes, lm.eos_id)
    return pp.sequential(regex_init, regex_step, max_new_tokens), (p, automaton), regex_proposal


def python_def(lm: Any, max_new_tokens: int = 24, prompt: str = "<|endoftext|>def"):
    """The posterior of ``lm``'s continuations of ``prompt`` that match
    :data:`PYTHON_DEF_PATTERN`, end with EOS within ``max_new_tokens`` tokens and parse with
    ``compile``. Returns ``(program, args, proposal)``: ``proposal`` is the locally constrained one
    (the LM masked by the regex automaton)."""
    p = tk.prompt(lm, prompt, max_new_tokens)
    automaton = regex_automaton(PYTHON_DEF_PATTERN, lm.vocab_bytes, lm.eos_id)
    decode = lm.tokenizer.decode

    def step(state, t, p, a):
        ctx, s = state
        tok = pp.sample("tok", ctx.next_token())
        pp.condition("regex", a.allowed(s)[tok])
        done = p.is_eos(tok)
        ok = tk.text_predicate(parses_as_def, decode, ctx.tokens, ctx.length, when=done)
        pp.condition("parses", ok)
        tk.require_eos("finished", done, t, max_new_tokens)
        pp.stop(done)
        return ctx.extend(p, tok), a.advance(s, tok)

    return pp.sequential(regex_init, step, max_new_tokens), (p, automaton), regex_proposal
