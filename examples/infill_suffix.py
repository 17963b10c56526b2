"""Infilling-style conditioning on a suffix: reasoning steps that lead to a given answer.

The embedded model was trained on step-by-step arithmetic (``Q: 17+5*3 = ? Step: … A: 32``).
Given the question, we generate the steps and condition on the text ending with the known answer
``A: <answer>``: at the last step every particle is weighted by the LM's probability of the suffix
(``tokens.score_tokens``, teacher forcing). The suffix scoring runs only at the last step: ``t`` is
the same for all particles, so ``lax.cond`` on it stays a real branch under ``vmap``.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ppinfer as pp  # noqa: E402
from ppinfer import tokens as tk  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402


def main(num_particles: int = 64, max_steps_tokens: int = 24, question: str = "12+7*3") -> dict:
    """Prints log Ẑ and the top 3 step texts; returns ``answer``, ``log_z`` and, per particle, the
    generated ``tokens`` (``i32[N, T]``), ``lengths``, ``texts`` and ``log_weights``."""
    lm = load_default()
    answer = eval(question)  # noqa: S307 - a fixed arithmetic string
    suffix = jnp.asarray(lm.tokenizer.encode(f" A: {answer}") + [lm.eos_id], jnp.int32)
    p = tk.prompt(lm, f"<|endoftext|>Q: {question} = ? Step:", max_steps_tokens + suffix.shape[0])
    num_steps = max_steps_tokens
    answer_marker = jnp.asarray(lm.tokenizer.encode(" A"), jnp.int32)[0]

    def init(p):
        return tk.Context.start(p)

    def step(ctx, t, p):
        tok = pp.sample("tok", ctx.next_token())
        # The steps must not write their own answer or end early: the suffix supplies them.
        pp.condition("no_answer_yet", (tok != answer_marker) & ~p.is_eos(tok))
        ctx = ctx.extend(p, tok)
        suffix_lp = jax.lax.cond(
            t == num_steps - 1, lambda c: score_suffix(c, p), lambda c: jnp.zeros(()), ctx
        )
        pp.factor("suffix", suffix_lp)
        return ctx

    def score_suffix(ctx, p):
        return tk.score_tokens(ctx, p, suffix)[0]

    program = pp.sequential(init, step, num_steps)
    result = pp.infer(program, p, algorithm=pp.SMC(num_particles), key=0)
    texts = tk.texts(result.state, lm.tokenizer, lm.eos_ids)
    print(f"Q: {question} = ?   conditioned on the answer {answer}: log Ẑ = {result.log_evidence:.2f}")
    best = {}
    for text, w in zip(texts, np.asarray(result.weights), strict=True):
        best[text] = best.get(text, 0.0) + float(w)
    for text, w in sorted(best.items(), key=lambda kv: -kv[1])[:3]:
        print(f"  {w:.3f}  Step:{text} A: {answer}")
    toks, lens = jax.device_get((result.state.tokens, result.state.length))
    return {
        "answer": answer,
        "log_z": float(result.log_evidence),
        "tokens": np.asarray(toks),
        "lengths": np.asarray(lens),
        "texts": texts,
        "log_weights": np.asarray(result.log_weights, np.float64),
    }


if __name__ == "__main__":
    main()
