import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro import handlers

import ppinfer as pp
from ppinfer.primitives import collect_stops
from ppinfer.weighted import simulate, site_log_prob


def model(y):
    z = pp.sample("z", dist.Normal(0.0, 1.0))
    pp.deterministic("z2", z * 2)
    pp.observe("y", dist.Normal(z, 0.5), y)
    return z


def guide(y):
    pp.sample("z", dist.Normal(1.0, 0.3))


def test_likelihood_weighting_weight_is_log_likelihood():
    w, info = simulate(jax.random.PRNGKey(0), model, (0.7,))
    z = w.choices["z"]
    np.testing.assert_allclose(w.log_weight, dist.Normal(z, 0.5).log_prob(0.7), rtol=1e-5)
    np.testing.assert_allclose(w.choices["z2"], 2 * z)
    assert set(info.nan_sites) == {"y"} and not bool(info.nan_sites["y"])


def test_proposal_weight_is_log_p_over_q():
    w, _ = simulate(jax.random.PRNGKey(1), model, (0.7,), proposal=guide)
    z = w.choices["z"]
    expected = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, 0.5).log_prob(0.7)
        - dist.Normal(1.0, 0.3).log_prob(z)
    )
    np.testing.assert_allclose(w.log_weight, expected, rtol=1e-5)


def test_proposal_with_unknown_or_observed_site_is_an_error():
    bad = lambda y: pp.sample("w", dist.Normal(0, 1))
    with pytest.raises(pp.ModelError, match="does not have"):
        simulate(jax.random.PRNGKey(0), model, (0.7,), proposal=bad)
    observed = lambda y: pp.sample("y", dist.Normal(0, 1))
    with pytest.raises(pp.ModelError, match="observes"):
        simulate(jax.random.PRNGKey(0), model, (0.7,), proposal=observed)


def test_simulate_vmaps_and_jits():
    run = jax.jit(jax.vmap(lambda k: simulate(k, model, (0.7,))[0].log_weight))
    assert run(jax.random.split(jax.random.PRNGKey(0), 7)).shape == (7,)


def test_mask_and_scale_follow_numpyro():
    def m():
        x = pp.sample("x", dist.Normal(0, 1))
        with handlers.scale(scale=3.0):
            pp.observe("a", dist.Normal(x, 1), 1.0)
        with handlers.mask(mask=False):
            pp.observe("b", dist.Normal(x, 1), 1.0)

    w, _ = simulate(jax.random.PRNGKey(0), m)
    x = w.choices["x"]
    np.testing.assert_allclose(w.log_weight, 3 * dist.Normal(x, 1).log_prob(1.0), rtol=1e-5)
    tr = handlers.trace(handlers.seed(m, 0)).get_trace()
    assert float(site_log_prob(tr["b"])) == 0.0


def test_condition_and_observe_primitives():
    def m():
        x = pp.sample("x", dist.Bernoulli(0.5))
        pp.condition("c", x == 1)
        return x

    for seed in range(6):
        w, _ = simulate(jax.random.PRNGKey(seed), m)
        assert float(w.log_weight) == (0.0 if int(w.value) == 1 else -np.inf)
    with pytest.raises(pp.DataError, match="NaN"):
        pp.observe("y", dist.Normal(0, 1), jnp.array([1.0, jnp.nan]))


def test_stop_is_collected_and_harmless_outside_an_engine():
    pp.stop(True)  # no handler: no effect
    stops = collect_stops()
    with stops:
        pp.stop(False)
        pp.stop(jnp.array(True))
    assert bool(stops.stopped)
