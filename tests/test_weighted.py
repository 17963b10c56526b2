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


def test_a_support_that_depends_on_a_latent_gives_the_exact_posterior():
    # θ ~ Exp(1), y | θ ~ Uniform(0, θ), y = 2: p(θ | y) ∝ e^{−θ}/θ on θ > 2. The program used to be
    # refused as "data outside the support" whenever the dry run drew θ < 2.
    from scipy import integrate

    def program(y):
        theta = pp.sample("theta", dist.Exponential(1.0))
        pp.observe("y", dist.Uniform(0.0, theta), y)

    r = pp.infer(program, 2.0, algorithm=pp.Importance(40_000), key=1)
    z = integrate.quad(lambda t: np.exp(-t) / t, 2.0, np.inf)[0]
    mean = integrate.quad(lambda t: np.exp(-t), 2.0, np.inf)[0] / z
    theta = np.asarray(r.samples["theta"])
    assert np.all(theta[np.isfinite(np.asarray(r.log_weights))] > 2.0)
    # Self-normalised IS, 40,000 draws (a third inside the support): sd of the mean ≈ 0.01, of log Ẑ ≈ 0.01.
    np.testing.assert_allclose(float(r.mean("theta")), mean, atol=0.05)
    np.testing.assert_allclose(r.log_evidence, np.log(z), atol=0.05)


def test_data_outside_a_fixed_support_is_refused_on_every_call():
    # The dry run refuses data outside a fixed support (a Bernoulli's {0, 1}) by name, and an MCMC
    # run compiled for good data used to skip it: the same bad data then gave frozen chains. A
    # particle run compiled for good data finds every particle impossible and says why.
    def program(y):
        p = pp.sample("p", dist.Beta(1.0, 1.0))
        with pp.plate("d", y.shape[0]):
            pp.observe("y", dist.Bernoulli(p), y)

    bad, good = jnp.array([0.0, 1.0, 2.0]), jnp.array([0.0, 1.0, 1.0])
    named = (pp.DataError, r"site 'y' lies outside the support.*element \[2\]")
    dead = (pp.ZeroEvidenceError, "outside its distribution's support")
    mcmc = pp.MCMC(pp.SingleSiteMH(), num_samples=20, num_warmup=10, progress_bar=False)
    for algorithm, again in ((mcmc, named), (pp.Importance(100), dead)):
        with pytest.raises(named[0], match=named[1]):
            pp.infer(program, bad, algorithm=algorithm, key=0)
        assert np.isfinite(pp.infer(program, good, algorithm=algorithm, key=0).samples["p"]).all()
        with pytest.raises(again[0], match=again[1]):
            pp.infer(program, bad, algorithm=algorithm, key=0)
