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
every child (it is sequential importance sampling). Steer is SMC's loop
(:func:`~ppinfer.algorithms.smc.run_loop`) over the same kernel step with ``extensions = K`` and the
:class:`~ppinfer.kernels.select.FearnheadClifford` selection, which also runs after the last step,
so the result has N particles (it does not change Ẑ).

Cost: each step runs N·K forward passes (children of finished particles included: the batch shape
is static) and holds N·K particle states (KV caches) at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from ppinfer import checks
from ppinfer.algorithms.smc import Loop, run_loop, run_sequential
from ppinfer.errors import ConfigError
from ppinfer.kernels.select import FearnheadClifford, fearnhead_clifford_threshold
from ppinfer.kernels.smc import extend
from ppinfer.population import Population, ess, gather
from ppinfer.program import SequentialProgram
from ppinfer.result import Result

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

threshold = fearnhead_clifford_threshold


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
        progress_bar: a progress bar over the steps, as :class:`~ppinfer.SMC`'s (it never changes
            the result).

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
    progress_bar: bool | None = None

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        checks.check_int("num_extensions", self.num_extensions, 1)
        checks.check_proposals(self)
        checks.check_int("num_particles · num_extensions", self.num_particles * self.num_extensions, 1)
        check_selection_scheme(self.resampling)

    name = "Steer"

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        checks.require_sequential(program, "Steer")
        return run_steer(key, program, args, self)

    def loop(self, program: SequentialProgram, args: tuple) -> Loop:
        """The :class:`~ppinfer.algorithms.smc.Loop` Steer runs: K extensions per particle and the
        Fearnhead–Clifford selection of N of N·K after every step, the last one included."""
        return steer_loop(
            self.num_particles,
            self.num_extensions,
            program.steps_for(args),
            self.resampling,
            self.proposal,
            self.init_proposal,
        )


def steer_loop(n, k, num_steps, scheme="systematic", proposal=None, init_proposal=None, **kw) -> Loop:
    return Loop(
        n,
        num_steps,
        FearnheadClifford(scheme),
        proposal,
        init_proposal,
        extensions=k,
        select_last=True,
        record=_steer_record,
        **kw,
    )


def _steer_record(state, info) -> dict:
    """Steer's per-step records: the survivors' ESS and the children kept deterministically."""
    kept = fearnhead_clifford_threshold(info.log_weights, state.log_weights.shape[0])[1]
    return {"survivors_ess": ess(state.log_weights), "num_kept": kept}


def run_steer(key: jax.Array, program: SequentialProgram, args: tuple, cfg: Steer) -> Result:
    """Run Steer (checks, compiled run, genealogy) and build the :class:`Result`."""
    return run_sequential(key, program, args, cfg, cfg.loop(program, args), cfg.name, post=_steer_post)


def _steer_post(out: dict) -> tuple[dict, dict]:
    """Result ``ess`` is the survivors'; the children's ESS and kept counts go to extras."""
    records = out["records"]
    extras = {"children_ess": out["ess"], "num_kept": records["num_kept"]}
    return {**out, "ess": records["survivors_ess"]}, extras


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
    """The pure Steer run (jit/vmap-able): :func:`~ppinfer.algorithms.smc.run_loop` on Steer's loop
    with the genealogy traced. Returns its dict plus ``children_ess: f32[T]`` and ``num_kept:
    i32[T]``; ``ess`` is the survivors' and ``ancestors`` the parent survivor of each survivor."""
    loop = steer_loop(n, k, num_steps, scheme, proposal, init_proposal, early_exit=False, genealogy=True)
    out = run_loop(key, program, args, loop)
    records = out.pop("records")
    return {
        **out,
        "ess": records["survivors_ess"],
        "children_ess": out["ess"],
        "num_kept": records["num_kept"],
        "ancestors": (out["ancestors"] // k).astype(jnp.int32),
    }


def selection_uniforms_shape(scheme: str, n: int) -> tuple[int, ...]:
    """The shape of the ``U[0, 1)`` input of :func:`select_from_uniforms`."""
    check_selection_scheme(scheme)
    return (1,) if scheme == "systematic" else (n,)


def select_from_uniforms(
    scheme: str, uniforms: jax.Array, log_weights: jax.Array, n: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:class:`~ppinfer.kernels.select.FearnheadClifford` given ``uniforms`` of
    :func:`selection_uniforms_shape`: ``(indices: i32[n], new_log_weights: f32[n], num_kept: i32[])``.
    Slots ``j < L`` hold the L heaviest children with their own weights; slot ``j ≥ L`` holds the
    child at position ``(j − L + u_j) / (n − L)`` of the cumulative distribution of the remaining
    children, with weight ``c``."""
    check_selection_scheme(scheme)
    u = jnp.broadcast_to(uniforms, (n,)) if scheme == "systematic" else uniforms
    indices, new_log_weights = FearnheadClifford(scheme)(u, log_weights)
    return indices, new_log_weights, threshold(log_weights, n)[1]


def select(
    key: jax.Array, pop: Population, n: int, scheme: str = "systematic"
) -> tuple[Population, jax.Array, jax.Array]:
    """Keep ``n`` of ``pop``'s M particles without replacement (Fearnhead–Clifford; see the module
    docstring). Returns ``(pop', indices: i32[n], num_kept: i32[])``."""
    uniforms = jax.random.uniform(key, selection_uniforms_shape(scheme, n), pop.log_weights.dtype)
    indices, new_log_weights, kept = select_from_uniforms(scheme, uniforms, pop.log_weights, n)
    return Population(gather(pop.particles, indices), new_log_weights), indices, kept


def check_selection_scheme(scheme: str) -> None:
    if scheme not in SELECTION_SCHEMES:
        raise ConfigError(f"unknown selection scheme {scheme!r} for Steer; choose one of {SELECTION_SCHEMES}")
