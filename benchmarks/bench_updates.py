"""Time and memory per IBIS update over a long stream: sufficient-statistics path vs history path.

    python benchmarks/bench_updates.py [--updates 1000] [--history-updates 200]

Prints the median wall time per update over windows of the stream, the bytes held by the
posterior state, and the process's peak RSS. The statistics path should stay flat; the history
path's moves re-score every batch so far, so its cost grows with t (and jumps when the buffer
doubles and the update is recompiled).
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import ppinfer as pp
from ppinfer.updates import IBIS


def stats_model(n, sum_y, sum_y2):
    mu = pp.sample("mu", dist.Normal(0.0, 1.0))
    pp.factor("y", -0.5 * (sum_y2 - 2 * mu * sum_y + n * mu**2) - 0.5 * n * jnp.log(2 * jnp.pi))


def stats(y):
    return (jnp.float32(y.shape[0]), jnp.sum(y), jnp.sum(y**2))


def history_model(y):
    mu = pp.sample("mu", dist.Normal(0.0, 1.0))
    with pp.plate("data", y.shape[0]):
        pp.observe("y", dist.Normal(mu, 1.0), y)


def stream(program, cfg, ys, label, window):
    t0 = time.perf_counter()
    post = pp.infer(program, ys[0], algorithm=cfg, key=0)
    first = time.perf_counter() - t0
    times = []
    for batch in ys[1:]:
        post = post.update(batch)
        times.append(post.wall_time)
    state_kb = sum(np.asarray(x).nbytes for x in jax.tree.leaves(post.ibis)) / 1024
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{label}: first batch (compile included) {first:.2f} s; {len(ys)} updates")
    for lo in range(0, len(times), window):
        w = np.asarray(times[lo : lo + window]) * 1e3
        span = f"{lo + 2:5d}-{lo + 1 + len(w):5d}"
        print(f"  updates {span}: median {np.median(w):7.2f} ms, max {w.max():7.1f} ms")
    print(f"  state {state_kb:.1f} KiB, peak RSS {rss_mb:.0f} MiB, mean(mu) = {float(post.mean('mu')):.4f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--history-updates", type=int, default=200)
    parser.add_argument("--particles", type=int, default=512)
    args = parser.parse_args()
    ys = np.random.default_rng(0).normal(0.5, 1.0, (args.updates, 8)).astype(np.float32)
    common = dict(num_particles=args.particles, num_moves=3, ess_threshold=1.0)
    stream(stats_model, IBIS(**common, sufficient_statistics=stats), ys, "statistics path", args.updates // 5)
    h = args.history_updates
    stream(history_model, IBIS(**common), ys[:h], "history path", max(h // 5, 1))


if __name__ == "__main__":
    main()
