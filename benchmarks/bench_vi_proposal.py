"""Learned SMC proposal vs the bootstrap filter on a linear-Gaussian state-space model.

Trains an affine-Gaussian proposal ``q(x_t | x_{t−1}, y_t)`` with the variational-SMC objective
(``ppinfer.vi.VSMC``), then runs R independent SMC filters with N particles each with the prior
(bootstrap) proposal and with the learned one, and compares the mean per-step ESS and the variance of
``log Ẑ`` (and its bias against the exact Kalman-filter ``log Z``).

    python benchmarks/bench_vi_proposal.py [--quick]

Ends with ``RESULT ess_gain=<learned/bootstrap mean ESS> logz_var_ratio=<bootstrap/learned var>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppinfer as pp  # noqa: E402
import ppinfer.vi  # noqa: E402, F401
from models.classic import lgssm, simulate_lgssm  # noqa: E402
from ppinfer.algorithms.smc import run_loop  # noqa: E402
from ppinfer.vi import VI, VSMC, affine_gaussian_proposal  # noqa: E402
from semantics import kalman_filter  # noqa: E402

LG = dict(a=0.9, q=1.0, c=1.0, r=0.1)


def features(x, t, ys):
    return jnp.stack([x, ys[t]])


def replicate(program, ys, n, reps, proposal):
    """``(log Ẑ: f[R], mean ESS / N: f[R])`` of R independent SMC runs (vmapped, jitted)."""

    @jax.jit
    def run(keys):
        def one(k):
            out = run_loop(k, program, (ys,), pp.SMC(n, proposal=proposal).loop(program, (ys,)))
            return out["log_evidence"], jnp.mean(out["ess"]) / n

        return jax.vmap(one)(keys)

    log_z, ess = run(jax.random.split(jax.random.PRNGKey(123), reps))
    return np.asarray(log_z), np.asarray(ess)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small run (< 60 s)")
    opts = parser.parse_args()
    steps, train_steps, reps, n = (30, 300, 200, 32) if opts.quick else (100, 1500, 1000, 64)
    ys = jnp.asarray(simulate_lgssm(0, steps, **LG))
    program = lgssm(**LG)
    log_z_exact = kalman_filter(LG["a"], LG["q"], LG["c"], LG["r"], 0.0, 1.0, np.asarray(ys))[0]

    t0 = time.perf_counter()
    guide = affine_gaussian_proposal("x", features, 2)
    vi = VI(
        VSMC(num_particles=16),
        guide,
        optax.adam(optax.exponential_decay(0.1, train_steps, 0.1)),
        train_steps,
        num_particles=n,
        chunk_size=100,
    )
    fitted = pp.infer(program, ys, algorithm=vi, key=0)
    train_time = time.perf_counter() - t0
    learned = pp.vi.bind_params(guide, fitted.extras["params"])
    trace = fitted.extras["objective_trace"]

    rows = []
    for name, proposal in (("bootstrap", None), ("learned", learned)):
        log_z, ess = replicate(program, ys, n, reps, proposal)
        rows.append((name, float(np.mean(ess)), float(np.var(log_z)), float(np.mean(log_z) - log_z_exact)))

    print(f"LGSSM a={LG['a']} q={LG['q']} c={LG['c']} r={LG['r']}, T={steps}, N={n}, R={reps} runs")
    print(
        f"VSMC training: {train_steps} steps in {train_time:.1f} s; objective (log Ẑ, N=16) "
        f"first 10 mean {np.mean(trace[:10]):.2f} -> last 10 mean {np.mean(trace[-10:]):.2f}; "
        f"exact log Z {log_z_exact:.2f}"
    )
    print(f"{'proposal':<10} {'mean ESS/N':>10} {'var log Z':>10} {'bias log Z':>11}")
    for name, ess, var, bias in rows:
        print(f"{name:<10} {ess:>10.3f} {var:>10.4f} {bias:>11.4f}")
    ess_gain = rows[1][1] / rows[0][1]
    var_ratio = rows[0][2] / rows[1][2]
    print(f"RESULT ess_gain={ess_gain:.2f} logz_var_ratio={var_ratio:.2f}")


if __name__ == "__main__":
    main()
