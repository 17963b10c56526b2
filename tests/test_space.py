"""The one parameter space (ppinfer.kernels.space): round trip, Jacobian, pushed prior, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import integrate, stats

import ppinfer as pp
from ppinfer.kernels.space import space_of


def model(y):
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    p = numpyro.sample("p", dist.Beta(2.0, 3.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]))
    numpyro.sample("y", dist.Normal(mu * p, s), obs=y)


Y = jnp.zeros(2)


def test_round_trip_and_layout():
    sp = space_of(model, (Y,))
    assert sp.names == ("mu", "p", "s") and sp.dim == 4
    u = sp.draw(jax.random.PRNGKey(3), Y)
    x, _ = sp.constrain(u)
    assert x["s"] > 0 and 0 < x["p"] < 1 and x["mu"].shape == (2,)
    np.testing.assert_allclose(sp.unconstrain(x), u, rtol=1e-5, atol=1e-5)


def test_log_prior_is_prior_density_plus_numerical_log_jacobian():
    sp = space_of(model, (Y,))
    u = jnp.array([0.3, -0.2, 0.7, -0.4])
    x, log_det = sp.constrain(u)
    # The map is coordinate-wise: the Jacobian is diagonal; compare with finite differences.
    jac = jax.jacfwd(lambda v: jnp.concatenate([jnp.ravel(sp.constrain(v)[0][n]) for n in sp.names]))(u)
    assert float(log_det) == pytest.approx(float(jnp.sum(jnp.log(jnp.abs(jnp.diag(jac))))), abs=1e-5)
    expected = (
        stats.halfnorm.logpdf(float(x["s"]))
        + stats.beta.logpdf(float(x["p"]), 2, 3)
        + stats.norm.logpdf(np.asarray(x["mu"])).sum()
        + float(log_det)
    )
    assert float(sp.log_prior(u, Y)) == pytest.approx(expected, abs=1e-4)  # observations excluded


def test_pushed_prior_integrates_to_one():
    def one(y):
        numpyro.sample("s", dist.Gamma(2.0, 1.5))

    sp = space_of(one, (None,))
    density = lambda v: float(jnp.exp(sp.log_prior(jnp.array([v]), None)))
    total, err = integrate.quad(density, -20, 10)
    assert total == pytest.approx(1.0, abs=1e-6)
    # A density that forgot the Jacobian integrates to something else: the check can fail.
    wrong = lambda v: float(jnp.exp(sp.log_prior(jnp.array([v]), None) - sp.constrain(jnp.array([v]))[1]))
    assert abs(integrate.quad(wrong, -20, 10)[0] - 1.0) > 0.1


def test_errors():
    def discrete(y):
        numpyro.sample("k", dist.Poisson(1.0))

    def nothing(y):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(pp.ModelError, match="discrete"):
        space_of(discrete, (None,))
    with pytest.raises(pp.ConfigError, match="discrete"):
        space_of(discrete, (None,), error=pp.ConfigError)
    with pytest.raises(pp.ModelError, match="no latent"):
        space_of(nothing, (0.0,))
    with pytest.raises(pp.ConfigError, match="'z'"):
        space_of(model, (Y,), sites=("z",))
    sub = space_of(model, (Y,), sites=("s",))
    assert sub.names == ("s",) and sub.dim == 1
