"""Exact invariance of the conditional SMC kernel: its transition matrix K, computed by enumerating
every random input of the real sweep (semantics.csmc), leaves the exact smoothing posterior π
stationary to round-off on finite HMMs — with and without ancestor sampling, with latent choices in
``init``, and when particles stop — while a sweep that does not pin the reference, or that
ancestor-samples with the wrong weights, is not invariant. K also agrees with the key-driven kernel's
empirical transitions."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy.stats import chi2

import ppinfer as pp
import ppinfer.algorithms.particle_gibbs as pg
from models.classic import discrete_hmm
from semantics.csmc import check_csmc_invariance, csmc_posterior, csmc_transition_matrix

# Built in float64: the exact check compares probabilities to ~1e-15, and a float32 transition row
# sums to 1 only to ~1e-8 (the check asserts that each reference's outcomes sum to 1).
with jax.enable_x64(True):
    PROBS0, TRANSITION, MEANS = (
        jnp.asarray([0.5, 0.5]),
        jnp.asarray([[0.7, 0.3], [0.4, 0.6]]),
        jnp.asarray([-1.0, 1.0]),
    )
    HMM = discrete_hmm(PROBS0, TRANSITION, MEANS, 1.0)
    YS3 = jnp.asarray([0.4, -0.2, 0.9])
    YS2 = YS3[:2]

TOL = 1e-8  # the bound; the valid kernels below measure 1e-16 to 7e-14


def _init_latent_hmm():
    """The HMM with x_0 drawn in ``init`` (so the trajectory has an ``init`` part) and x_{t+1} in
    step t."""

    def init(ys):
        return pp.sample("x0", dist.Categorical(probs=PROBS0))

    def step(x, t, ys):
        x = pp.sample("x", dist.Categorical(probs=TRANSITION[x]))
        pp.observe("y", dist.Normal(MEANS[x], 1.0), ys[t])
        return x

    return pp.sequential(init, step, lambda ys: ys.shape[0])


def _stopping_hmm():
    """The HMM whose particle ends after step 1 when x_1 = 1: trajectories of different lengths."""

    def step(x, t, ys):
        x = HMM.step(x, t, ys)
        pp.stop((x == 1) & (t == 1))
        return x

    return pp.sequential(HMM.init, step, 3)


@functools.cache
def exact_kernel(name: str, num_particles: int, ancestor_sampling: bool):
    program, ys = {
        "hmm3": (HMM, YS3),
        "hmm2": (HMM, YS2),
        "init2": (_init_latent_hmm(), YS2),
        "stop3": (_stopping_hmm(), YS3),
    }[name]
    states, k = csmc_transition_matrix(program, (ys,), num_particles, ancestor_sampling)
    post_states, pi = csmc_posterior(program, (ys,))
    assert states == post_states
    return program, ys, states, k, pi


@pytest.mark.parametrize(
    "name, num_particles, ancestor_sampling",
    [
        ("hmm3", 2, False),
        ("hmm3", 2, True),
        ("hmm2", 3, False),
        ("hmm2", 3, True),
        ("init2", 3, False),
        ("init2", 2, True),
        ("stop3", 2, False),
    ],
)
def test_csmc_leaves_exact_posterior_invariant(name, num_particles, ancestor_sampling):
    _, _, states, k, pi = exact_kernel(name, num_particles, ancestor_sampling)
    assert np.abs(pi @ k - pi).max() < TOL
    assert np.abs(k.sum(axis=1) - 1.0).max() < 1e-12
    # Every trajectory is reached from every other in one sweep (measured: min K = 1.1e-3).
    assert k.min() > 0.0
    # An identity kernel is invariant too: this one must move (from every state).
    assert np.all(np.diag(k) < 0.99)
    assert np.mean(1.0 - np.diag(k)) > 0.15
    if name == "stop3":
        assert len(states) == 6  # trajectories that stopped after step 1 are states of their own


def test_unpinned_sweep_is_not_invariant():
    # Not pinning slot 0 turns the sweep into one unconditional SMC run and one draw from its final
    # weights (the kernel's init): its law is far from π for N = 2, whatever the reference.
    unpinned = functools.partial(pg.csmc_step_from_noise, pin=False)
    states, k = csmc_transition_matrix(HMM, (YS3,), 2, sweep_fn=unpinned)
    _, pi = csmc_posterior(HMM, (YS3,))
    assert np.allclose(k, k[0], atol=1e-12)  # it forgets the reference
    assert np.abs(pi @ k - pi).max() > 0.05  # measured 0.125


def _ancestor_without_transition(next_step, particles, ref_next):
    """A wrong ancestor-sampling weight: ``w_i`` alone, without ``p(x*_t, y_t | s_i)``."""
    scores = jnp.where(particles.done, -jnp.inf, 0.0)
    return scores, jnp.zeros((), bool)


def _sweep_with_wrong_ancestor_weights(*args, **kwargs):
    # The real sweep, traced (once, under jit) with the wrong ancestor-sampling block in place.
    with mock.patch.object(pg, "_ancestor_scores", _ancestor_without_transition):
        return pg.csmc_step_from_noise(*args, **kwargs)


def test_wrong_ancestor_sampling_weights_are_not_invariant():
    error = check_csmc_invariance(HMM, (YS2,), 3, True, sweep_fn=_sweep_with_wrong_ancestor_weights)
    assert error > 0.01  # measured 0.0197; valid kernels ≤ 1e-13


def test_exact_kernel_matches_key_driven_sweeps():
    # The noise-driven sweep that the enumeration runs is the key-driven kernel: from each state,
    # CHAINS key-driven sweeps land on the states with frequencies K[x, ·] (chi-square per row;
    # each fails with probability ≤ 1e-3 / S when they agree, so the family ≤ 1e-3).
    num_particles, ancestor_sampling = 3, True
    program, ys, states, k, _ = exact_kernel("hmm2", num_particles, ancestor_sampling)
    chains, num_steps = 4000, len(ys)
    x = np.array([[dict(s)[f"{t}/x"] for t in range(num_steps)] for s in states])
    code = 2 ** np.arange(num_steps)  # binary states: a trajectory's number
    index = np.zeros(2**num_steps, np.int64)
    index[x @ code] = np.arange(len(states))
    with jax.enable_x64(True):
        kernel = pg.csmc(program, (ys,), num_particles, ancestor_sampling=ancestor_sampling)
        refs = pg.Trajectory(
            {},
            {"x": jnp.asarray(np.repeat(x, chains, axis=0))},
            jnp.ones((len(states) * chains, num_steps), bool),
        )
        keys = jax.random.split(jax.random.PRNGKey(11), len(states) * chains)
        new, _ = jax.jit(jax.vmap(lambda key, r: kernel.step(key, r, (ys,))))(keys, refs)
    out = index[np.asarray(new.steps["x"]) @ code].reshape(len(states), chains)
    alpha = 1e-3 / len(states)
    for s in range(len(states)):
        counts = np.bincount(out[s], minlength=len(states))
        expected = chains * k[s]
        small = expected < 5  # pooled so that the chi-square approximation holds
        obs = np.append(counts[~small], counts[small].sum())
        exp = np.append(expected[~small], expected[small].sum())
        obs, exp = obs[exp > 0], exp[exp > 0]
        stat = np.sum((obs - exp) ** 2 / exp)
        assert chi2.sf(stat, df=len(exp) - 1) > alpha, (states[s], counts, expected)
