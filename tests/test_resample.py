import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppinfer as pp
from ppinfer.population import Population
from ppinfer.resample import SCHEMES, ancestors_from_uniforms
from semantics import check_resample, resample_outcomes

WEIGHTS = [
    [0.1, -1.0],
    [0.3, -0.2, -2.0],
    [-np.inf, 0.0, -1.0],
    [0.0, 0.0, 0.0],
    [2.0, -3.0, 0.5, -0.5],
]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("log_weights", WEIGHTS)
def test_resampling_is_valid_exactly(x64, scheme, log_weights):
    # E[⟦resample(pop)⟧] = ⟦pop⟧, by enumerating the resampler's uniforms.
    assert check_resample(scheme, log_weights) < 1e-12


@pytest.mark.parametrize("scheme", SCHEMES)
def test_outcome_probabilities_sum_to_one(x64, scheme):
    outcomes = resample_outcomes(scheme, [0.3, -0.2, -2.0])
    assert math.fsum(p for p, _ in outcomes) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_check_resample_takes_weights_of_any_scale(x64, scheme):
    # exp(800) overflowed (a raw OverflowError); the error is now relative to the total mass.
    assert check_resample(scheme, [800.0, 799.0, -5.0]) < 1e-12
    assert check_resample(scheme, [-800.0, -801.0]) < 1e-12


def test_a_biased_resampler_fails_the_check(x64):
    from ppinfer.kernels.select import Systematic

    # Picking the heaviest particle every time is not valid; the exact check must say so.
    def greedy(u, lw):
        n = u.shape[0]
        lse = jax.scipy.special.logsumexp(lw)
        return jnp.full(n, jnp.argmax(lw), jnp.int32), jnp.full(n, lse - jnp.log(n))

    assert check_resample(greedy, [0.1, -1.0]) > 0.1
    # Resetting weights to 0 (losing Ẑ) is not valid either: the check reads the returned weights.
    reset = lambda u, lw: (Systematic()(u, lw)[0], jnp.zeros(u.shape[0]))
    assert check_resample(reset, [0.1, -1.0]) > 0.1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dead_particles_are_never_chosen(scheme):
    lw = jnp.array([-jnp.inf, 0.0, -jnp.inf, -1.0, -jnp.inf])
    pop = Population(jnp.arange(5), lw)
    for seed in range(20):
        new, anc = pp.resample(jax.random.PRNGKey(seed), pop, scheme)
        assert set(np.asarray(anc).tolist()) <= {1, 3}
        np.testing.assert_allclose(new.log_weights, pp.log_evidence(lw) - np.log(5), rtol=1e-6)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_all_dead_gives_no_nan(scheme):
    pop = Population(jnp.arange(3.0), jnp.full(3, -jnp.inf))
    new, anc = pp.resample(jax.random.PRNGKey(0), pop, scheme)
    assert np.all(np.isneginf(new.log_weights))
    np.testing.assert_array_equal(anc, [0, 1, 2])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_offspring_counts_match_weights(scheme):
    # Mean offspring over 2000 vmapped resamplings matches N·w_i; CLT bound at false-failure 1e-3
    # per coordinate (fixed seed).
    n = 50
    lw = jax.random.normal(jax.random.PRNGKey(1), (n,))
    pop = Population(jnp.arange(n), lw)
    keys = jax.random.split(jax.random.PRNGKey(2), 2000)
    anc = jax.jit(jax.vmap(lambda k: pp.resample(k, pop, scheme)[1]))(keys)
    counts = np.stack([np.bincount(a, minlength=n) for a in np.asarray(anc)])
    expected = n * np.exp(np.asarray(pp.normalize(lw)))
    se = counts.std(0, ddof=1) / np.sqrt(len(keys)) + 1e-9
    assert np.all(np.abs(counts.mean(0) - expected) <= 3.29 * se + 1e-6)


def test_uniform_extremes_stay_in_range():
    lw = jnp.array([0.0, -jnp.inf])
    for scheme in SCHEMES:
        u = jnp.full((2,), 0.9999999)
        u = u[:1] if scheme == "systematic" else u
        assert np.all(np.asarray(ancestors_from_uniforms(scheme, u, lw)) == 0)


def test_unknown_scheme():
    with pytest.raises(pp.ConfigError, match="resampling scheme"):
        pp.resample(jax.random.PRNGKey(0), Population(jnp.arange(2), jnp.zeros(2)), "bogus")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_group_resampling_keeps_groups_and_their_mass(scheme):
    from ppinfer.resample import resample_groups

    lw = jax.random.normal(jax.random.PRNGKey(3), (12,))
    pop = Population(jnp.arange(12), lw)
    new, anc = resample_groups(jax.random.PRNGKey(4), pop, scheme, 3)
    anc = np.asarray(anc)
    assert np.all(anc // 4 == np.arange(12) // 4)
    for g in range(3):
        np.testing.assert_allclose(
            pp.log_evidence(new.log_weights[4 * g : 4 * g + 4]),
            pp.log_evidence(lw[4 * g : 4 * g + 4]),
            rtol=1e-5,
        )


def test_local_resampling_smc_is_unbiased():
    # Island resampling (4 groups) keeps E[Ẑ] = Z (CLT bound, false-failure rate 1e-3).
    from models.classic import lgssm, simulate_lgssm
    from ppinfer.algorithms.smc import Loop, run_loop, smc_selection
    from semantics import check_unbiased_evidence, kalman_filter

    ys = jnp.asarray(simulate_lgssm(5, 10, 0.9, 0.5, 1.0, 1.0))
    prog = lgssm(0.9, 0.5, 1.0, 1.0)
    loop = Loop(32, 10, smc_selection("systematic", 1.0, num_groups=4), history=False)
    run = jax.jit(jax.vmap(lambda k: run_loop(k, prog, (ys,), loop)["log_evidence"]))
    lz = np.asarray(run(jax.random.split(jax.random.PRNGKey(0), 2000)))
    assert check_unbiased_evidence(lz, kalman_filter(0.9, 0.5, 1.0, 1.0, 0.0, 1.0, np.asarray(ys))[0])
