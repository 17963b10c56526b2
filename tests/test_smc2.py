"""SMC² on the LGSSM with an unknown AR coefficient (the model of tests/test_pmmh.py): its evidence
estimate is unbiased and its weighted θ particles match the exact posterior (Kalman filter on a grid,
``semantics.exact``); a variant that accepts every PMMH move fails the same checks.

Every bound is computed from R independent replicates (fixed seeds, so each test is deterministic):
a replicate average must lie within 4 of its standard errors (sample sd / √R) of the exact value,
plus, for the posterior moments, a small allowance for SMC's O(1/N_θ) bias. If the averages are
normal and the SE is the sample SE, a correct sampler fails one such check with probability
P(|t_{R−1}| > 4): 2.7e-4 for R = 40 (t with 39 degrees of freedom; 6e-5 for a known SE).
"""

from collections import OrderedDict

import jax.numpy as jnp
import numpy as np
import pytest

import ppinfer as pp
from models.classic import lgssm_unknown_coefficient, simulate_lgssm
from ppinfer import _compile
from ppinfer.algorithms import smc2 as smc2_module
from ppinfer.kernels.mh import accept
from ppinfer.kernels.select import Systematic
from semantics.exact import lgssm_coefficient_log_evidence, lgssm_coefficient_posterior

Q, C, R = 0.5, 1.0, 0.5
prior, LGSSM = lgssm_unknown_coefficient(Q, C, R)
YS = simulate_lgssm(3, 30, 0.7, Q, C, R)
ALGORITHM = pp.SMC2(prior, num_particles=256, num_inner=32, num_moves=1)


def replicates(num: int) -> np.ndarray:
    """``f64[num, 3]``: (log Ẑ − log Z, posterior mean of a, posterior sd of a) per seed."""
    log_z = lgssm_coefficient_log_evidence(YS, Q, C, R)
    rows = []
    for seed in range(num):
        r = pp.infer(LGSSM, YS, algorithm=ALGORITHM, key=seed)
        rows.append((r.log_evidence - log_z, float(r.mean("a")), float(r.std("a"))))
    return np.asarray(rows, np.float64)


def check_against_exact(rows: np.ndarray) -> dict:
    """Assert the three replicate checks of the module docstring; return the measured errors."""
    exact_mean, exact_sd = lgssm_coefficient_posterior(YS, Q, C, R)
    se = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x)))
    ratio = np.exp(rows[:, 0])  # Ẑ / Z: mean 1 exactly (unbiased); lognormal-ish with small spread
    mean_err = float(np.mean(rows[:, 1]) - exact_mean)
    sd_err = float(np.mean(rows[:, 2]) - exact_sd)
    errors = {"ratio-1": float(np.mean(ratio) - 1), "mean": mean_err, "sd": sd_err}
    assert abs(np.mean(ratio) - 1) < 4 * se(ratio), errors
    # Allowances for the O(1/N_θ) bias of self-normalised SMC moments: 0.005 on the mean and 2 % of
    # the sd, above what 20 runs with 4x the particles measured (−0.002 ± 0.002, +0.002 ± 0.002).
    assert abs(mean_err) < 4 * se(rows[:, 1]) + 0.005, errors
    assert abs(sd_err) < 4 * se(rows[:, 2]) + 0.02 * exact_sd, errors
    return errors


def test_smc2_matches_exact_evidence_and_posterior():
    rows = replicates(40)
    errors = check_against_exact(rows)
    # Measured (R = 40): E[Ẑ/Z] − 1 = −0.017 (SE 0.018), mean error −0.004 (SE 0.004, bound 0.020),
    # sd error +0.003 (SE 0.002, bound 0.015); exact posterior mean 0.411, sd 0.246; sd of log Ẑ 0.12.
    assert np.std(rows[:, 0]) < 0.5, errors  # the SE above is trustworthy only for a tight log Ẑ
    r = pp.infer(LGSSM, YS, algorithm=ALGORITHM, key=0)
    assert r.samples["a"].shape == r.log_weights.shape == (256,)
    assert r.ess.shape == r.resampled.shape == r.log_evidence_history.shape == (30,)
    assert float(jnp.exp(r.log_weights).sum()) == pytest.approx(np.exp(r.log_evidence), rel=1e-4)
    assert 0.1 < np.nanmean(r.extras["acceptance_rate"]) < 0.8


def test_check_fails_when_every_move_is_accepted(monkeypatch):
    # Skip the MH ratio: each move is then a plain random walk that ignores p(θ) Ẑ_t(θ), so the
    # population drifts off the posterior (measured, R = 10: mean error −0.55, sd 3.4x the exact
    # one, E[Ẑ/Z] − 1 = −0.64).
    always = lambda key, log_alpha, new, old: accept(key, 0 * log_alpha, new, old)  # log α = 0
    monkeypatch.setattr(smc2_module, "accept", always)
    monkeypatch.setattr(_compile, "_CACHE", OrderedDict())  # compile the broken variant apart
    rows = replicates(10)
    with pytest.raises(AssertionError):
        check_against_exact(rows)
    exact_mean, _ = lgssm_coefficient_posterior(YS, Q, C, R)
    assert abs(np.mean(rows[:, 1]) - exact_mean) > 0.2


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"num_particles": 0}, "num_particles"),
        ({"num_inner": 0}, "num_inner"),
        ({"num_inner": 2.5}, "num_inner"),
        ({"ess_threshold": 1.5}, "ess_threshold"),
        ({"inner_ess_threshold": -0.1}, "inner_ess_threshold"),
        ({"num_moves": 0}, "num_moves"),
        ({"resampling": "bogus"}, "bogus"),
    ],
)
def test_smc2_settings_are_checked(bad, match):
    with pytest.raises(pp.ConfigError, match=match):
        pp.SMC2(prior, **bad)


def test_smc2_needs_a_sequential_program():
    with pytest.raises(pp.ConfigError, match="prior must be a program"):
        pp.SMC2(3)
    with pytest.raises(pp.ConfigError, match="sequential"):
        pp.infer(prior, YS, algorithm=pp.SMC2(prior))


@pytest.mark.parametrize("which", ["resampling", "inner_resampling"])
def test_a_selection_returning_nan_weights_is_an_error(which):
    # Before: log_evidence nan, returned as a result.
    def nan_weights(u, lw):
        return Systematic()(u, lw)[0], jnp.full_like(lw, jnp.nan)

    algorithm = pp.SMC2(prior, num_particles=16, num_inner=8, ess_threshold=1.0, **{which: nan_weights})
    expected = r"log Ẑ is nan at the end: a log weight became NaN or \+inf — a selection"
    with pytest.raises(pp.InferenceError, match=expected):
        pp.infer(LGSSM, YS[:10], algorithm=algorithm, key=0)


def test_chunks_and_progress_bar_do_not_change_the_run(monkeypatch, capsys):
    """SMC² runs in compiled chunks of outer steps (progress bar, Ctrl-C between chunks); one step
    per chunk with a bar gives the arrays of the default chunking and of the pure run compiled
    whole (step t reads its own key)."""
    import dataclasses

    import jax

    from ppinfer import _talk

    algorithm = pp.SMC2(prior, num_particles=32, num_inner=16, num_moves=1)
    default = pp.infer(LGSSM, YS, algorithm=algorithm, key=4)
    monkeypatch.setattr(_talk, "FIRST_CHUNK", 1)
    monkeypatch.setattr(_talk, "CHUNK_SECONDS", 0.0)
    chunked = pp.infer(LGSSM, YS, algorithm=dataclasses.replace(algorithm, progress_bar=True), key=4)
    assert "SMC2 32x16 particles" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(chunked.log_weights), np.asarray(default.log_weights))
    np.testing.assert_array_equal(np.asarray(chunked.samples["a"]), np.asarray(default.samples["a"]))
    assert chunked.log_evidence == default.log_evidence
    run_whole = jax.jit(lambda key, ys: algorithm._run(key, LGSSM, (ys,), len(YS), False))
    whole = run_whole(jax.random.PRNGKey(4), YS)
    np.testing.assert_array_equal(np.asarray(whole["log_weights"]), np.asarray(default.log_weights))
    np.testing.assert_array_equal(np.asarray(whole["ess"]), np.asarray(default.ess))
