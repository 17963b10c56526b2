"""TemperedSMC with HMC/NUTS moves: the step-size rule between temperatures, and a dense mass.

    python benchmarks/bench_tempered_tuning.py [--quick]

A. A correlated 5-D Bayesian linear regression (prior N(0, I), 30 observations of noise sd 0.5,
   columns scaled ×1, ×10, ×0.1 and one column nearly a copy of another; exact posterior and
   evidence in closed form). ``TemperedSMC(1000, move=…)``, adaptive schedule, for each
   configuration over the same seeds: the step-size rule before this change (symmetric,
   ``step · exp(a − target)``, patched in as the baseline) and the current one
   (:func:`ppinfer.kernels.anneal.tune_step_size`), each with the diagonal population mass
   (``inverse_mass="population"``, the default) and the dense one (``"full"``). Printed: the
   temperatures per run whose moves accepted under 5 % (the particles did not move there), the
   largest |posterior mean − exact| in posterior sds, the range of posterior var / exact var, the
   log Ẑ error (mean ± standard error over seeds) and the time per run (compiled, after one run).

B. The bias that tuning adds to Ẑ (its parameters read the population, module docstring of
   :mod:`ppinfer.kernels.anneal`): ``E[Ẑ/Z]`` at N = 32 on a 2-D conjugate Gaussian (5 fixed
   temperatures, 3 moves each; ``tests/test_anneal.py``'s kernel-level model), with each rule,
   over many vmapped runs, from the default step size and from one far too large (3.0).

Ends with ``RESULT stuck_old=<x> stuck_new=<x> stuck_full=<x> z_ratio_old=<x> z_ratio_new=<x>``.
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
from scipy.stats import multivariate_normal

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


def regression():
    rng = np.random.default_rng(3)
    n, d = 30, 5
    x = rng.normal(size=(n, d)) @ np.diag([1, 10, 0.1, 1, 1])
    x[:, 3] = x[:, 0] + 0.1 * rng.normal(size=n)
    y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    precision = np.eye(d) + x.T @ x / 0.25
    cov = np.linalg.inv(precision)
    mean = cov @ x.T @ y / 0.25
    log_z = multivariate_normal(np.zeros(n), x @ x.T + 0.25 * np.eye(n)).logpdf(y)

    def model(x, y):
        w = pp.sample("w", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
        with pp.plate("data", y.shape[0]):
            pp.observe("y", dist.Normal(x @ w, 0.5), y)

    return model, (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)), mean, np.diag(cov), log_z


def part_a(seeds: int) -> dict:
    model, args, mean, var, log_z = regression()
    configs = [
        ("HMC, diagonal mass, rule before", symmetric_rule, anneal.HMCMove()),
        ("HMC, diagonal mass", CURRENT_RULE, anneal.HMCMove()),
        ("HMC, full mass", CURRENT_RULE, anneal.HMCMove(inverse_mass="full")),
        ("NUTS, diagonal mass", CURRENT_RULE, anneal.NUTSMove()),
        ("NUTS, full mass", CURRENT_RULE, anneal.NUTSMove(inverse_mass="full")),
    ]
    print("A. correlated 5-D regression, TemperedSMC(1000), adaptive schedule")
    print(f"{'move':34s} {'stuck/run':>9s} {'temps':>6s} {'max|Δmean|/sd':>13s} {'var ratio':>13s} "
          f"{'logZ err':>15s} {'s/run':>6s}")  # fmt: skip
    stuck_of = {}
    for name, rule, move in configs:
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
        stuck_of[name] = float(np.mean(stuck))
        z_line = f"{np.mean(z_errs):+.3f} ± {np.std(z_errs, ddof=1) / np.sqrt(seeds):.3f}"
        print(f"{name:34s} {np.mean(stuck):9.2f} {np.mean(temps):6.1f} {np.mean(errs):13.3f} "
              f"{ratios.min():6.3f}–{ratios.max():.3f} {z_line:>15s} {np.median(times):6.2f}")  # fmt: skip
    use_rule(CURRENT_RULE)
    return stuck_of


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
    stuck = part_a(seeds)
    print(f"\nB. E[Ẑ/Z] with HMCMove tuned, N = 32, 2-D conjugate Gaussian, {runs} runs")
    for step_size in (0.5, 3.0):  # the default (accepts above target: both rules agree); too large
        old, old_se = z_ratio(symmetric_rule, runs, step_size)
        new, new_se = z_ratio(CURRENT_RULE, runs, step_size)
        before, now = f"{old:.4f} ± {old_se:.4f}", f"{new:.4f} ± {new_se:.4f}"
        print(f"step_size={step_size}: rule before {before}, current rule {now}")
    print(
        f"RESULT stuck_old={stuck['HMC, diagonal mass, rule before']:.2f} "
        f"stuck_new={stuck['HMC, diagonal mass']:.2f} stuck_full={stuck['HMC, full mass']:.2f} "
        f"z_ratio_old={old:.4f} z_ratio_new={new:.4f}"
    )


if __name__ == "__main__":
    main()
