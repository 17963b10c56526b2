"""Diagnostic plots of SMC results (matplotlib, imported lazily)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ppinfer.errors import ConfigError
from ppinfer.result import Result

__all__ = ["lineages", "plot_genealogy", "plot_ess"]


def lineages(result: Result) -> np.ndarray:
    """``i32[N, T]``: the particle index, after each step's resampling, of every final particle's
    ancestor — row ``i`` is final particle ``i``'s line of descent."""
    ancestors = _ancestors(result)
    t_max, n = ancestors.shape
    out = np.empty((n, t_max), np.int64)
    idx = np.arange(n)
    for t in range(t_max - 1, -1, -1):
        out[:, t] = idx
        idx = ancestors[t, idx]
    return out


def plot_genealogy(result: Result, ax: Any = None, weights: bool = True) -> Any:
    """Draw every resampling step's parent → child links (grey) and the lines of descent of the
    final particles (coloured by weight): which prefixes survived resampling."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    ancestors = _ancestors(result)
    t_max, n = ancestors.shape
    for t in range(1, t_max):
        for i in range(n):
            ax.plot([t - 1, t], [ancestors[t - 1, i], i], color="0.85", lw=0.4, zorder=1)
    lines = lineages(result)
    w = np.asarray(result.weights) if weights else np.ones(n) / n
    alpha = 0.2 + 0.8 * w / max(w.max(), 1e-12)
    for i in np.argsort(w):
        ax.plot(range(t_max), lines[i], color="C0", alpha=float(alpha[i]), lw=1.0, zorder=2)
    ax.set_xlabel("step")
    ax.set_ylabel("particle")
    ax.set_title(f"genealogy ({int(np.sum(result.resampled))} resampling steps)")
    return ax


def plot_ess(result: Result, ax: Any = None, threshold: float | None = 0.5) -> Any:
    """ESS after each step (before resampling); dots mark the steps that resampled."""
    import matplotlib.pyplot as plt

    ess = np.asarray(result.ess)
    if result.ess is None or ess.ndim != 1:
        raise ConfigError(
            f"this {result.algorithm} result has no ESS per step (plot_ess takes the result of a "
            "particle algorithm: SMC, Steer, TemperedSMC, IBIS…)"
        )
    ax = ax or plt.gca()
    steps = np.arange(len(ess))
    ax.plot(steps, ess, label="ESS")
    if result.resampled is not None:
        res = np.asarray(result.resampled, bool)
        ax.plot(steps[res], ess[res], "o", ms=3, label="resampled")
    if threshold is not None:
        ax.axhline(threshold * result.num_particles, color="k", ls=":", lw=0.8, label="threshold")
    ax.set_xlabel("step")
    ax.set_ylabel("ESS")
    ax.legend(fontsize=8)
    return ax


def _ancestors(result: Result) -> np.ndarray:
    if result.ancestors is None:
        raise ConfigError(
            f"this {result.algorithm} result has no genealogy (run with SMC(history=True), the "
            "default, to record the ancestors)"
        )
    return np.asarray(result.ancestors)
