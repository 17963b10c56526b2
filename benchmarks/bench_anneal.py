"""Tempered SMC with random-walk, HMC and NUTS moves, and waste-free SMC, side by side in one process.

Model: conjugate Bayesian linear regression (``d`` coefficients ~ N(0, 1), ``n`` observations with
unit noise), so the posterior mean, covariance and ``log Z`` are exact. Every algorithm uses the
adaptive schedule (ESS target 0.5) and the same number of particles. Each is compiled and run once,
then timed over interleaved runs with different seeds (median wall time, compile excluded). Over the
same runs: the **estimator ESS** of the posterior means, ``min_j σ_j² / mean_r (m̂_rj − μ_j)²``
(the number of independent posterior draws whose average would have the same mean squared error; it
counts the bias too), ESS per second, the largest posterior-mean error in posterior sds, and the
mean and sd of ``log Ẑ − log Z``.

Ends with ``RESULT ess_per_s_rw=<x> ess_per_s_hmc=<x> ess_per_s_nuts=<x> ess_per_s_wf=<x>
ess_per_s_wf_hmc=<x> hmc_over_rw=<x> wf_over_rw=<x>`` (ESS/s, and ESS/s ratios against tempered SMC
with the random walk). ``--quick``: fewer particles and repetitions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import numpyro.distributions as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved_medians  # noqa: E402

import ppinfer as pp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer particles and repetitions")
    opts = parser.parse_args()
    n_particles, reps = (1000, 12) if opts.quick else (2000, 32)
    d, n_obs = 8, 100
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_obs, d)).astype(np.float32)
    y = (X @ rng.normal(size=d) + rng.normal(size=n_obs)).astype(np.float32)
    cov = X @ X.T + np.eye(n_obs)
    log_z = float(-0.5 * (y @ np.linalg.solve(cov, y) + np.linalg.slogdet(2 * np.pi * cov)[1]))
    post_cov = np.linalg.inv(X.T @ X + np.eye(d))
    post_mean, post_var = post_cov @ X.T @ y, np.diag(post_cov)

    def model(X, y):
        beta = pp.sample("beta", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
        with pp.plate("data", y.shape[0]):
            pp.observe("y", dist.Normal(X @ beta, 1.0), y)

    algorithms = {
        "rw": pp.TemperedSMC(n_particles, num_moves=5, move="rw"),
        "hmc": pp.TemperedSMC(n_particles, num_moves=2, move="hmc"),
        "nuts": pp.TemperedSMC(n_particles, num_moves=1, move="nuts"),
        "wf": pp.WasteFreeSMC(n_particles, chain_length=10, move="rw"),
        "wf_hmc": pp.WasteFreeSMC(n_particles, chain_length=10, move="hmc"),
    }
    print(
        f"Bayesian linear regression d={d}, n={n_obs}; {n_particles} particles, adaptive schedule, "
        f"{reps} timed runs each"
    )
    for name, alg in algorithms.items():
        print(f"  {name:7s} {alg}")
    first = {}
    for name, alg in algorithms.items():
        t0 = time.perf_counter()
        pp.infer(model, X, y, algorithm=alg, key=0)
        first[name] = time.perf_counter() - t0
    runs: dict[str, list] = {name: [] for name in algorithms}

    def timed(name):
        def fn(seed):
            runs[name].append(pp.infer(model, X, y, algorithm=algorithms[name], key=seed))

        return fn

    times = interleaved_medians({name: timed(name) for name in algorithms}, reps)
    print(
        f"{'':7s} {'first s':>8s} {'run ms':>8s} {'temps':>6s} {'accept':>7s} {'ESS':>8s} {'ESS/s':>9s} "
        f"{'max|mean err|/sd':>17s} {'logZ err':>9s} {'logZ sd':>8s}"
    )
    ess_per_s = {}
    for name in algorithms:
        means = np.array([np.asarray(r.mean("beta")) for r in runs[name]])
        mse = np.mean((means - post_mean) ** 2, axis=0)
        ess = float(np.min(post_var / mse))
        ess_per_s[name] = ess / times[name]
        err_sd = float(np.max(np.abs(means.mean(0) - post_mean) / np.sqrt(post_var)))
        lz = np.array([r.log_evidence for r in runs[name]]) - log_z
        temps = np.median([r.extras["num_steps"] for r in runs[name]])
        acc = np.mean([float(np.mean(r.extras["acceptance_rate"])) for r in runs[name]])
        print(
            f"{name:7s} {first[name]:8.1f} {times[name] * 1e3:8.1f} {temps:6.0f} {acc:7.2f} {ess:8.0f} "
            f"{ess_per_s[name]:9.0f} {err_sd:17.3f} {lz.mean():9.3f} {lz.std(ddof=1):8.3f}"
        )
    fields = " ".join(f"ess_per_s_{k}={v:.0f}" for k, v in ess_per_s.items())
    print(
        f"RESULT {fields} hmc_over_rw={ess_per_s['hmc'] / ess_per_s['rw']:.3f} "
        f"wf_over_rw={ess_per_s['wf'] / ess_per_s['rw']:.3f}"
    )


if __name__ == "__main__":
    main()
