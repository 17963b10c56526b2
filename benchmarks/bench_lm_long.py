"""Long generations: ms per token against the number of new tokens T; dense vs paged KV cache.

The embedded model's context is 256 positions, too short for T = 512, so the model is a random
Llama-shaped transformer (RoPE, RMSNorm, SwiGLU, grouped-query attention: 4 layers, hidden 256,
8 query / 2 key-value heads of 32, MLP 688, context 1024) with the embedded model's tokenizer
(vocabulary 2048), built in memory from a seed (no checkpoint). N = 64 particles, prompt
``<|endoftext|>import``, T = 64, 256, 512 (``--lengths``). For each T, in one process, compile
excluded, interleaved medians of ``--reps`` runs:

- SMC dense / SMC paged: token-level SMC with the regex constraint ``[^eE]*`` (text without the
  letter e; about a third of the vocabulary is banned at every step, EOS included, so that every
  particle generates T tokens: the ``tokens`` column), the locally constrained
  proposal, systematic resampling when ESS < ``--ess-threshold`` × N (0.9: resampling at most
  steps, which makes particles share prefixes); ``tokens.prompt(..., cache="dense" | "paged")``,
  paged with ``--pool-factor``;
- plain: ``LanguageModel.generate`` (64 independent sequences, no constraint, dense cache, blocked
  attention).

Figures per T: ms per generated token (one run of N particles), resamplings per run, the KV cache's
bytes (dense: ``N * T`` positions per layer; paged: the block pool, tails and tables: what the
run allocates), the most pool blocks in use at once (``PagedCache.peak``: the pool that would have
sufficed), and the bytes one resampling copies (dense: every particle's whole cache; paged: tables,
tails and lengths). The path ``cache="auto"`` takes (dense below
``paged.AUTO_PAGED_MIN_TOKENS``, paged from it) gives the headline figures.

Then one paged decode step alone (no SMC: :func:`decode_step_ms`) at the shortest and the longest
length, and with ``--real-step`` the same on a random GPT-2 124M-shaped checkpoint (about a minute
more): what a token's attention costs as the cache grows, apart from the run around it.

Ends with ``RESULT per_token_t512_over_t64=<x> paged_memory_over_dense=<x> smc_over_plain_t512=<x>``
(SMC on the auto path; memory at the longest T: both caches' arrays are allocated up front, so their
bytes follow from their shapes). ``--quick``: N = 64, only what the RESULT needs (T = 64: SMC dense;
T = 512: SMC paged and plain), one timed run each. Timings on the shared CPU machine are noisy
(other jobs run beside it).
"""

from __future__ import annotations

import argparse
import math
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
from models.lm_programs import regex_init, regex_proposal, regex_step  # noqa: E402
from ppinfer import tokens as tk  # noqa: E402
from ppinfer.constraints import regex_automaton  # noqa: E402
from ppinfer.lm import (  # noqa: E402
    LanguageModel,
    TransformerConfig,
    load,
    load_default,
    paged,  # noqa: E402
)
from ppinfer.lm import transformer as tr  # noqa: E402

PROMPT = "<|endoftext|>import"
PATTERN = r"[^eE]*"  # text that avoids the letter e


def random_llama(seed: int = 0) -> LanguageModel:
    """A random Llama-shaped model (1k context) with the embedded model's tokenizer."""
    base = load_default()
    config = TransformerConfig(
        arch="llama", vocab_size=base.config.vocab_size, hidden_size=256, num_layers=4, num_heads=8,
        num_kv_heads=2, head_dim=32, intermediate_size=688, max_position_embeddings=1024,
        norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, model_type="llama",
        eos_token_id=base.eos_id, bos_token_id=base.eos_id,
    )  # fmt: skip
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    d, f, n = config.hidden_size, config.intermediate_size, config.num_layers
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def dense(d_in, d_out):
        return {"w": jax.random.normal(next(keys), (n, d_in, d_out)) * d_in**-0.5}

    layers = {
        "attn_norm": {"scale": jnp.ones((n, d))},
        "mlp_norm": {"scale": jnp.ones((n, d))},
        "q": dense(d, q_out), "k": dense(d, kv_out), "v": dense(d, kv_out), "o": dense(q_out, d),
        "gate": dense(d, f), "up": dense(d, f), "down": dense(f, d),
    }  # fmt: skip
    params = {
        "embed": jax.random.normal(next(keys), (config.vocab_size, d)),
        "final_norm": {"scale": jnp.ones((d,))},
        "layers": layers,
        # Logits of a few units: next-token distributions neither flat nor degenerate.
        "lm_head": jax.random.normal(next(keys), (d, config.vocab_size)) * 6.0 * d**-0.5,
    }
    return LanguageModel(params=params, config=config, tokenizer=base.tokenizer)


def kv_bytes(cache) -> int:
    """Bytes of a particle cache's arrays (what the run holds for keys and values)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def resample_bytes(cache) -> int:
    """Bytes one resampling copies: every per-particle leaf the gather moves (for the paged cache:
    not the pool, which :meth:`PagedCache.reindex` shares)."""
    if isinstance(cache, paged.PagedCache):
        moved = (cache.table, cache.tail_k, cache.tail_v, cache.length, cache.peak, cache.missing)
        return sum(x.size * x.dtype.itemsize for x in moved)
    return kv_bytes(cache)


def cache_shapes(lm, cache: str, n: int, t: int, pool_factor: float):
    """The particle cache a run of ``n`` particles and ``t`` tokens allocates (shapes only)."""
    make = {
        "dense": lambda: tr.init_particle_cache(lm.config, n, t),
        "paged": lambda: paged.init_paged_cache(lm.config, n, t, pool_factor=pool_factor),
    }[cache]
    return jax.eval_shape(make)


def make_smc(lm, cache: str, n: int, t: int, ess: float, pool_factor: float):
    p = tk.prompt(lm, PROMPT, t, cache=cache, pool_factor=pool_factor if cache == "paged" else None)
    # EOS is not given to the automaton: its bytes (<|endoftext|>) contain an "e", so it is banned
    # and every particle generates all T tokens (a run that ended early would not measure step T).
    automaton = regex_automaton(PATTERN, lm.vocab_bytes, None)
    program = pp.sequential(regex_init, regex_step, t)
    algorithm = pp.SMC(n, proposal=regex_proposal, ess_threshold=ess, resampling="systematic")
    record = {"resampled": [], "peak": []}

    def run(seed):
        result = pp.infer(program, p, automaton, algorithm=algorithm, key=seed)
        jax.block_until_ready(result.state)
        record["resampled"].append(int(np.sum(result.resampled)))
        record["length"] = float(np.mean(result.state[0].length))
        cache_out = result.state[0].cache
        if isinstance(cache_out, paged.PagedCache):
            record["peak"].append(int(jnp.max(cache_out.peak)))
        record["cache"] = cache_out
        return result

    return run, record


def make_plain(lm, n: int, t: int):
    def run(seed):
        out = lm.generate(PROMPT, num_particles=n, max_new_tokens=t, key=jax.random.key(seed))
        return jax.block_until_ready(out)

    return run


def decode_step_ms(lm, n: int, lengths, reps: int = 5) -> dict[int, float]:
    """Median ms of one paged decode step (:func:`ppinfer.lm.paged.decode_batch`, jitted) for ``n``
    particles that each hold ``L`` cached positions, for each ``L`` of ``lengths``: random pool
    contents and block tables (distinct blocks per particle), an 8-token prompt. Isolates what a
    token costs at a given length, without the SMC around it."""
    config, params = lm.config, lm.params
    _, prompt_cache = tr.prefill(params, config, jnp.arange(8, dtype=jnp.int32))
    t_max = max(lengths) + tr.BLOCK_SIZE
    # Logits only: the updated cache is not an output, so no copy of the pool is timed (a run
    # updates it in place).
    step = jax.jit(lambda cache, tokens: paged.decode_batch(params, config, prompt_cache, cache, tokens)[0])
    tokens = jnp.zeros((n,), jnp.int32)
    out = {}
    for length in lengths:
        cache = paged.init_paged_cache(config, n, t_max, pool_factor=1.0)
        full = length // cache.block_size
        table = np.full(cache.table.shape, -1, np.int32)
        table[:, :full] = np.arange(n * full).reshape(n, full)  # block i of particle p: p*full + i
        noise = jax.random.normal(jax.random.key(0), cache.pool_k.shape, cache.pool_k.dtype)
        cache = cache.replace(
            pool_k=noise, pool_v=noise, table=jnp.asarray(table), length=jnp.full((n,), length, jnp.int32)
        )
        jax.block_until_ready(step(cache, tokens))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(step(cache, tokens))
            times.append(time.perf_counter() - t0)
        out[length] = float(np.median(times)) * 1e3
    return out


def real_shape_steps(n: int) -> None:
    """``--real-step``: :func:`decode_step_ms` on a random GPT-2 124M-shaped checkpoint (written to a
    temporary folder and loaded with ``ppinfer.lm.load``) at 64 and 500 cached positions."""
    import tempfile

    from _real_models import write_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        lm = load(write_checkpoint(folder, "gpt2-124m"))
        ms = decode_step_ms(lm, n, (64, 500), reps=3)
    print(
        f"GPT-2 124M shape, paged decode step, N={n}: {ms[64]:.0f} ms at 64 cached positions, "
        f"{ms[500]:.0f} ms at 500 (ratio {ms[500] / ms[64]:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 64 and 512, one timed run each")
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--lengths", default=None, help="comma-separated T values")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--ess-threshold", type=float, default=0.9)
    parser.add_argument("--pool-factor", type=float, default=0.25)
    parser.add_argument(
        "--real-step", action="store_true",
        help="also time one paged decode step of a GPT-2 124M-shaped model at 64 and 500 positions",
    )  # fmt: skip
    opts = parser.parse_args()
    n = opts.particles
    lengths = [64, 512] if opts.quick else [64, 256, 512]
    if opts.lengths:
        lengths = [int(v) for v in opts.lengths.split(",")]
    reps = opts.reps or (1 if opts.quick else 3)
    lm = random_llama()
    c = lm.config
    print(
        f"random Llama-shaped LM (layers {c.num_layers}, hidden {c.hidden_size}, heads "
        f"{c.num_heads}/{c.num_kv_heads}x{c.head_dim}, MLP {c.intermediate_size}, vocab {c.vocab_size}, "
        f"context {c.max_position_embeddings}), N={n}, regex {PATTERN!r}, locally constrained "
        f"proposal, ESS threshold {opts.ess_threshold}, block {tr.BLOCK_SIZE}, paged pool factor "
        f"{opts.pool_factor}, auto: paged from T={paged.AUTO_PAGED_MIN_TOKENS}, "
        f"device={jax.devices()[0].platform}, {reps} timed run(s) each, compile excluded"
    )
    print(
        f"{'T':>4} {'path':<7}{'ms/tok':>8}{'compile s':>10}{'resampled':>10}{'KV MB':>8}"
        f"{'peak blocks':>12}{'pool':>6}{'MB/resample':>12}{'tokens':>9}"
    )
    table, factors = {}, {}
    auto = {t: "paged" if t >= paged.AUTO_PAGED_MIN_TOKENS else "dense" for t in lengths}
    short, long = lengths[0], lengths[-1]
    for t in lengths:
        runs, records, compile_s = {}, {}, {}
        paths = ("dense", "paged", "plain")
        if opts.quick:
            paths = (auto[t], "plain") if t == long else (auto[t],)
        for cache in ("dense", "paged"):
            if cache in paths:
                runs[cache], records[cache] = make_smc(lm, cache, n, t, opts.ess_threshold, opts.pool_factor)
        if "plain" in paths:
            runs["plain"] = make_plain(lm, n, t)
        factor = {t: opts.pool_factor}
        for name, fn in list(runs.items()):
            t0 = time.perf_counter()
            try:
                fn(0)
            except pp.errors.InferenceError as error:
                # Short runs share little (2 blocks per particle at T = 64): a small pool runs out.
                print(f"T={t} {name}, pool factor {opts.pool_factor}: {str(error)[:90]}...; factor 1.0")
                factor[t] = 1.0
                runs[name], records[name] = make_smc(lm, name, n, t, opts.ess_threshold, 1.0)
                t0 = time.perf_counter()
                runs[name](0)
            compile_s[name] = time.perf_counter() - t0
        factors[t] = factor[t]
        medians = interleaved_medians(runs, reps)
        for name in runs:
            ms = medians[name] / t * 1e3
            line = f"{t:>4} {name:<7}{ms:>8.2f}{compile_s[name]:>10.1f}"
            if name in records:
                rec = records[name]
                cache = cache_shapes(lm, name, n, t, factors[t])
                mb, moved = kv_bytes(cache) / 1e6, resample_bytes(cache) / 1e6
                peak = f"{max(rec['peak'])}" if rec["peak"] else "-"
                pool = f"{math.prod(cache.pool_k.shape[:2])}" if rec["peak"] else "-"
                line += f"{np.median(rec['resampled']):>10.0f}{mb:>8.1f}{peak:>12}{pool:>6}{moved:>12.2f}"
                line += f"{rec['length']:>9.0f}"
                table[t, name] = {"ms": ms, "mb": mb, "moved": moved}
            else:
                table[t, name] = {"ms": ms}
            print(line, flush=True)
    per_token = table[long, auto[long]]["ms"] / table[short, auto[short]]["ms"]
    memory = kv_bytes(cache_shapes(lm, "paged", n, long, factors[long])) / kv_bytes(
        cache_shapes(lm, "dense", n, long, 1.0)
    )
    over_plain = table[long, auto[long]]["ms"] / table[long, "plain"]["ms"]
    print(
        "ms/tok: wall ms per generated token of one run (N particles); KV MB: the cache's arrays; "
        "peak blocks: most pool blocks in use at once (of 'pool'); MB/resample: bytes one "
        "resampling copies"
    )
    line = f"auto path: {auto}"
    if (long, "dense") in table and (long, "paged") in table:
        line += f"; paged/dense ms per token at T={long}: "
        line += f"{table[long, 'paged']['ms'] / table[long, 'dense']['ms']:.2f}"
    if (long, "dense") in table and (short, "dense") in table:
        line += f"; dense per token T={long}/T={short}: "
        line += f"{table[long, 'dense']['ms'] / table[short, 'dense']['ms']:.2f}"
    print(line)
    steps = decode_step_ms(lm, n, (short, long - tr.BLOCK_SIZE // 2))
    print(
        f"one paged decode step (no SMC), N={n}: {steps[short]:.1f} ms at {short} cached positions, "
        f"{steps[long - tr.BLOCK_SIZE // 2]:.1f} ms at {long - tr.BLOCK_SIZE // 2}"
    )
    if opts.real_step:
        real_shape_steps(n)
    print(
        f"RESULT per_token_t{long}_over_t{short}={per_token:.2f} paged_memory_over_dense={memory:.2f} "
        f"smc_over_plain_t{long}={over_plain:.2f}"
    )


if __name__ == "__main__":
    main()
