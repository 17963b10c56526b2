"""FFBS (forward-filtering backward-sampling): smoothed marginals against the exact
Rauch–Tung–Striebel smoother on a linear-Gaussian state-space model, filtering means from the same
run against the Kalman filter, a backward pass without the transition density failing the check, and
clear errors for what FFBS does not support.

Monte Carlo error of the smoothing check (N = 1000 filter particles, P = 1000 paths, the data of
``simulate_lgssm(0, 20, …)``), measured over 100 keys for each step t and each of the two programs
below: the rms error of the smoothed mean is at most 0.095·sd_t (sd_t² the RTS variance) and of the
smoothed variance at most 0.104·var_t, and the errors are close to Gaussian (largest |z| over the
100 × 20 values of each: 3.5 to 4.0). The bounds 0.45·sd_t and 0.5·var_t are ≥ 4.7 of those rms
errors at every t (≥ 5.3 for ``lgssm``): a false-failure rate below 1e-4 per test for its 40
comparisons (Gaussian tails, union bound), for any key. Without the transition density the backward
pass draws each x_t from its filtering marginal, whose mean is up to 1.23·sd_t (2.7 bounds) from the
smoothed one on these data: the check fails.
"""

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppinfer as pp
from models.classic import lgssm, simulate_lgssm
from ppinfer.algorithms import ffbs as ffbs_module
from semantics.exact import kalman_filter, kalman_smoother

A, Q, C, R = 0.9, 0.5, 1.0, 1.0
T, N, P = 20, 1000, 1000
MEAN_BOUND, VAR_BOUND = 0.45, 0.5  # × sd_t and × var_t (module docstring)


@pytest.fixture(scope="module")
def data():
    ys = simulate_lgssm(0, T, A, Q, C, R)
    means, variances = kalman_smoother(A, Q, C, R, 0.0, 1.0, ys)
    return ys, means, variances


def smoothing_errors(paths, means, variances):
    """Per-step errors of the paths' means and variances, in units of the check's bounds."""
    x = np.asarray(paths, np.float64)
    mean_err = np.abs(x.mean(0) - means) / (MEAN_BOUND * np.sqrt(variances))
    var_err = np.abs(x.var(0) - variances) / (VAR_BOUND * variances)
    return mean_err, var_err


def test_kalman_smoother_is_the_exact_posterior(data):
    ys, means, variances = data
    # The dense Gaussian posterior of x_{0:T−1}: prior x = mu + M e, e ~ N(0, I), y = C x + N(0, R).
    sd = np.r_[1.0, np.full(T - 1, np.sqrt(Q))]
    lag = np.subtract.outer(np.arange(T), np.arange(T))
    m = np.where(lag >= 0, A ** np.maximum(lag, 0), 0.0) * sd[None, :]
    prior_precision = np.linalg.inv(m @ m.T)
    cov = np.linalg.inv(prior_precision + C * C / R * np.eye(T))
    mean = cov @ (C / R * np.asarray(ys, np.float64))
    np.testing.assert_allclose(means, mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(variances, np.diag(cov), rtol=1e-8)
    # At the last step the smoother is the filter.
    _, filt_means, filt_vars = kalman_filter(A, Q, C, R, 0.0, 1.0, ys)
    assert means[-1] == pytest.approx(filt_means[-1], rel=1e-12)
    assert variances[-1] == pytest.approx(filt_vars[-1], rel=1e-12)
    assert not np.allclose(means[:-1], filt_means[:-1], atol=0.1)


def test_smoothed_marginals_match_rts_and_filtering_means_match_kalman(data):
    ys, means, variances = data
    program = lgssm(A, Q, C, R)
    result = pp.infer(program, ys, algorithm=pp.FFBS(N, num_paths=P), key=0)
    assert result.algorithm == "FFBS"
    assert result.samples["x"].shape == (P, T)
    assert result.extras["indices"].shape == (P, T)
    np.testing.assert_allclose(np.asarray(result.weights), 1.0 / P, rtol=1e-5)
    assert float(jnp.logaddexp.reduce(result.log_weights)) == pytest.approx(result.log_evidence, abs=1e-3)
    # Each path's final state is its last choice (the program returns x).
    np.testing.assert_array_equal(np.asarray(result.state), np.asarray(result.samples["x"][:, -1]))

    mean_err, var_err = smoothing_errors(result.samples["x"], means, variances)
    assert np.all(mean_err < 1.0), mean_err
    assert np.all(var_err < 1.0), var_err
    # Result.mean / var are the paths' (equal weights).
    np.testing.assert_allclose(
        result.mean("x"), np.asarray(result.samples["x"]).mean(0), rtol=1e-4, atol=1e-5
    )

    # Filtering means from the same run: against the Kalman filter with test_smc's 4.5-sigma bound
    # from the filter's own ESS, and equal to SMC's with the same settings and key (the same run).
    log_z, filt_means, filt_vars = kalman_filter(A, Q, C, R, 0.0, 1.0, ys)
    filtering = np.asarray(result.filtering_mean("x"))
    ess = np.asarray(result.ess)
    assert np.all(np.abs(filtering - filt_means) < 4.5 * np.sqrt(filt_vars / ess)), filtering - filt_means
    # Filtering variances (Result.filtering): a weighted variance of a Gaussian has
    # relative sd about sqrt(2 / ESS); 5 of those is a bound no correct run crosses in practice.
    flt = result.filtering
    filt_var_hat = np.asarray(flt.var("x"))
    assert np.all(np.abs(filt_var_hat / filt_vars - 1.0) < 5.0 * np.sqrt(2.0 / ess)), filt_var_hat / filt_vars
    np.testing.assert_allclose(np.asarray(flt.std("x")), np.sqrt(filt_var_hat), rtol=1e-6)
    smc = pp.infer(program, ys, algorithm=pp.SMC(N), key=0)
    np.testing.assert_allclose(filtering, np.asarray(smc.filtering_mean("x")), rtol=1e-5, atol=1e-5)
    assert result.log_evidence == pytest.approx(smc.log_evidence, abs=1e-4)
    # sd of log Ẑ for this filter is below 0.1 (test_smc): 0.4 is a 4-sigma bound.
    assert result.log_evidence == pytest.approx(log_z, abs=0.4)


def test_backward_pass_without_the_transition_density_fails_the_check(data, monkeypatch):
    ys, means, variances = data
    true_density = ffbs_module.transition_log_density

    def ignored(step, states, choices):
        scores, next_states, dets = true_density(step, states, choices)
        return jnp.zeros_like(scores), next_states, dets

    monkeypatch.setattr(ffbs_module, "transition_log_density", ignored)
    # A fresh program object: a new compiled run (the cache keys on the program).
    result = pp.infer(lgssm(A, Q, C, R), ys, algorithm=pp.FFBS(N, num_paths=P), key=0)
    mean_err, var_err = smoothing_errors(result.samples["x"], means, variances)
    # Each x_t is drawn from its filtering marginal: right at the last step, wrong before.
    assert mean_err[-1] < 1.0
    assert mean_err.max() > 2.0, mean_err


def init_observed_lgssm():
    """The LGSSM with x_0 sampled and y_0 observed in ``init``; step t draws x_{t+1} from the state."""

    def init(ys):
        x = pp.sample("x0", dist.Normal(0.0, 1.0))
        pp.observe("y0", dist.Normal(C * x, np.sqrt(R)), ys[0])
        return x

    def step(prev, t, ys):
        pp.deterministic("prev", prev)
        x = pp.sample("x", dist.Normal(A * prev, np.sqrt(Q)))
        pp.observe("y", dist.Normal(C * x, np.sqrt(R)), ys[t + 1])
        return x

    return pp.sequential(init, step, lambda ys: ys.shape[0] - 1)


def test_init_sites_and_deterministic_sites_are_smoothed_along_the_path(data):
    # The same model and data with x_0 in init: init's site is smoothed with the steps (the step-0
    # children continue init's particles), and a deterministic site is recomputed along each path.
    ys, means, variances = data
    result = pp.infer(init_observed_lgssm(), ys, algorithm=pp.FFBS(N, num_paths=P), key=1)
    assert result.samples["x0"].shape == (P,) and result.samples["x"].shape == (P, T - 1)
    paths = np.concatenate([np.asarray(result.samples["x0"])[:, None], np.asarray(result.samples["x"])], 1)
    mean_err, var_err = smoothing_errors(paths, means, variances)
    assert np.all(mean_err < 1.0), mean_err
    assert np.all(var_err < 1.0), var_err
    # The deterministic site reads the previous state: along the path it is the path's previous
    # value (copied from the filter's lineages it would be another particle's).
    np.testing.assert_array_equal(np.asarray(result.samples["prev"]), paths[:, :-1])


def test_bad_configs_and_unsupported_programs_raise_clear_errors(data):
    ys = data[0][:4]
    for bad in (
        dict(num_particles=0),
        dict(num_particles=10, num_paths=0),
        dict(num_particles=10, num_paths=2.5),
        dict(num_particles=10, resampling="nope"),
        dict(num_particles=10, ess_threshold=1.5),
    ):
        with pytest.raises(pp.ConfigError):
            pp.FFBS(**bad)

    with pytest.raises(pp.ConfigError, match="sequential program"):
        pp.infer(lambda: pp.sample("z", dist.Normal(0.0, 1.0)), algorithm=pp.FFBS(10))
    with pytest.raises(pp.ModelError, match="needs num_steps >= 1, got 0"):  # was an IndexError's
        pp.infer(lgssm(A, 1.0, 1.0, 1.0), ys[:0], algorithm=pp.FFBS(10, num_paths=5))
    # Its printout says whose per-step ESS it shows (the filter's 10, not the 5 paths': 7.3 > 5).
    text = repr(pp.infer(lgssm(A, Q, C, R), ys, algorithm=pp.FFBS(10, num_paths=5), key=0))
    assert "N=5," in text and "of the forward filter's 10 particles" in text

    def stopping_step(x, t, ys):
        x = pp.sample("x", dist.Normal(A * x, 1.0))
        pp.observe("y", dist.Normal(x, 1.0), ys[t])
        pp.stop(x > 3.0)
        return x

    stops = pp.sequential(lambda ys: jnp.zeros(()), stopping_step, lambda ys: ys.shape[0])
    with pytest.raises(pp.ConfigError, match="stop"):
        pp.infer(stops, ys, algorithm=pp.FFBS(10, num_paths=5))

    # Second order: the state keeps the previous value, so it is not Markov in the step's choice.
    def ar2_step(state, t, ys):
        x, prev = state
        x_new = pp.sample("x", dist.Normal(0.6 * x + 0.3 * prev, 1.0))
        pp.observe("y", dist.Normal(x_new, 1.0), ys[t])
        return (x_new, x)

    ar2 = pp.sequential(lambda ys: (jnp.zeros(()), jnp.zeros(())), ar2_step, lambda ys: ys.shape[0])
    with pytest.raises(pp.ModelError, match="not Markov"):
        pp.infer(ar2, ys, algorithm=pp.FFBS(16, num_paths=4))

    def observe_only(x, t, ys):
        pp.observe("y", dist.Normal(x, 1.0), ys[t])
        return x

    no_choice = pp.sequential(
        lambda ys: pp.sample("x", dist.Normal(0.0, 1.0)), observe_only, lambda ys: ys.shape[0]
    )
    with pytest.raises(pp.ModelError, match="no random choice"):
        pp.infer(no_choice, ys, algorithm=pp.FFBS(16, num_paths=4))


def test_ffbs_keeps_float64(x64):
    # Its log weights were float32 whatever the precision, so its means came back float32.
    ys = simulate_lgssm(0, 5, 0.9, 0.5, 1.0, 1.0)
    r = pp.infer(lgssm(0.9, 0.5, 1.0, 1.0), ys, algorithm=pp.FFBS(16, 4), key=0)
    assert r.log_weights.dtype == jnp.float64 and r.mean("x").dtype == jnp.float64
