"""TemperedSMC with HMC/NUTS moves: the step-size rule between temperatures, and a dense mass.

    python benchmarks/bench_tempered_tuning.py [--quick]

A. Two Bayesian linear regressions with exact posteriors and evidence: a correlated 5-D one
   (prior N(0, I), 30 observations of noise sd 0.5, columns scaled ×1, ×10, ×0.1 and one column
   nearly a copy of another) and a peaked 3-D one (correlated columns scaled 100 apart, 200
   observations of sd 0.01, prior sd 100). ``TemperedSMC(1000, move=…)``, adaptive schedule, over
   the same seeds: the defaults before this change (the population's variance as the diagonal
   mass, the symmetric step-size rule ``step · exp(a − target)``, patched in as the baseline), the
   current rule (:func:`ppinfer.kernels.anneal.tune_step_size`) with the diagonal mass, and the
   current default (``inverse_mass="auto"``: the full covariance at N ≥ 10 d). Printed: the
   temperatures per run whose moves accepted under 5 % (the particles did not move there), the
   largest |posterior mean − exact| in posterior sds, the range of posterior var / exact var, the
   log Ẑ error (mean ± standard error over seeds) and the time per run (compiled, after one run).

B. The bias that tuning adds to Ẑ (its parameters read the population, module docstring of
   :mod:`ppinfer.kernels.anneal`): ``E[Ẑ/Z]`` at N = 32 on a 2-D conjugate Gaussian (5 fixed
   temperatures, 3 moves each; ``tests/test_anneal.py``'s kernel-level model), with each rule,
   over many vmapped runs, from the default step size and from one far too large (3.0).

Ends with ``RESULT stuck_old=<x> stuck_new=<x> stuck_full=<x> peaked_err_sd_old=<x>
peaked_err_sd_default=<x> z_ratio_old=<x> z_ratio_new=<x>``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from scipy.stats import multivariate_normal, norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppinfer as pp  # noqa: E402
import ppinfer._compile as compile_cache  # noqa: E402
from ppinfer.kernels import anneal  # noqa: E402

CURRENT_RULE = anneal.tune_step_size


def symmetric_rule(step_size, acceptance_rate, target, gain=1.0):
    """The rule before this change: ``step · exp(gain · (a − target))`` both ways."""
    if target is None:
        return step_size
    new = step_size * jnp.exp(gain * (acceptance_rate - target))
    return jnp.where(jnp.isnan(acceptance_rate), step_size, new)


def use_rule(rule) -> None:
    """Trace the anneal step with ``rule`` from now on (compiled runs are dropped)."""
    anneal.tune_step_size = rule
    compile_cache._CACHE.clear()


def correlated():
    """5-D: columns scaled ×1, ×10, ×0.1, one a near copy of another; 30 observations, sd 0.5."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 5)) @ np.diag([1, 10, 0.1, 1, 1])
    x[:, 3] = x[:, 0] + 0.1 * rng.normal(size=30)
    return x, x @ rng.normal(size=5) + 0.5 * rng.normal(size=30), 1.0, 0.5


def peaked():
    """3-D: correlated columns scaled 100 apart, 200 observations of sd 0.01, prior sd 100."""
    rng = np.random.default_rng(0)
    x = (
        rng.standard_normal((200, 3))
        @ np.diag([1e2, 1.0, 1e-1])
        @ np.array([[1, 0.9, 0], [0, 1, 0.9], [0, 0, 1.0]])
    )
    y = x @ np.array([0.001, 1.0, 50.0]) + 0.01 * np.random.default_rng(1).standard_normal(200)
    return x, y, 100.0, 0.01


def regression(data):
    """The Bayesian linear regression ``w ~ N(0, prior² I)``, ``y ~ N(x w, noise²)`` on ``data``
    and its exact posterior mean, variances and log evidence."""
    x, y, prior, noise = data
    n, d = x.shape
    precision = np.eye(d) / prior**2 + x.T @ x / noise**2
    cov = np.linalg.inv(precision)
    mean = cov @ x.T @ y / noise**2
    # log Z = log p(y | m) + log p(m) − log p(m | y) at the posterior mean m (the n × n marginal
    # covariance of y is singular in float64 for the peaked problem).
    log_z = (
        norm.logpdf(y, x @ mean, noise).sum()
        + norm.logpdf(mean, 0.0, prior).sum()
        - multivariate_normal(mean, cov).logpdf(mean)
    )

    def model(x, y):
        w = pp.sample("w", dist.Normal(0.0, prior).expand([d]).to_event(1))
        with pp.plate("data", y.shape[0]):
            pp.observe("y", dist.Normal(x @ w, noise), y)

    return model, (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)), mean, np.diag(cov), log_z


CONFIGS = [
    # The defaults before this change: the population's variance as mass, the symmetric rule.
    ("HMC, diagonal mass, rule before", symmetric_rule, anneal.HMCMove(inverse_mass="population")),
    ("HMC, diagonal mass", CURRENT_RULE, anneal.HMCMove(inverse_mass="population")),
    ("HMC, full mass (the default here)", CURRENT_RULE, anneal.HMCMove()),
    ("NUTS, diagonal mass", CURRENT_RULE, anneal.NUTSMove(inverse_mass="population")),
    ("NUTS, full mass (the default here)", CURRENT_RULE, anneal.NUTSMove()),
]


def part_a(name: str, data, seeds: int) -> dict:
    model, args, mean, var, log_z = regression(data)
    print(f"A. {name}, TemperedSMC(1000), adaptive schedule")
    print(f"{'move':36s} {'stuck/run':>9s} {'temps':>6s} {'max|Δmean|/sd':>13s} {'var ratio':>13s} "
          f"{'logZ err':>17s} {'s/run':>6s}")  # fmt: skip
    stuck_of, err_of = {}, {}
    for label, rule, move in CONFIGS:
        use_rule(rule)
        algorithm = pp.TemperedSMC(1000, move=move)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pp.infer(model, *args, algorithm=algorithm, key=10_000)  # compile
            stuck, temps, errs, ratios, z_errs, times = [], [], [], [], [], []
            for s in range(seeds):
                t0 = time.perf_counter()
                r = pp.infer(model, *args, algorithm=algorithm, key=s)
                times.append(time.perf_counter() - t0)
                acc = np.asarray(r.extras["acceptance_rate"])
                acc = acc[np.isfinite(acc)]
                stuck.append(int(np.sum(acc < 0.05)))
                temps.append(acc.size)
                m, v = np.asarray(r.mean("w")), np.asarray(r.var("w"))
                errs.append(float(np.max(np.abs(m - mean) / np.sqrt(var))))
                ratios.append(v / var)
                z_errs.append(r.log_evidence - log_z)
        ratios = np.mean(ratios, axis=0)
        stuck_of[label], err_of[label] = float(np.mean(stuck)), float(np.mean(errs))
        z_line = f"{np.mean(z_errs):+.3f} ± {np.std(z_errs, ddof=1) / np.sqrt(seeds):.3f}"
        print(f"{label:36s} {np.mean(stuck):9.2f} {np.mean(temps):6.1f} {np.mean(errs):13.3f} "
              f"{ratios.min():6.3f}–{ratios.max():.3f} {z_line:>17s} {np.median(times):6.2f}")  # fmt: skip
    use_rule(CURRENT_RULE)
    return stuck_of, err_of


# B: prior N(0, I₂), three observations y_j ~ N(u, I₂), L_λ = L^λ on a fixed schedule.
YK = np.array([[0.5, -1.0], [1.5, 0.0], [1.0, -0.4]], np.float32)
LOG_Z_K = sum(multivariate_normal(np.zeros(3), np.eye(3) + 1.0).logpdf(YK[:, k]) for k in range(2))
TEMPS = (0.05, 0.15, 0.35, 0.65, 1.0)


def z_ratio(rule, runs: int, step_size: float, n: int = 32) -> tuple[float, float]:
    """``E[Ẑ/Z]`` and its standard error over ``runs`` vmapped runs of ``HMCMove(step_size)``
    (tuned)."""
    use_rule(rule)
    move = anneal.HMCMove(step_size=step_size)
    log_prior = lambda u: jnp.sum(jax.scipy.stats.norm.logpdf(u))
    log_lik = lambda u, lam: lam * jnp.sum(jax.scipy.stats.norm.logpdf(jnp.asarray(YK), u))

    def run(key):
        k0, k1 = jax.random.split(key)
        state = anneal.init(jax.random.normal(k0, (n, 2)), move)

        def step(key, state, i):
            kw = {"log_prior": log_prior, "log_lik": log_lik, "move": move, "num_moves": 3}
            return anneal.anneal_step(key, state, jnp.asarray(TEMPS)[i], **kw)

        state, _, _ = anneal.anneal_loop(k1, state, step, max_steps=len(TEMPS))
        return jax.scipy.special.logsumexp(state.log_weights)

    log_z = np.asarray(jax.jit(jax.vmap(run))(jax.random.split(jax.random.PRNGKey(1), runs)), np.float64)
    ratio = np.exp(log_z - LOG_Z_K)
    use_rule(CURRENT_RULE)
    return float(ratio.mean()), float(ratio.std(ddof=1) / np.sqrt(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds and runs")
    opts = parser.parse_args()
    seeds, runs = (4, 2000) if opts.quick else (12, 12000)
    stuck, _ = part_a("correlated 5-D regression", correlated(), seeds)
    _, errs = part_a("peaked 3-D regression", peaked(), seeds)
    print(f"\nB. E[Ẑ/Z] with HMCMove tuned, N = 32, 2-D conjugate Gaussian, {runs} runs")
    for step_size in (0.5, 3.0):  # the default (accepts above target: both rules agree); too large
        old, old_se = z_ratio(symmetric_rule, runs, step_size)
        new, new_se = z_ratio(CURRENT_RULE, runs, step_size)
        before, now = f"{old:.4f} ± {old_se:.4f}", f"{new:.4f} ± {new_se:.4f}"
        print(f"step_size={step_size}: rule before {before}, current rule {now}")
    before, full = "HMC, diagonal mass, rule before", "HMC, full mass (the default here)"
    print(
        f"RESULT stuck_old={stuck[before]:.2f} stuck_new={stuck['HMC, diagonal mass']:.2f} "
        f"stuck_full={stuck[full]:.2f} peaked_err_sd_old={errs[before]:.1f} "
        f"peaked_err_sd_default={errs[full]:.3f} z_ratio_old={old:.4f} z_ratio_new={new:.4f}"
    )


if __name__ == "__main__":
    main()
