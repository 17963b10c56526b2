"""Plain sampling from the embedded LM (``lm.generate``) vs the SMC path, same process.

Three ways to draw N unconstrained samples of at most T tokens from the embedded default model
(prompt ``<|endoftext|>import``):

- ``before``: the previous ``lm.generate`` body, kept here as the baseline: a ``lax.scan`` over all T
  tokens of ``jax.vmap(lm_step)``;
- ``generate``: ``lm.generate`` now — one batched decode step per token (``batched_step``, the step
  SMC uses) in a ``while_loop`` that ends once every sequence has emitted EOS;
- ``smc``: a token-level program (``sample`` from the LM, ``stop`` at EOS) run by ``pp.SMC(N)``.

``before`` and ``generate`` draw with the same keys: their tokens are checked to be identical.
Times are medians of ``--reps`` interleaved runs after one compiling run (``_timing``), on a shared
CPU (noisy). Ends with ``RESULT generate_s=… before_s=… smc_s=… generate_over_smc=…
before_over_generate=…`` (N=10⁴, T=16 by default; ``--quick``: N=1000).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved_medians  # noqa: E402

import ppinfer as pp  # noqa: E402
from ppinfer import tokens as tk  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402
from ppinfer.lm.transformer import init_particle_cache, lm_step, prefill  # noqa: E402

PROMPT = "<|endoftext|>import"


@functools.partial(jax.jit, static_argnums=(1, 4, 5, 6))
def generate_before(params, config, prompt, key, num_particles, max_new_tokens, eos_id):
    """The previous ``_generate`` (temperature 1): a scan over all T steps of vmap(lm_step)."""
    logits, prompt_cache = prefill(params, config, prompt)
    logits = jnp.broadcast_to(logits[-1], (num_particles, config.vocab_size))
    cache = init_particle_cache(config, num_particles, max_new_tokens, params["embed"].dtype)
    step = jax.vmap(lm_step, in_axes=(None, None, None, 0, 0))

    def body(carry, key):
        logits, cache, done = carry
        token = jax.random.categorical(key, logits).astype(jnp.int32)
        token = jnp.where(done, max(eos_id, 0), token)
        logits, cache = step(params, config, prompt_cache, cache, token)
        return (logits, cache, done | (token == eos_id)), (token, done)

    done = jnp.zeros((num_particles,), bool)
    _, (tokens, was_done) = jax.lax.scan(body, (logits, cache, done), jax.random.split(key, max_new_tokens))
    return tokens.T, jnp.sum(~was_done, axis=0).astype(jnp.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=1000")
    parser.add_argument("--particles", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    opts = parser.parse_args()
    n = 1000 if opts.quick else opts.particles
    t_max = opts.tokens

    lm = load_default()
    ids = lm.encode(PROMPT)
    p = tk.prompt(lm, PROMPT, max_new_tokens=t_max)

    def step(ctx, t, p):
        tok = pp.sample("tok", ctx.next_token())
        pp.stop(tok == p.eos_id)
        return ctx.extend(p, tok)

    program = pp.sequential(tk.Context.start, step, t_max)

    def before(seed):
        key = jax.random.key(seed)
        return jax.block_until_ready(generate_before(lm.params, lm.config, ids, key, n, t_max, lm.eos_id))

    def generate(seed):
        return jax.block_until_ready(lm.generate(PROMPT, key=seed, num_particles=n, max_new_tokens=t_max))

    def smc(seed):
        return jax.block_until_ready(pp.infer(program, p, algorithm=pp.SMC(n), key=seed).log_weights)

    first = {}
    for name, fn in (("before", before), ("generate", generate), ("smc", smc)):
        t0 = time.perf_counter()
        fn(0)
        first[name] = time.perf_counter() - t0
    old, new = jax.device_get(before(7)), jax.device_get(generate(7))
    same = bool(np.array_equal(old[0], new.tokens) and np.array_equal(old[1], new.lengths))
    medians = interleaved_medians({"before": before, "generate": generate, "smc": smc}, opts.reps)

    print(f"embedded LM, N={n}, T={t_max}, prompt {PROMPT!r}, device={jax.devices()[0].platform}")
    print(f"{'':<12}{'median s':>10}{'first call s':>14}{'tokens/s':>10}")
    for name in ("before", "generate", "smc"):
        print(f"{name:<12}{medians[name]:>10.2f}{first[name]:>14.1f}{n * t_max / medians[name]:>10.0f}")
    print(f"before and generate drew identical tokens and lengths: {same}")
    print(
        f"RESULT generate_s={medians['generate']:.2f} before_s={medians['before']:.2f} "
        f"smc_s={medians['smc']:.2f} generate_over_smc={medians['generate'] / medians['smc']:.2f} "
        f"before_over_generate={medians['before'] / medians['generate']:.2f} same_draws={same}"
    )


if __name__ == "__main__":
    main()
