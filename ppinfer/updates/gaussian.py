"""The parametric representation: fit a Gaussian to the posterior and use it as the next prior.

After a round of IBIS, :func:`fit_gaussian` matches the weighted mean and covariance of the particles
in the *unconstrained* space of the latent sites (``v = ravel(T⁻¹(x))``, the space IBIS moves in).
The next batch is then absorbed by IBIS on :func:`gaussian_prior_program`, whose prior is that
Gaussian (pushed through the constraining bijections ``T``) and whose likelihood is the original
program's. Memory and time per update are constant (only ``mean: f32[d]``, ``cov: f32[d, d]`` are
kept), but this is **an approximation**: each fit replaces the particle posterior ``π̂_t`` by its
moment-matched Gaussian ``q_t``, and the error accumulates. Every update reports the divergence
its fit introduces,

    fit_kl_t ≈ KL(π̂_t ‖ q_t)   and   fit_kl_reverse_t ≈ KL(q_t ‖ π̂_t),

with ``π̂_t ∝ γ_t = q_{t−1} · p(y_t | x)`` (see :func:`projection_kl`). The accumulated ``log_evidence`` is
``Σ_t log Ẑ_t``, an estimate of ``log p(y_{1:T})`` only up to that projection error. The Gaussian
is exact for a Gaussian posterior in the unconstrained space (e.g. Normal-Normal); compare with the
particle representation (:class:`~ppinfer.updates.IBIS`) when in doubt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro import handlers

from ppinfer import checks
from ppinfer._compile import cached_jit
from ppinfer.errors import ConfigError
from ppinfer.infer import infer
from ppinfer.population import normalize
from ppinfer.primitives import deterministic, factor, sample
from ppinfer.traced import assess
from ppinfer.updates.ibis import IBIS, Posterior, _space

__all__ = [
    "Gaussian",
    "ParametricPosterior",
    "fit_gaussian",
    "gaussian_prior_program",
    "projection_kl",
    "to_parametric",
    "GAUSSIAN_SITE",
]

GAUSSIAN_SITE = "_gaussian_prior"


class Gaussian(NamedTuple):
    """``N(mean, cov)`` over the raveled unconstrained latent vector: ``mean: f32[d]``,
    ``cov: f32[d, d]``."""

    mean: jax.Array
    cov: jax.Array


def fit_gaussian(posterior: Posterior, jitter: float = 1e-6) -> Gaussian:
    """The moment-matched Gaussian of ``posterior``'s weighted particles (unconstrained space),
    ``jitter · I`` added to the covariance."""
    v = posterior.ibis.particles
    w = jnp.exp(normalize(posterior.ibis.log_weights))
    mean = w @ v
    centred = v - mean
    cov = (centred * w[:, None]).T @ centred
    return Gaussian(mean, cov + jitter * jnp.eye(v.shape[1], dtype=v.dtype))


def gaussian_prior_program(program: Callable[..., Any], args: tuple) -> Callable[..., Any]:
    """A program ``new(mean, cov, *args)``: ``v ~ N(mean, cov)`` (site :data:`GAUSSIAN_SITE`), the
    original latent sites as ``deterministic`` sites ``x = T(unravel(v))``, and a ``factor`` of the
    original program's log likelihood at ``x``. Its density in ``v`` is the Gaussian prior times the
    likelihood, as the next round's IBIS target needs. ``args`` (one batch) fix the structure.

    The Gaussian's parameters are arguments (not closed over), so one compiled IBIS update serves
    every round."""
    space = _space(program, args)

    def new(mean, cov, *batch):
        v = sample(GAUSSIAN_SITE, dist.MultivariateNormal(mean, covariance_matrix=cov))
        x, _ = space.constrain(v)
        for name, value in x.items():
            deterministic(name, value)
        with handlers.block():  # the inner run's sites are not this program's sites
            log_lik = assess(program, batch, x).log_likelihood
        factor("likelihood", log_lik)

    new.__qualname__ = f"gaussian_prior[{getattr(program, '__qualname__', 'program')}]"
    return new


def projection_kl(posterior: Posterior, gaussian: Gaussian, args: tuple) -> tuple[float, float]:
    """Estimated divergences (nats) between a one-batch posterior ``π ∝ γ`` and its fit ``q``:
    ``(KL(π ‖ q), KL(q ‖ π))``, with ``γ(v)`` the score of ``posterior.program(*args)`` at ``v``
    times ``|det J|`` and ``args`` that batch's program arguments.

    ``log Z`` is estimated by importance sampling from ``q`` itself (N draws, key derived from the
    posterior's): ``log Ẑ_q = logmeanexp(log γ − log q)``, low-variance exactly when the fit is
    good. Then ``KL(π ‖ q) ≈ Σ_i w_i [log γ(v_i) − log q(v_i)] − log Ẑ_q`` over the weighted
    particles, and ``KL(q ‖ π) ≈ log Ẑ_q − mean_j [log γ(u_j) − log q(u_j)]`` over the draws
    (≥ 0 by Jensen). Both are consistent as N → ∞."""
    program = posterior.program

    def build():
        def kl(key, particles, log_weights, mean, cov, args):
            space = _space(program, args)
            q = dist.MultivariateNormal(mean, covariance_matrix=cov)

            def log_ratio(v):
                x, log_det = space.constrain(v)
                out = assess(program, args, x).score + log_det - q.log_prob(v)
                return jnp.where(jnp.isnan(out), -jnp.inf, out)

            draws = q.sample(key, (particles.shape[0],))
            r_q = jax.vmap(log_ratio)(draws)
            log_z = jax.scipy.special.logsumexp(r_q) - jnp.log(r_q.shape[0])
            w = jnp.exp(normalize(log_weights))
            return jnp.sum(w * jax.vmap(log_ratio)(particles)) - log_z, log_z - jnp.mean(r_q)

        return kl

    fn, _ = cached_jit(("ibis_projection_kl", program), build)
    st = posterior.ibis
    key = jax.random.fold_in(st.key, 1)
    pq, qp = fn(key, st.particles, st.log_weights, gaussian.mean, gaussian.cov, tuple(args))
    return float(pq), float(qp)


@dataclass
class ParametricPosterior:
    """A Gaussian posterior (unconstrained space) that absorbs batches by one-batch IBIS rounds.

    Attributes:
        gaussian: the current fit ``q_t``.
        program: the original program; ``prior_program``: :func:`gaussian_prior_program` of it.
        algorithm: the IBIS settings of each round.
        key: ``u32[2]``, split by each update.
        log_evidence: ``Σ_t log Ẑ_t`` (approximate; see the module docstring).
        template: one batch of the original program's arguments (fixes shapes for :meth:`sample`).
        fit_kl: per update, the estimated ``KL(π̂_t ‖ q_t)`` its Gaussian fit introduced.
        fit_kl_reverse: per update, the estimated ``KL(q_t ‖ π̂_t)``.
        last: the latest round's particle posterior (before its fit).
    """

    gaussian: Gaussian
    program: Any
    prior_program: Any
    algorithm: IBIS
    key: jax.Array
    log_evidence: float
    template: tuple = ()
    fit_kl: list[float] = field(default_factory=list)
    fit_kl_reverse: list[float] = field(default_factory=list)
    last: Posterior | None = None

    @property
    def step(self) -> int:
        return len(self.fit_kl)

    def update(self, *batch: Any) -> ParametricPosterior:
        """Absorb one batch: IBIS from the Gaussian prior on this batch, then refit."""
        key, k_round = jax.random.split(self.key)
        g = self.gaussian
        post = infer(self.prior_program, g.mean, g.cov, *batch, algorithm=self.algorithm, key=k_round)
        fit = fit_gaussian(post)
        kl, kl_reverse = projection_kl(post, fit, (g.mean, g.cov, *map(jnp.asarray, batch)))
        return ParametricPosterior(
            gaussian=fit,
            program=self.program,
            prior_program=self.prior_program,
            algorithm=self.algorithm,
            key=key,
            log_evidence=self.log_evidence + post.log_evidence,
            template=self.template,
            fit_kl=[*self.fit_kl, kl],
            fit_kl_reverse=[*self.fit_kl_reverse, kl_reverse],
            last=post,
        )

    def sample(self, num_samples: int, key: int | jax.Array = 0) -> dict[str, jax.Array]:
        """``num_samples`` draws of the latent sites (constrained) from the Gaussian ``q_t``."""
        key = checks.as_key(key)
        g = self.gaussian
        v = jax.random.multivariate_normal(key, g.mean, g.cov, (int(num_samples),))
        space = _space(self.program, self.template)
        return jax.vmap(lambda u: space.constrain(u)[0])(v)


def to_parametric(posterior: Posterior, batch: tuple, algorithm: IBIS | None = None) -> ParametricPosterior:
    """Switch a one-batch particle posterior (``posterior.step == 1``, ``batch`` its data) to the
    Gaussian representation; ``algorithm`` runs each later round (default: the posterior's)."""
    if posterior.step != 1:
        raise ConfigError("to_parametric takes the posterior of the first batch (step 1)")
    if posterior.config.sufficient_statistics is not None:
        raise ConfigError("to_parametric needs the history path (no sufficient_statistics)")
    batch = tuple(map(jnp.asarray, batch))
    fit = fit_gaussian(posterior)
    kl, kl_reverse = projection_kl(posterior, fit, batch)
    return ParametricPosterior(
        gaussian=fit,
        program=posterior.program,
        prior_program=gaussian_prior_program(posterior.program, batch),
        algorithm=algorithm or posterior.config,
        key=posterior.ibis.key,
        log_evidence=posterior.log_evidence,
        template=batch,
        fit_kl=[kl],
        fit_kl_reverse=[kl_reverse],
        last=posterior,
    )
