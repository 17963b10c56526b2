"""The result of :func:`ppinfer.infer`: weighted particles per site and diagnostics.

Meaning: the weighted empirical measure ``Σ_i exp(log_weights[i]) · δ(particle_i)``, whose total mass
is the evidence estimate Ẑ (``log_evidence``); for :class:`~ppinfer.Enumerate` it is the exact
unnormalised posterior.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer import checks
from ppinfer.errors import ConfigError
from ppinfer.population import Population, normalize
from ppinfer.population import ess as _ess
from ppinfer.resample import resample as _resample

__all__ = ["Result", "Filtering", "Deferred", "DeferredExtras"]


class Deferred:
    """A value computed once, on first use. Algorithms hand :class:`Result` deferred pieces that
    cost work to build and that many users never read — e.g. SMC's trajectories, traced back through
    the genealogy — so a run that only needs ``log_evidence`` or the final state does not pay for
    them. Calling the object computes (first time) and returns the value."""

    def __init__(self, fn: Callable[[], Any]):
        self._fn: Callable[[], Any] | None = fn
        self._value: Any = None

    def __call__(self) -> Any:
        if self._fn is not None:
            from ppinfer._compile import TRACE_LOCK

            with TRACE_LOCK:  # computed once even when several threads read it at once
                if self._fn is not None:
                    self._value, self._fn = self._fn(), None
        return self._value


class DeferredExtras(dict):
    """``Result.extras`` whose keys listed in ``deferred`` (name → :class:`Deferred`) are computed
    when first read with ``[]``, ``get`` or iteration."""

    def __init__(self, values: dict, deferred: dict[str, Deferred]):
        super().__init__(values)
        self._deferred = dict(deferred)

    def _fill(self) -> None:
        if not self._deferred:
            return
        from ppinfer._compile import TRACE_LOCK

        # Under the lock, a key leaves ``_deferred`` only once its value is in the dict: another
        # thread reading meanwhile waits, instead of finding it in neither (a None or a KeyError).
        with TRACE_LOCK:
            for name, value in list(self._deferred.items()):
                self[name] = value()
                del self._deferred[name]

    def __missing__(self, name):
        if name in self._deferred:
            self._fill()
        if super().__contains__(name):
            return super().__getitem__(name)
        raise KeyError(name)

    def __repr__(self) -> str:
        self._fill()
        return super().__repr__()

    def __eq__(self, other: object) -> bool:
        self._fill()
        return super().__eq__(other)

    def get(self, name, default=None):
        self._fill()
        return super().get(name, default)

    def __contains__(self, name) -> bool:
        return name in self._deferred or super().__contains__(name)

    def __iter__(self):
        self._fill()
        return super().__iter__()

    def items(self):
        self._fill()
        return super().items()

    def keys(self):
        self._fill()
        return super().keys()

    def values(self):
        self._fill()
        return super().values()

    def __len__(self) -> int:
        return super().__len__() + len(self._deferred)


class Filtering:
    """Every step's filtering approximation from one SMC run.

    Step ``t``'s approximation of ``p(x_t | y_{0:t})`` is its particles right after the step's
    reweighting and before its resampling, weighted by the filtering weights (the weight carried
    from step ``t−1`` times the step's incremental weight); particles that had already finished
    (``stop``) are left out of step ``t``. Built from the records SMC keeps with
    ``history=True`` (``Result.extras["filtering"]``), the same ones :class:`~ppinfer.FFBS`'s
    backward pass uses.

    Attributes:
        weights: ``f32[T, M]``, each step's normalised filtering weights (0 for finished particles).
        ess: ``f32[T]``, each step's ESS ``1 / Σ w²``.
    """

    def __init__(self, records: dict):
        self._records = records
        lw = jnp.where(records["active"], records["log_weights"], -jnp.inf)
        self.weights = jnp.exp(lw - jax.scipy.special.logsumexp(lw, axis=1, keepdims=True))
        self.ess = 1.0 / jnp.sum(self.weights**2, axis=1)

    @property
    def num_steps(self) -> int:
        return int(self.weights.shape[0])

    @property
    def sites(self) -> list[str]:
        """The step sites recorded."""
        return list(self._records["choices"])

    def _site(self, name: str) -> jax.Array:
        if name not in self._records["choices"]:
            raise ConfigError(f"no filtering records of step site {name!r}; recorded: {self.sites}")
        return self._records["choices"][name]

    def expectation(self, fn: Callable[[jax.Array], jax.Array], name: str) -> jax.Array:
        """``[T, …]``: ``E[fn(x_t) | y_{0:t}]`` of step site ``name`` at every step."""
        x = fn(self._site(name))
        w = self.weights.reshape(self.weights.shape + (1,) * (x.ndim - 2)).astype(jnp.result_type(float))
        return jnp.sum(w * x, axis=1)

    def mean(self, name: str) -> jax.Array:
        """``[T, …]``: the filtering mean ``E[x_t | y_{0:t}]`` of step site ``name``."""
        return self.expectation(lambda x: x, name)

    def var(self, name: str) -> jax.Array:
        """``[T, …]``: the filtering variance ``Var[x_t | y_{0:t}]`` of step site ``name``."""
        m = self.mean(name)
        return self.expectation(lambda x: (x - m[:, None]) ** 2, name)

    def std(self, name: str) -> jax.Array:
        return jnp.sqrt(self.var(name))

    def __repr__(self) -> str:
        low = float(jnp.min(self.ess))
        return f"Filtering({self.num_steps} steps, sites {self.sites}, min ESS {low:.1f})"


def _returned_array(value: Any) -> jax.Array:
    """A value of ``expectation``'s function as an array, or :class:`ConfigError` (a string, …)."""
    try:
        return jnp.asarray(value)
    except TypeError:
        raise ConfigError(
            f"expectation(fn): fn must return arrays or numbers (or a pytree of them), got {value!r}"
        ) from None


@dataclass
class Result:
    """Weighted particles and what the algorithm recorded.

    Attributes:
        samples: site name → ``[N, …]`` values. For a sequential program, a step site ``x`` is the
            particle's whole trajectory ``[N, T, …]`` (traced back through resampling); an ``init``
            site keeps its name, or becomes ``"init/x"`` if a step site has the same name. An
            algorithm may pass a :class:`Deferred` instead of the dict: the samples are then
            computed on first access (SMC traces its genealogy only when ``samples`` is read).
        log_weights: ``f32[N]``, unnormalised: ``logsumexp(log_weights) = log_evidence``.
        log_evidence: ``log Ẑ``, the log of an unbiased estimate of the evidence ``Z`` (exact for
            Enumerate); ``None`` for an algorithm that gives no evidence estimate (MCMC and the
            MCMC-driven PMMH and ParticleGibbs).
        algorithm: the algorithm's name.
        ess: ``f32[T]``, the ESS after each step's reweighting, before resampling (sequential only).
        resampled: ``bool[T]``, whether the population was resampled after each step.
        log_evidence_history: ``f32[T]``, ``log Ẑ`` after each step.
        ancestors: ``i32[T, N]``, the ancestor of each particle at each resampling (identity when
            not resampled): the genealogy.
        state: the final state pytree ``[N, …]`` of a sequential program.
        wall_time: seconds spent in the run, compilation included.
    """

    samples: dict[str, jax.Array]
    log_weights: jax.Array
    log_evidence: float | None
    algorithm: str
    ess: jax.Array | None = None
    resampled: jax.Array | None = None
    log_evidence_history: jax.Array | None = None
    ancestors: jax.Array | None = None
    state: Any = None
    wall_time: float = float("nan")
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_particles(self) -> int:
        return int(self.log_weights.shape[0])

    @property
    def weights(self) -> jax.Array:
        """``f32[N]`` normalised weights (sum to 1)."""
        return jnp.exp(normalize(self.log_weights))

    @property
    def final_ess(self) -> float:
        """The ESS of the final weights."""
        return float(_ess(self.log_weights))

    def expectation(self, fn: Callable[[dict[str, jax.Array]], Any]) -> Any:
        """``Σ_i w_i fn(particle_i)`` under the normalised weights; ``fn`` takes one particle's sample
        dict and returns a pytree of arrays."""
        values = jax.vmap(lambda sample: jax.tree.map(_returned_array, fn(sample)))(self.samples)
        w = self.weights
        return jax.tree.map(lambda v: jnp.tensordot(w, v.astype(w.dtype), axes=1), values)

    def mean(self, name: str) -> jax.Array:
        """Posterior mean of site ``name`` (shape of one particle's value)."""
        if name not in self.samples:
            raise ConfigError(f"no site {name!r} in this result; its sites are {sorted(self.samples)}")
        return self.expectation(lambda s: s[name])

    def var(self, name: str) -> jax.Array:
        """Posterior variance of site ``name``."""
        m = self.mean(name)
        return self.expectation(lambda s: (s[name] - m) ** 2)

    def std(self, name: str) -> jax.Array:
        return jnp.sqrt(self.var(name))

    @property
    def filtering(self) -> Filtering:
        """Every step's filtering approximation ``p(x_t | y_{0:t})`` from this one SMC run (SMC,
        Steer, FFBS with ``history=True``): :class:`Filtering`, with per-step ``mean``, ``var``,
        ``std`` of a step site and the per-step ``ess``. Raises :class:`~ppinfer.errors.ConfigError`
        for a result without the records."""
        records = self.extras.get("filtering") if isinstance(self.extras, dict) else None
        if records is None:
            raise ConfigError(
                f"{self.algorithm} recorded no filtering history: it comes from SMC, Steer or FFBS "
                "with history=True on a sequential program"
            )
        return Filtering(records)

    def filtering_mean(self, name: str) -> jax.Array:
        """``[T, …]``: the filtering mean ``E[x_t | y_{0:t}]`` of step site ``name`` at every step
        (``result.filtering.mean(name)``; see :class:`Filtering`)."""
        return self.filtering.mean(name)

    def sample(self, num_samples: int | None = None, key: int | jax.Array = 0) -> dict[str, jax.Array]:
        """``num_samples`` (default N) draws from the normalised posterior: particles drawn with
        replacement ∝ weight (multinomial)."""
        n = self.num_particles if num_samples is None else checks.check_int("num_samples", num_samples, 1)
        key = checks.as_key(key)
        idx = jax.random.categorical(key, normalize(self.log_weights), shape=(n,))
        return jax.tree.map(lambda x: x[idx], self.samples)

    def resampled_samples(self, key: int | jax.Array = 0) -> dict[str, jax.Array]:
        """N equally weighted draws by systematic resampling (lower variance than :meth:`sample`)."""
        key = checks.as_key(key)
        pop, _ = _resample(key, Population(self.samples, self.log_weights), "systematic")
        return pop.particles

    def to_arviz(self, key: int | jax.Array = 0, num_chains: int = 4, num_draws: int | None = None):
        """An ``arviz.InferenceData`` of equally weighted draws standing for the weighted particles.

        ArviZ has no weighted draws, so ``posterior`` holds ``num_draws`` draws by systematic
        resampling ∝ weight (in random order), split into ``num_chains`` groups of equal size.
        The default ``num_draws`` is the final ESS, rounded (at least 4 per group): draws that carry
        about as much information as the weighted particles do, so ArviZ's ESS and MCSE of a
        posterior mean agree with the particle system's own (``final_ess``), instead of counting
        every copy of a resampled particle as a new draw. The groups are exchangeable, not Markov
        chains: R-hat is ≈ 1 by construction and checks nothing. ``attrs`` hold
        ``log_evidence``, ``num_particles`` and ``final_ess``; the weighted particles themselves are
        ``samples`` and ``weights``. ``sample_stats`` is empty (no per-draw diagnostics)."""
        import arviz as az

        checks.check_int("num_chains", num_chains, 1)
        if num_draws is None:
            m = max(4 * num_chains, int(round(self.final_ess)))
            m -= m % num_chains
        else:
            m = checks.check_int("num_draws", num_draws, num_chains)
            if m % num_chains:
                raise ConfigError(f"num_draws={m} must be a multiple of num_chains={num_chains}")
        key = checks.as_key(key)
        k_u, k_perm = jax.random.split(key)
        w = np.asarray(self.weights, np.float64)
        cdf = np.cumsum(w / w.sum())
        u = (float(jax.random.uniform(k_u)) + np.arange(m)) / m
        idx = np.minimum(np.searchsorted(cdf, u, side="right"), len(w) - 1)
        idx = idx[np.asarray(jax.random.permutation(k_perm, m))]
        posterior = {}
        for name, value in self.samples.items():
            v = np.asarray(value)
            if np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_:
                posterior[name] = v[idx].reshape(num_chains, m // num_chains, *v.shape[1:])
        z = self.log_evidence
        attrs = {
            "algorithm": self.algorithm,
            "num_particles": self.num_particles,
            "final_ess": self.final_ess,
            "log_evidence": float("nan") if z is None else float(z),
        }
        return az.from_dict(posterior=posterior, attrs=attrs)

    def to_html(self, path, tokenizer=None, site: str = "tok", title: str | None = None):
        """Write a self-contained HTML page of this SMC run over tokens (per step: each particle's
        text, weight, parent and copies; ESS, resampling events, log Ẑ): see :mod:`ppinfer.html`."""
        from ppinfer.html import write_smc_html

        return write_smc_html(self, path, tokenizer=tokenizer, site=site, title=title)

    def __repr__(self) -> str:
        z = self.log_evidence
        evidence = "no evidence" if z is None else f"log_evidence={float(z):.4f}"
        head = f"Result({self.algorithm}, N={self.num_particles}, {evidence}"
        lines = [f"{head}, final ESS={self.final_ess:.1f})"]
        if self.resampled is not None:
            n_res = int(np.sum(np.asarray(self.resampled)))
            # FFBS: the per-step records are its forward filter's, a population of another size.
            forward = self.extras.get("filter_log_weights") if isinstance(self.extras, dict) else None
            of = "" if forward is None else f" of the forward filter's {np.shape(forward)[0]} particles"
            lines.append(
                f"  steps={len(self.resampled)}, resampled {n_res} times, "
                f"min ESS={float(np.min(np.asarray(self.ess))):.1f}{of}"
            )
        for name, value in self.samples.items():
            shape = tuple(value.shape[1:])
            if not jnp.issubdtype(value.dtype, jnp.number) and value.dtype != jnp.bool_:
                continue
            if shape == ():
                m, s = float(self.mean(name)), float(self.std(name))
                lines.append(f"  {name}: mean={m:.4g} sd={s:.4g}")
            else:
                lines.append(f"  {name}: shape={shape}")
        return "\n".join(lines)


def _get_samples(self: Result) -> dict[str, jax.Array]:
    value = self.__dict__["_samples"]
    if isinstance(value, Deferred):
        value = self.__dict__["_samples"] = value()
    return value


def _set_samples(self: Result, value: dict[str, jax.Array] | Deferred) -> None:
    self.__dict__["_samples"] = value


# ``samples`` stays a dataclass field (constructor argument, repr, equality) but reads through this
# property, which resolves a Deferred value once.
Result.samples = property(_get_samples, _set_samples)  # type: ignore[assignment]
