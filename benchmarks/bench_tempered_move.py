"""TemperedSMC's random-walk move: a diagonal scale against the population's full covariance.

    python benchmarks/bench_tempered_move.py [--quick] [--particles N] [--seeds S]

On posteriordb posteriors with reference draws (arK: an AR(5) model whose coefficients are strongly
correlated; eight_schools_noncentered: nearly independent coordinates), each seed runs
``TemperedSMC(N, move=RWMove(covariance=c))`` for ``c`` in ``("diagonal", "full")``, alternating,
same seed and same work (the same number of moves per temperature). Printed per move: the largest
|posterior mean − reference mean| in reference sds, the range of posterior sd / reference sd over
the parameters, the median acceptance rate, the number of temperatures, and the time per run (the
compiled run only: each configuration runs once before timing). ``RESULT`` gives, for arK, the
worst mean error and sd ratio of each move.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppinfer as pp  # noqa: E402
from models.posteriordb import flatten_draws, load, reference  # noqa: E402
from ppinfer.kernels.anneal import RWMove  # noqa: E402

POSTERIORS = ("arK-arK", "eight_schools-eight_schools_noncentered")


def summary(result, ref) -> tuple[float, float, float]:
    """(max |Δmean|/sd, min sd ratio, max sd ratio) over the reference's parameters."""
    draws, w = flatten_draws(result.samples), np.asarray(result.weights, np.float64)
    errs, ratios = [], []
    for name, r in ref.items():
        m = float(w @ draws[name])
        sd = float(np.sqrt(w @ (draws[name] - m) ** 2))
        errs.append(abs(m - r["mean"]) / r["sd"])
        ratios.append(sd / r["sd"])
    return max(errs), min(ratios), max(ratios)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--particles", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    seeds = 2 if a.quick else a.seeds
    pp.set_verbosity(0)
    result_parts = []
    for name in POSTERIORS:
        model, args = load(name)
        ref = reference(name)
        rows: dict[str, list] = {"diagonal": [], "full": []}
        for cov in rows:  # compile each once, untimed
            pp.infer(model, *args, algorithm=pp.TemperedSMC(a.particles, move=RWMove(covariance=cov)), key=99)
        for seed in range(seeds):
            for cov in rows:
                alg = pp.TemperedSMC(a.particles, move=RWMove(covariance=cov))
                t0 = time.perf_counter()
                r = pp.infer(model, *args, algorithm=alg, key=seed)
                seconds = time.perf_counter() - t0
                err, lo, hi = summary(r, ref)
                acc = float(np.median(np.asarray(r.extras["acceptance_rate"])))
                rows[cov].append((err, lo, hi, acc, int(r.extras["num_steps"]), seconds))
        print(f"\n{name}: TemperedSMC({a.particles}), {seeds} seeds")
        head = ("move", "max|Δmean|/sd", "sd ratio range", "acceptance", "steps", "s/run")
        print(" ".join(f"{h:>{w}}" for h, w in zip(head, (9, 14, 16, 11, 6, 7), strict=True)))
        for cov, rs in rows.items():
            x = np.asarray(rs)
            print(
                f"{cov:>9} {x[:, 0].max():14.2f} {x[:, 1].min():7.2f}–{x[:, 2].max():<8.2f} "
                f"{np.median(x[:, 3]):11.3f} {np.median(x[:, 4]):6.0f} {np.median(x[:, 5]):7.2f}"
            )
        if name == "arK-arK":
            for cov, rs in rows.items():
                x = np.asarray(rs)
                ratio = f"{x[:, 1].min():.2f}-{x[:, 2].max():.2f}"
                result_parts.append(f"{cov}_max_mean_err={x[:, 0].max():.2f} {cov}_sd_ratio={ratio}")
            t = {cov: np.median(np.asarray(rs)[:, 5]) for cov, rs in rows.items()}
            result_parts.append(f"time_full_over_diagonal={t['full'] / t['diagonal']:.2f}")
    print("\nRESULT arK " + " ".join(result_parts))


if __name__ == "__main__":
    main()
