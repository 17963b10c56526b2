"""Exact reference answers for the model zoo: forward algorithm (discrete HMM) and Kalman filter
(linear-Gaussian state-space model). Plain numpy in float64."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

__all__ = ["hmm_forward", "kalman_filter", "lgssm_coefficient_posterior"]


def hmm_forward(init_probs, transition, emission_log_lik) -> tuple[float, np.ndarray]:
    """Exact ``log Z = log p(y_{0:T−1})`` and filtering marginals of a discrete HMM whose hidden
    state ``z_0 ~ init_probs``, ``z_{t+1} ~ transition[z_t]``, observation log-likelihood
    ``emission_log_lik[t, k] = log p(y_t | z_t = k)``. Returns ``(log_z, filter: f64[T, K])``."""
    log_pi = np.log(np.asarray(init_probs, np.float64))
    log_a = np.log(np.asarray(transition, np.float64))
    ll = np.asarray(emission_log_lik, np.float64)
    alpha = log_pi + ll[0]
    filters = [alpha - logsumexp(alpha)]
    for t in range(1, ll.shape[0]):
        alpha = logsumexp(alpha[:, None] + log_a, axis=0) + ll[t]
        filters.append(alpha - logsumexp(alpha))
    return float(logsumexp(alpha)), np.exp(np.stack(filters))


def kalman_filter(a, q, c, r, m0, p0, ys) -> tuple[float, np.ndarray, np.ndarray]:
    """Scalar linear-Gaussian state-space model ``x_0 ~ N(m0, p0)``, ``x_t = a x_{t−1} + N(0, q)``
    (t ≥ 1), ``y_t = c x_t + N(0, r)`` for t = 0…T−1 (variances). Returns the exact
    ``(log p(y_{0:T−1}), filtering means f64[T], filtering variances f64[T])``."""
    m, p = float(m0), float(p0)
    log_z, means, variances = 0.0, [], []
    for t, y in enumerate(np.asarray(ys, np.float64)):
        if t > 0:
            m, p = a * m, a * a * p + q
        s = c * c * p + r
        log_z += -0.5 * (np.log(2 * np.pi * s) + (y - c * m) ** 2 / s)
        k = p * c / s
        m, p = m + k * (y - c * m), (1 - k * c) * p
        means.append(m)
        variances.append(p)
    return float(log_z), np.array(means), np.array(variances)


def lgssm_coefficient_posterior(ys, q, c, r, m0=0.0, p0=1.0, num_grid: int = 2001) -> tuple[float, float]:
    """Exact posterior mean and sd of the AR coefficient ``a ~ Uniform(−1, 1)`` of the LGSSM of
    :func:`kalman_filter` given ``ys``: the Kalman likelihood ``p(ys | a)`` on a fine grid of
    ``(−1, 1)`` (quadrature; the grid error is far below any Monte Carlo tolerance)."""
    grid = np.linspace(-0.999, 0.999, num_grid)
    log_lik = np.array([kalman_filter(a, q, c, r, m0, p0, ys)[0] for a in grid])
    w = np.exp(log_lik - log_lik.max())
    w /= w.sum()
    mean = float(np.sum(w * grid))
    return mean, float(np.sqrt(np.sum(w * (grid - mean) ** 2)))
