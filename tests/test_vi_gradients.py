"""Unbiasedness of the VI gradient estimators against exact gradients computed by enumeration.

Each check compares the mean of R vmapped replications of ``jax.grad(surrogate)`` with the exact
gradient, per component, with a CLT bound at false-failure rate 1e-4 (fixed seeds, so a pass is
reproducible; about 40 component checks in this file: family-wise rate ≤ 0.4 %).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from normal_normal import normal_guide, normal_model

import ppinfer as pp
from ppinfer.vi import (
    Particles,
    constrain,
    elbo,
    expectation,
    find_params,
    iwelbo,
    renyi,
    rws,
    sample_particles,
    wake_p,
    wake_q,
)
from semantics import check_mean

RATE = 1e-4
PRIOR = jnp.array([0.2, 0.5, 0.3])
MU = jnp.array([-1.0, 0.0, 2.0])
Y = 1.0


def cat_model(y):
    b = numpyro.param("b", 0.3)
    z = pp.sample("z", dist.Categorical(probs=PRIOR))
    pp.observe("y", dist.Normal(MU[z] + b, 1.0), y)


def cat_guide(y):
    theta = numpyro.param("theta", jnp.array([0.3, -0.2, 0.1]))
    pp.sample("z", dist.Categorical(logits=theta))


SPEC = find_params(jax.random.PRNGKey(0), [(cat_guide, (Y,)), (cat_model, (Y,))])


def exact_objective(objective, u):
    """``E[F]`` by enumerating the K samples' joint values (differentiable in ``u``); for
    fixed-sample objectives the sampling probabilities are held fixed, giving ``E[∇F]``."""
    p = constrain(u, SPEC.constraints)
    log_q = jax.nn.log_softmax(p["theta"])
    log_p = jnp.log(PRIOR) + dist.Normal(MU + p["b"], 1.0).log_prob(Y)
    k = objective.num_particles
    idx = jnp.asarray(list(itertools.product(range(3), repeat=k)))
    zeros = jnp.zeros(idx.shape)
    ps = Particles(log_p[idx] - log_q[idx], log_p[idx], log_q[idx], zeros, zeros, {})
    values = jax.vmap(objective.fn)(ps)
    mass = jnp.exp(jnp.sum(log_q[idx], axis=1))
    if objective.fixed_samples:
        mass = jax.lax.stop_gradient(mass)
    return jnp.sum(mass * values)


def grad_replicates(objective, estimators, reps, baseline=0.0, seed=1):
    def one(key):
        f = lambda u: objective.surrogate(
            key, cat_model, cat_guide, constrain(u, SPEC.constraints), (Y,), estimators, baseline
        )[0]
        return jax.grad(f)(SPEC.init)

    return jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(seed), reps))


def flat(g):
    return np.concatenate([np.asarray(g["theta"]).reshape(-1, 3), np.asarray(g["b"]).reshape(-1, 1)], 1)


def tempered_elbo(num_particles):
    """A user-written objective: ELBO with the likelihood tempered by 0.5 (its own constructs only)."""
    return expectation(lambda ps: jnp.mean(0.5 * ps.log_p + 0.5 * jnp.log(0.2) - ps.log_q), num_particles)


OBJECTIVES = {
    "elbo": elbo(1),
    "iwelbo3": iwelbo(3),
    "renyi0.5": renyi(0.5, 2),
    "wake_q3": wake_q(3),
    "wake_p3": wake_p(3),
    "tempered2": tempered_elbo(2),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_reinforce_gradient_is_unbiased(name):
    objective = OBJECTIVES[name]
    exact = flat(jax.grad(lambda u: exact_objective(objective, u))(SPEC.init))[0]
    grads = flat(grad_replicates(objective, "reinforce", 4000, baseline=-2.0))
    for j in range(4):
        assert check_mean(grads[:, j], exact[j], RATE), (name, j, grads[:, j].mean(), exact[j])


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_enumerated_gradient_is_exact(name):
    objective = OBJECTIVES[name]
    exact = flat(jax.grad(lambda u: exact_objective(objective, u))(SPEC.init))[0]
    grads = flat(grad_replicates(objective, "enumerate", 3))
    np.testing.assert_allclose(grads, np.broadcast_to(exact, grads.shape), rtol=1e-4, atol=1e-5)
    value, _ = objective.surrogate(
        jax.random.PRNGKey(0), cat_model, cat_guide, constrain(SPEC.init, SPEC.constraints), (Y,),
        "enumerate",
    )  # fmt: skip
    assert float(value) == pytest.approx(float(exact_objective(objective, SPEC.init)), rel=1e-5)


def test_baseline_lowers_variance_not_mean():
    g0 = flat(grad_replicates(elbo(1), "reinforce", 4000, baseline=0.0))
    gb = flat(grad_replicates(elbo(1), "reinforce", 4000, baseline=-2.0))
    assert gb[:, :3].std(0).sum() < 0.7 * g0[:, :3].std(0).sum()


def test_reinforce_without_score_term_is_detected_as_biased():
    """The estimator that forgets the score term (``∇F`` at a fixed sample) must fail the check."""

    def one(key):
        def f(u):
            ps = sample_particles(
                key, cat_model, cat_guide, constrain(u, SPEC.constraints), (Y,), 1, "reinforce"
            )
            return jnp.mean(ps.log_weight)

        return jax.grad(f)(SPEC.init)

    grads = flat(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(3), 4000)))
    exact = flat(jax.grad(lambda u: exact_objective(elbo(1), u))(SPEC.init))[0]
    assert not all(check_mean(grads[:, j], exact[j], RATE) for j in range(3))


def test_rws_gradient_is_wake_p_plus_wake_q():
    exact_rws = flat(jax.grad(lambda u: exact_objective(rws(2), u))(SPEC.init))[0]
    exact_p = flat(jax.grad(lambda u: exact_objective(wake_p(2), u))(SPEC.init))[0]
    exact_q = flat(jax.grad(lambda u: exact_objective(wake_q(2), u))(SPEC.init))[0]
    np.testing.assert_allclose(exact_rws, exact_p + exact_q, rtol=1e-5)
    grads = flat(grad_replicates(rws(2), None, 4000))
    for j in range(4):
        assert check_mean(grads[:, j], exact_rws[j], RATE)


# Continuous model: z ~ N(0, 1), y ~ N(z, 1); guide N(m, s). Closed-form ELBO:
# E_q[log p(z) + log p(y|z)] + H(q) = −(m² + s²)/2 − ((y − m)² + s²)/2 − log 2π + log s + ½ log 2πe.


NSPEC = find_params(jax.random.PRNGKey(0), [(normal_guide, (Y,))])


def exact_normal_elbo(u):
    p = constrain(u, NSPEC.constraints)
    m, s = p["m"], p["s"]
    return (
        -(m**2 + s**2) / 2
        - ((Y - m) ** 2 + s**2) / 2
        - jnp.log(2 * jnp.pi)
        + jnp.log(s)
        + 0.5 * jnp.log(2 * jnp.pi * jnp.e)
    )


@pytest.mark.parametrize("estimator", ["reparam", "reinforce"])
def test_reparam_and_reinforce_agree_with_exact_elbo_gradient(estimator):
    exact = jax.grad(exact_normal_elbo)(NSPEC.init)
    value = elbo(1).surrogate

    def one(key):
        f = lambda u: value(
            key, normal_model, normal_guide, constrain(u, NSPEC.constraints), (Y,), estimator, -1.5
        )[0]
        return jax.grad(f)(NSPEC.init)

    grads = jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(5), 20000))
    for name in ("m", "s"):
        assert check_mean(grads[name], float(exact[name]), RATE), (estimator, name)
    # ELBO's value is unbiased too.
    vals = jax.vmap(
        lambda k: value(k, normal_model, normal_guide, constrain(NSPEC.init, NSPEC.constraints), (Y,))[1]
    )(jax.random.split(jax.random.PRNGKey(6), 20000))
    assert check_mean(vals, float(exact_normal_elbo(NSPEC.init)), RATE)
