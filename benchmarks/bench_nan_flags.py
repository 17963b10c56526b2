"""What per-step NaN-site flags cost a bootstrap filter, side by side in one process.

``pp.infer`` runs an SMC-family loop without per-step, per-site NaN flags (``Loop.nan_sites``): a
NaN or +inf log density still shows in log Ẑ, and only a run whose log Ẑ went NaN or +inf runs
again, with the flags, to name the site. This benchmark runs the same compiled SMC loop
(``run_chunked``, what ``pp.infer`` runs, plus its output checks) both ways, interleaved, against
the hand-written ``lax.scan`` filter of ``bench_classic_pf``: LGSSM, T = 100, N = 10,000,
systematic resampling at ESS < N/2, ``history=False``, compilation excluded on every side.

Prints ``RESULT flags_over_no_flags=<x> no_flags_vs_handwritten=<x> flags_vs_handwritten=<x>``
(paired medians over rounds).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved_times, paired_ratio  # noqa: E402
from bench_classic_pf import M0, P0, A, C, Q, R, handwritten_filter  # noqa: E402

import ppinfer as pp  # noqa: E402
from models.classic import lgssm, simulate_lgssm  # noqa: E402
from ppinfer._compile import split_args  # noqa: E402
from ppinfer.algorithms.smc import check_output, run_chunked  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=31)
    opts = parser.parse_args()
    n, t_max = 10_000, 100
    ys = simulate_lgssm(0, t_max, A, Q, C, R, M0, P0)
    model = lgssm(A, Q, C, R, M0, P0)
    cfg = pp.SMC(n, resampling="systematic", ess_threshold=0.5, history=False, progress_bar=False)
    args = (ys,)
    dyn, static_key, rebuild = split_args(args)
    with_flags = cfg.loop(model, args)
    assert with_flags.nan_sites
    without = replace(with_flags, nan_sites=False)

    def run(loop):
        def call(seed):
            key = jax.random.PRNGKey(seed)
            out = run_chunked(
                ("loop", model, loop, static_key), key, dyn, rebuild, model, args, loop, cfg, "SMC"
            )
            return check_output(out, cfg, "SMC")

        return call

    hand = handwritten_filter(n)
    ys_dev = jnp.asarray(ys)
    fns = {
        "no_flags": run(without),
        "flags": run(with_flags),
        "hand": lambda s: hand(jax.random.PRNGKey(s), ys_dev).block_until_ready(),
    }
    for fn in fns.values():  # compile
        fn(0)
    assert fns["no_flags"](7) == fns["flags"](7)  # the same draws, the same log Ẑ
    times = interleaved_times(fns, opts.reps)
    for name, ts in times.items():
        print(f"{name:>9}: median {np.median(ts) * 1e3:7.2f} ms")
    print(
        f"RESULT flags_over_no_flags={paired_ratio(times, 'flags', 'no_flags'):.3f} "
        f"no_flags_vs_handwritten={paired_ratio(times, 'no_flags', 'hand'):.3f} "
        f"flags_vs_handwritten={paired_ratio(times, 'flags', 'hand'):.3f}"
    )


if __name__ == "__main__":
    main()
