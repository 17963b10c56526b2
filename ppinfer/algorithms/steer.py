"""SMC steering: N particles × K extensions, N survivors kept without replacement.

The beam-like SMC variant of Lew et al. (2023), *Sequential Monte Carlo Steering of Large Language
Models using Probabilistic Programs* (llamppl's ``smc_steer``), as a composition of blocks:

    start (N particles)  →  repeat T times: extend ×K → advance (N·K children) → select N of N·K

- :func:`extend` replaces every particle of weight ``w`` by K children of weight ``w/K`` (a finished
  particle: one child of weight ``w`` and K−1 children of weight 0, so it is carried, not copied
  K times). Deterministic and valid: the measure is unchanged.
- :func:`~ppinfer.suspended.advance` runs the step once per child (vmapped over N·K, each with its
  own random choices) and multiplies in its incremental weight ``p/q``. Valid.
- :func:`select` keeps N of the N·K children by Fearnhead–Clifford (2003) optimal resampling: find
  the threshold ``c`` with ``Σ_i min(w_i / c, 1) = N``; every child with ``w_i ≥ c`` survives once
  with its own weight; the N − L remaining slots are filled by systematic (or stratified) resampling
  of the other children ∝ ``w_i``, each survivor getting weight ``c``. A child below the threshold
  survives with probability ``w_i / c`` (systematic: at most once) and then has weight ``c``, so
  ``E[⟦select(pop)⟧] = ⟦pop⟧``: valid, and since exactly N − L slots of weight ``c`` replace mass
  ``(N − L) c``, the total mass (Ẑ) is preserved *exactly*, not only in expectation. Survivors are
  distinct children (with systematic selection), which is what makes it "without replacement" and
  beam-like: heavy children are kept deterministically instead of being copied.

Every block is valid, so Steer is: ``E[⟦Steer(p)⟧] = ⟦p⟧``, in particular ``E[Ẑ] = Z``, and the
weighted survivors estimate the posterior consistently as N grows. With ``K = 1`` selection keeps
every child (it is sequential importance sampling). The loop is one ``lax.scan`` compiled with
``jax.jit``. Selection also runs after the last step, so the result has N particles (it does not
change Ẑ).

Cost: each step runs N·K forward passes (children of finished particles included: the batch shape
is static) and holds N·K particle states (KV caches) at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from ppinfer import checks
from ppinfer._compile import split_args
from ppinfer.algorithms.smc import run_checked, sample_names
from ppinfer.errors import ConfigError
from ppinfer.population import Population, ess, gather, log_evidence
from ppinfer.program import SequentialProgram, is_sequential
from ppinfer.result import Result
from ppinfer.suspended import Particle, Sequential, advance, start

__all__ = [
    "Steer",
    "SELECTION_SCHEMES",
    "extend",
    "threshold",
    "select",
    "select_from_uniforms",
    "selection_uniforms_shape",
    "steer_run",
    "run_steer",
]

SELECTION_SCHEMES = ("systematic", "stratified")


@dataclass(frozen=True)
class Steer:
    """SMC steering (see the module docstring) for a :class:`~ppinfer.SequentialProgram`.

    Args:
        num_particles: N ≥ 1, the particles kept after each step.
        num_extensions: K ≥ 1, the children of each particle at each step (N·K steps are run).
        resampling: how the slots below the threshold are filled: ``"systematic"`` (default; a
            child is selected at most once) or ``"stratified"`` (independent uniform per slot).
        proposal: ``proposal(state, t, *args)`` proposing some of the step's latent sites (default:
            the program's own prior). Weighted by ``log p − log q``.
        init_proposal: the same for ``init``: ``init_proposal(*args)``.

    The :class:`~ppinfer.Result` has ``log_weights: f32[N]`` (unnormalised; the survivors are not
    equally weighted: ``logsumexp`` is ``log Ẑ``, an unbiased estimate of ``Z`` on the linear
    scale), ``ess: f32[T]`` the ESS of the N survivors after each step, ``resampled: bool[T]`` all
    True (selection runs every step), ``ancestors: i32[T, N]`` the survivor each survivor descends
    from (its parent at the previous step), ``samples`` traced through the genealogy like SMC's,
    ``state`` the survivors' final states, and ``extras``: ``"active": bool[N, T]`` (the particle
    was running before step t), ``"children_ess": f32[T]`` (ESS of the N·K children before
    selection) and ``"num_kept": i32[T]`` (children above the threshold, kept deterministically).
    """

    num_particles: int = 64
    num_extensions: int = 4
    resampling: str = "systematic"
    proposal: Callable[..., Any] | None = None
    init_proposal: Callable[..., Any] | None = None

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        checks.check_int("num_extensions", self.num_extensions, 1)
        check_selection_scheme(self.resampling)

    name = "Steer"

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        if not is_sequential(program):
            raise ConfigError(
                "Steer needs a sequential program (ppinfer.sequential(init, step, num_steps)); "
                "for a static program use Importance or Enumerate"
            )
        return run_steer(key, program, args, self)


def run_steer(key: jax.Array, program: SequentialProgram, args: tuple, cfg: Steer) -> Result:
    """Run Steer (checks, compiled run, genealogy) and build the :class:`Result`."""
    t0 = time.perf_counter()
    num_steps = program.steps_for(args)
    dyn, static_key, rebuild = split_args(args)
    settings = (cfg.num_particles, cfg.num_extensions, num_steps, cfg.resampling)
    cache_key = ("steer", program, cfg.proposal, cfg.init_proposal, settings, static_key)

    def build():
        def compiled(key, dyn):
            return steer_run(key, program, rebuild(dyn), *settings, cfg.proposal, cfg.init_proposal)

        return compiled

    out, log_z = run_checked(cache_key, build, key, dyn, program, args, cfg, "Steer")
    samples, site_kinds = sample_names(out["init_choices"], out["trajectories"])
    return Result(
        samples=samples,
        log_weights=out["log_weights"],
        log_evidence=log_z,
        algorithm=cfg.name,
        ess=out["ess"],
        resampled=jnp.ones((num_steps,), bool),
        log_evidence_history=out["log_evidence_history"],
        ancestors=out["ancestors"],
        state=out["state"],
        wall_time=time.perf_counter() - t0,
        extras={
            "active": out["active"],
            "site_kinds": site_kinds,
            "children_ess": out["children_ess"],
            "num_kept": out["num_kept"],
        },
    )


def steer_run(
    key: jax.Array,
    program: SequentialProgram,
    args: tuple,
    n: int,
    k: int,
    num_steps: int,
    scheme: str = "systematic",
    proposal: Callable[..., Any] | None = None,
    init_proposal: Callable[..., Any] | None = None,
) -> dict:
    """The pure Steer core (jit/vmap-able). Returns a dict with ``log_weights: f32[N]``,
    ``log_evidence: f32[]``, ``log_evidence_init: f32[]``, per step ``ess: f32[T]`` (survivors),
    ``children_ess: f32[T]``, ``num_kept: i32[T]``, ``log_evidence_history: f32[T]`` and ``ancestors:
    i32[T, N]`` (parent survivor of each survivor), genealogy-traced ``init_choices`` ``[N, …]`` and
    step ``trajectories`` ``[N, T, …]``, ``active: bool[N, T]``, the final ``state`` and per-site
    NaN flags ``nan_sites``."""
    k_init, k_loop = jax.random.split(key)
    seq, init_info = start(k_init, program, args, n, init_proposal)
    log_z_init = log_evidence(seq.population.log_weights)

    def body(seq: Sequential, key_t):
        k_adv, k_sel = jax.random.split(key_t)
        children = extend(seq.population, k)
        active = jnp.repeat(~seq.population.particles.done, k)
        grown, info = advance(k_adv, Sequential(children, seq.t), program, args, proposal)
        pop, chosen, kept = select(k_sel, grown.population, n, scheme)
        record = (
            info.choices,
            active,
            chosen,
            ess(pop.log_weights),
            ess(grown.population.log_weights),
            kept,
            log_evidence(pop.log_weights),
            info.nan_sites,
        )
        return Sequential(pop, grown.t), record

    seq, (choices, active, chosen, ess_h, children_ess, kept, log_z_h, nan_h) = jax.lax.scan(
        body, seq, jax.random.split(k_loop, num_steps)
    )
    trajectories, init_index = _trace(chosen, k, {"choices": choices, "active": active})
    nan_sites = {**init_info.nan_sites, **{name: jnp.any(v) for name, v in nan_h.items()}}
    return {
        "init_choices": jax.tree.map(lambda x: x[init_index], init_info.choices),
        "trajectories": trajectories["choices"],
        "active": trajectories["active"],
        "log_weights": seq.population.log_weights,
        "log_evidence": log_evidence(seq.population.log_weights),
        "log_evidence_init": log_z_init,
        "log_evidence_history": log_z_h,
        "ess": ess_h,
        "children_ess": children_ess,
        "num_kept": kept,
        "ancestors": (chosen // k).astype(jnp.int32),
        "state": seq.population.particles.state,
        "nan_sites": nan_sites,
    }


def extend(pop: Population, k: int) -> Population:
    """K children per particle: ``pop.particles`` is a :class:`~ppinfer.suspended.Particle` with
    leading axis N; the result has N·K particles, child ``i·K + j`` a copy of particle ``i``. A
    running particle's children each get log weight ``w_i − log K``; a finished one (``done``) is
    carried by child ``i·K`` with its whole weight ``w_i``, its other children get −inf (they are
    never selected). Deterministic and valid: ``⟦extend(pop)⟧ = ⟦pop⟧``."""
    n = pop.num_particles
    particles = gather(pop.particles, jnp.repeat(jnp.arange(n), k))
    lw = jnp.repeat(pop.log_weights, k)
    first = (jnp.arange(n * k) % k) == 0
    lw = jnp.where(particles.done, jnp.where(first, lw, -jnp.inf), lw - jnp.log(k))
    return Population(Particle(particles.state, particles.done), lw)


def threshold(log_weights: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Fearnhead–Clifford's threshold for keeping ``n`` of ``M = len(log_weights)`` children.

    Sorting the weights ``s_0 ≥ s_1 ≥ …``, ``L`` is the smallest index with ``s_L ≤ c_L = (Σ_{i≥L}
    s_i) / (n − L)``; then ``Σ_i min(s_i / c_L, 1) = n``. Returns ``(order: i32[M]`` (descending
    sort), ``num_kept: i32[]`` (L, the children with ``w ≥ c`` kept deterministically),
    ``log_c: f32[]``, ``log_w_sorted: f32[M])``. ``log_c`` is −inf when fewer than ``n`` children
    have positive weight (the remaining slots then get weight zero); when ``n ≥ M`` every child is
    kept in place (``order`` is the identity, ``L = M``), so ``K = 1`` is sequential importance
    sampling."""
    m = log_weights.shape[0]
    if n >= m:  # room for every child: all kept in place, the spare slots get weight zero
        order = jnp.arange(m, dtype=jnp.int32)
        return order, jnp.asarray(m, jnp.int32), jnp.asarray(-jnp.inf, log_weights.dtype), log_weights
    order = jnp.argsort(-log_weights, stable=True).astype(jnp.int32)
    s = log_weights[order]
    ref = jnp.where(jnp.isfinite(s[0]), s[0], 0.0)
    w = jnp.exp(s - ref)
    # Tail sums T_L from the small end: no cancellation, and T_L ≥ s_L holds in floating point too.
    tail = jnp.cumsum(w[::-1])[::-1][:n]
    ok = w[:n] * (n - jnp.arange(n)) <= tail  # always true at L = n − 1
    kept = jnp.argmax(ok).astype(jnp.int32)
    log_c = ref + jnp.log(tail[kept]) - jnp.log((n - kept).astype(s.dtype))
    return order, kept, log_c, s


def selection_uniforms_shape(scheme: str, n: int) -> tuple[int, ...]:
    """The shape of the ``U[0, 1)`` input of :func:`select_from_uniforms`."""
    check_selection_scheme(scheme)
    return (1,) if scheme == "systematic" else (n,)


def select_from_uniforms(
    scheme: str, uniforms: jax.Array, log_weights: jax.Array, n: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The deterministic part of :func:`select`: ``(indices: i32[n], new_log_weights: f32[n],
    num_kept: i32[])`` for ``log_weights: f32[M]`` given ``uniforms`` of
    :func:`selection_uniforms_shape`. Slots ``j < L`` hold the L heaviest children with their own
    weights; slot ``j ≥ L`` holds the child at position ``(j − L + u_j) / (n − L)`` of the
    cumulative distribution of the remaining children, with weight ``c``. When every weight is zero
    the indices are arbitrary and every new weight is −inf."""
    check_selection_scheme(scheme)
    m = log_weights.shape[0]
    order, kept, log_c, s = threshold(log_weights, n)
    ref = jnp.where(jnp.isfinite(s[0]), s[0], 0.0)
    rank = jnp.arange(m)
    residual = jnp.where(rank >= kept, jnp.exp(s - ref), 0.0)
    cdf = jnp.cumsum(residual)
    j = jnp.arange(n)
    u = uniforms[0] if scheme == "systematic" else uniforms
    positions = (j - kept + u) / jnp.maximum(n - kept, 1) * cdf[-1]
    last_alive = m - 1 - jnp.argmax((residual > 0)[::-1])
    drawn = jnp.minimum(jnp.searchsorted(cdf, positions, side="right"), last_alive)
    deterministic = j < kept
    ranks = jnp.where(deterministic, jnp.minimum(j, m - 1), drawn)
    new_log_weights = jnp.where(deterministic, s[jnp.minimum(j, m - 1)], log_c)
    return order[ranks], new_log_weights, kept


def select(
    key: jax.Array, pop: Population, n: int, scheme: str = "systematic"
) -> tuple[Population, jax.Array, jax.Array]:
    """Keep ``n`` of ``pop``'s M particles without replacement (Fearnhead–Clifford; see the module
    docstring). Returns ``(pop', indices: i32[n], num_kept: i32[])``: ``pop'`` has the selected
    particles and the new log weights. Valid: ``E[⟦select(pop)⟧] = ⟦pop⟧`` (checked exactly by
    ``semantics.steer.check_select``), and ``logsumexp`` of the weights is preserved whenever at
    least ``n`` weights are positive."""
    uniforms = jax.random.uniform(key, selection_uniforms_shape(scheme, n), pop.log_weights.dtype)
    indices, new_log_weights, kept = select_from_uniforms(scheme, uniforms, pop.log_weights, n)
    return Population(gather(pop.particles, indices), new_log_weights), indices, kept


def check_selection_scheme(scheme: str) -> None:
    if scheme not in SELECTION_SCHEMES:
        raise ConfigError(f"unknown selection scheme {scheme!r} for Steer; choose one of {SELECTION_SCHEMES}")


def _trace(chosen: jax.Array, k: int, history: Any) -> tuple[Any, jax.Array]:
    """Trace each final survivor back: ``chosen: i32[T, N]`` is the child (of N·K) each survivor was
    after step t, ``history`` has leaves ``[T, N·K, …]`` indexed by child. Returns ``(trajectories``
    with leaves ``[N, T, …]``, ``init_index: i32[N])``."""
    n = chosen.shape[1]

    def back(idx, xs):
        chosen_t, hist_t = xs
        child = chosen_t[idx]
        return child // k, jax.tree.map(lambda h: h[child], hist_t)

    init_index, traj = jax.lax.scan(back, jnp.arange(n), (chosen, history), reverse=True)
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), traj), init_index
