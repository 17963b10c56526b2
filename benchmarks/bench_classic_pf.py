"""Bootstrap particle filter on a linear-Gaussian state-space model: ppinfer vs hand-written JAX.

Model (``models.classic.lgssm``): x_0 ~ N(0, 1), x_t = 0.9 x_{t-1} + N(0, 0.5), y_t = x_t + N(0, 1).
T = 100, N = 10,000. All filters resample systematically when ESS < N/2 and run jit-compiled on the
same device; times are interleaved medians of ≥ 5 runs after compilation, end to end (``infer``
includes its host-side checks and builds its ``Result``). Like for like, in pairs:

- ``SMC(history=False)`` — a filter that records no per-step particle data (log Ẑ, weights, ESS and
  the final particles), as ``particles`` runs with ``store_history=False`` — against the hand-written
  ``lax.scan`` filter that computes log Ẑ: ``ratio_vs_handwritten``, the issue's target (≤ 1.1);
- the same SMC loop as one ``jax.jit`` program (``run_loop``: no host-side checks, no chunks, no
  ``Result``), which splits ``SMC(history=False)``'s time into its compiled steps
  (``loop_ratio_vs_handwritten``) and ``infer``'s fixed work per call;
- ``SMC()`` (the default: every step's particles and ancestors recorded, so that ``Result.samples``
  are whole trajectories) against a hand-written filter that records the same.

The log Ẑ error is against the exact Kalman-filter value. ``particles`` (N. Chopin's library,
numpy) runs too when it is importable (install it with ``pip install --no-deps particles numba
joblib scikit-learn``: its metadata pins numpy<2, which jax cannot use).

Prints a table and ends with ``RESULT ratio_vs_handwritten=<x> logz_mean_err=<x> logz_sd=<x>
loop_ratio_vs_handwritten=<x> paired_ratio_vs_handwritten=<x>`` (the last: the median over rounds of
the two times' ratio within a round, steadier than the ratio of medians on a noisy machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved_medians, interleaved_times, paired_ratio  # noqa: E402

import ppinfer as pp  # noqa: E402
from models.classic import lgssm, simulate_lgssm  # noqa: E402
from ppinfer.algorithms.smc import run_loop  # noqa: E402
from semantics import kalman_filter  # noqa: E402

A, Q, C, R, M0, P0 = 0.9, 0.5, 1.0, 1.0, 0.0, 1.0


def handwritten_filter(n: int, per_particle_keys: bool = False, history: bool = False):
    """The reference: a bootstrap filter written directly with lax.scan (no framework). With
    ``per_particle_keys`` each particle draws its noise from its own key, ``fold_in(step_key, i)``,
    as a one-particle program vmapped over particles must — this isolates the cost of that. With
    ``history`` it also records every step's particles and ancestors (``[T, N]`` each), what SMC
    needs to return trajectories — this isolates the cost of recording."""

    @jax.jit
    def run(key, ys):
        t_max = ys.shape[0]

        def step(carry, inp):
            x, log_w, log_z = carry
            key_t, y, t = inp
            k_prop, k_res = jax.random.split(key_t)
            loc = jnp.where(t == 0, M0, A * x)
            scale = jnp.sqrt(jnp.where(t == 0, P0, Q))
            if per_particle_keys:
                site = jax.random.fold_in(k_prop, 0)
                eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(site, i)))(jnp.arange(n))
            else:
                eps = jax.random.normal(k_prop, (n,))
            x = loc + scale * eps
            log_w = log_w - 0.5 * ((y - C * x) ** 2 / R + jnp.log(2 * jnp.pi * R))
            lse = logsumexp(log_w)
            log_z, log_w = log_z + lse, log_w - lse
            ess = 1.0 / jnp.sum(jnp.exp(2 * log_w))

            def resample(args):
                x, log_w = args
                cdf = jnp.cumsum(jnp.exp(log_w))
                u = (jax.random.uniform(k_res) + jnp.arange(n)) / n
                idx = jnp.minimum(jnp.searchsorted(cdf, u * cdf[-1], side="right"), n - 1)
                return x[idx], jnp.full((n,), -jnp.log(n))

            x_t = x
            do = (ess < 0.5 * n) & (t < t_max - 1)
            if history:
                cdf = jnp.cumsum(jnp.exp(log_w))
                u = (jax.random.uniform(k_res) + jnp.arange(n)) / n
                idx = jnp.minimum(jnp.searchsorted(cdf, u * cdf[-1], side="right"), n - 1)
                idx = jnp.where(do, idx, jnp.arange(n))
                x, log_w = x[idx], jnp.where(do, jnp.full((n,), -jnp.log(n)), log_w)
                return (x, log_w, log_z), (x_t, idx)
            x, log_w = jax.lax.cond(do, resample, lambda a: a, (x, log_w))
            return (x, log_w, log_z), None

        init = (jnp.zeros(n), jnp.full((n,), -jnp.log(n)), jnp.zeros(()))
        inputs = (jax.random.split(key, t_max), ys, jnp.arange(t_max))
        (x, log_w, log_z), records = jax.lax.scan(step, init, inputs)
        return (log_z, records) if history else log_z

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 60 s)")
    parser.add_argument("--particles", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=100)
    opts = parser.parse_args()
    n, t_max = opts.particles, opts.steps
    reps, seeds = (15, 10) if opts.quick else (31, 50)

    ys = simulate_lgssm(0, t_max, A, Q, C, R, M0, P0)
    log_z_exact = kalman_filter(A, Q, C, R, M0, P0, ys)[0]
    model = lgssm(A, Q, C, R, M0, P0)
    algorithm = pp.SMC(n, resampling="systematic", ess_threshold=0.5, history=False)
    with_history = pp.SMC(n, resampling="systematic", ess_threshold=0.5)
    # The same loop as one jitted program (no host-side checks, no chunking, no Result): what the
    # compiled steps cost, apart from infer's fixed per-call work.
    loop = algorithm.loop(model, (ys,))
    loop_only = jax.jit(lambda k, y: run_loop(k, model, (y,), loop)["log_evidence"])
    hand = handwritten_filter(n)
    hand_keys = handwritten_filter(n, per_particle_keys=True)
    hand_hist = handwritten_filter(n, history=True)
    ys_dev = jnp.asarray(ys)

    t0 = time.perf_counter()
    pp.infer(model, ys, algorithm=algorithm, key=0)
    compile_pp = time.perf_counter() - t0
    t0 = time.perf_counter()
    pp.infer(model, ys, algorithm=with_history, key=0)
    compile_pp_hist = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop_only(jax.random.PRNGKey(0), ys_dev).block_until_ready()
    compile_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    hand(jax.random.PRNGKey(0), ys_dev).block_until_ready()
    compile_hand = time.perf_counter() - t0
    t0 = time.perf_counter()
    hand_keys(jax.random.PRNGKey(0), ys_dev).block_until_ready()
    compile_hand_keys = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(hand_hist(jax.random.PRNGKey(0), ys_dev))
    compile_hand_hist = time.perf_counter() - t0

    times = interleaved_times(
        {
            "pp": lambda s: pp.infer(model, ys, algorithm=algorithm, key=s),
            "pp_hist": lambda s: pp.infer(model, ys, algorithm=with_history, key=s),
            "loop": lambda s: loop_only(jax.random.PRNGKey(s), ys_dev).block_until_ready(),
            "hand": lambda s: hand(jax.random.PRNGKey(s), ys_dev).block_until_ready(),
            "hand_keys": lambda s: hand_keys(jax.random.PRNGKey(s), ys_dev).block_until_ready(),
            "hand_hist": lambda s: jax.block_until_ready(hand_hist(jax.random.PRNGKey(s), ys_dev)),
        },
        reps,
    )
    medians = {name: float(np.median(ts)) for name, ts in times.items()}
    time_pp, time_hand, time_hand_keys = medians["pp"], medians["hand"], medians["hand_keys"]
    time_hand_hist, time_pp_hist = medians["hand_hist"], medians["pp_hist"]

    log_z_pp = np.array(
        [pp.infer(model, ys, algorithm=algorithm, key=1000 + s).log_evidence for s in range(seeds)]
    )
    log_z_hand = np.array([float(hand(jax.random.PRNGKey(1000 + s), ys_dev)) for s in range(seeds)])
    log_z_keys = np.array([float(hand_keys(jax.random.PRNGKey(1000 + s), ys_dev)) for s in range(seeds)])
    log_z_hist = np.array(
        [float(hand_hist(jax.random.PRNGKey(1000 + s), ys_dev)[0]) for s in range(seeds)]
    )

    log_z_pp_hist = np.array(
        [pp.infer(model, ys, algorithm=with_history, key=1000 + s).log_evidence for s in range(seeds)]
    )
    log_z_loop = np.array([float(loop_only(jax.random.PRNGKey(1000 + s), ys_dev)) for s in range(seeds)])
    rows = [
        ("ppinfer SMC(history=False)", time_pp, compile_pp, log_z_pp),
        ("  its loop, one jit program", medians["loop"], compile_loop, log_z_loop),
        ("ppinfer SMC()", time_pp_hist, compile_pp_hist, log_z_pp_hist),
        ("hand-written lax.scan", time_hand, compile_hand, log_z_hand),
        ("hand-written, key/particle", time_hand_keys, compile_hand_keys, log_z_keys),
        ("hand-written, with history", time_hand_hist, compile_hand_hist, log_z_hist),
    ]
    try:
        import particles
        from particles import kalman
        from particles import state_space_models as ssm

        lg = kalman.LinearGauss(rho=A, sigmaX=np.sqrt(Q), sigmaY=np.sqrt(R), sigma0=np.sqrt(P0))

        def run_particles(seed):
            np.random.seed(seed)
            pf = particles.SMC(
                fk=ssm.Bootstrap(ssm=lg, data=ys.astype(np.float64)),
                N=n,
                resampling="systematic",
                ESSrmin=0.5,
                store_history=False,
            )
            pf.run()
            return pf.logLt

        time_particles = interleaved_medians({"particles": run_particles}, max(3, reps // 2))["particles"]
        log_z_particles = np.array([run_particles(1000 + s) for s in range(min(seeds, 10))])
        rows.append(("particles (numpy)", time_particles, float("nan"), log_z_particles))
    except ImportError:
        print("(particles not installed: skipping that peer)")

    print(f"LGSSM bootstrap filter, T={t_max}, N={n}, device={jax.devices()[0].platform}")
    print(f"exact log Z (Kalman) = {log_z_exact:.4f}")
    print(
        f"{'implementation':<28}{'median s':>10}{'compile s':>11}{'vs hand':>9}{'logZ err':>10}{'logZ sd':>9}"
    )
    for name, t, c, lz in rows:
        err = lz.mean() - log_z_exact
        print(f"{name:<28}{t:>10.4f}{c:>11.2f}{t / time_hand:>9.2f}{err:>10.4f}{lz.std():>9.4f}")
    err, sd = log_z_pp.mean() - log_z_exact, log_z_pp.std()
    print(
        f"SMC() (trajectories recorded) vs the hand-written filter that records them too: "
        f"{time_pp_hist / time_hand_hist:.3f}; vs the plain hand-written filter: "
        f"{time_pp_hist / time_hand:.3f}"
    )
    print(
        f"SMC(history=False) = its compiled loop ({medians['loop'] / time_hand:.3f}x the hand-written "
        f"filter) + infer's fixed work per call ({(time_pp - medians['loop']) * 1e3:.2f} ms: host-side "
        "checks, start/chunk/output programs, Result)"
    )
    print(
        f"RESULT ratio_vs_handwritten={time_pp / time_hand:.3f} logz_mean_err={err:.4f} logz_sd={sd:.4f} "
        f"loop_ratio_vs_handwritten={medians['loop'] / time_hand:.3f} "
        f"paired_ratio_vs_handwritten={paired_ratio(times, 'pp', 'hand'):.3f}"
    )


if __name__ == "__main__":
    main()
