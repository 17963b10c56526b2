"""Statistical validity checks for where exact enumeration is out of reach.

Each check runs many independent replications of an algorithm (vmapped and jit-compiled, with fixed
seeds) and compares a sample mean with its exact value using a CLT bound with a stated two-sided
false-failure rate: ``|mean − expected| ≤ z_{1−α/2} · sd/√R``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import norm

from ppinfer.algorithms.importance import importance_run
from ppinfer.algorithms.smc import SMC, run_phases
from ppinfer.errors import ConfigError
from ppinfer.program import SequentialProgram

__all__ = [
    "CLTCheck",
    "check_mean",
    "check_unbiased_evidence",
    "smc_log_evidence_replicates",
    "log_evidence_replicates",
    "importance_log_evidence_replicates",
]


@dataclass(frozen=True)
class CLTCheck:
    """Outcome of a CLT test: passes when ``|estimate − expected| ≤ z_crit · stderr``."""

    estimate: float
    expected: float
    stderr: float
    z: float
    z_crit: float
    false_failure_rate: float

    @property
    def passed(self) -> bool:
        return abs(self.z) <= self.z_crit

    def __bool__(self) -> bool:
        return self.passed


def check_mean(samples: Any, expected: float, false_failure_rate: float = 1e-3) -> CLTCheck:
    """Is ``E[samples] = expected``? ``samples: f[R]`` i.i.d. replications, ``R ≥ 2`` (the standard
    error is estimated from them). A NaN sample makes the check fail (``z`` is NaN)."""
    if not 0.0 < false_failure_rate < 1.0:  # 0: never fails; 1 or more: always fails
        raise ConfigError(f"false_failure_rate must be in (0, 1), got {false_failure_rate!r}")
    x = np.asarray(samples, np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ConfigError(
            f"samples must be a 1-D array of at least 2 replications (the standard error is estimated "
            f"from them), got shape {x.shape}"
        )
    stderr = float(np.std(x, ddof=1) / np.sqrt(x.size))
    est = float(np.mean(x))
    z = (est - expected) / stderr if stderr > 0 else (0.0 if est == expected else np.inf)
    return CLTCheck(
        est,
        float(expected),
        stderr,
        float(z),
        float(norm.ppf(1 - false_failure_rate / 2)),
        false_failure_rate,
    )


def check_unbiased_evidence(log_z_hats: Any, log_z: float, false_failure_rate: float = 1e-3) -> CLTCheck:
    """``E[Ẑ] = Z``, tested on ``Ẑ/Z = exp(log Ẑ − log Z)`` (not on ``log Ẑ``, which is biased low)."""
    ratios = np.exp(np.asarray(log_z_hats, np.float64) - log_z)
    return check_mean(ratios, 1.0, false_failure_rate)


def smc_log_evidence_replicates(
    program: SequentialProgram,
    args: tuple,
    num_replicates: int,
    num_particles: int,
    key: int = 0,
    resampling: Any = "systematic",
    ess_threshold: float = 0.5,
    proposal: Callable[..., Any] | None = None,
    history: bool = True,
) -> np.ndarray:
    """``f32[R]``: ``log Ẑ`` of ``R`` independent runs of ``SMC(num_particles, resampling,
    ess_threshold, proposal=proposal, history=history)`` (:func:`log_evidence_replicates`)."""
    algorithm = SMC(num_particles, resampling, ess_threshold, proposal, history=history)
    return log_evidence_replicates(program, args, num_replicates, algorithm, key)


def log_evidence_replicates(
    program: SequentialProgram, args: tuple, num_replicates: int, algorithm: Any, key: int = 0
) -> np.ndarray:
    """``f32[R]``: ``log Ẑ`` of ``R`` independent runs of ``algorithm`` (an SMC-family config with
    ``.loop``: :class:`~ppinfer.SMC`, :class:`~ppinfer.Steer`) — the phases :func:`ppinfer.infer`
    runs for it (:func:`~ppinfer.algorithms.smc.run_phases`: early exit, finished-particle masks,
    history setting, selection), vmapped over keys."""
    loop = algorithm.loop(program, args)
    args = _as_jax(args)

    @jax.jit
    def run(keys):
        return jax.vmap(lambda k: run_phases(k, program, args, loop)["log_evidence"])(keys)

    return np.asarray(run(jax.random.split(jax.random.PRNGKey(key), num_replicates)))


def importance_log_evidence_replicates(
    program: Callable[..., Any],
    args: tuple,
    num_replicates: int,
    num_particles: int,
    key: int = 0,
    proposal: Callable[..., Any] | None = None,
) -> np.ndarray:
    """``f32[R]``: ``log Ẑ`` of ``R`` independent importance-sampling runs of a static program: the
    pure sampler :func:`~ppinfer.algorithms.importance.importance_run` that ``pp.infer`` compiles for
    ``pp.Importance(num_particles, proposal)``, vmapped over keys."""
    args = _as_jax(args)

    @jax.jit
    def run(keys):
        one = lambda k: importance_run(k, program, args, num_particles, proposal)["log_evidence"]
        return jax.vmap(one)(keys)

    return np.asarray(run(jax.random.split(jax.random.PRNGKey(key), num_replicates)))


def _as_jax(args: tuple) -> tuple:
    """numpy arrays → jax arrays, so programs may index data with traced step numbers."""
    return jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, args)
