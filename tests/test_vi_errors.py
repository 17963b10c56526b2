"""Clear ppinfer errors from VI, an autoguide, and a learned SMC proposal end to end."""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer.autoguide import AutoNormal

import ppinfer as pp
from models.classic import lgssm, simulate_lgssm
from ppinfer.vi import VI, VSMC, affine_gaussian_proposal, bind_params, elbo, iwelbo
from semantics import smc_log_evidence_replicates


def model(y):
    z = pp.sample("z", dist.Normal(0.0, 1.0))
    pp.observe("y", dist.Normal(z, 1.0), y)


def guide(y):
    m = numpyro.param("m", 0.0)
    pp.sample("z", dist.Normal(m, 1.0))


def test_num_steps_must_be_positive():
    with pytest.raises(pp.ConfigError, match="num_steps"):
        VI(elbo(), guide, optax.adam(0.1), 0)


def test_guide_sampling_unknown_site():
    def extra(y):
        guide(y)
        pp.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(pp.ModelError, match="'w'"):
        pp.infer(model, 1.0, algorithm=VI(elbo(), extra, optax.adam(0.1), 5))


def test_guide_missing_latent_site():
    def two(y):
        z = pp.sample("z", dist.Normal(0.0, 1.0))
        w = pp.sample("w", dist.Normal(0.0, 1.0))
        pp.observe("y", dist.Normal(z + w, 1.0), y)

    with pytest.raises(pp.ModelError, match="'w'"):
        pp.infer(two, 1.0, algorithm=VI(iwelbo(2), guide, optax.adam(0.1), 5))


def test_nan_objective_stops_with_the_step():
    def bad(y):
        z = pp.sample("z", dist.Normal(0.0, 1.0))
        pp.factor("f", -10.0 * z + jnp.sqrt(z + 3.0))  # NaN once z < −3; the gradient pushes z down

    with pytest.raises(pp.InferenceError, match="step"):
        pp.infer(bad, 1.0, algorithm=VI(elbo(), guide, optax.sgd(0.5), 50, chunk_size=20))


def test_autonormal_guide_and_equal_weights():
    r = pp.infer(
        model, 1.0, algorithm=VI(elbo(4), AutoNormal(model), optax.adam(0.05), 400, 500, weighting="equal")
    )
    # Exact posterior N(0.5, 0.5).
    assert float(r.extras["params"]["z_auto_loc"]) == pytest.approx(0.5, abs=0.1)
    assert float(r.extras["params"]["z_auto_scale"]) == pytest.approx(np.sqrt(0.5), abs=0.1)
    np.testing.assert_allclose(np.asarray(r.log_weights), r.log_evidence - np.log(500), rtol=1e-5)
    assert r.samples["z"].shape == (500,)


def test_learned_proposal_lowers_log_evidence_variance():
    lg = dict(a=0.9, q=1.0, c=1.0, r=0.1)
    ys = jnp.asarray(simulate_lgssm(0, 15, **lg))
    program = lgssm(**lg)
    prop = affine_gaussian_proposal("x", lambda x, t, ys: jnp.stack([x, ys[t]]), 2)
    vi = VI(VSMC(8), prop, optax.adam(optax.exponential_decay(0.1, 100, 0.1)), 100, 64)
    r = pp.infer(program, ys, algorithm=vi, key=0)
    assert r.algorithm == "VI" and r.samples["x"].shape == (64, 15)
    learned = bind_params(prop, r.extras["params"])
    boot = smc_log_evidence_replicates(program, (ys,), 100, 16, key=1)
    good = smc_log_evidence_replicates(program, (ys,), 100, 16, key=1, proposal=learned)
    # The benchmark (T = 30, N = 32) measures a ratio ≈ 11; 2 leaves room for a shorter fit and seed noise.
    assert np.var(boot) > 2 * np.var(good)
    assert pp.SMC(16, proposal=learned).proposal is learned


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"estimators": "score"}, "unknown gradient estimator 'score'"),
        ({"estimators": {"z": "score"}}, "unknown gradient estimator 'score'"),
        ({"estimators": 3}, "estimators must be a str or a dict"),
        ({"weighting": "uniform"}, "weighting must be one of"),
        ({"guide": 3}, "guide must be a program"),
        ({"optimizer": "adam"}, "optimizer must be an optax GradientTransformation"),
    ],
)
def test_settings_are_checked(kwargs, match):
    settings = {"objective": elbo(), "guide": guide, "optimizer": optax.adam(0.1), "num_steps": 5, **kwargs}
    with pytest.raises(pp.ConfigError, match=match):
        VI(**settings)


def test_init_params_start_the_fit_and_unknown_ones_are_refused():
    # Constrained initial values: with a zero learning rate the fit stays where it started.
    def scaled(y):
        m = numpyro.param("m", 0.0)
        s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
        pp.sample("z", dist.Normal(m, s))

    start = {"m": 2.5, "s": 0.3}
    r = pp.infer(
        model, 1.0, algorithm=VI(elbo(), scaled, optax.sgd(0.0), 2, num_particles=8, init_params=start)
    )
    assert float(r.extras["params"]["m"]) == pytest.approx(2.5, abs=1e-6)
    assert float(r.extras["params"]["s"]) == pytest.approx(0.3, rel=1e-5)
    with pytest.raises(pp.ConfigError, match="init_params names 'q', which is not a param site"):
        pp.infer(model, 1.0, algorithm=VI(elbo(), scaled, optax.sgd(0.0), 2, init_params={"q": 1.0}))


def test_init_params_of_the_wrong_shape_or_outside_the_constraint_are_refused():
    # A (3,) start for a scalar param used to run, giving (5, 3) samples of a scalar site and a
    # meaningless log Ẑ; a start outside the constraint reported a non-finite objective.
    def scaled(y):
        s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
        pp.sample("z", dist.Normal(0.0, s))

    for start, match in (
        ({"s": jnp.ones(3)}, r"init_params\['s'\] has shape \(3,\), but the param site has shape \(\)"),
        ({"s": -1.0}, r"init_params\['s'\] = -1.0 lies outside the param's constraint"),
    ):
        with pytest.raises(pp.ConfigError, match=match):
            pp.infer(model, 1.0, algorithm=VI(elbo(), scaled, optax.sgd(0.0), 2, init_params=start))


def test_data_outside_a_support_is_a_data_error_naming_the_site():
    # VI never ran the program before fitting: it reported "the objective was not finite".
    def beta_bernoulli(y):
        p = pp.sample("p", dist.Beta(1.0, 1.0))
        with pp.plate("d", y.shape[0]):
            pp.observe("y", dist.Bernoulli(p), y)

    def beta_guide(y):
        a = numpyro.param("a", 1.0, constraint=dist.constraints.positive)
        pp.sample("p", dist.Beta(a, 1.0))

    vi = VI(elbo(), beta_guide, optax.adam(0.05), 5)
    assert np.isfinite(pp.infer(beta_bernoulli, jnp.array([0.0, 1.0, 1.0]), algorithm=vi).log_evidence)
    with pytest.raises(pp.DataError, match=r"site 'y' lies outside the support.*element \[2\]"):
        pp.infer(beta_bernoulli, jnp.array([0.0, 1.0, 2.0]), algorithm=vi)


def test_renyi_alpha_must_be_a_finite_number():
    from ppinfer.vi import renyi

    for alpha in (float("nan"), float("inf"), "0.5", None):
        with pytest.raises(pp.ConfigError, match="renyi's alpha must be a finite number"):
            renyi(alpha, 4)


def test_misspelled_names_are_refused_not_ignored():
    """A misspelled site in ``estimators`` ran with the default estimators, and ``bind_params`` with
    a dict lacking a param (``{}``, or the whole ``extras``) silently kept the initial values."""
    fit = pp.infer(model, 1.0, algorithm=VI(elbo(4), guide, optax.adam(0.05), 50, 10), key=0)
    with pytest.raises(pp.ConfigError, match=r"estimators names \['zz'\], which the guide does not sample"):
        pp.infer(
            model, 1.0, algorithm=VI(elbo(4), guide, optax.adam(0.05), 10, estimators={"zz": "reinforce"})
        )
    for wrong in ({}, fit.extras):
        with pytest.raises(pp.ModelError, match="has no value in params"):
            pp.infer(model, 1.0, algorithm=pp.Importance(10, proposal=bind_params(guide, wrong)))
    bound = pp.infer(
        model, 1.0, algorithm=pp.Importance(10, proposal=bind_params(guide, fit.extras["params"]))
    )
    assert np.isfinite(bound.log_evidence)
    with pytest.raises(pp.ConfigError, match="chunk_size must be an integer >= 1"):
        VI(elbo(4), guide, optax.adam(0.05), 10, chunk_size=0)


def test_affine_proposal_checks_its_feature_count():
    lg = dict(a=0.9, q=1.0, c=1.0, r=0.1)
    ys = jnp.asarray(simulate_lgssm(0, 5, **lg))
    prop = affine_gaussian_proposal("x", lambda x, t, ys: jnp.stack([x, ys[t]]), 3)
    vi = VI(VSMC(4), prop, optax.adam(0.1), 5, 8)
    with pytest.raises(pp.ModelError, match=r"returned shape \(2,\), but num_features=3"):
        pp.infer(lgssm(**lg), ys, algorithm=vi, key=0)
