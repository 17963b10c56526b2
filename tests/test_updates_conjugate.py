"""IBIS on conjugate models: after T batches the particle posterior matches the analytic batch
posterior, and the accumulated evidence Ẑ_{1:T} = Π_t Ẑ(t | 1:t−1) is unbiased for p(y_{1:T}).

Replicated checks run R independent IBIS streams (``run_stream``, vmapped and jitted, fixed seeds)
and compare averages with the exact values by CLT bounds, false-failure rate 1e-3 each. The
interactive path (``infer`` then ``Posterior.update``) is checked against the exact posterior in
``test_updates_gaussian.py``, next to the parametric representation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy.special import betaln, gammaln
from scipy.stats import multivariate_normal

import ppinfer as pp
from models.classic import beta_bernoulli
from ppinfer.updates import IBIS, constrained_samples, run_stream
from semantics import check_mean, check_unbiased_evidence

T, B = 5, 8  # batches, batch size
RNG = np.random.default_rng(7)

# Beta-Bernoulli, history path (every batch kept).
A, BETA = 2.0, 3.0
FLIPS = RNG.binomial(1, 0.7, (T, B)).astype(np.int32)
H = FLIPS.sum()
BB_POST = (A + H, BETA + FLIPS.size - H)
BB_MEAN = BB_POST[0] / sum(BB_POST)
BB_M2 = BB_MEAN * (BB_POST[0] + 1) / (sum(BB_POST) + 1)
BB_LOG_Z = betaln(*BB_POST) - betaln(A, BETA)

# Normal-Normal with known variance, sufficient-statistics path: S = (n, Σy, Σy²).
M0, S0, SIGMA = 0.0, 2.0, 1.5
YS = RNG.normal(1.0, SIGMA, (T, B)).astype(np.float32)
NN_PREC = 1 / S0**2 + YS.size / SIGMA**2
NN_MEAN = (M0 / S0**2 + YS.sum() / SIGMA**2) / NN_PREC
NN_M2 = NN_MEAN**2 + 1 / NN_PREC
NN_LOG_Z = multivariate_normal(
    np.full(YS.size, M0), SIGMA**2 * np.eye(YS.size) + S0**2 * np.ones((YS.size, YS.size))
).logpdf(YS.ravel())

# Gamma-Poisson, sufficient-statistics path: S = (n, Σy, Σ log y!).
ALPHA, RATE = 3.0, 1.0
COUNTS = RNG.poisson(2.5, (T, B)).astype(np.float32)
GP_POST = (ALPHA + COUNTS.sum(), RATE + COUNTS.size)
GP_MEAN = GP_POST[0] / GP_POST[1]
GP_M2 = GP_MEAN**2 + GP_POST[0] / GP_POST[1] ** 2
GP_LOG_Z = (
    ALPHA * np.log(RATE)
    - gammaln(ALPHA)
    + gammaln(GP_POST[0])
    - GP_POST[0] * np.log(GP_POST[1])
    - gammaln(COUNTS + 1).sum()
)


def normal_stats_model(n, sum_y, sum_y2):
    """``log p(y_{1:t} | mu)`` exactly, from (n, Σy, Σy²)."""
    mu = pp.sample("mu", dist.Normal(M0, S0))
    sq = sum_y2 - 2 * mu * sum_y + n * mu**2
    pp.factor("y", -0.5 * sq / SIGMA**2 - 0.5 * n * jnp.log(2 * jnp.pi * SIGMA**2))


def normal_stats(y):
    return (jnp.float32(y.shape[0]), jnp.sum(y), jnp.sum(y**2))


def poisson_stats_model(n, sum_y, sum_log_fact):
    lam = pp.sample("lam", dist.Gamma(ALPHA, RATE))
    pp.factor("y", sum_y * jnp.log(lam) - n * lam - sum_log_fact)


def poisson_stats(y):
    return (jnp.float32(y.shape[0]), jnp.sum(y), jnp.sum(jax.scipy.special.gammaln(y + 1)))


CASES = {
    "beta-bernoulli-history": (beta_bernoulli(A, BETA), FLIPS, None, "p", BB_MEAN, BB_M2, BB_LOG_Z),
    "normal-statistics": (normal_stats_model, YS, normal_stats, "mu", NN_MEAN, NN_M2, NN_LOG_Z),
    "gamma-poisson-statistics": (
        poisson_stats_model,
        COUNTS,
        poisson_stats,
        "lam",
        GP_MEAN,
        GP_M2,
        GP_LOG_Z,
    ),
}


@pytest.mark.parametrize("tempering_ess", [0.5, None], ids=["tempered", "plain"])
@pytest.mark.parametrize("case", list(CASES))
def test_sequential_matches_batch_posterior_and_evidence_unbiased(case, tempering_ess):
    """Both update paths: tempered stages (the default) and plain IBIS (one reweighting per batch,
    ``tempering_ess=None``; no test ran it before)."""
    program, data, stats, site, mean, m2, log_z = CASES[case]
    cfg = IBIS(num_particles=200, num_moves=5, sufficient_statistics=stats, tempering_ess=tempering_ess)
    run = lambda k: _final_moments(k, program, jnp.asarray(data), cfg, site)
    keys = jax.random.split(jax.random.PRNGKey(0), 100)
    log_z_hat, means, m2s = jax.jit(jax.vmap(run))(keys)
    check = check_unbiased_evidence(np.asarray(log_z_hat), log_z, 1e-3)
    assert check, check
    for got, want in ((means, mean), (m2s, m2)):
        check = check_mean(np.asarray(got), want, 1e-3)
        assert check, check


def _final_moments(key, program, data, cfg, site):
    state, info = run_stream(key, program, (data,), cfg)
    prior_args = (data[0],) if cfg.sufficient_statistics is None else state.data
    x = constrained_samples(program, state.particles, prior_args)[site]
    w = jax.nn.softmax(state.log_weights)
    return jax.scipy.special.logsumexp(state.log_weights), jnp.sum(w * x), jnp.sum(w * x**2)
