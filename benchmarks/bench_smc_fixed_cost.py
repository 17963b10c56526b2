"""SMC's fixed cost per call: ``pp.infer`` against the hand-written filter in short rounds.

The bootstrap filter of ``bench_classic_pf`` (LGSSM, T = 100, N = 10,000, systematic resampling when
ESS < N/2), timed in rounds of three: ``SMC(history=False)``, ``SMC()`` and the hand-written
``lax.scan`` filter, each after the others in the same round. ``bench_classic_pf`` times five
functions per round, two of which record ``[T, N]`` histories and evict more of the cache; here
the rounds are shorter, so what differs between ``infer`` and the hand-written filter is mostly
``infer``'s fixed work per call (host-side checks, launches, waits, the ``Result``). Compilation is
excluded on both sides (one call each first); one thread pool, the same device.

``--root DIR`` imports ``ppinfer`` (and the model) from another checkout, to compare two versions
with the same script, one after the other. Ends with ``RESULT paired_ratio_filter=<x>
paired_ratio_history=<x>``: the medians over rounds of ``infer``'s time ÷ the hand-written
filter's in the same round.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(HERE.parent), help="checkout to import ppinfer from")
    parser.add_argument("--rounds", type=int, default=80)
    opts = parser.parse_args()
    sys.path.insert(0, str(HERE))  # the hand-written filter and the timing helper: this checkout's
    sys.path.insert(0, opts.root)

    import jax
    import jax.numpy as jnp

    import ppinfer as pp
    from models.classic import lgssm, simulate_lgssm

    # After ppinfer: bench_classic_pf puts this checkout first on the path when imported.
    timing, classic = importlib.import_module("_timing"), importlib.import_module("bench_classic_pf")
    interleaved_times, paired_ratio = timing.interleaved_times, timing.paired_ratio
    A, Q, C, R, M0, P0 = classic.A, classic.Q, classic.C, classic.R, classic.M0, classic.P0
    handwritten_filter = classic.handwritten_filter

    ys = simulate_lgssm(0, 100, A, Q, C, R, M0, P0)
    model = lgssm(A, Q, C, R, M0, P0)
    filt = pp.SMC(10_000, resampling="systematic", ess_threshold=0.5, history=False)
    hist = pp.SMC(10_000, resampling="systematic", ess_threshold=0.5)
    hand, ys_dev = handwritten_filter(10_000), jnp.asarray(ys)
    fns = {
        "filter": lambda s: pp.infer(model, ys, algorithm=filt, key=s),
        "history": lambda s: pp.infer(model, ys, algorithm=hist, key=s),
        "hand": lambda s: hand(jax.random.PRNGKey(s), ys_dev).block_until_ready(),
    }
    for fn in fns.values():
        fn(0)  # compile
    times = interleaved_times(fns, opts.rounds)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"ppinfer from {Path(pp.__file__).resolve().parent}")
    print(" ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
    print(
        f"RESULT paired_ratio_filter={paired_ratio(times, 'filter', 'hand'):.3f} "
        f"paired_ratio_history={paired_ratio(times, 'history', 'hand'):.3f}"
    )


if __name__ == "__main__":
    main()
