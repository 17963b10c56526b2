"""Long generations: ms per token against the number of new tokens T, dense vs blocked attention.

Embedded default LM, N = 64 particles, T = 64, 128 and the longest the model's context allows
(256 positions, minus the prompt, rounded down to a multiple of 16: 240). For each T, in one
process, compile excluded, interleaved medians:

- SMC: token-level SMC with the regex constraint ``[^eE]*`` (text without the letter e), the locally
  constrained proposal and ESS-adaptive resampling (``--ess-threshold``; 1.0 resamples every step),
- plain: ``LanguageModel.generate``'s jitted scan (64 sequences, no constraint),
- decode: one batched ``decode`` step with every cache empty and with every cache full,

each with the dense attention (all T cache positions every step) and the blocked one (blocks up to
the longest live particle). The path is chosen when a function is traced, through
``transformer.AUTO_BLOCKED_MIN_TOKENS``; each path gets its own model object and its own jitted
functions (fresh Python functions: jax keys its trace cache on the function), so both stay
compiled side by side.

Ends with ``RESULT per_token_t<T>_over_t64=<x> ...`` (SMC, blocked, which ``attention="auto"`` uses
at these sizes) plus the dense figure and SMC/plain at the longest T.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PPINFER_COMPILATION_CACHE", "0")  # time the compile of this process

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved_medians  # noqa: E402

import ppinfer as pp  # noqa: E402
from models.lm_programs import regex_program  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402
from ppinfer.lm import transformer as tr  # noqa: E402
from ppinfer.lm.model import _generate  # noqa: E402

PROMPT = "<|endoftext|>import"
PATTERN = r"[^eE]*"  # text that avoids the letter e
THRESHOLD = {"dense": 10**9, "blocked": 0}  # AUTO_BLOCKED_MIN_TOKENS forcing each path


def traced_with(mode: str, fn):
    """``fn`` with ``AUTO_BLOCKED_MIN_TOKENS`` set for ``mode`` while it runs (its first call
    traces it; later calls reuse the compiled code)."""

    def wrapped(*args):
        old = tr.AUTO_BLOCKED_MIN_TOKENS
        tr.AUTO_BLOCKED_MIN_TOKENS = THRESHOLD[mode]
        try:
            return fn(*args)
        finally:
            tr.AUTO_BLOCKED_MIN_TOKENS = old

    return wrapped


def make_runs(lm, mode: str, n: int, t: int, ess: float):
    """The SMC, plain and decode functions of one attention path, each ``fn(seed)``, blocking."""
    lm = dataclasses.replace(lm)  # its own identity: its own entry in ppinfer's compile cache
    program, args, proposal = regex_program(lm, PROMPT, PATTERN, t)
    algorithm = pp.SMC(n, proposal=proposal, ess_threshold=ess)
    resampled = []

    def smc(seed):
        result = pp.infer(program, *args, algorithm=algorithm, key=seed)
        resampled.append(int(np.sum(result.resampled)))
        return result

    eos = -1 if lm.eos_id is None else lm.eos_id
    ids = lm.encode(PROMPT)
    # Fresh Python functions: jax keys its trace cache on the function, so jitting the same one
    # twice would reuse the first path's trace.
    generate = jax.jit(lambda *a: _generate.__wrapped__(*a), static_argnums=(1, 4, 5, 6, 7))

    def plain(seed):
        key = jax.random.key(seed)
        return jax.block_until_ready(generate(lm.params, lm.config, ids, key, n, t, 1.0, eos))

    _, prompt_cache = lm.prefill(ids)
    step = jax.jit(lambda *a: tr.decode.__wrapped__(*a), static_argnums=1, donate_argnums=3)
    tokens = jnp.ones((n,), jnp.int32)

    def decode_at(fill):
        def run(seed):
            del seed
            cache = tr.init_particle_cache(lm.config, n, t)
            cache = cache._replace(length=jnp.full((n,), fill, jnp.int32))
            jax.block_until_ready(cache)
            t0 = time.perf_counter()
            logits, _ = step(lm.params, lm.config, prompt_cache, cache, tokens)
            jax.block_until_ready(logits)
            return time.perf_counter() - t0

        return run

    runs = {
        "smc": smc,
        "plain": plain,
        "decode_empty": decode_at(0),
        "decode_full": decode_at(t - 1),
    }
    return {name: traced_with(mode, fn) for name, fn in runs.items()}, resampled


def step_medians(fns, reps):
    """Median of the in-function timings (decode: the step alone, not the cache set-up)."""
    out = {}
    for name, fn in fns.items():
        out[name] = float(np.median([fn(i) for i in range(reps)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed run each")
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--ess-threshold", type=float, default=0.5)
    opts = parser.parse_args()
    n = opts.particles
    reps = 1 if opts.quick else 3
    lm = load_default()
    room = lm.config.max_position_embeddings - int(lm.encode(PROMPT).shape[0])
    lengths = [64, 128, min(256, room // 16 * 16)]
    modes = ("dense", "blocked")
    print(
        f"embedded LM, N={n}, regex {PATTERN!r}, ESS threshold {opts.ess_threshold}, "
        f"block {tr.BLOCK_SIZE}, auto: blocked from T={tr.AUTO_BLOCKED_MIN_TOKENS}, "
        f"device={jax.devices()[0].platform}"
    )
    print(
        f"{'T':>4} {'path':<8}{'SMC ms/tok':>11}{'plain ms/tok':>13}{'SMC/plain':>10}"
        f"{'step empty':>11}{'step full':>10}{'compile s':>10}{'resampled':>10}"
    )
    table = {}
    for t in lengths:
        runs, timed, resampled = {}, {}, {}
        compile_s = {}
        for mode in modes:
            fns, resampled[mode] = make_runs(lm, mode, n, t, opts.ess_threshold)
            t0 = time.perf_counter()
            fns["smc"](0)
            fns["plain"](0)
            fns["decode_empty"](0)
            fns["decode_full"](0)
            compile_s[mode] = time.perf_counter() - t0
            runs.update({f"{name}/{mode}": fn for name, fn in fns.items() if name in ("smc", "plain")})
            timed.update({f"{name}/{mode}": fn for name, fn in fns.items() if name.startswith("decode")})
        medians = interleaved_medians(runs, reps)
        steps = step_medians(timed, 5 if opts.quick else 9)
        for mode in modes:
            smc, plain = medians[f"smc/{mode}"] / t * 1e3, medians[f"plain/{mode}"] / t * 1e3
            empty, full = steps[f"decode_empty/{mode}"] * 1e3, steps[f"decode_full/{mode}"] * 1e3
            table[t, mode] = (smc, plain)
            print(
                f"{t:>4} {mode:<8}{smc:>11.2f}{plain:>13.2f}{smc / plain:>10.2f}{empty:>11.2f}"
                f"{full:>10.2f}{compile_s[mode]:>10.1f}{np.median(resampled[mode]):>10.0f}",
                flush=True,
            )
    long = lengths[-1]
    ratio = table[long, "blocked"][0] / table[64, "blocked"][0]
    ratio_dense = table[long, "dense"][0] / table[64, "dense"][0]
    print(
        "per token: ms per generated token of one run (N particles at once); step empty/full: one "
        "decode call with every cache at length 0 / T-1 (ms)"
    )
    print(
        f"RESULT per_token_t{long}_over_t64={ratio:.2f} per_token_t{long}_over_t64_dense={ratio_dense:.2f} "
        f"blocked_over_dense_t{long}={table[long, 'blocked'][0] / table[long, 'dense'][0]:.2f} "
        f"smc_over_plain_t{long}={table[long, 'blocked'][0] / table[long, 'blocked'][1]:.2f}"
    )


if __name__ == "__main__":
    main()
