import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppinfer as pp
from ppinfer.population import Population, collapse_from_uniform, gather
from semantics import check_collapse, check_spawn


def test_spawn_copies_and_splits_weight():
    pop = pp.spawn({"a": jnp.array([1.0, 2.0])}, 4, log_weight=0.5)
    assert pop.particles["a"].shape == (4, 2)
    np.testing.assert_allclose(pop.log_weights, 0.5 - np.log(4), rtol=1e-6)
    np.testing.assert_allclose(pp.log_evidence(pop.log_weights), 0.5, rtol=1e-6)


def test_spawn_is_valid(x64):
    assert check_spawn(5) < 1e-12


def test_ess_uniform_and_degenerate():
    assert float(pp.ess(jnp.zeros(10))) == pytest.approx(10.0, rel=1e-5)
    assert float(pp.ess(jnp.array([0.0, -jnp.inf, -jnp.inf]))) == pytest.approx(1.0)
    assert float(pp.ess(jnp.full(3, -jnp.inf))) == 0.0
    # ESS is invariant to a common shift of the log weights, even a huge one.
    lw = jnp.array([0.1, -0.3, 0.7])
    assert float(pp.ess(lw - 1e4)) == pytest.approx(float(pp.ess(lw)), rel=1e-3)


@pytest.mark.parametrize("shift", [0.0, -1e4, -1e8, 300.0])
def test_log_evidence_and_ess_match_float64_at_every_scale(shift):
    from ppinfer.population import log_evidence_and_ess

    rng = np.random.default_rng(0)
    lw = rng.normal(size=1000) * 3.0
    lw[::7] = -np.inf
    x = (lw + shift).astype(np.float32)
    lse, ess = log_evidence_and_ess(jnp.asarray(x))
    x = x.astype(np.float64)  # the reference: the same float32 inputs, in float64
    top = x[np.isfinite(x)].max()
    w = np.exp(x - top)
    assert float(lse) == pytest.approx(np.log(w.sum()) + top, rel=1e-6, abs=1e-5)
    assert float(ess) == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-5)


def test_log_evidence_and_ess_dead_nan_and_gradient():
    from ppinfer.population import log_evidence_and_ess

    lse, ess = log_evidence_and_ess(jnp.full(4, -jnp.inf))
    assert float(lse) == -np.inf and float(ess) == 0.0
    assert np.isnan(float(log_evidence_and_ess(jnp.array([0.0, jnp.nan]))[0]))
    assert float(log_evidence_and_ess(jnp.array([0.0, jnp.inf]))[0]) == np.inf
    lw = jnp.array([0.3, -1.2, 2.0, -jnp.inf])
    grad = jax.grad(lambda x: log_evidence_and_ess(x)[0])(lw)  # VSMC differentiates log Ẑ
    np.testing.assert_allclose(grad, jax.grad(jax.scipy.special.logsumexp)(lw), rtol=1e-6)


def test_normalize_and_log_evidence():
    lw = jnp.array([1.0, 2.0, -jnp.inf])
    p = jnp.exp(pp.normalize(lw))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
    assert float(p[2]) == 0.0
    np.testing.assert_allclose(pp.log_evidence(lw), np.log(np.e + np.e**2), rtol=1e-6)
    dead = pp.normalize(jnp.full(2, -jnp.inf))
    assert not np.any(np.isnan(dead))


def test_collapse_valid_exactly(x64):
    assert check_collapse([0.2, -1.0, 0.5]) < 1e-12
    assert check_collapse([-np.inf, 0.0, -2.0]) < 1e-12


def test_collapse_returns_total_mass_and_live_particle():
    pop = Population(jnp.arange(3), jnp.array([-jnp.inf, 0.0, -jnp.inf]))
    for u in (0.0, 0.5, 0.999999):
        i, lw = collapse_from_uniform(jnp.array([u]), pop)
        assert int(i) == 1 and float(lw) == 0.0
    i, lw = pp.collapse(jax.random.PRNGKey(0), pop)
    assert int(i) == 1


def test_gather_every_leaf():
    parts = {"x": jnp.arange(4.0), "y": jnp.arange(8).reshape(4, 2)}
    out = gather(parts, jnp.array([3, 3, 0, 1]))
    np.testing.assert_array_equal(out["x"], [3.0, 3.0, 0.0, 1.0])
    np.testing.assert_array_equal(out["y"][0], [6, 7])
