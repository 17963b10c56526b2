"""Exact reference answers for the model zoo: forward algorithm (discrete HMM), Kalman filter and
Rauch–Tung–Striebel smoother (linear-Gaussian state-space model). Plain numpy in float64."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

__all__ = [
    "hmm_forward",
    "kalman_filter",
    "kalman_smoother",
    "lgssm_coefficient_posterior",
    "lgssm_coefficient_log_evidence",
]


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


def kalman_smoother(a, q, c, r, m0, p0, ys) -> tuple[np.ndarray, np.ndarray]:
    """The smoothing marginals ``p(x_t | y_{0:T−1}) = N(means[t], variances[t])`` of the scalar
    linear-Gaussian model of :func:`kalman_filter`: its own forward (filtering) pass, then the
    Rauch–Tung–Striebel backward pass ``g_t = a P_t / P_{t+1|t}``,
    ``m^s_t = m_t + g_t (m^s_{t+1} − a m_t)``, ``P^s_t = P_t + g_t² (P^s_{t+1} − P_{t+1|t})``
    (``P_{t+1|t} = a² P_t + q``). At ``t = T−1`` the smoother equals the filter. Returns
    ``(means f64[T], variances f64[T])``."""
    a, q, c, r = float(a), float(q), float(c), float(r)
    ys = np.asarray(ys, np.float64)
    num_steps = ys.shape[0]
    filt_m, filt_p = np.empty(num_steps), np.empty(num_steps)
    m, p = float(m0), float(p0)
    for t in range(num_steps):
        if t > 0:
            m, p = a * filt_m[t - 1], a * a * filt_p[t - 1] + q
        gain = p * c / (c * c * p + r)
        filt_m[t], filt_p[t] = m + gain * (ys[t] - c * m), (1.0 - gain * c) * p
    means, variances = filt_m.copy(), filt_p.copy()
    for t in range(num_steps - 2, -1, -1):
        pred_p = a * a * filt_p[t] + q
        g = a * filt_p[t] / pred_p
        means[t] = filt_m[t] + g * (means[t + 1] - a * filt_m[t])
        variances[t] = filt_p[t] + g * g * (variances[t + 1] - pred_p)
    return means, variances


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


def lgssm_coefficient_log_evidence(ys, q, c, r, m0=0.0, p0=1.0, num_grid: int = 4001) -> float:
    """Exact ``log p(ys) = log ∫ p(a) p(ys | a) da`` for the model of
    :func:`lgssm_coefficient_posterior` (``a ~ Uniform(−1, 1)``, density ½): the Kalman likelihood
    on a uniform grid of ``[−1, 1]`` integrated by the trapezoid rule, in log space (the integrand
    is smooth, so the grid error is far below any Monte Carlo tolerance)."""
    grid = np.linspace(-1.0, 1.0, num_grid)
    log_lik = np.array([kalman_filter(a, q, c, r, m0, p0, ys)[0] for a in grid])
    log_w = np.full(num_grid, np.log(grid[1] - grid[0]))
    log_w[[0, -1]] -= np.log(2.0)  # trapezoid end weights
    return float(logsumexp(log_lik + log_w) + np.log(0.5))
