"""Resample-move SMC and PMMH on a linear-Gaussian state-space model with an unknown static
coefficient ``a``, against the exact posterior of ``a`` on a grid (Kalman likelihood)."""

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppinfer as pp
from models.classic import simulate_lgssm
from ppinfer.algorithms.resample_move import ResampleMoveSMC
from ppinfer.errors import ConfigError, ModelError
from semantics import kalman_filter

Q, R, P0, PRIOR_SD = 0.5, 0.5, 1.0, 0.5


def init(ys):
    a = pp.sample("a", dist.Normal(0.0, PRIOR_SD))
    return (a, jnp.zeros(()))


def step(state, t, ys):
    a, x = state
    loc = jnp.where(t == 0, 0.0, a * x)
    x = pp.sample("x", dist.Normal(loc, jnp.sqrt(jnp.where(t == 0, P0, Q))))
    pp.observe("y", dist.Normal(x, np.sqrt(R)), ys[t])
    return (a, x)


PROGRAM = pp.sequential(init, step, lambda ys: ys.shape[0])


@pytest.fixture(scope="module")
def data():
    ys = simulate_lgssm(4, 60, 0.8, Q, 1.0, R)
    grid = np.linspace(-2.5, 2.5, 1001)
    log_lik = np.array([kalman_filter(a, Q, 1.0, R, 0.0, P0, ys)[0] for a in grid])
    log_post = log_lik - 0.5 * grid**2 / PRIOR_SD**2
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    mean = float(np.sum(w * grid))
    sd = float(np.sqrt(np.sum(w * (grid - mean) ** 2)))
    return ys, mean, sd


def test_resample_move_rejuvenates_static_parameter(data):
    ys, mean, sd = data
    plain = pp.infer(PROGRAM, ys, algorithm=pp.SMC(400), key=0)
    rm = pp.infer(PROGRAM, ys, algorithm=ResampleMoveSMC(400, move_sites=("a",), num_moves=2), key=0)
    unique_plain = len(np.unique(np.asarray(plain.samples["a"])))
    unique_rm = len(np.unique(np.asarray(rm.samples["a"])))
    # Plain SMC never redraws `a`: resampling collapses it onto a handful of values.
    assert unique_plain < 20 and unique_rm > 200
    # Moves keep the posterior of `a`: mean within 0.5 posterior sd, sd within 30 %.
    assert abs(float(rm.mean("a")) - mean) < 0.5 * sd
    assert float(rm.std("a")) == pytest.approx(sd, rel=0.3)
    assert abs(float(rm.mean("a")) - mean) < abs(float(plain.mean("a")) - mean) + 0.1 * sd
    assert rm.samples["x"].shape == (400, 60)
    assert float(np.max(np.asarray(rm.extras["acceptance_rate"]))) > 0.1


def test_resample_move_errors():
    with pytest.raises(ConfigError):
        ResampleMoveSMC(10, move_sites=())
    with pytest.raises(ConfigError):
        ResampleMoveSMC(10, move_sites=("a",), num_moves=0)
    ys = np.zeros(3, np.float32)
    with pytest.raises(ModelError, match="not a latent site"):
        pp.infer(PROGRAM, ys, algorithm=ResampleMoveSMC(10, move_sites=("b",)))
    with pytest.raises(ConfigError, match="sequential"):
        pp.infer(lambda: None, algorithm=ResampleMoveSMC(10, move_sites=("a",)))
