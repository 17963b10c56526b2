"""Identities between objectives: Rényi α = 0 is the IWELBO (α → 1 the ELBO); at the exact
posterior every importance weight is Z, so ELBO = IWELBO = log Z, and the ELBO is stationary."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import betaln
from normal_normal import normal_guide as guide
from normal_normal import normal_model as model

import ppinfer as pp
from models.classic import beta_bernoulli
from ppinfer.vi import Particles, constrain, elbo, find_params, iwelbo, renyi, sample_particles
from semantics import check_mean

RATE = 1e-4  # per component; 2 components in this file's CLT check


def random_particles(seed, k):
    rng = np.random.default_rng(seed)
    lw = jnp.asarray(rng.normal(-3.0, 2.0, k), jnp.float32)
    zeros = jnp.zeros(k)
    return Particles(lw, lw + 1.0, -jnp.ones(k), zeros, zeros, {})


@pytest.mark.parametrize("k", [1, 3, 16])
def test_renyi_alpha_zero_is_iwelbo_and_alpha_to_one_is_elbo(k):
    ps = random_particles(k, k)
    assert float(renyi(0.0, k).fn(ps)) == pytest.approx(float(iwelbo(k).fn(ps)), abs=1e-6)
    assert float(renyi(1.0 - 1e-4, k).fn(ps)) == pytest.approx(float(elbo(k).fn(ps)), abs=2e-3)
    assert renyi(1.0, k).name == "elbo"


# The normal-normal setting (tests/normal_normal.py): posterior N(y/2, 1/2), log Z = log N(y; 0, 2).
Y = 1.3
LOG_Z = float(dist.Normal(0.0, np.sqrt(2.0)).log_prob(Y))


SPEC = find_params(jax.random.PRNGKey(0), [(guide, (Y,))])
EXACT = {"m": jnp.asarray(Y / 2), "s": jnp.asarray(np.sqrt(0.5), jnp.float32)}


def surrogate_and_grad(objectives, estimators):
    """``(keys f[R], params) ->`` for each objective ``(values f32[R], grads {name: f32[R]})`` at the
    same draws (one compiled function; ``params`` constrained)."""

    def f(key, params):
        u = {n: pp.vi.unconstrain(v, SPEC.constraints[n]) for n, v in params.items()}
        g = lambda o: (
            lambda u: o.surrogate(key, model, guide, constrain(u, SPEC.constraints), (Y,), estimators)[0]
        )
        return [jax.value_and_grad(g(o))(u) for o in objectives]

    return jax.jit(jax.vmap(f, (0, None)))


@pytest.mark.parametrize("estimators", ["reparam", "reinforce"])
def test_renyi_alpha_zero_surrogate_equals_iwelbo_draw_by_draw(estimators):
    """Same key, same guide draws: equal values *and* equal gradients (both estimators)."""
    keys = jax.random.split(jax.random.PRNGKey(3), 8)
    params = {"m": jnp.asarray(0.2), "s": jnp.asarray(0.8)}
    (v_r, g_r), (v_i, g_i) = surrogate_and_grad([renyi(0.0, 4), iwelbo(4)], estimators)(keys, params)
    np.testing.assert_allclose(v_r, v_i, rtol=1e-6, atol=1e-6)
    for n in ("m", "s"):
        np.testing.assert_allclose(g_r[n], g_i[n], rtol=1e-5, atol=1e-6)
        assert np.std(np.asarray(g_r[n])) > 0  # the draws differ: not a vacuous comparison


def test_weights_are_constant_log_z_at_exact_posterior():
    ps = jax.jit(lambda k: sample_particles(k, model, guide, EXACT, (Y,), 1000))(jax.random.PRNGKey(0))
    np.testing.assert_allclose(ps.log_weight, LOG_Z, atol=1e-5)
    values = jax.jit(
        lambda k: [o.surrogate(k, model, guide, EXACT, (Y,))[0] for o in (elbo(8), iwelbo(8), renyi(0.5, 8))]
    )(jax.random.PRNGKey(1))
    np.testing.assert_allclose(values, LOG_Z, atol=1e-5)


def test_elbo_gradient_has_mean_zero_at_exact_posterior():
    """The exact posterior maximises the ELBO: each reparam gradient draw is non-zero, their mean is
    zero (CLT check per component); away from it the mean is not (the check has power)."""
    keys = jax.random.split(jax.random.PRNGKey(4), 4000)
    grads = surrogate_and_grad([elbo(1)], "reparam")
    [(_, g)] = grads(keys, EXACT)
    for n in ("m", "s"):
        assert np.std(np.asarray(g[n])) > 0.1
        assert check_mean(g[n], 0.0, RATE), (n, float(np.mean(g[n])))
    [(_, g_off)] = grads(keys, {"m": EXACT["m"] + 0.2, "s": EXACT["s"]})
    assert not check_mean(g_off["m"], 0.0, RATE)


# Beta-Bernoulli: the Beta(2 + heads, 2 + tails) guide is the posterior; log Z = log B(a', b') − log B(2, 2).
FLIPS = jnp.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], jnp.int32)
HEADS, TAILS = int(FLIPS.sum()), int((1 - FLIPS).sum())


def beta_guide(flips):
    a = numpyro.param("a", 1.0, constraint=dist.constraints.positive)
    b = numpyro.param("b", 1.0, constraint=dist.constraints.positive)
    pp.sample("p", dist.Beta(a, b))


def test_beta_bernoulli_elbo_is_log_z_at_exact_posterior():
    log_z = float(betaln(2.0 + HEADS, 2.0 + TAILS) - betaln(2.0, 2.0))
    exact = {"a": jnp.asarray(2.0 + HEADS), "b": jnp.asarray(2.0 + TAILS)}
    bb = beta_bernoulli(2.0, 2.0)
    ps = jax.jit(lambda k: sample_particles(k, bb, beta_guide, exact, (FLIPS,), 1000))(jax.random.PRNGKey(0))
    np.testing.assert_allclose(ps.log_weight, log_z, atol=2e-4)
