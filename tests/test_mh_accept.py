"""The one Metropolis–Hastings accept rule (:func:`ppinfer.kernels.mh.accept`): its acceptance
frequency, NaN handling and pytree/batch selection, and exactly: a 3-state Metropolis kernel built on
it leaves its target invariant to 1e-12, while a shifted rule does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from ppinfer.kernels import Kernel, MHInfo, accept

LOG_ALPHAS = (-3.0, -1.0, -0.2, 0.0, 0.7, -np.inf, np.inf)


def test_acceptance_frequency_is_min_1_exp_log_alpha():
    # Each of the 5 non-degenerate checks: two-sided CLT bound with false-failure rate 1e-6
    # (z = 4.89), so ≤ 5e-6 for the test; log_alpha ≥ 0 always accepts, −inf never does (exactly).
    m = 200_000
    z = norm.isf(0.5e-6)
    for i, la in enumerate(LOG_ALPHAS):
        key = jax.random.PRNGKey(i)
        log_alpha = jnp.full((m,), la, jnp.float32)
        zeros = jnp.zeros((m,))
        state, info = accept(key, log_alpha, zeros + 1.0, zeros)
        # The stream: u = jax.random.uniform(key, log_alpha.shape, log_alpha.dtype).
        u = jax.random.uniform(key, (m,), jnp.float32)
        np.testing.assert_array_equal(info.accepted, jnp.log(u) < la)
        np.testing.assert_array_equal(state, info.accepted.astype(state.dtype))
        p = min(1.0, float(np.exp(la)))
        freq = float(jnp.mean(info.accepted))
        assert abs(freq - p) <= z * np.sqrt(p * (1 - p) / m), (la, freq, p)
        np.testing.assert_allclose(info.acceptance_rate, p, rtol=1e-6)
        np.testing.assert_array_equal(info.log_alpha, log_alpha)  # not clipped
        assert info.acceptance_probability is info.acceptance_rate


def test_nan_log_alpha_rejects():
    # u = 0 (log u = −inf) accepts every ratio above −inf: a NaN ratio still rejects.
    state, info = accept(jnp.zeros(()), jnp.nan, 1.0, 0.0)
    assert not bool(info.accepted) and float(state) == 0.0
    assert float(info.log_alpha) == -np.inf and float(info.acceptance_rate) == 0.0
    log_alpha = jnp.array([np.nan, 0.0, np.nan, 5.0])
    state, info = accept(jax.random.PRNGKey(0), log_alpha, jnp.ones(4), jnp.zeros(4))
    np.testing.assert_array_equal(info.accepted, [False, True, False, True])
    np.testing.assert_array_equal(state, [0.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(info.acceptance_rate, [0.0, 1.0, 0.0, 1.0])


def test_pytree_state_with_batch_axis():
    n = 6
    ok = np.arange(n) % 2 == 0  # log_alpha = +inf accepts, −inf rejects, whatever u is
    log_alpha = jnp.where(ok, jnp.inf, -jnp.inf)
    proposed = {
        "x": jnp.ones((n, 3)),
        "y": (jnp.arange(n), jnp.ones((n, 2, 2), jnp.int32)),
        "z": jnp.ones(n, bool),
    }
    current = jax.tree.map(jnp.zeros_like, proposed)
    step = jax.jit(lambda key, la: accept(key, la, proposed, current))
    state, info = step(jax.random.PRNGKey(1), log_alpha)
    assert isinstance(info, MHInfo) and info.accepted.shape == (n,)
    assert jax.tree.structure(state) == jax.tree.structure(proposed)
    for new, prop in zip(jax.tree.leaves(state), jax.tree.leaves(proposed), strict=True):
        assert new.shape == prop.shape and new.dtype == prop.dtype
        want = np.where(ok.reshape((n,) + (1,) * (prop.ndim - 1)), prop, 0)
        np.testing.assert_array_equal(new, want)
    # The same step vmapped over chains (each with a scalar log_alpha) gives the same state.
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    vstate, vinfo = jax.vmap(accept)(keys, log_alpha, proposed, current)
    np.testing.assert_array_equal(vinfo.accepted, ok)
    jax.tree.map(np.testing.assert_array_equal, vstate, state)
    # A scalar decision selects whole leaves; a leaf without the batch axes is an error.
    whole, _ = accept(jnp.zeros(()), 0.0, proposed, current)
    jax.tree.map(np.testing.assert_array_equal, whole, proposed)
    with pytest.raises(ValueError, match="batch axes"):
        accept(jax.random.PRNGKey(0), log_alpha, jnp.ones(()), jnp.zeros(()))


def acceptance_cells(log_alpha: float, grid: int = 4096):
    """Midpoints and lengths of a split of [0, 1) into cells at ``k / grid`` and at
    ``min(1, exp(log_alpha))``, the one point where ``log u < log_alpha`` changes: the correct rule
    is constant on each cell, so summing cell lengths where it accepts is its exact probability (a
    rule with another change point is only approximated, to within 1/grid)."""
    c = min(1.0, float(np.exp(log_alpha)))
    edges = np.unique(np.concatenate([np.arange(grid + 1) / grid, [c]]))
    return (edges[:-1] + edges[1:]) / 2, np.diff(edges)


def test_acceptance_probability_is_exact(x64):
    for la in (-5.0, -1.3, -np.log(3.0), -1e-3, 0.0, 0.4, -np.inf):
        mids, lengths = acceptance_cells(la)
        _, info = jax.vmap(lambda u, la=la: accept(u, jnp.float64(la), 1.0, 0.0))(jnp.asarray(mids))
        prob = float(np.sum(lengths * np.asarray(info.accepted)))
        assert abs(prob - min(1.0, np.exp(la))) < 1e-12, (la, prob)


# A 3-state Metropolis–Hastings kernel on a cycle: propose x ± 1 (mod 3), +1 with probability p_right.
PI = np.array([0.2, 0.5, 0.3])


def mh_kernel(rule, p_right: float):
    """``step(u_prop, u_acc, x) -> x'`` with explicit uniforms, and the same as a :class:`Kernel`."""
    log_pi = jnp.log(jnp.asarray(PI))
    log_q = jnp.log(jnp.asarray([p_right, 1.0 - p_right]))  # [q(x+1 | x), q(x−1 | x)]

    def step(u_prop, u_acc, x):
        right = u_prop < p_right
        new = (x + jnp.where(right, 1, -1)) % 3
        # log α = log π(x') + log q(x | x') − log π(x) − log q(x' | x); the reverse of a right move
        # is a left move.
        log_alpha = log_pi[new] - log_pi[x] + jnp.where(right, log_q[1] - log_q[0], log_q[0] - log_q[1])
        return rule(u_acc, log_alpha, new, x)[0]

    def kernel(key, x):
        k_prop, k_acc = jax.random.split(key)
        return step(jax.random.uniform(k_prop, dtype=jnp.float64), k_acc, x), None

    return step, kernel


def transition_matrix(rule, p_right: float) -> np.ndarray:
    """The exact transition matrix: the two proposals enumerated (a uniform in each of the cells
    [0, p_right) and [p_right, 1)), the acceptance uniform split by :func:`acceptance_cells`."""
    step, _ = mh_kernel(rule, p_right)
    log_pi = np.log(PI)
    k = np.zeros((3, 3))
    for x in range(3):
        for u_prop, q in ((p_right / 2, p_right), ((1 + p_right) / 2, 1 - p_right)):
            new = (x + (1 if u_prop < p_right else -1)) % 3
            rev = 1 - q
            mids, lengths = acceptance_cells(log_pi[new] - log_pi[x] + np.log(rev) - np.log(q))
            nxt = jax.vmap(lambda u, u_prop=u_prop, x=x: step(u_prop, u, jnp.asarray(x)))(jnp.asarray(mids))
            np.add.at(k[x], np.asarray(nxt), q * lengths)
    return k


def shifted(u, log_alpha, proposed, current):
    """A broken rule: accepts where ``log u < log_alpha + 0.5``."""
    return accept(u, log_alpha + 0.5, proposed, current)


@pytest.mark.parametrize("p_right", [0.5, 0.8])
def test_metropolis_kernel_on_accept_is_exactly_invariant(x64, p_right):
    k = transition_matrix(accept, p_right)
    np.testing.assert_allclose(k.sum(axis=1), 1.0, atol=1e-12)
    assert np.max(np.abs(PI @ k - PI)) < 1e-12
    assert np.max(np.diag(k)) > 0.1  # it does reject (else the check would not test the rule)
    # Detailed balance, not only invariance.
    flow = PI[:, None] * k
    assert np.max(np.abs(flow - flow.T)) < 1e-12
    # The shifted rule breaks invariance (measured: by 0.16 for p_right = 0.5, 0.034 for 0.8).
    broken = transition_matrix(shifted, p_right)
    assert np.max(np.abs(PI @ broken - PI)) > 1e-3


def test_kernel_type(x64):
    _, kernel = mh_kernel(accept, 0.8)
    assert isinstance(kernel, Kernel)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x, _ = jax.jit(jax.vmap(kernel))(keys, jnp.arange(4) % 3)
    assert x.shape == (4,) and np.all((np.asarray(x) >= 0) & (np.asarray(x) < 3))
