"""A critic on prefixes: a user function of the decoded text, used as a twist.

Target: the LM's continuations of ``"<|endoftext|>import"`` reweighted by a final reward
``exp(−1.5 · #words)`` on the text (short import lines). The same function on every prefix serves as
a twist (a critic that guesses the final reward early): ``tokens.twist`` applies it and removes the
previous one, so the target is unchanged while weak particles are resampled away sooner.
"""

import sys
from functools import partial
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ppinfer as pp  # noqa: E402
from ppinfer import tokens as tk  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402


def reward(text: str) -> float:
    return -1.5 * len(text.split())


def main(num_particles: int = 64, max_new_tokens: int = 12) -> dict:
    """Prints one line per run; returns, for ``twist=False`` and ``twist=True`` (keys ``False``,
    ``True``), ``log_z``, ``mean_ess``, ``mean_words`` and, per particle, the generated ``tokens``,
    ``lengths``, ``texts`` and final ``log_weights``, with the per-step ``resampled`` flags."""
    lm = load_default()
    p = tk.prompt(lm, "<|endoftext|>import", max_new_tokens)

    def score(ctx):
        return tk.text_value(reward, lm.tokenizer.decode, ctx.tokens, ctx.length)

    def init(p):
        return tk.Context.start(p), jnp.zeros(())

    def step(state, t, p, use_twist):
        ctx, psi = state
        tok = pp.sample("tok", ctx.next_token())
        done = p.is_eos(tok) | (t == max_new_tokens - 1)
        ctx = ctx.extend(p, tok)
        value = score(ctx)
        pp.factor("reward", jnp.where(done, value, 0.0))
        if use_twist:
            psi = tk.twist("critic", value, psi, final=done)
        pp.stop(p.is_eos(tok))
        return ctx, psi

    out = {}
    for use_twist in (False, True):
        program = pp.sequential(init, partial(step, use_twist=use_twist), max_new_tokens)
        r = pp.infer(program, p, algorithm=pp.SMC(num_particles), key=0)
        texts = tk.texts(r.state[0], lm.tokenizer, lm.eos_ids)
        mean_words = float(np.sum(np.asarray(r.weights) * np.array([len(t.split()) for t in texts])))
        print(
            f"twist={use_twist!s:>5}: log Ẑ {r.log_evidence:6.2f}  mean ESS {float(np.mean(r.ess)):5.1f}  "
            f"E[#words] {mean_words:.2f}  e.g. 'import{texts[int(np.argmax(np.asarray(r.weights)))]}'"
        )
        toks, lens = np.asarray(r.state[0].tokens), np.asarray(r.state[0].length)
        out[use_twist] = {
            "log_z": float(r.log_evidence),
            "mean_ess": float(np.mean(r.ess)),
            "mean_words": mean_words,
            "tokens": toks,
            "lengths": lens,
            "texts": texts,
            "log_weights": np.asarray(r.log_weights, np.float64),
            "resampled": np.asarray(r.resampled),
        }
    return out


if __name__ == "__main__":
    main()
