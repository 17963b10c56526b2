import numpy as np
import numpyro.distributions as dist
import pytest
from scipy.special import betaln

import ppinfer as pp
from models.classic import beta_bernoulli


def normal_model(ys):
    mu = pp.sample("mu", dist.Normal(0.0, 1.0))
    with pp.plate("n", ys.shape[0]):
        pp.observe("y", dist.Normal(mu, 1.0), ys)


def exact_normal(ys):
    n = len(ys)
    post_var = 1.0 / (1 + n)
    post_mean = post_var * np.sum(ys)
    cov = np.eye(n) + np.ones((n, n))
    _, logdet = np.linalg.slogdet(2 * np.pi * cov)
    log_z = -0.5 * (logdet + ys @ np.linalg.solve(cov, ys))
    return post_mean, post_var, log_z


YS = np.array([0.8, 1.6, 1.1], np.float32)


def test_prior_importance_matches_conjugate_posterior():
    m, v, log_z = exact_normal(YS.astype(np.float64))
    r = pp.infer(normal_model, YS, algorithm=pp.Importance(20000), key=0)
    assert float(r.mean("mu")) == pytest.approx(m, abs=0.03)
    assert float(r.var("mu")) == pytest.approx(v, abs=0.02)
    assert r.log_evidence == pytest.approx(log_z, abs=0.03)


def test_proposal_importance_is_better_and_correct():
    m, v, log_z = exact_normal(YS.astype(np.float64))
    guide = lambda ys: pp.sample("mu", dist.Normal(m, 1.2 * np.sqrt(v)))
    r_prior = pp.infer(normal_model, YS, algorithm=pp.Importance(2000), key=1)
    r_guide = pp.infer(normal_model, YS, algorithm=pp.Importance(2000, proposal=guide), key=1)
    assert r_guide.final_ess > 2 * r_prior.final_ess
    assert float(r_guide.mean("mu")) == pytest.approx(m, abs=0.03)
    assert r_guide.log_evidence == pytest.approx(log_z, abs=0.01)


def test_beta_bernoulli_evidence_and_mean():
    flips = np.array([1, 0, 1, 1, 1, 0, 1, 1], np.float32)
    h, t = flips.sum(), len(flips) - flips.sum()
    r = pp.infer(beta_bernoulli(2.0, 2.0), flips, algorithm=pp.Importance(20000), key=3)
    assert float(r.mean("p")) == pytest.approx((2 + h) / (4 + len(flips)), abs=0.01)
    assert r.log_evidence == pytest.approx(betaln(2 + h, 2 + t) - betaln(2, 2), abs=0.03)


def test_importance_on_sequential_program_never_resamples():
    from models.classic import lgssm

    ys = np.zeros(5, np.float32)
    r = pp.infer(lgssm(0.9, 1.0, 1.0, 1.0), ys, algorithm=pp.Importance(100), key=0)
    assert r.algorithm == "Importance"
    assert not np.any(np.asarray(r.resampled))
    assert r.samples["x"].shape == (100, 5)


def test_data_of_new_shapes_is_checked_on_a_later_call():
    """The dry run's shape check runs for every new argument signature, not only when the program is
    first compiled: ``y`` of another length than ``x`` after a good call was a raw broadcasting
    ``TypeError`` from inside JAX."""

    def regression(x, y):
        w = pp.sample("w", dist.Normal(0.0, 1.0))
        pp.observe("y", dist.Normal(w * x, 1.0), y)

    x = np.linspace(0, 1, 50).astype(np.float32)
    y = 2 * x
    good = pp.infer(regression, x, y, algorithm=pp.Importance(100), key=0)
    assert np.isfinite(good.log_evidence)
    with pytest.raises(pp.ModelError):
        pp.infer(regression, x, y[:10], algorithm=pp.Importance(100), key=0)
    again = pp.infer(regression, x, y, algorithm=pp.Importance(100), key=0)
    assert again.log_evidence == good.log_evidence
