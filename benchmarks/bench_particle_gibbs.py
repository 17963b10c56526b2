"""Particle Gibbs: plain conditional SMC against conditional SMC with ancestor sampling, side by side.

Target: the linear-Gaussian state-space model of ``tests/test_particle_gibbs.py`` (``x_t = a x_{t−1} +
N(0, 0.5)``, ``y_t = x_t + N(0, 0.5)``, prior ``a ~ U(−1, 1)``) on simulated data; the exact posterior
of ``a`` comes from the Kalman likelihood on a grid. Both samplers run ``ParticleGibbs`` with the same
particles, chains, warm-up and recorded sweeps, and one MH move of ``a`` per sweep. Both are compiled
before timing (a warm-up call; ``ParticleGibbs`` caches its compiled chains), then timed as
interleaved medians over ``reps`` runs with different seeds.

Printed per sampler: wall time, the fraction of sweeps that changed ``x_0`` (path degeneracy: plain
CSMC leaves the early trajectory stuck), bulk ESS (ArviZ) of ``a`` and ``x_0``, ESS of ``a`` per
second, and the error of the posterior mean of ``a`` against the exact one in units of its MCSE.

Ends with ``RESULT as_ess_per_s_ratio_vs_plain=<x> as_time_ratio_vs_plain=<x>
x0_update_rate_plain=<x> x0_update_rate_as=<x> a_error_in_mcse_as=<x>``. ``--quick`` runs a shorter
series with fewer sweeps and one timed repetition.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import arviz as az
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppinfer as pp  # noqa: E402
from benchmarks._timing import interleaved_medians  # noqa: E402
from models.classic import lgssm_unknown_coefficient, simulate_lgssm  # noqa: E402
from ppinfer.algorithms.particle_gibbs import ParticleGibbs  # noqa: E402
from semantics.exact import lgssm_coefficient_posterior  # noqa: E402

Q, C, R, A_TRUE = 0.5, 1.0, 0.5, 0.7


PRIOR, PROGRAM = lgssm_unknown_coefficient(Q, C, R)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    if opts.quick:
        num_steps, n, chains, samples, warmup, reps = 40, 10, 2, 400, 100, 1
    else:
        num_steps, n, chains, samples, warmup, reps = 100, 20, 4, 2000, 500, 3
    ys = simulate_lgssm(5, num_steps, A_TRUE, Q, C, R)
    truth = lgssm_coefficient_posterior(ys, Q, C, R)[0]
    print(f"LGSSM T={num_steps}, N={n} particles, {chains} chains x {samples} sweeps (+{warmup} warm-up)")
    print(f"exact posterior mean of a: {truth:.4f}")

    configs = {
        "plain": ParticleGibbs(n, samples, warmup, chains, prior=PRIOR),
        "ancestor": ParticleGibbs(n, samples, warmup, chains, prior=PRIOR, ancestor_sampling=True),
    }
    results: dict[str, pp.Result] = {}

    def runner(name):
        def run(seed):
            results[name] = pp.infer(PROGRAM, ys, algorithm=configs[name], key=seed)

        return run

    for name in configs:  # compile
        runner(name)(0)
    times = interleaved_medians({name: runner(name) for name in configs}, reps)

    stats = {}
    for name, r in results.items():
        idata = r.to_arviz()
        x0 = np.asarray(r.chains()["x"])[:, :, 0]
        ess_a = float(az.ess(idata)["a"])
        ess_x0 = float(az.ess(az.from_dict(posterior={"x0": x0}))["x0"])
        mcse = float(az.mcse(idata)["a"])
        err = abs(float(r.mean("a")) - truth) / mcse
        rate = float(np.mean(r.extras["update_rate"][:, 0]))
        stats[name] = (times[name], rate, ess_a, ess_x0, ess_a / times[name], err)
        print(
            f"{name:>9}: {times[name]:.2f} s, x_0 changed in {rate:.1%} of sweeps, ESS(a)={ess_a:.0f}, "
            f"ESS(x_0)={ess_x0:.0f}, ESS(a)/s={ess_a / times[name]:.0f}, "
            f"mean(a)={float(r.mean('a')):.4f} (|error| = {err:.2f} MCSE)"
        )
    plain, anc = stats["plain"], stats["ancestor"]
    print(
        f"RESULT as_ess_per_s_ratio_vs_plain={anc[4] / plain[4]:.3f} as_time_ratio_vs_plain="
        f"{anc[0] / plain[0]:.3f} x0_update_rate_plain={plain[1]:.3f} x0_update_rate_as={anc[1]:.3f} "
        f"a_error_in_mcse_as={anc[5]:.2f}"
    )


if __name__ == "__main__":
    main()
