"""The tiny token-level setting shared by the token-program tests: a bigram LM over {EOS, a, b, c}
whose prompt is [EOS] (used as BOS), short enough (T steps) for Enumerate to give the exact
posterior, and a program with a hard constraint, a potential and a stop."""

import jax.numpy as jnp
import numpy as np

import ppinfer as pp
from ppinfer import tokens as tk
from ppinfer.lm import NGramLM

EOS = 0
T = 3
PROBS = np.array(
    [
        [0.05, 0.45, 0.30, 0.20],
        [0.30, 0.10, 0.40, 0.20],
        [0.25, 0.35, 0.10, 0.30],
        [0.40, 0.20, 0.30, 0.10],
    ]
)
LM = NGramLM.from_probs(PROBS, bos_id=EOS)
P = tk.prompt(LM, [EOS], T)


def init(p):
    return tk.Context.start(p)


def no_repeat_step(ctx, t, p):
    """Constraint: no token repeats the previous one; potential: reward token 2."""
    tok = pp.sample("tok", ctx.next_token())
    prev = jnp.where(ctx.length > 0, ctx.tokens[jnp.maximum(ctx.length - 1, 0)], -1)
    pp.condition("no_repeat", (tok != prev) | (tok == EOS))
    pp.factor("likes_b", 0.7 * (tok == 2))
    pp.stop(tok == EOS)
    return ctx.extend(p, tok)
