"""ppinfer's ELBO optimisation step vs NumPyro's SVI step, side by side in one process.

Same model, same guide (a mean-field Normal guide written with ``numpyro.param``/``sample``, the
function NumPyro's ``AutoNormal`` would build — written out because the autoguide's set-up runs the
model eagerly, ~180 small compilations, too slow for ``--quick``), same initial parameters, same optax
optimizer (Adam), same number of particles per step, both as one ``jax.jit``-compiled ``lax.scan``
of S steps:

- ppinfer: :func:`ppinfer.vi.build_step` with ``elbo(K)`` (what ``VI`` runs);
- NumPyro: ``numpyro.infer.SVI(model, guide, optax.adam, Trace_ELBO(num_particles=K)).update``.

Models: a hierarchical (varying-intercept) linear regression and a Bayesian neural net with two
tanh hidden layers. Each scan is compiled and run once (warm-up), then timed as the median of
``reps`` interleaved runs (``benchmarks/_timing.py``). The final ELBO of each fit is the mean of the
objective over its last 100 steps (both traces record the same K-particle ELBO estimate) and, in the
full run, an independent estimate by one estimator for both (NumPyro's ``Trace_ELBO`` with 2000
particles, fixed key).

    python benchmarks/bench_vi.py [--quick]

Ends with ``RESULT step_ratio_vs_numpyro=<x>``: ppinfer time per step / NumPyro time per step,
geometric mean over the two models (target ≤ 1.1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import SVI, Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppinfer as pp  # noqa: E402
from benchmarks._timing import interleaved_medians  # noqa: E402
from ppinfer.vi import build_step, constrain, elbo, find_params, init_fit_state, unconstrain  # noqa: E402


def hierarchical_regression(num_groups: int, num_obs: int, seed: int = 0):
    """Varying intercepts ``a_j ~ N(μ, σ_a)``, common slope: ``y_i ~ N(a_{g_i} + β x_i, σ)``."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, num_groups, num_obs).astype(np.int32)
    x = rng.normal(size=num_obs).astype(np.float32)
    a = rng.normal(1.0, 0.7, num_groups)
    y = (a[group] + 0.5 * x + rng.normal(0.0, 0.4, num_obs)).astype(np.float32)

    def model(group, x, y):
        mu = pp.sample("mu", dist.Normal(0.0, 5.0))
        sigma_a = pp.sample("sigma_a", dist.HalfNormal(2.0))
        beta = pp.sample("beta", dist.Normal(0.0, 5.0))
        sigma = pp.sample("sigma", dist.HalfNormal(2.0))
        with pp.plate("groups", num_groups):
            a = pp.sample("a", dist.Normal(mu, sigma_a))
        with pp.plate("data", num_obs):
            pp.observe("y", dist.Normal(a[group] + beta * x, sigma), y)

    guide = mean_field_guide(
        {"mu": (), "sigma_a": (), "beta": (), "sigma": (), "a": (num_groups,)},
        positive=("sigma_a", "sigma"),
        plates={"a": ("groups", num_groups)},
    )
    return model, guide, (jnp.asarray(group), jnp.asarray(x), jnp.asarray(y))


def bayesian_nn(num_obs: int, dim: int, hidden: int, seed: int = 0):
    """Two tanh hidden layers of width ``hidden``, standard-normal weights, ``y ~ N(f(x), σ)``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_obs, dim)).astype(np.float32)
    y = (np.sin(x @ rng.normal(size=dim)) + 0.1 * rng.normal(size=num_obs)).astype(np.float32)

    def model(x, y):
        w1 = pp.sample("w1", dist.Normal(0.0, 1.0).expand([dim, hidden]).to_event(2))
        b1 = pp.sample("b1", dist.Normal(0.0, 1.0).expand([hidden]).to_event(1))
        w2 = pp.sample("w2", dist.Normal(0.0, 1.0).expand([hidden, hidden]).to_event(2))
        b2 = pp.sample("b2", dist.Normal(0.0, 1.0).expand([hidden]).to_event(1))
        w3 = pp.sample("w3", dist.Normal(0.0, 1.0).expand([hidden]).to_event(1))
        sigma = pp.sample("sigma", dist.HalfNormal(1.0))
        h = jnp.tanh(jnp.tanh(x @ w1 + b1) @ w2 + b2)
        with pp.plate("data", num_obs):
            pp.observe("y", dist.Normal(h @ w3, sigma), y)

    shapes = {"w1": (dim, hidden), "b1": (hidden,), "w2": (hidden, hidden), "b2": (hidden,), "w3": (hidden,)}
    guide = mean_field_guide({**shapes, "sigma": ()}, positive=("sigma",))
    return model, guide, (jnp.asarray(x), jnp.asarray(y))


def mean_field_guide(shapes: dict[str, tuple], positive: tuple = (), plates: dict | None = None):
    """``q(z) = Π_s N(z_s; m_s, σ_s)`` (log-normal for the ``positive`` sites), ``σ_s > 0`` through
    NumPyro's positive constraint: the family of NumPyro's ``AutoNormal``, initialised at ``m = 0``,
    ``σ = 0.1``. ``plates``: site → (plate name, size) for a site the model draws in a plate."""
    plates = plates or {}

    def guide(*args):
        for name, shape in shapes.items():
            loc = numpyro.param(f"{name}_loc", jnp.zeros(shape))
            scale = numpyro.param(f"{name}_scale", jnp.full(shape, 0.1), constraint=dist.constraints.positive)
            d = (dist.LogNormal if name in positive else dist.Normal)(loc, scale)
            if name in plates:
                with pp.plate(*plates[name]):
                    pp.sample(name, d)
            else:
                pp.sample(name, d.to_event(len(shape)))

    return guide


def bench_model(name, model, guide, args, num_steps, num_particles, reps, full_eval, lr=1e-2):
    """Time per step of both (median of ``reps`` interleaved runs of ``num_steps`` steps) and the
    final ELBO of both fits."""
    optimizer = optax.adam(lr)
    svi = SVI(model, guide, optimizer, Trace_ELBO(num_particles=num_particles))
    svi_state0 = svi.init(jax.random.PRNGKey(0), *args)
    init = svi.get_params(svi_state0)  # constrained

    spec = find_params(jax.random.PRNGKey(0), [(guide, args)])
    assert set(spec.init) == set(init), (sorted(spec.init), sorted(init))
    u0 = {n: unconstrain(v, spec.constraints[n]) for n, v in init.items()}
    step = build_step(model, guide, elbo(num_particles), optimizer, spec.constraints)
    state0 = init_fit_state(u0, optimizer)

    @jax.jit
    def run_pp(key, state, args):
        body = lambda s, _: step(jax.random.fold_in(key, s.step), s, args)
        return jax.lax.scan(body, state, None, length=num_steps)

    @jax.jit
    def run_np(key, svi_state, args):
        body = lambda s, _: svi.update(s, *args)
        return jax.lax.scan(body, svi_state._replace(rng_key=key), None, length=num_steps)

    t0 = time.perf_counter()
    out_pp = jax.block_until_ready(run_pp(jax.random.PRNGKey(1), state0, args))
    t_compile_pp = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_np = jax.block_until_ready(run_np(jax.random.PRNGKey(1), svi_state0, args))
    t_compile_np = time.perf_counter() - t0

    fns = {
        "ppinfer": lambda s: jax.block_until_ready(run_pp(jax.random.PRNGKey(s), state0, args)),
        "numpyro": lambda s: jax.block_until_ready(run_np(jax.random.PRNGKey(s), svi_state0, args)),
    }
    med = interleaved_medians(fns, reps)

    # Both traces record the K-particle ELBO estimate at each step (NumPyro's loss is −ELBO).
    last_pp = float(np.mean(np.asarray(out_pp[1].objective)[-100:]))
    last_np = float(-np.mean(np.asarray(out_np[1])[-100:]))
    elbo_pp = elbo_np = float("nan")
    if full_eval:
        final = Trace_ELBO(num_particles=2000)
        ev = jax.jit(lambda p: -final.loss(jax.random.PRNGKey(7), p, model, guide, *args))
        elbo_pp = float(ev(constrain(out_pp[0].params, spec.constraints)))
        elbo_np = float(ev(svi.get_params(out_np[0])))

    per_pp, per_np = med["ppinfer"] / num_steps * 1e6, med["numpyro"] / num_steps * 1e6
    print(
        f"{name:24s} {per_pp:10.1f} {per_np:10.1f} {per_pp / per_np:6.3f}  "
        f"{last_pp:10.2f} {last_np:10.2f}  {elbo_pp:10.2f} {elbo_np:10.2f}  "
        f"{t_compile_pp:5.1f}/{t_compile_np:4.1f}"
    )
    return per_pp / per_np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    a = parser.parse_args()
    num_steps, reps, k = (500, 15, 4) if a.quick else (2000, 21, 4)
    reps = a.reps or reps
    numpyro.enable_validation(False)
    print(f"jax {jax.__version__}, numpyro {numpyro.__version__}, backend {jax.default_backend()}")
    print(f"{num_steps} steps per timed run, {k} particles per step, median of {reps} interleaved runs")
    print(
        f"{'model':24s} {'pp us/step':>10s} {'np us/step':>10s} {'ratio':>6s}  {'ELBO pp':>10s} "
        f"{'ELBO np':>10s}  {'ELBO2k pp':>10s} {'ELBO2k np':>10s}  compile s pp/np"
    )
    full = not a.quick
    ratios = [
        bench_model("hierarchical_regression", *hierarchical_regression(8, 200), num_steps, k, reps, full),
        bench_model("bnn_2layer", *bayesian_nn(128, 4, 16), num_steps, k, reps, full),
    ]
    ratio = float(np.exp(np.mean(np.log(ratios))))
    print(f"ELBO: mean of the last 100 steps' {k}-particle ELBO estimates of the fit; ELBO2k: NumPyro's")
    print("Trace_ELBO(2000 particles) at the fitted parameters, same key for both (full run only).")
    print(f"RESULT step_ratio_vs_numpyro={ratio:.3f}")


if __name__ == "__main__":
    main()
