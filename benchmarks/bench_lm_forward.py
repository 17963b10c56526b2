"""Decode throughput of the embedded default LM: ppinfer (JAX) against transformers (torch).

For N particles sharing one prompt, tokens/s counts all particles: N × steps / seconds of decode
(one jitted call per token for all particles). torch runs ``GPT2LMHeadModel`` on the same weights
with its KV cache, batched over N, under ``torch.inference_mode``. Median of RUNS timed runs after
a warm-up; the first ppinfer call per N is reported as compile time.

    python benchmarks/bench_lm_forward.py [--quick]

Ends with ``RESULT decode_tok_s_n64=<x> ratio_vs_torch_n64=<x>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppinfer.lm import load_default  # noqa: E402
from ppinfer.lm.model import DEFAULT_MODEL_DIR  # noqa: E402

PROMPT = "<|endoftext|>import os\n\n\ndef main(argv):\n    path = os.path.join(argv[0], 'x')\n"
RUNS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in (1, 64), 16 steps (< 60 s)")
    args = parser.parse_args()
    sizes, steps = ((1, 64), 16) if args.quick else ((1, 16, 64, 256), 64)

    lm = load_default()
    prompt = lm.tokenizer.encode(PROMPT)
    torch_bench = torch_decoder(prompt)
    rows = []
    for n in sizes:
        tokens = np.random.default_rng(n).integers(1, lm.config.vocab_size, (steps, n))
        compile_s, jax_s = time_ppinfer(lm, prompt, jnp.asarray(tokens, jnp.int32))
        torch_s = torch_bench(tokens) if torch_bench else float("nan")
        rows.append((n, compile_s, n * steps / jax_s, n * steps / torch_s))

    print(f"default LM, prompt {len(prompt)} tokens, {steps} decode steps, median of {RUNS} runs")
    print(f"{'N':>5} {'compile s':>10} {'ppinfer tok/s':>14} {'torch tok/s':>12} {'ratio':>7}")
    for n, compile_s, jax_tps, torch_tps in rows:
        print(f"{n:>5} {compile_s:>10.2f} {jax_tps:>14.0f} {torch_tps:>12.0f} {jax_tps / torch_tps:>7.2f}")
    n64 = next(row for row in rows if row[0] == 64)
    print(f"RESULT decode_tok_s_n64={n64[2]:.0f} ratio_vs_torch_n64={n64[2] / n64[3]:.3f}")


def time_ppinfer(lm, prompt: list[int], tokens: jax.Array) -> tuple[float, float]:
    """(seconds of the first, compiling call; median seconds of the decode loop)."""
    steps, n = tokens.shape
    _, prompt_cache = lm.prefill(prompt)
    # One device array per step, so the timed loop is nothing but decode calls.
    per_step = [jax.device_put(row) for row in np.asarray(tokens)]

    def run() -> float:
        cache = lm.init_particle_cache(prompt_cache, n, steps)
        jax.block_until_ready(cache)
        start = time.perf_counter()
        for t in range(steps):
            logits, cache = lm.decode(prompt_cache, cache, per_step[t])
        jax.block_until_ready((logits, cache))
        return time.perf_counter() - start

    cache = lm.init_particle_cache(prompt_cache, n, steps)
    start = time.perf_counter()
    jax.block_until_ready(lm.decode(prompt_cache, cache, per_step[0]))
    compile_s = time.perf_counter() - start
    run()
    return compile_s, statistics.median(run() for _ in range(RUNS))


def torch_decoder(prompt: list[int]):
    """A function timing transformers' batched cached decode, or None without torch."""
    try:
        import torch
        from transformers import GPT2LMHeadModel
    except ImportError:
        return None
    model = GPT2LMHeadModel.from_pretrained(DEFAULT_MODEL_DIR).eval()

    def run(tokens: np.ndarray) -> float:
        steps, n = tokens.shape
        batch = torch.tensor([prompt] * n)
        step_tokens = torch.from_numpy(tokens).long()
        with torch.inference_mode():
            cache = model(batch, use_cache=True).past_key_values
            start = time.perf_counter()
            for t in range(steps):
                out = model(step_tokens[t][:, None], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
            return time.perf_counter() - start

    def bench(tokens: np.ndarray) -> float:
        run(tokens)
        return statistics.median(run(tokens) for _ in range(RUNS))

    return bench


if __name__ == "__main__":
    main()
