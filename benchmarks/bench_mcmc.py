"""MCMC benchmarks, side by side in one process.

(a) NUTS through ppinfer (``MCMC(NUTS())``) vs NumPyro's own ``MCMC(NUTS)`` on eight_schools and
    gp_pois_regr (posteriordb): wall time of a second (compiled) run and min bulk ESS per second.
(b) ppinfer's adaptive TemperedSMC vs BlackJAX's ``adaptive_tempered_smc`` if ``blackjax`` is
    importable (it is not a dependency; skipped otherwise).

Ends with ``RESULT nuts_time_ratio_vs_numpyro=<x> tempered_ratio_vs_blackjax=<x>`` (ppinfer time /
peer time, geometric mean over models; NaN when skipped). ``--quick`` runs shorter chains.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import arviz as az
import jax
import numpy as np
from numpyro.infer import MCMC as NumPyroMCMC
from numpyro.infer import NUTS as NumPyroNUTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppinfer as pp  # noqa: E402
from models.posteriordb import load  # noqa: E402
from ppinfer.mcmc import MCMC, NUTS  # noqa: E402

MODELS = ["eight_schools-eight_schools_noncentered", "gp_pois_regr-gp_pois_regr"]


def min_ess(chains: dict) -> float:
    data = {k: np.asarray(v) for k, v in chains.items() if np.asarray(v).ndim >= 2}
    return float(min(float(np.min(az.ess(az.convert_to_dataset(data))[k].values)) for k in data))


def run_ppinfer(model, args, warmup, samples, chains):
    alg = MCMC(NUTS(), samples, warmup, num_chains=chains)
    pp.infer(model, *args, algorithm=alg, key=0)  # compile
    t = time.perf_counter()
    r = pp.infer(model, *args, algorithm=alg, key=1)
    return time.perf_counter() - t, min_ess(r.chains())


def run_numpyro(model, args, warmup, samples, chains):
    mcmc = NumPyroMCMC(
        NumPyroNUTS(model),
        num_warmup=warmup,
        num_samples=samples,
        num_chains=chains,
        chain_method="vectorized",
        progress_bar=False,
        jit_model_args=True,
    )
    mcmc.run(jax.random.PRNGKey(0), *args)  # compile
    t = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(1), *args)
    jax.block_until_ready(mcmc.get_samples())
    return time.perf_counter() - t, min_ess(mcmc.get_samples(group_by_chain=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    warmup, samples, chains = (200, 200, 2) if a.quick else (500, 1000, 4)
    print(
        f"{'model':40s} {'ppinfer s':>9s} {'numpyro s':>9s} {'ESS/s pp':>9s} {'ESS/s np':>9s} {'ratio':>6s}"
    )
    ratios = []
    for name in MODELS:
        model, args = load(name)
        t_pp, ess_pp = run_ppinfer(model, args, warmup, samples, chains)
        t_np, ess_np = run_numpyro(model, args, warmup, samples, chains)
        ratios.append(t_pp / t_np)
        print(
            f"{name:40s} {t_pp:9.2f} {t_np:9.2f} {ess_pp / t_pp:9.1f} {ess_np / t_np:9.1f} {t_pp / t_np:6.2f}"
        )
    nuts_ratio = float(np.exp(np.mean(np.log(ratios))))
    if importlib.util.find_spec("blackjax") is None:
        print("tempered SMC vs BlackJAX: skipped (blackjax is not installed)")
        tempered_ratio = float("nan")
    else:
        tempered_ratio = bench_blackjax(a.quick)
    print(
        f"RESULT nuts_time_ratio_vs_numpyro={nuts_ratio:.3f} tempered_ratio_vs_blackjax={tempered_ratio:.3f}"
    )


def bench_blackjax(quick: bool) -> float:
    """ppinfer TemperedSMC vs blackjax.adaptive_tempered_smc (RW-MH moves) on a conjugate model:
    time ratio of a second (compiled) run."""
    import blackjax
    import jax.numpy as jnp
    import numpyro.distributions as dist

    from ppinfer.algorithms.tempered import TemperedSMC

    n = 500 if quick else 2000
    y = np.random.default_rng(0).normal(1.5, 1.0, 50).astype(np.float32)

    def model(y):
        mu = pp.sample("mu", dist.Normal(0.0, 1.0))
        with pp.plate("data", y.shape[0]):
            pp.observe("y", dist.Normal(mu, 1.0), y)

    alg = TemperedSMC(n, num_moves=5)
    pp.infer(model, y, algorithm=alg, key=0)
    t = time.perf_counter()
    pp.infer(model, y, algorithm=alg, key=1)
    t_pp = time.perf_counter() - t

    def step(key, x):
        return jax.tree.map(lambda v: v + 0.3 * jax.random.normal(key, v.shape), x)

    prior = lambda x: dist.Normal(0.0, 1.0).log_prob(x["mu"])
    lik = lambda x: jnp.sum(dist.Normal(x["mu"], 1.0).log_prob(y))
    smc = blackjax.adaptive_tempered_smc(
        prior,
        lik,
        blackjax.rmh.build_kernel(),
        blackjax.rmh.init,
        {"sigma": jnp.array([0.3])}
        if False
        else {"transition_generator": lambda k, x: x + 0.3 * jax.random.normal(k, x.shape)},
        blackjax.smc.resampling.systematic,
        0.5,
        num_mcmc_steps=5,
    )

    @jax.jit
    def run(key):
        state = smc.init({"mu": jax.random.normal(key, (n,))})

        def cond(c):
            return c[1].tempering_param < 1

        def body(c):
            k, s = c
            k, sub = jax.random.split(k)
            s, _ = smc.step(sub, s)
            return k, s

        return jax.lax.while_loop(cond, body, (key, state))[1]

    jax.block_until_ready(run(jax.random.PRNGKey(0)))
    t = time.perf_counter()
    jax.block_until_ready(run(jax.random.PRNGKey(1)))
    t_bj = time.perf_counter() - t
    print(f"tempered SMC: ppinfer {t_pp:.3f}s, blackjax {t_bj:.3f}s")
    return t_pp / t_bj


if __name__ == "__main__":
    main()
