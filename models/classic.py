"""Classic models with exact answers (see ``semantics.exact``), used by tests, docs and the demo.

Sequential models take the data ``ys: f32[T]`` as their argument; step ``t`` samples the latent
state ``x_t`` (from the initial distribution when ``t = 0``) and observes ``ys[t]``, so the step site
``x`` lines up with the data.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import ppinfer as pp

__all__ = [
    "sprinkler",
    "discrete_hmm",
    "lgssm",
    "lgssm_unknown_coefficient",
    "simulate_lgssm",
    "simulate_hmm",
    "beta_bernoulli",
]


def sprinkler(wet: bool = True):
    """The sprinkler network (rain → sprinkler → wet grass), conditioned on the grass being ``wet``."""

    def model():
        rain = pp.sample("rain", dist.Bernoulli(0.2))
        sprinkler_on = pp.sample("sprinkler", dist.Bernoulli(jnp.where(rain, 0.01, 0.4)))
        p_wet = jnp.array([[0.0, 0.8], [0.9, 0.99]])[sprinkler_on, rain]
        pp.observe("wet", dist.Bernoulli(p_wet), jnp.asarray(wet, jnp.int32))

    return model


def discrete_hmm(init_probs, transition, means, scale: float) -> pp.SequentialProgram:
    """Hidden Markov model with K states: ``x_0 ~ Cat(init_probs)``, ``x_t ~ Cat(transition[x_{t−1}])``,
    ``y_t ~ N(means[x_t], scale)``. Exact answer: :func:`semantics.exact.hmm_forward`."""
    init_probs, transition, means = map(jnp.asarray, (init_probs, transition, means))

    def init(ys):
        return jnp.zeros((), jnp.int32)

    def step(x, t, ys):
        probs = jnp.where(t == 0, init_probs, transition[x])
        x = pp.sample("x", dist.Categorical(probs=probs))
        pp.observe("y", dist.Normal(means[x], scale), ys[t])
        return x

    return pp.sequential(init, step, num_steps=lambda ys: ys.shape[0])


def lgssm(a: float, q: float, c: float, r: float, m0: float = 0.0, p0: float = 1.0):
    """Linear-Gaussian state-space model (variances ``q``, ``r``, ``p0``):
    ``x_0 ~ N(m0, p0)``, ``x_t ~ N(a x_{t−1}, q)``, ``y_t ~ N(c x_t, r)``. Exact answer:
    :func:`semantics.exact.kalman_filter`."""

    def init(ys):
        return jnp.zeros((), jnp.float32)

    def step(x, t, ys):
        first = t == 0
        loc = jnp.where(first, m0, a * x)
        scale = jnp.sqrt(jnp.where(first, p0, q))
        x = pp.sample("x", dist.Normal(loc, scale))
        pp.observe("y", dist.Normal(c * x, np.sqrt(r)), ys[t])
        return x

    return pp.sequential(init, step, num_steps=lambda ys: ys.shape[0])


def lgssm_unknown_coefficient(q: float, c: float, r: float):
    """The LGSSM of :func:`lgssm` (``m0 = 0``, ``p0 = 1``) with its AR coefficient a static
    parameter ``a ~ Uniform(−1, 1)``, in the form PMMH and particle Gibbs take: returns
    ``(prior, program)``, ``prior(ys)`` sampling ``"a"`` and ``program`` a sequential program whose
    ``init``/``step`` read ``theta["a"]``. Exact answer:
    :func:`semantics.exact.lgssm_coefficient_posterior`."""

    def prior(ys):
        pp.sample("a", dist.Uniform(-1.0, 1.0))

    def init(theta, ys):
        return jnp.zeros(())

    def step(x, t, theta, ys):
        loc = jnp.where(t == 0, 0.0, theta["a"] * x)
        x = pp.sample("x", dist.Normal(loc, jnp.sqrt(jnp.where(t == 0, 1.0, q))))
        pp.observe("y", dist.Normal(c * x, np.sqrt(r)), ys[t])
        return x

    return prior, pp.sequential(init, step, lambda theta, ys: ys.shape[0])


def simulate_lgssm(key: int, num_steps: int, a, q, c, r, m0=0.0, p0=1.0) -> np.ndarray:
    """Data ``f32[T]`` drawn from :func:`lgssm` with a numpy seed."""
    rng = np.random.default_rng(key)
    x = rng.normal(m0, np.sqrt(p0))
    ys = []
    for t in range(num_steps):
        if t > 0:
            x = a * x + rng.normal(0, np.sqrt(q))
        ys.append(c * x + rng.normal(0, np.sqrt(r)))
    return np.asarray(ys, np.float32)


def simulate_hmm(key: int, num_steps: int, init_probs, transition, means, scale) -> np.ndarray:
    """Data ``f32[T]`` drawn from :func:`discrete_hmm` with a numpy seed."""
    rng = np.random.default_rng(key)
    k = len(init_probs)
    x = rng.choice(k, p=init_probs)
    ys = []
    for t in range(num_steps):
        if t > 0:
            x = rng.choice(k, p=np.asarray(transition)[x])
        ys.append(rng.normal(np.asarray(means)[x], scale))
    return np.asarray(ys, np.float32)


def beta_bernoulli(alpha: float = 1.0, beta: float = 1.0):
    """``p ~ Beta(alpha, beta)``, ``flips_i ~ Bernoulli(p)``. Exact posterior: Beta(alpha + heads,
    beta + tails); evidence: ``B(alpha + h, beta + t) / B(alpha, beta)``."""

    def model(flips):
        p = pp.sample("p", dist.Beta(alpha, beta))
        with pp.plate("data", flips.shape[0]):
            pp.observe("flips", dist.Bernoulli(p), flips)

    return model
