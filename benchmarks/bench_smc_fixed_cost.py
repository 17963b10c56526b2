"""SMC's fixed cost per call: ``pp.infer`` against the hand-written filter in short rounds.

The bootstrap filter of ``bench_classic_pf`` (LGSSM, T = 100, N = 10,000, systematic resampling when
ESS < N/2), timed in rounds of three: ``SMC(history=False)``, ``SMC()`` and the hand-written
``lax.scan`` filter, each after the others in the same round. ``bench_classic_pf`` times five
functions per round, two of which record ``[T, N]`` histories and evict more of the cache; here
the rounds are shorter, so what differs between ``infer`` and the hand-written filter is mostly
``infer``'s fixed work per call (host-side checks, launches, waits, the ``Result``). Compilation is
excluded on both sides (one call each first); one thread pool, the same device.

The pure filter's time is also split: a fourth function in each round calls the one compiled
program that ``SMC(history=False)`` runs (``_compile``'s fused run, captured from ``infer``'s first
chunk) directly on the same arguments, so ``host_share_filter`` = (``infer`` − that program) ÷ the
hand-written filter, the median over rounds, is ``infer``'s work outside compiled code (checks,
cache lookups, the launch, the ``Result``). ``python_calls_per_infer`` (``_history``: of
``SMC()``) counts the Python function calls of one warm ``infer`` (``cProfile``; deterministic,
unlike the times).

``--root DIR`` imports ``ppinfer`` (and the model) from another checkout, to compare two versions
with the same script, one after the other. Ends with ``RESULT paired_ratio_filter=<x>
paired_ratio_history=<x> host_share_filter=<x> python_calls_per_infer=<n>
python_calls_per_infer_history=<n>``: the ratios are
medians over rounds of a time ÷ the hand-written filter's in the same round.
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

    import cProfile
    import pstats

    import jax
    import jax.numpy as jnp

    import ppinfer as pp
    from models.classic import lgssm, simulate_lgssm
    from ppinfer import _compile

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
    fns["compiled"] = compiled_program(_compile, lambda: fns["filter"](0))
    fns["compiled"](0)

    def python_calls(fn):
        profile = cProfile.Profile()
        profile.runcall(fn, 1)
        return pstats.Stats(profile).total_calls

    calls_filter, calls_history = python_calls(fns["filter"]), python_calls(fns["history"])
    times = interleaved_times(fns, opts.rounds)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    host = statistics.median(
        (f - c) / h for f, c, h in zip(times["filter"], times["compiled"], times["hand"], strict=True)
    )
    print(f"ppinfer from {Path(pp.__file__).resolve().parent}")
    print(" ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
    print(
        f"RESULT paired_ratio_filter={paired_ratio(times, 'filter', 'hand'):.3f} "
        f"paired_ratio_history={paired_ratio(times, 'history', 'hand'):.3f} "
        f"host_share_filter={host:.3f} python_calls_per_infer={calls_filter} "
        f"python_calls_per_infer_history={calls_history}"
    )


def compiled_program(compile_module, warm_call):
    """``fn(seed)``: the compiled program of ``warm_call``'s first chunk, run directly (new key per
    seed, the same other arguments) and waited for. Captured by wrapping ``_Jitted.dispatch``
    during one warm call."""
    import jax

    jitted = compile_module._Jitted
    real, seen = jitted.dispatch, []

    def spy(self, *args, **kwargs):
        seen.append((self, args))
        return real(self, *args, **kwargs)

    jitted.dispatch = spy
    try:
        warm_call()
    finally:
        jitted.dispatch = real
    fn, args = seen[0]  # the first chunk: (zeros, key, dyn, stop, first)
    return lambda s: jax.block_until_ready(fn._jitted(args[0], jax.random.PRNGKey(s), *args[2:]))


if __name__ == "__main__":
    main()
