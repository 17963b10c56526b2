"""posteriordb models ported from the math in ``/work/shared/posteriordb/MODELS.md`` (not from Stan
code), with loaders for their data and reference summaries.

Each model is a plain program ``model(**data)``-style function taking the arrays it needs; the
sites (latent or ``deterministic``) are named as the reference parameters (vector sites flatten to
``name[1..K]``). Flat priors are ``ImproperUniform`` sites; dependent bounds are reparameterised
with their log-Jacobian as a factor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

import ppinfer as pp

__all__ = ["POSTERIORS", "load", "reference", "flatten_draws", "ROOT"]

ROOT = os.environ.get("PPINFER_POSTERIORDB", "/work/shared/posteriordb")


def eight_schools_noncentered(y, sigma):
    mu = pp.sample("mu", dist.Normal(0.0, 5.0))
    tau = pp.sample("tau", dist.HalfCauchy(5.0))
    with pp.plate("J", y.shape[0]):
        theta_tilde = pp.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = pp.deterministic("theta", mu + tau * theta_tilde)
        pp.observe("y", dist.Normal(theta, sigma), y)


def kidiq_momhsiq(kid_score, mom_hs, mom_iq):
    beta = pp.sample("beta", dist.ImproperUniform(constraints.real, (), (3,)))
    sigma = pp.sample("sigma", dist.HalfCauchy(2.5))
    mean = beta[0] + beta[1] * mom_hs + beta[2] * mom_iq
    with pp.plate("N", kid_score.shape[0]):
        pp.observe("kid_score", dist.Normal(mean, sigma), kid_score)


def ark(y, K: int):
    alpha = pp.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pp.sample("beta", dist.Normal(0.0, 10.0).expand([K]).to_event(1))
    sigma = pp.sample("sigma", dist.HalfCauchy(2.5))
    t_total = y.shape[0]
    lags = jnp.stack([y[K - k - 1 : t_total - k - 1] for k in range(K)], axis=-1)
    with pp.plate("T", t_total - K):
        pp.observe("y", dist.Normal(alpha + lags @ beta, sigma), y[K:])


def garch11(y, sigma1):
    mu = pp.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
    alpha0 = pp.sample("alpha0", dist.ImproperUniform(constraints.positive, (), ()))
    alpha1 = pp.sample("alpha1", dist.Uniform(0.0, 1.0))
    # beta1 ∈ (0, 1 − alpha1), flat: beta1 = (1 − alpha1) b, b ~ U(0, 1), Jacobian 1 − alpha1.
    b = pp.sample("beta1_unit", dist.Uniform(0.0, 1.0))
    pp.factor("beta1_jacobian", jnp.log1p(-alpha1))
    beta1 = pp.deterministic("beta1", (1.0 - alpha1) * b)

    def step(sigma_prev, y_prev):
        sigma_t = jnp.sqrt(alpha0 + alpha1 * (y_prev - mu) ** 2 + beta1 * sigma_prev**2)
        return sigma_t, sigma_t

    _, sigmas = jax.lax.scan(step, jnp.asarray(sigma1, y.dtype), y[:-1])
    sigma = jnp.concatenate([jnp.asarray(sigma1, y.dtype)[None], sigmas])
    with pp.plate("T", y.shape[0]):
        pp.observe("y", dist.Normal(mu, sigma), y)


def gp_pois_regr(x, k):
    rho = pp.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = pp.sample("alpha", dist.HalfNormal(2.0))
    n = x.shape[0]
    unit = jnp.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * rho**2))
    # Jitter 1e-10 in Stan (float64); float32 needs more. chol(K) = α·chol(K/α²): factoring α out
    # keeps the jitter relative (1e-5, i.e. α²·1e-5 on K). An absolute 1e-5 on α²K falls near float32
    # round-off once α² ≳ 20, and the potential's round-off noise (up to ~2 nats) then collapses
    # NUTS's step size in some chains (both NumPyro's MCMC and ppinfer's; bench_mcmc.py).
    chol = alpha * jnp.linalg.cholesky(unit + 1e-5 * jnp.eye(n))
    f_tilde = pp.sample("f_tilde", dist.Normal(0.0, 1.0).expand([n]).to_event(1))
    f = pp.deterministic("f", chol @ f_tilde)
    with pp.plate("N", n):
        pp.observe("k", dist.Poisson(jnp.exp(f)), k)


def low_dim_gauss_mix(y):
    mu = pp.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    pp.factor("mu_prior", jnp.sum(dist.Normal(0.0, 2.0).log_prob(mu)))
    sigma = pp.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = pp.sample("theta", dist.Beta(5.0, 5.0))
    mix = dist.MixtureSameFamily(
        dist.Categorical(probs=jnp.stack([theta, 1.0 - theta])), dist.Normal(mu, sigma)
    )
    with pp.plate("N", y.shape[0]):
        pp.observe("y", mix, y)


POSTERIORS: dict[str, tuple[Callable, Callable[[dict], tuple]]] = {
    "eight_schools-eight_schools_noncentered": (
        eight_schools_noncentered,
        lambda d: (_f(d["y"]), _f(d["sigma"])),
    ),
    "kidiq-kidscore_momhsiq": (
        kidiq_momhsiq,
        lambda d: (_f(d["kid_score"]), _f(d["mom_hs"]), _f(d["mom_iq"])),
    ),
    "arK-arK": (ark, lambda d: (_f(d["y"]), int(d["K"]))),
    "garch-garch11": (garch11, lambda d: (_f(d["y"]), float(d["sigma1"]))),
    "gp_pois_regr-gp_pois_regr": (gp_pois_regr, lambda d: (_f(d["x"]), np.asarray(d["k"], np.int32))),
    "low_dim_gauss_mix-low_dim_gauss_mix": (low_dim_gauss_mix, lambda d: (_f(d["y"]),)),
}


def load(name: str) -> tuple[Callable, tuple]:
    """``(model, args)`` for posterior ``name`` (a key of :data:`POSTERIORS`)."""
    model, to_args = POSTERIORS[name]
    with open(os.path.join(ROOT, name, "data.json")) as f:
        return model, to_args(json.load(f))


def reference(name: str) -> dict[str, dict]:
    """Reference summary per parameter (``mean``, ``sd``, ``posteriordb_mcse_mean``…)."""
    with open(os.path.join(ROOT, name, "reference_summary.json")) as f:
        return json.load(f)["parameters"]


def flatten_draws(samples: dict) -> dict[str, np.ndarray]:
    """Site name → ``[N]`` draws, vector sites split as ``name[1]``, ``name[2]``…"""
    out = {}
    for k, v in samples.items():
        v = np.asarray(v)
        if v.ndim == 1:
            out[k] = v
        else:
            flat = v.reshape(v.shape[0], -1)
            for i in range(flat.shape[1]):
                out[f"{k}[{i + 1}]"] = flat[:, i]
    return out


def _f(x) -> np.ndarray:
    return np.asarray(x, np.float32)
