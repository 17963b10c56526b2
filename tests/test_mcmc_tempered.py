"""Tempered and data-annealed SMC on a conjugate model with exact evidence and posterior."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions import biject_to
from scipy.stats import multivariate_normal

import ppinfer as pp
from ppinfer.algorithms.tempered import DataAnnealedSMC, TemperedSMC, anneal_run
from ppinfer.errors import ConfigError, ModelError
from ppinfer.traced import latent_sites
from semantics import check_unbiased_evidence

Y = np.random.default_rng(0).normal(1.5, 1.0, 20).astype(np.float32)
N_DATA = Y.shape[0]
LOG_Z = multivariate_normal(np.zeros(N_DATA), np.eye(N_DATA) + np.ones((N_DATA, N_DATA))).logpdf(Y)
POST_MEAN, POST_SD = Y.sum() / (N_DATA + 1), 1 / np.sqrt(N_DATA + 1)


def model(y):
    mu = pp.sample("mu", dist.Normal(0.0, 1.0))
    pp.sample("s", dist.HalfNormal(2.0))  # a nuisance site, prior only: exercises the Jacobian
    with pp.plate("data", y.shape[0]):
        pp.observe("y", dist.Normal(mu, 1.0), y)


def replicates(path, schedule, num_replicates=200, n=100):
    transforms = {k: biject_to(d.support) for k, d in latent_sites(model, (Y,)).items()}
    y = jnp.asarray(Y)
    run = lambda k: anneal_run(k, model, (y,), n, 3, path, schedule, transforms)
    out = jax.jit(jax.vmap(run))(jax.random.split(jax.random.PRNGKey(0), num_replicates))
    return np.asarray(out["log_evidence"]), out


@pytest.mark.parametrize(
    "path,schedule",
    [
        (("temper", None), ("fixed", (0.05, 0.2, 0.5, 1.0), 4)),
        (("temper", None), ("adaptive", 0.5, 50)),
        (("data", N_DATA), ("fixed", (5.0, 10.0, 15.0, 20.0), 4)),
    ],
    ids=["tempered-fixed", "tempered-adaptive", "data-annealed"],
)
def test_evidence_unbiased_and_posterior_mean(path, schedule):
    # E[Ẑ/Z] = 1 over 200 independent runs, CLT bound with false-failure rate 1e-3.
    log_z_hats, out = replicates(path, schedule)
    check = check_unbiased_evidence(log_z_hats, LOG_Z, 1e-3)
    assert check, check
    # Per-run weighted posterior means of mu: their average is within CLT bounds of the truth
    # (up to the O(1/N) self-normalisation bias, < 0.01 here).
    w = jax.nn.softmax(out["log_weights"], axis=1)
    means = np.asarray(jnp.sum(w * out["choices"]["mu"], axis=1))
    assert abs(np.mean(means) - POST_MEAN) < 4 * np.std(means) / np.sqrt(len(means)) + 0.01


def test_infer_tempered_and_data_annealed():
    for alg in (TemperedSMC(400), DataAnnealedSMC(400, num_data=N_DATA, batch_size=5)):
        r = pp.infer(model, Y, algorithm=alg, key=0)
        assert r.log_evidence == pytest.approx(LOG_Z, abs=0.5)
        assert float(r.mean("mu")) == pytest.approx(POST_MEAN, abs=0.1)
        assert float(r.std("mu")) == pytest.approx(POST_SD, rel=0.25)
        lambdas = np.asarray(r.extras["lambdas"])
        assert np.all(np.diff(lambdas) > 0) and lambdas[-1] == (1.0 if alg.name == "TemperedSMC" else 20.0)


def test_tempered_errors():
    with pytest.raises(ConfigError):
        TemperedSMC(10, temperatures=(0.5, 0.4, 1.0))
    with pytest.raises(ConfigError):
        TemperedSMC(10, num_moves=0)
    with pytest.raises(ConfigError):
        DataAnnealedSMC(10, num_data=0)
    # A NaN compares false with everything: it passed the ordering check and the run returned
    # log Ẑ = 0 after one step at temperature NaN.
    for temps in ([float("nan"), 1.0], [0.3, float("nan"), 1.0], ["a", 1.0]):
        with pytest.raises(ConfigError, match="temperatures"):
            TemperedSMC(10, temperatures=temps)
        with pytest.raises(ConfigError, match="temperatures"):
            pp.WasteFreeSMC(10, chain_length=2, temperatures=temps)
    for bad in (3.0, float("nan"), True):  # a float count failed inside range() at run time
        with pytest.raises(ConfigError, match="num_data must be an integer"):
            DataAnnealedSMC(10, num_data=bad)
        with pytest.raises(ConfigError, match="batch_size must be an integer"):
            DataAnnealedSMC(10, num_data=4, batch_size=bad)
    # num_data that is not the data plate's length (the default 1 included) annealed nothing: one
    # importance step from the prior to the posterior (median ESS 1.6 of 1000 on 400 points).
    for num_data in (1, N_DATA + 1):
        with pytest.raises(ConfigError, match=rf"no observed site has a last dimension of length {num_data}"):
            pp.infer(model, Y, algorithm=DataAnnealedSMC(20, num_data=num_data))

    def discrete(y):
        pp.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ModelError, match="discrete"):
        pp.infer(discrete, Y, algorithm=TemperedSMC(10))
