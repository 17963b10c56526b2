"""VSBC (ppinfer.vi.vsbc): passes a guide whose family contains the posterior, flags a biased one.

Model: ``μ ∈ R², μ_j ~ N(0, 1)``, ``y_ij ~ N(μ_j, 1)``, i = 1..5: the posterior is
``N(Σ_i y_ij / 6, 1/6)`` per component. Each VSBC run: M = 100 simulated data sets, a fit of 300
steps each, L = 200 guide draws. Tests at false-failure rate α = 0.01 (Bonferroni over the two
components); the seeds are fixed, so the outcome is reproducible.
"""

import itertools

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from scipy.stats import ks_2samp

import ppinfer as pp
from ppinfer.vi import elbo
from ppinfer.vi.calibration import max_walk_tail, symmetry_test, vsbc

N = 5
POST_SD = float(np.sqrt(1.0 / (N + 1)))
Y = jnp.zeros((N, 2))  # shapes only: vsbc simulates the data


def model(y):
    mu = pp.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pp.plate("obs", N):
        pp.observe("y", dist.Normal(mu, 1.0).to_event(1), y)


def exact_guide(y):
    """Normal family with free mean and scale: contains the posterior."""
    m = numpyro.param("m", jnp.zeros(2))
    s = numpyro.param("s", jnp.ones(2), constraint=dist.constraints.positive)
    pp.sample("mu", dist.Normal(m, s).to_event(1))


def biased_guide(y):
    """Component 0: the exact posterior mean shifted by +0.7 posterior sd (scale fitted) — biased.
    Component 1: mean fitted, scale fixed at 0.4 × the posterior sd — unbiased but underdispersed."""
    s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
    m = numpyro.param("m", 0.0)
    loc = jnp.stack([jnp.sum(y[:, 0]) / (N + 1) + 0.7 * POST_SD, m])
    pp.sample("mu", dist.Normal(loc, jnp.stack([s, 0.4 * POST_SD])).to_event(1))


def run(guide, key):
    opt = optax.adam(optax.exponential_decay(0.1, 300, 0.05))
    return vsbc(
        model, guide, (Y,), objective=elbo(4), optimizer=opt, num_steps=300, num_simulations=100,
        num_draws=200, false_failure_rate=0.01, key=key,
    )  # fmt: skip


def test_exact_guide_passes():
    r = run(exact_guide, 0)
    assert r.probabilities["mu"].shape == (100, 2)
    assert r.true_values["mu"].shape == (100, 2)
    assert np.all((r.probabilities["mu"] > 0) & (r.probabilities["mu"] < 1))
    assert r.passed("symmetry"), r.symmetry_pvalues
    assert r.passed("uniformity"), r.uniformity_pvalues


def test_biased_guide_is_flagged():
    """VSBC (symmetry) flags the shifted component only: it checks average bias, not dispersion;
    the uniformity (SBC) test flags both."""
    r = run(biased_guide, 1)
    assert not r.passed("symmetry")
    np.testing.assert_array_equal(r.flagged("symmetry")["mu"], [True, False])
    np.testing.assert_array_equal(r.flagged("uniformity")["mu"], [True, True])
    # More of the simulated truths fall below the (shifted-up) guide's median.
    assert np.mean(r.probabilities["mu"][:, 0] < 0.5) > 0.6
    # The underdispersed component's probabilities pile up at both ends.
    assert np.mean(np.abs(r.probabilities["mu"][:, 1] - 0.5) > 0.4) > 0.4


def test_max_walk_tail_matches_enumeration():
    for n in (1, 2, 7, 12):
        walks = np.cumsum(np.asarray(list(itertools.product((-1, 1), repeat=n))), axis=1)
        peak = np.max(np.abs(walks), axis=1)
        for level in range(0, n + 2):
            assert max_walk_tail(n, level) == pytest.approx(np.mean(peak >= level), abs=1e-12), (n, level)


def test_symmetry_statistic_is_ks_distance_between_p_and_one_minus_p():
    rng = np.random.default_rng(0)
    for p in (rng.uniform(size=50), rng.beta(2.0, 5.0, size=80)):
        stat, _ = symmetry_test(p)
        assert stat == pytest.approx(ks_2samp(p, 1.0 - p).statistic, abs=1e-12)


def test_symmetry_test_false_failure_rate():
    """Under a symmetric law the rejection rate at level 0.05 is ≤ 0.05 (the p-value is exact and
    discrete, hence conservative): bound 0.05 + 3.9 standard errors (false-failure rate 1e-4); and a
    skewed law is rejected most of the time."""
    rng = np.random.default_rng(1)
    reps, alpha = 2000, 0.05
    null = np.asarray([symmetry_test(rng.beta(0.5, 0.5, size=60))[1] for _ in range(reps)])
    assert np.mean(null < alpha) <= alpha + 3.9 * np.sqrt(alpha * (1 - alpha) / reps)
    assert np.mean(null < alpha) > 0.5 * alpha  # not vacuous: it does reject at about the level
    skewed = np.asarray([symmetry_test(rng.beta(1.0, 2.0, size=60))[1] for _ in range(200)])
    assert np.mean(skewed < alpha) > 0.8


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(pp.ConfigError, match="num_simulations"):
        vsbc(model, exact_guide, (Y,), num_simulations=1)

    def discrete(y):
        z = pp.sample("z", dist.Bernoulli(0.5))
        pp.observe("y", dist.Normal(z, 1.0), y)

    with pytest.raises(pp.ModelError, match="'z'"):
        vsbc(discrete, exact_guide, (0.0,), num_simulations=2)

    def no_data():
        pp.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(pp.ModelError, match="observed"):
        vsbc(no_data, exact_guide, num_simulations=2)

    def with_condition(y):
        mu = pp.sample("mu", dist.Normal(0.0, 1.0))
        pp.condition("pos", mu > 0)
        pp.observe("y", dist.Normal(mu, 1.0), y)

    with pytest.raises(pp.ModelError, match="'pos'"):
        vsbc(with_condition, exact_guide, (0.0,), num_simulations=2)


def test_vsbc_holds_the_trace_lock_while_it_traces():
    # NumPyro's handler stack is process-global: vsbc traces the model and guide under ppinfer's
    # trace lock, as infer does, so another thread's infer cannot interleave its handlers.
    from ppinfer._compile import TRACE_LOCK

    seen = []

    def watched(y):
        seen.append(TRACE_LOCK.held())
        model(y)

    vsbc(watched, exact_guide, (Y,), num_steps=2, num_simulations=2, num_draws=4, key=1)
    assert seen and all(seen)
