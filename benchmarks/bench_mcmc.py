"""MCMC benchmarks: ppinfer against the peers it reuses or competes with, side by side in one process.

(a) NUTS through ppinfer (``MCMC(NUTS())``, NumPyro's kernel driven by ppinfer's chain loop) against
    NumPyro's own ``MCMC(NUTS)`` on eight_schools (noncentered) and gp_pois_regr (posteriordb): the same
    warmup, samples, chains (vectorized) and ``target_accept_prob``. Both sides are compiled before
    timing — a warm-up run of each, run concurrently so that the compilations overlap — and the number
    of XLA compilations during the timed runs is printed (it must be 0 on both sides). NumPyro's
    ``MCMC.run`` recompiles its sampling loop on every call (its ``fori_collect`` wraps the cached body
    in a fresh ``jax.jit`` each time, and the loop's jit keys on that wrapper), so its run is wrapped in
    one ``jax.jit`` here; this also removes its eager initialisation cost, which only favours NumPyro.
    Timed: median over interleaved runs with different seeds; ESS: min bulk ESS over all sites (ArviZ),
    median over the same runs.
(b) ppinfer's adaptive ``TemperedSMC`` against BlackJAX's ``adaptive_tempered_smc`` on a conjugate
    Bayesian linear regression (exact ``log Z`` known): the same particles, ESS target (bisection),
    systematic resampling every step, and the same random-walk MH move (``num_moves`` steps per
    temperature, Gaussian with per-coordinate scale ``2.38/√d`` × the particles' spread, recomputed
    each temperature). Wall time of compiled runs (interleaved medians) and ``log Ẑ`` of both.

Ends with ``RESULT nuts_time_ratio_vs_numpyro=<x> tempered_ratio_vs_blackjax=<x>`` (ppinfer time /
peer time; NUTS: geometric mean over the models; NaN when BlackJAX is not installed). Targets ≤ 1.1
and ≤ 1.2. ``--quick`` (under 60 s) runs shorter chains, fewer particles, 3 repetitions and NUTS on
gp_pois_regr only: eight_schools' short runs last ~40 ms, so there its time ratio is host-side noise,
and its two compilations (~17 s) would dominate the quick run.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import monitoring
from numpyro.infer import MCMC as NumPyroMCMC
from numpyro.infer import NUTS as NumPyroNUTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppinfer as pp  # noqa: E402
from models.posteriordb import load  # noqa: E402
from ppinfer.algorithms.tempered import TemperedSMC  # noqa: E402
from ppinfer.mcmc import MCMC, NUTS  # noqa: E402

MODELS = ["eight_schools-eight_schools_noncentered", "gp_pois_regr-gp_pois_regr"]
TARGET_ACCEPT = 0.8

_COMPILES = [0]
monitoring.register_event_duration_secs_listener(
    lambda event, _secs, **_kw: _COMPILES.__setitem__(0, _COMPILES[0] + 1)
    if event == "/jax/core/compile/backend_compile_duration"
    else None
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    t_start = time.perf_counter()
    warmup, samples, chains, reps = (100, 100, 2, 3) if a.quick else (500, 1000, 4, 5)
    print(f"(a) NUTS: {warmup} warmup + {samples} samples x {chains} chains, target_accept {TARGET_ACCEPT}")
    print(
        f"{'model':40s} {'pp s':>7s} {'numpyro s':>9s} {'ESS pp':>7s} {'ESS np':>7s} "
        f"{'ESS/s pp':>8s} {'ESS/s np':>8s} {'time ratio':>10s} {'ESS/s ratio':>11s} {'compiles':>8s}"
    )
    ratios = []
    for name in MODELS[1:] if a.quick else MODELS:
        row = bench_nuts(name, warmup, samples, chains, reps)
        ratios.append(row["t_pp"] / row["t_np"])
        print(
            f"{name:40s} {row['t_pp']:7.2f} {row['t_np']:9.2f} {row['ess_pp']:7.0f} {row['ess_np']:7.0f} "
            f"{row['ess_pp'] / row['t_pp']:8.1f} {row['ess_np'] / row['t_np']:8.1f} "
            f"{row['t_pp'] / row['t_np']:10.3f} "
            f"{(row['ess_pp'] / row['t_pp']) / (row['ess_np'] / row['t_np']):11.3f} {row['compiles']:8d}"
        )
        first = f"pp {row['first_pp']:.1f} s, numpyro {row['first_np']:.1f} s"
        print(f"{'':40s} first run / compilation (overlapped): {first}")
    nuts_ratio = float(np.exp(np.mean(np.log(ratios))))
    if importlib.util.find_spec("blackjax") is None:
        print("(b) tempered SMC vs BlackJAX: skipped (blackjax is not installed)")
        tempered_ratio = float("nan")
    else:
        tempered_ratio = bench_tempered(a.quick)
    print(f"total wall time {time.perf_counter() - t_start:.1f}s")
    print(
        f"RESULT nuts_time_ratio_vs_numpyro={nuts_ratio:.3f} tempered_ratio_vs_blackjax={tempered_ratio:.3f}"
    )


def bench_nuts(name: str, warmup: int, samples: int, chains: int, reps: int) -> dict:
    """Median wall time and median min-ESS of ``reps`` interleaved runs of each side."""
    model, args = load(name)
    alg = MCMC(NUTS(target_accept_prob=TARGET_ACCEPT), samples, warmup, num_chains=chains)

    def run_pp(seed):
        r = pp.infer(model, *args, algorithm=alg, key=seed)
        return jax.block_until_ready(r.chains())

    mcmc = NumPyroMCMC(
        NumPyroNUTS(model, target_accept_prob=TARGET_ACCEPT),
        num_warmup=warmup,
        num_samples=samples,
        num_chains=chains,
        chain_method="vectorized",
        progress_bar=False,
    )

    @jax.jit
    def numpyro_run(key, *args):
        mcmc.run(key, *args)
        return mcmc.get_samples(group_by_chain=True)

    compiled, first = compile_alongside(numpyro_run, (jax.random.PRNGKey(0), *args), run_pp)

    def run_np(seed):
        return jax.block_until_ready(compiled(jax.random.PRNGKey(seed), *args))

    run_np(0)
    before = _COMPILES[0]
    times, ess = interleaved({"pp": run_pp, "np": run_np}, reps)
    return {
        "first_pp": first["pp"],
        "first_np": first["peer"],
        "t_pp": times["pp"],
        "t_np": times["np"],
        "ess_pp": ess["pp"],
        "ess_np": ess["np"],
        "compiles": _COMPILES[0] - before,
    }


def compile_alongside(peer: Any, example_args: tuple, run_pp: Callable[[int], Any]) -> tuple[Any, dict]:
    """Compile the jitted ``peer`` for ``example_args`` in a background thread while ``run_pp(0)``
    runs (and compiles) here, so that the two XLA compilations overlap on a multi-core machine. The
    peer is traced and lowered first, in this thread: NumPyro's effect-handler stack is global, so two
    programs must not be traced at once; XLA's compilation itself runs outside the GIL. Returns the
    peer's compiled executable (call it instead of ``peer``) and the wall times of ``run_pp(0)`` and of
    the peer's compilation (measured while overlapping). Only the timed runs after this are compared."""
    t0 = time.perf_counter()
    lowered = peer.lower(*example_args)
    lower_s = time.perf_counter() - t0

    def compile_peer():
        t = time.perf_counter()
        return lowered.compile(), time.perf_counter() - t

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(compile_peer)
        t1 = time.perf_counter()
        run_pp(0)
        pp_s = time.perf_counter() - t1
        compiled, peer_s = future.result()
    return compiled, {"pp": pp_s, "peer": lower_s + peer_s}


def interleaved(fns: dict, reps: int, seed: int = 100) -> tuple[dict, dict]:
    """Like ``benchmarks._timing.interleaved_medians`` but also keeps each run's min ESS (computed
    outside the timed region): ``(median time, median min-ESS)`` per side."""
    times = {k: [] for k in fns}
    ess = {k: [] for k in fns}
    for i in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            chains = fn(seed + i)
            times[k].append(time.perf_counter() - t0)
            ess[k].append(min_ess(chains))
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}
    return med(times), med(ess)


def min_ess(chains: dict) -> float:
    """Min bulk ESS over every scalar component of every site (``[C, S, …]`` draws)."""
    data = {k: np.asarray(v) for k, v in chains.items()}
    ds = az.convert_to_dataset(data)
    return float(min(float(np.min(az.ess(ds)[k].values)) for k in data))


def bench_tempered(quick: bool) -> float:
    """ppinfer TemperedSMC vs blackjax adaptive_tempered_smc; returns the time ratio."""
    import blackjax
    from blackjax.mcmc.random_walk import normal as rw_normal
    from blackjax.smc import adaptive_tempered, resampling

    n_particles, num_moves, ess_target, reps = (1000, 5, 0.5, 3) if quick else (4000, 5, 0.5, 7)
    d, n_obs = 8, 100
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_obs, d)).astype(np.float32)
    y = (X @ rng.normal(size=d) + rng.normal(size=n_obs)).astype(np.float32)
    cov = X @ X.T + np.eye(n_obs)
    exact = float(-0.5 * (y @ np.linalg.solve(cov, y) + np.linalg.slogdet(2 * np.pi * cov)[1]))
    print(
        f"(b) tempered SMC on Bayesian linear regression (d={d}, n={n_obs}), {n_particles} particles, "
        f"{num_moves} RW-MH moves per temperature, ESS target {ess_target}"
    )

    def model(X, y):
        beta = pp.sample("beta", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
        with pp.plate("data", y.shape[0]):
            pp.observe("y", dist.Normal(X @ beta, 1.0), y)

    alg = TemperedSMC(n_particles, ess_target=ess_target, num_moves=num_moves)

    def run_pp(seed):
        r = pp.infer(model, X, y, algorithm=alg, key=seed)
        return r.log_evidence, r.extras["num_steps"]

    log_prior = lambda b: jnp.sum(dist.Normal(0.0, 1.0).log_prob(b))
    log_lik = lambda b: jnp.sum(dist.Normal(X @ b, 1.0).log_prob(y))
    rw = blackjax.additive_step_random_walk.build_kernel()

    def rw_step(key, state, logdensity_fn, sigma):
        return rw(key, state, logdensity_fn, rw_normal(sigma))

    kernel = adaptive_tempered.build_kernel(
        log_prior, log_lik, rw_step, blackjax.rmh.init, resampling.systematic, ess_target
    )

    @jax.jit
    def blackjax_run(key):
        k0, key = jax.random.split(key)
        state = adaptive_tempered.init(jax.random.normal(k0, (n_particles, d)))

        def cond(c):
            return c[1].tempering_param < 1.0

        def body(c):
            i, s, log_z = c
            # The same move scale as ppinfer's: 2.38/sqrt(d) x the particles' per-coordinate sd.
            mean = s.weights @ s.particles
            sd = jnp.sqrt(s.weights @ (s.particles - mean) ** 2)
            sigma = 2.38 / jnp.sqrt(d) * jnp.maximum(sd, 1e-4)
            s, info = kernel(jax.random.fold_in(key, i), s, num_moves, {"sigma": sigma[None]})
            return i + 1, s, log_z + info.log_likelihood_increment

        i, _, log_z = jax.lax.while_loop(cond, body, (0, state, jnp.zeros(())))
        return log_z, i

    compiled, first = compile_alongside(blackjax_run, (jax.random.PRNGKey(0),), run_pp)

    def run_bj(seed):
        log_z, steps = jax.block_until_ready(compiled(jax.random.PRNGKey(seed)))
        return float(log_z), int(steps)

    run_bj(0)
    print(f"  first run / compilation (overlapped): ppinfer {first['pp']:.1f} s, peer {first['peer']:.1f} s")
    before = _COMPILES[0]
    times = {"pp": [], "bj": []}
    out = {"pp": [], "bj": []}
    for i in range(reps):
        for k, fn in (("pp", run_pp), ("bj", run_bj)):
            t0 = time.perf_counter()
            out[k].append(fn(100 + i))
            times[k].append(time.perf_counter() - t0)
    t_pp, t_bj = statistics.median(times["pp"]), statistics.median(times["bj"])
    fmt = lambda rs: ", ".join(f"{z:.2f}" for z, _ in rs)
    print(f"  exact log Z {exact:.3f}")
    print(f"  ppinfer  log Ẑ per run [{fmt(out['pp'])}], temperatures {[s for _, s in out['pp']]}")
    print(f"  blackjax log Ẑ per run [{fmt(out['bj'])}], temperatures {[s for _, s in out['bj']]}")
    print(
        f"  median wall time: ppinfer {t_pp * 1e3:.1f} ms, blackjax {t_bj * 1e3:.1f} ms, "
        f"ratio {t_pp / t_bj:.3f}; compilations during timed runs: {_COMPILES[0] - before}"
    )
    # BlackJAX's schedule differs (it moves at the previous temperature, then reweights), so the
    # number of temperatures may differ; the per-temperature cost separates schedule from speed.
    per_pp = t_pp / statistics.median(s for _, s in out["pp"])
    per_bj = t_bj / statistics.median(s for _, s in out["bj"])
    print(
        f"  per temperature: ppinfer {per_pp * 1e3:.1f} ms, blackjax {per_bj * 1e3:.1f} ms, "
        f"ratio {per_pp / per_bj:.3f}"
    )
    return t_pp / t_bj


if __name__ == "__main__":
    main()
