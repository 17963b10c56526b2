"""Token-level programs on the embedded default LM."""

import re

import numpy as np
import pytest

import ppinfer as pp
from models.lm_programs import PYTHON_DEF_PATTERN, parses_as_def, python_def
from ppinfer import tokens as tk
from ppinfer.lm import load_default


@pytest.fixture(scope="module")
def lm():
    return load_default()


def test_regex_constraint_holds_on_every_surviving_particle(lm):
    program, args, proposal = python_def(lm, 14)
    algorithm = pp.SMC(32, proposal=proposal)
    checked = 0
    for seed in range(6):
        try:
            r = pp.infer(program, *args, algorithm=algorithm, key=seed)
        except pp.ZeroEvidenceError:
            continue  # a run where no particle finished within 14 tokens is a clear error, not a bad match
        texts = tk.texts(r.state[0], lm.tokenizer, lm.eos_id)
        for text, w in zip(texts, np.asarray(r.weights), strict=True):
            if w > 0:
                assert re.fullmatch(PYTHON_DEF_PATTERN, text), text
                assert parses_as_def(text), text
                checked += 1
    assert checked >= 10


def test_parses_as_def():
    assert parses_as_def(" f(a, b):")
    assert not parses_as_def(" f(a, a):")  # duplicate parameter
    assert not parses_as_def(" if(x):")  # keyword as a name


def test_texts_and_lm_prompt_pytree(lm):
    import jax

    p = tk.prompt(lm, "<|endoftext|>import", 4)
    leaves, treedef = jax.tree.flatten(p)
    again = jax.tree.unflatten(treedef, leaves)
    assert again.max_new_tokens == 4 and again.eos_id == lm.eos_id
    ctx = tk.Context.start(p)
    ids = lm.tokenizer.encode(" os")
    for t in ids:
        ctx = ctx.extend(p, t)
    batched = jax.tree.map(lambda x: x[None], ctx)
    assert tk.texts(batched, lm.tokenizer, lm.eos_id) == [" os"]
    lp, _ = tk.score_tokens(tk.Context.start(p), p, np.asarray(ids))
    expected = sum(float(c) for c in _teacher_forced(lm, p, ids))
    assert float(lp) == pytest.approx(expected, rel=1e-5)


def _teacher_forced(lm, p, ids):
    ctx = tk.Context.start(p)
    for t in ids:
        yield ctx.logp[t]
        ctx = ctx.extend(p, t)
