"""SMC in compiled chunks: what the chunking costs, and how fast Ctrl-C lands.

``pp.infer(..., algorithm=SMC(...))`` runs the loop as three compiled phases (start, steps in
chunks of ~0.25 s, output) driven from Python (``ppinfer.algorithms.smc.run_chunked``). The
baseline is the same loop compiled whole, ``jax.jit(run_loop)``, called on the same model, data,
key and device; both sides are timed after compilation, as interleaved medians. ``infer`` also
does its host-side checks and builds its ``Result`` (lazy genealogy), which the baseline does not.

Runs (the linear-Gaussian model of ``bench_classic_pf``):

- T = 100, N = 10,000, ``history=False`` and ``history=True``: a short run (one or two chunks);
- T = 5,000, N = 1,000, ``history=False``: a long run (several chunks).

Then a run of 3 million steps in a child process gets SIGINT 2 s after its compile notice; the
time until the child's ``except KeyboardInterrupt`` runs is printed (median of 3).

Ends with ``RESULT ratio_short=<x> ratio_short_history=<x> ratio_long=<x> interrupt_s=<x>``
(chunked time / whole-program time).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved_medians  # noqa: E402

import ppinfer as pp  # noqa: E402
from models.classic import lgssm, simulate_lgssm  # noqa: E402
from ppinfer.algorithms.smc import run_loop  # noqa: E402

A, Q, C, R, M0, P0 = 0.9, 0.5, 1.0, 1.0, 0.0, 1.0

CHILD = textwrap.dedent(
    """
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (see the test)
    import numpy as np, numpyro.distributions as dist, ppinfer as pp
    from ppinfer import _talk
    _talk.NOTICE_AFTER_S = 0.0

    def step(x, t, ys):
        x = pp.sample("x", dist.Normal(0.5 * x, 1.0))
        pp.observe("y", dist.Normal(x, 1.0), ys[t % 10])
        return x

    walk = pp.sequential(lambda ys: 0.0, step, 3_000_000)
    try:
        pp.infer(walk, np.zeros(10, np.float32), algorithm=pp.SMC(1000, history=False), key=0)
    except KeyboardInterrupt:
        print("CAUGHT", time.time(), flush=True)
    """
)


def pair(n: int, t_max: int, history: bool, reps: int) -> float:
    ys = simulate_lgssm(0, t_max, A, Q, C, R, M0, P0)
    model = lgssm(A, Q, C, R, M0, P0)
    cfg = pp.SMC(n, history=history, progress_bar=False)
    loop = cfg.loop(model, (ys,))
    whole = jax.jit(lambda key, ys: run_loop(key, model, (ys,), loop))
    pp.infer(model, ys, algorithm=cfg, key=0)  # compile both
    jax.block_until_ready(whole(jax.random.PRNGKey(0), ys))
    med = interleaved_medians(
        {
            "chunked": lambda s: pp.infer(model, ys, algorithm=cfg, key=s),
            "whole": lambda s: jax.block_until_ready(whole(jax.random.PRNGKey(s), ys)),
        },
        reps,
    )
    ratio = med["chunked"] / med["whole"]
    print(
        f"T={t_max:>5} N={n:>6} history={history!s:<5}  infer (chunked) {1e3 * med['chunked']:8.2f} ms"
        f"   jit(run_loop) {1e3 * med['whole']:8.2f} ms   ratio {ratio:.3f}"
    )
    return ratio


def interrupt_latency() -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in child.stderr:
            if "ppinfer: compiled" in line:
                break
        time.sleep(2.0)
        sent = time.time()
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=120)
    finally:
        child.kill()
    caught = float(next(x for x in out.splitlines() if x.startswith("CAUGHT")).split()[1])
    return caught - sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    reps = 7 if parser.parse_args().quick else 21
    short = pair(10_000, 100, False, reps)
    short_h = pair(10_000, 100, True, reps)
    long_ = pair(1_000, 5_000, False, max(3, reps // 3))
    lat = statistics.median(interrupt_latency() for _ in range(3))
    print(f"Ctrl-C during a 3-million-step run: caught after {lat:.2f} s (median of 3)")
    print(
        f"RESULT ratio_short={short:.3f} ratio_short_history={short_h:.3f} "
        f"ratio_long={long_:.3f} interrupt_s={lat:.2f}"
    )


if __name__ == "__main__":
    main()
