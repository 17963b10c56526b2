"""PMMH recovers a static parameter of a linear-Gaussian SSM (exact reference: Kalman grid)."""

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppinfer as pp
from models.classic import simulate_lgssm
from ppinfer.algorithms.pmmh import PMMH
from semantics import kalman_filter

Q, C, R = 0.5, 1.0, 0.5


def prior(ys):
    pp.sample("a", dist.Uniform(-1.0, 1.0))


def init(theta, ys):
    return jnp.zeros(())


def step(x, t, theta, ys):
    a = theta["a"]
    x = pp.sample("x", dist.Normal(jnp.where(t == 0, 0.0, a * x), jnp.sqrt(jnp.where(t == 0, 1.0, Q))))
    pp.observe("y", dist.Normal(C * x, np.sqrt(R)), ys[t])
    return x


def test_pmmh_matches_exact_parameter_posterior():
    ys = simulate_lgssm(3, 40, 0.7, Q, C, R)
    grid = np.linspace(-0.999, 0.999, 2001)
    log_lik = np.array([kalman_filter(a, Q, C, R, 0.0, 1.0, ys)[0] for a in grid])
    w = np.exp(log_lik - log_lik.max())
    w /= w.sum()
    exact_mean = float(np.sum(w * grid))
    exact_sd = float(np.sqrt(np.sum(w * (grid - exact_mean) ** 2)))

    program = pp.sequential(init, step, lambda theta, ys: ys.shape[0])
    algorithm = PMMH(prior, num_particles=64, num_samples=1500, num_warmup=300, num_chains=4)
    r = pp.infer(program, ys, algorithm=algorithm, key=0)
    import arviz as az

    idata = r.to_arviz()
    mcse = float(az.mcse(idata)["a"])
    rhat = float(az.rhat(idata)["a"])
    assert rhat < 1.05
    assert 0.1 < float(np.mean(r.extras["acceptance_rate"])) < 0.6
    # Mean within 4 MCSE (false-failure rate ~6e-5 if the MCSE is right) of the exact posterior mean.
    assert abs(float(r.mean("a")) - exact_mean) < 4 * mcse + 0.005
    assert float(r.std("a")) == pytest.approx(exact_sd, rel=0.2)


def test_pmmh_settings_are_checked():
    with pytest.raises(pp.ConfigError, match="num_samples"):
        PMMH(prior, num_samples=0)
    with pytest.raises(pp.ConfigError, match="sequential"):
        pp.infer(prior, np.zeros(3, np.float32), algorithm=PMMH(prior))
