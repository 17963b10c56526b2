"""The sufficient-statistics path: time and memory per update do not grow with the number of
updates (the history path's moves re-score every batch so far; this one re-scores O(1) statistics)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import ppinfer as pp
from ppinfer.updates import IBIS


def model(n, sum_y, sum_y2):
    """``y_i ~ N(mu, 1)``: ``log p(y_{1:t} | mu)`` from (n, Σy, Σy²)."""
    mu = pp.sample("mu", dist.Normal(0.0, 1.0))
    pp.factor("y", -0.5 * (sum_y2 - 2 * mu * sum_y + n * mu**2) - 0.5 * n * jnp.log(2 * jnp.pi))


def stats(y):
    return (jnp.float32(y.shape[0]), jnp.sum(y), jnp.sum(y**2))


def state_bytes(post) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(post.ibis))


def test_time_and_memory_per_update_stay_flat(capfd):
    ys = np.random.default_rng(0).normal(0.5, 1.0, (160, 4)).astype(np.float32)
    cfg = IBIS(num_particles=256, num_moves=3, ess_threshold=1.0, sufficient_statistics=stats)
    post = pp.infer(model, ys[0], algorithm=cfg, key=0)  # resample and move at every update
    post = post.update(ys[1])  # compiles the update
    capfd.readouterr()
    times, sizes = [], []
    for batch in ys[2:]:
        post = post.update(batch)
        times.append(post.wall_time)
        sizes.append(state_bytes(post))
    # The deterministic half: every later update runs the one compiled program on a state of one
    # size (the history path re-compiles as its buffer doubles and its state grows).
    assert "compiling" not in capfd.readouterr().err
    assert len(set(sizes)) == 1
    # The timed half, loose because a loaded CI machine is noisy: the fastest of 40 early updates
    # against the fastest of the last 40. A cost ∝ t (the history path) would be ~4.7× here.
    early, late = min(times[10:50]), min(times[-40:])
    assert late < 3.0 * early, (early, late)
    exact_mean = ys.sum() / (ys.size + 1)
    assert abs(float(post.mean("mu")) - exact_mean) < 0.25 / np.sqrt(ys.size + 1)
