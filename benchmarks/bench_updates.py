"""Cost per IBIS update over a long stream: sufficient-statistics path vs history path.

    python benchmarks/bench_updates.py            # 1000 updates on each path, N = 512
    python benchmarks/bench_updates.py --quick    # 60 updates on each path, N = 128 (about 30 s CPU)

The model is a Normal mean with known variance, batches of 8 observations, ``IBIS(num_moves=3,
ess_threshold=1.0)`` (resample and move at every update, the default tempering), run twice on the
same stream: once through running sufficient statistics ``(n, Σy, Σy²)``, once keeping every batch.

For each update it records the CPU time of this process (``time.process_time``: what the update
costs, insensitive to other processes on a shared machine) and the wall time, and prints their
medians over windows of updates, with the process's resident memory at the end of each window.
On the history path the compiled update is rebuilt each time the batch buffer doubles
(``capacity_for``); those updates are listed separately and left out of the windows, which give the
steady-state cost. At the end of each path: the bytes held by the posterior state and the size of
its saved file (``ppinfer.updates.save``), and the peak RSS so far.

Expected: the statistics path stays flat in time and memory; the history path's moves re-score
every batch so far, so its per-update time grows with ``t`` (``O(t)``, stepwise with the buffer).

The final line is ``RESULT stats_ms_per_update=… stats_growth=… history_ms_per_update_last=…
history_growth=… peak_rss_mib=… …``: CPU milliseconds per update, median over the last window;
growth is the last window's median over the first window's.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import ppinfer as pp
from ppinfer.updates import IBIS, save
from ppinfer.updates.ibis import capacity_for


def stats_model(n, sum_y, sum_y2):
    """``y_i ~ Normal(mu, 1)`` scored through its sufficient statistics (exact log likelihood)."""
    mu = pp.sample("mu", dist.Normal(0.0, 1.0))
    pp.factor("y", -0.5 * (sum_y2 - 2 * mu * sum_y + n * mu**2) - 0.5 * n * jnp.log(2 * jnp.pi))


def stats(y):
    """One batch's statistics ``(n, Σy, Σy²)``."""
    return (jnp.float32(y.shape[0]), jnp.sum(y), jnp.sum(y**2))


def history_model(y):
    """``y_i ~ Normal(mu, 1)``, one batch ``y: f32[B]``."""
    mu = pp.sample("mu", dist.Normal(0.0, 1.0))
    with pp.plate("data", y.shape[0]):
        pp.observe("y", dist.Normal(mu, 1.0), y)


def rss_mib() -> float:
    """The current resident set size in MiB (Linux ``/proc``; NaN elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    """The process's peak RSS so far in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream(program, cfg, ys, label: str, window: int) -> dict:
    """Run ``infer`` on ``ys[0]`` then one update per remaining batch; print and return the figures."""
    c0, w0 = time.process_time(), time.perf_counter()
    post = pp.infer(program, ys[0], algorithm=cfg, key=0)
    jax.block_until_ready(post.log_weights)
    first_cpu, first_wall = time.process_time() - c0, time.perf_counter() - w0
    cpu, wall, steps, rss_at = [], [], [], {}
    for i, batch in enumerate(ys[1:]):
        c0, w0 = time.process_time(), time.perf_counter()
        post = post.update(batch)
        jax.block_until_ready(post.ibis.log_weights)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        steps.append(post.step)
        if (i + 1) % window == 0 or i + 1 == len(ys) - 1:
            rss_at[i] = rss_mib()
    cpu, wall, steps = np.asarray(cpu) * 1e3, np.asarray(wall) * 1e3, np.asarray(steps)
    # The history path recompiles when the step count outgrows the buffer.
    if cfg.sufficient_statistics is None:
        recompiled = np.asarray([capacity_for(t) != capacity_for(t - 1) for t in steps])
    else:
        recompiled = np.zeros(len(steps), bool)

    print(f"{label}: {len(steps)} updates after the first batch, N = {cfg.num_particles}")
    print(f"  first batch (infer, compile included): CPU {first_cpu:.2f} s, wall {first_wall:.2f} s")
    for j in np.flatnonzero(recompiled):
        print(
            f"  update {steps[j]:5d} (buffer {capacity_for(steps[j] - 1)} -> {capacity_for(steps[j])}, "
            f"recompiled): CPU {cpu[j] / 1e3:.2f} s, wall {wall[j] / 1e3:.2f} s"
        )
    medians = []
    for lo in range(0, len(steps), window):
        sl = slice(lo, min(lo + window, len(steps)))
        keep = ~recompiled[sl]
        c, w = cpu[sl][keep], wall[sl][keep]
        medians.append(float(np.median(c)))
        print(
            f"  updates {steps[sl][0]:5d}-{steps[sl][-1]:5d}: CPU median {medians[-1]:7.2f} ms "
            f"(max {c.max():7.1f}), wall median {np.median(w):7.2f} ms, "
            f"RSS {rss_at.get(sl.stop - 1, float('nan')):6.0f} MiB"
        )
    state_kib = sum(np.asarray(x).nbytes for x in jax.tree.leaves(post.ibis)) / 1024
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "posterior.safetensors"
        save(post, path)
        saved_kib = path.stat().st_size / 1024
    peak = peak_rss_mib()
    print(
        f"  state {state_kib:.1f} KiB in memory, saved file {saved_kib:.1f} KiB, "
        f"peak RSS so far {peak:.0f} MiB, mean(mu) = {float(post.mean('mu')):.4f}"
    )
    return {
        "last": medians[-1],
        "growth": medians[-1] / medians[0],
        "compile_cpu_s": float(cpu[recompiled].sum() / 1e3),
        "state_kib": state_kib,
        "saved_kib": saved_kib,
        "rss_growth_mib": rss_at[len(steps) - 1] - rss_at[min(window, len(steps)) - 1],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 updates per path, N = 128")
    parser.add_argument("--updates", type=int, help="updates after the first batch (default 1000)")
    parser.add_argument("--particles", type=int, help="N (default 512)")
    parser.add_argument("--window", type=int, help="updates per window (default updates / 5)")
    args = parser.parse_args()
    updates = args.updates or (60 if args.quick else 1000)
    particles = args.particles or (128 if args.quick else 512)
    window = args.window or max(updates // 5, 1)

    ys = np.random.default_rng(0).normal(0.5, 1.0, (updates + 1, 8)).astype(np.float32)
    common = dict(num_particles=particles, num_moves=3, ess_threshold=1.0)
    s = stream(stats_model, IBIS(**common, sufficient_statistics=stats), ys, "statistics path", window)
    h = stream(history_model, IBIS(**common), ys, "history path", window)
    print(
        f"RESULT stats_ms_per_update={s['last']:.2f} stats_growth={s['growth']:.2f} "
        f"history_ms_per_update_last={h['last']:.2f} history_growth={h['growth']:.2f} "
        f"peak_rss_mib={peak_rss_mib():.0f} history_compile_cpu_s={h['compile_cpu_s']:.1f} "
        f"stats_state_kib={s['state_kib']:.1f} history_state_kib={h['state_kib']:.1f} "
        f"stats_rss_growth_mib={s['rss_growth_mib']:.1f} updates={updates} particles={particles}"
    )


if __name__ == "__main__":
    main()
