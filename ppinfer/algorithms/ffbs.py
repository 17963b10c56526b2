"""Forward-filtering backward-sampling (FFBS): smoothed trajectories of a state-space program from
one SMC run and a backward pass over its every-step filtering approximations.

**Algorithm.** A sequential program's state after step ``t`` is ``s_t`` and the step's latent choices
are ``x_t``; the trajectory is ``x_{0:T−1}`` (and ``init``'s latent choices).

1. *Forward filter*: one SMC run (:func:`~ppinfer.algorithms.smc.run_loop`, ``history=True``) with N
   particles. Step ``t``'s filtering approximation is its N children right after the reweighting and
   before the selection: choices ``x_t^i``, states ``s_t^i`` and *filtering weights*
   ``w_t^i ∝ exp(log_weights[t, i])``, the pre-selection log weights recorded in
   ``out["filtering"]["log_weights"]`` (the weight carried from step ``t−1``, times the step's
   incremental weight ``p/q``), normalised over ``i``. The run records each step's *post*-selection
   states (a :class:`~ppinfer.algorithms.smc.Loop` recorder); child ``i`` of step ``t`` was advanced
   from particle ``i`` of those after step ``t−1`` (of ``init`` for ``t = 0``), so its state ``s_t^i``
   is recomputed by re-running step ``t`` from it with ``x_t^i`` substituted.
2. *Backward sampling*, for each of P paths independently: ``b_{T−1} ~ w_{T−1}``; then for
   ``t = T−2 … 0``

       b_t ~ w_t^i · p(x_{t+1}^{b_{t+1}}, y_{t+1} | s_t^i),   i = 0 … N−1,

   the transition density computed by re-running ``step(s_t^i, t+1)`` with ``x_{t+1}`` substituted
   (:func:`transition_log_density`: the step's whole log density — its latent sites, and its
   observations and factors, which only matter if they depend on ``s_t``). The path is
   ``(x_init^{b_0}, x_0^{b_0}, …, x_{T−1}^{b_{T−1}})`` (step 0's child ``i`` continues ``init``'s
   particle ``i``: no selection separates them). Deterministic sites of steps ``t ≥ 1`` are
   recomputed along the path (from ``s_{t−1}^{b_{t−1}}``), not copied from the filter's lineage.

Everything is vmapped over particles and paths and compiled into one function with the forward
run: O(T·N) forward and O(T·N·P) backward step evaluations (and O(N·P) memory per step).

**Result.** ``samples``: step site → ``[P, T, …]`` (init site → ``[P, …]``), P equally weighted
smoothed trajectories (``log_weights = log Ẑ − log P`` each, so ``logsumexp`` is ``log Ẑ``);
``log_evidence``: the forward filter's ``log Ẑ`` (unbiased ``Ẑ``); ``ess``, ``resampled``,
``log_evidence_history``: the filter's; ``state``: each path's final state ``[P, …]``;
``filtering_mean(site)``: every step's filtering mean from the same forward run (the forward run
is the one :class:`~ppinfer.SMC` with the same settings and key makes); ``extras["indices"]``:
``i32[P, T]`` the particle ``b_t`` each path took at step ``t``.

**Validity.** Given the filter's particle approximations, each path is an exact draw from the FFBS
smoothing approximation ``Π_t`` of ``p(x_{0:T−1} | y)`` (Godsill, Doucet & West 2004): the
backward kernel is the filtering approximation reweighted by the exact transition density.
That approximation is consistent as N → ∞ (Douc, Garivier, Moulines & Olsson 2011), so the
marginal of each ``x_t`` over the paths converges to the smoothing marginal ``p(x_t | y_{0:T−1})``
— on a linear-Gaussian model, the Rauch–Tung–Striebel smoother's means and variances (checked in
``tests/test_ffbs.py``). Unlike SMC's own trajectories (the genealogy, which collapses onto few
ancestors at early steps), the paths re-select particles at every step, so early steps stay diverse.
Checking one step of a backward draw that ignores the transition density (``b_t ~ w_t`` alone:
the filtering marginals) fails this test at early steps.

**Requirements** (checked; a :class:`~ppinfer.errors.ConfigError` or
:class:`~ppinfer.errors.ModelError` otherwise):

- every particle runs every step: a program that can :func:`~ppinfer.stop` is refused;
- each step makes a latent choice;
- the program is Markov in its choices: the state a step returns does not depend on the previous
  state once the step's latent choices are fixed (a state-space program returning its latest latent
  value, ``return x``). Otherwise the path's states are not those its choices imply and the backward
  weights are wrong; the backward pass compares the states every candidate ``s_t^i`` leads to and the
  run raises when they differ.

The backward weights use the program's own transition density, so a ``proposal`` only changes the
forward filter (its weights carry ``p/q``). No sharding over devices.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer import checks
from ppinfer._compile import cached_jit, split_args
from ppinfer.algorithms.smc import SMC, Loop, check_output, run_chunked, run_loop, sample_names, stops_early
from ppinfer.errors import ConfigError, InferenceError, ModelError
from ppinfer.kernels.select import as_selection
from ppinfer.population import gather
from ppinfer.program import SequentialProgram
from ppinfer.result import Result
from ppinfer.suspended import match_state
from ppinfer.traced import assess, latent_sites

__all__ = ["FFBS", "ffbs_run", "ffbs_backward", "backward_sample", "transition_log_density", "record_states"]


@dataclass(frozen=True)
class FFBS:
    """Forward-filtering backward-sampling smoother for a :class:`~ppinfer.SequentialProgram`
    (module docstring): one SMC forward run, then ``num_paths`` trajectories drawn backward.

    Args:
        num_particles: N ≥ 1, the forward filter's particles.
        num_paths: P ≥ 1, smoothed trajectories drawn (cost O(T·N·P)).
        resampling, ess_threshold, proposal, init_proposal: the forward filter's, as :class:`~ppinfer.SMC`'s.
        progress_bar: the forward filter's bar, as :class:`~ppinfer.SMC`'s (it runs in compiled
            chunks: Ctrl-C stops it between chunks; neither changes the result).
    """

    num_particles: int = 1000
    num_paths: int = 100
    resampling: Any = "systematic"
    ess_threshold: float = 0.5
    proposal: Callable[..., Any] | None = None
    init_proposal: Callable[..., Any] | None = None
    progress_bar: bool | None = None

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        checks.check_int("num_paths", self.num_paths, 1)
        as_selection(self.resampling)
        checks.check_probability("ess_threshold", self.ess_threshold)

    name = "FFBS"

    def filter(self) -> SMC:
        """The forward filter: :class:`~ppinfer.SMC` with these settings and ``history=True``."""
        return SMC(
            self.num_particles,
            self.resampling,
            self.ess_threshold,
            self.proposal,
            self.init_proposal,
            history=True,
        )

    def loop(self, program: SequentialProgram, args: tuple) -> Loop:
        """The forward run's :class:`~ppinfer.algorithms.smc.Loop`: the filter's, recording every
        step's post-selection states (:func:`record_states`)."""
        return dataclasses.replace(self.filter().loop(program, args), early_exit=False, record=record_states)

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        checks.require_sequential(program, "FFBS")
        program.steps_for(args)  # its own error for no steps (empty data), before any run
        if stops_early(program, args, self):
            raise ConfigError(
                "FFBS needs every particle to run every step, but this program can end a particle "
                "early (it calls ppinfer.stop): smooth it with SMC's trajectories or ParticleGibbs"
            )
        t0 = time.perf_counter()
        loop = self.loop(program, args)
        dyn, static_key, rebuild = split_args(args)
        num_paths = self.num_paths

        cache_key = ("ffbs", program, loop, num_paths, static_key)
        # The forward filter in compiled chunks (progress bar, Ctrl-C), then the backward pass.
        forward = run_chunked(cache_key, key, dyn, rebuild, program, args, loop, self, self.name)
        log_z = check_output(forward, self, self.name)  # NaN sites, a dead population
        backward, _ = cached_jit(
            (*cache_key, "backward"),
            lambda: lambda key, dyn, fwd: ffbs_backward(key, program, rebuild(dyn), num_paths, fwd),
        )
        out = backward(key, dyn, forward)
        checks.raise_on_nan_sites(out["nan_sites"], self.name)
        _raise_on_backward_flags(out)
        samples, site_kinds = sample_names(out["init_path"], out["paths"])
        p = num_paths
        return Result(
            samples=samples,
            log_weights=jnp.full((p,), log_z - np.log(p), forward["log_weights"].dtype),
            log_evidence=log_z,
            algorithm=self.name,
            ess=out["ess"],
            resampled=out["resampled"],
            log_evidence_history=out["log_evidence_history"],
            ancestors=None,
            state=out["final_state"],
            wall_time=time.perf_counter() - t0,
            extras={
                "site_kinds": site_kinds,
                "filtering": out["filtering"],
                "indices": out["indices"],
                "active": jnp.ones(out["indices"].shape, bool),
                "filter_log_weights": out["log_weights"],
            },
        )


def record_states(state, info) -> dict:
    """The :class:`~ppinfer.algorithms.smc.Loop` recorder of FFBS: each step's states after its
    selection (the states the next step advances), ``[T, N, …]`` in ``out["records"]["state"]``."""
    return {"state": state.particles.state}


def ffbs_run(key: jax.Array, program: SequentialProgram, args: tuple, loop: Loop, num_paths: int) -> dict:
    """The pure FFBS run (jit-able): :func:`~ppinfer.algorithms.smc.run_loop` on ``loop`` (which must
    record :func:`record_states`, with ``history``) from ``key``, then :func:`backward_sample` from
    ``fold_in(key, ·)``. Returns run_loop's summaries (``log_weights``, ``log_evidence``, histories,
    ``nan_sites``, ``filtering``) and the backward pass's outputs (see :func:`backward_sample`)."""
    return ffbs_backward(key, program, args, num_paths, run_loop(key, program, args, loop))


def ffbs_backward(key: jax.Array, program: SequentialProgram, args: tuple, num_paths: int, out: dict) -> dict:
    """FFBS after its forward run ``out`` (:func:`~ppinfer.algorithms.smc.run_loop`'s dict, from
    ``key``): :func:`backward_sample` from ``fold_in(key, ·)``, and :func:`ffbs_run`'s dict."""
    back = backward_sample(
        jax.random.fold_in(key, 0xFFB5),
        program,
        args,
        num_paths,
        out["filtering"]["log_weights"],
        out["filtering"]["choices"],
        out["init_choices"],
        out["records"]["state"],
    )
    final_state = gather(out["state"], back["indices"][:, -1])
    keep = ("log_weights", "log_evidence", "log_evidence_init", "log_evidence_history", "ess", "resampled")
    return {
        **{k: out[k] for k in keep},
        "filtering": out["filtering"],
        "nan_sites": {**out["nan_sites"], **back.pop("nan_sites")},
        "final_state": final_state,
        **back,
    }


def backward_sample(
    key: jax.Array,
    program: SequentialProgram,
    args: tuple,
    num_paths: int,
    log_weights: jax.Array,
    choices: dict,
    init_choices: dict,
    post_states: Any,
) -> dict:
    """Draw ``num_paths`` (P) trajectories backward through a forward run's filtering records.

    Args:
        log_weights: ``f32[T, N]`` pre-selection (filtering) log weights of each step's children.
        choices: each step's latent and deterministic site values, name → ``[T, N, …]``.
        init_choices: ``init``'s site values, name → ``[N, …]`` (particle ``i`` is the parent of
            step 0's child ``i``).
        post_states: the states after each step's selection, ``[T, N, …]`` (step ``t + 1``'s child
            ``i`` was advanced from particle ``i`` of step ``t``).

    Returns a dict: ``indices: i32[P, T]`` (``b_t`` per path), ``paths`` (step sites ``[P, T, …]``),
    ``init_path`` (init sites ``[P, …]``), and flags ``non_markov``, ``stuck`` (a path whose every
    backward weight was zero) and ``nan_sites`` (``"<backward transition density>"``: NaN)."""
    num_steps, n = log_weights.shape
    init_names = tuple(latent_sites(program.init, args))
    init_state = jax.vmap(
        lambda i: _state_of(program.init, args, {k: init_choices[k][i] for k in init_names})
    )(jnp.arange(n))
    init_state = match_state(init_state, jax.tree.map(lambda s: s[0], post_states))
    step_names = tuple(
        latent_sites(lambda s: program.step(s, jnp.zeros((), jnp.int32), *args), (_first(init_state),))
    )
    if not step_names:
        raise ModelError(
            "FFBS: the program's step makes no random choice (no latent sample site): there is no "
            "transition density to sample the trajectory backward with"
        )
    latent = {k: choices[k] for k in step_names}
    # The state each step's children were advanced from: init's for step 0, step t−1's selected.
    prev_states = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b[:-1]]), init_state, post_states)
    keys = jax.random.split(key, num_steps)
    b_last = jax.random.categorical(keys[-1], log_weights[-1], shape=(num_paths,)).astype(jnp.int32)
    x_last = gather(_at(latent, -1), b_last)

    def back(carry, xs):
        b_next, x_next = carry
        t, key_t, lw_t, prev_t, latent_t = xs
        here = lambda s: program.step(s, t, *args)
        states_t = jax.vmap(lambda s, x: match_state(_state_of(here, (s,), x), s))(prev_t, latent_t)
        nxt = lambda s: program.step(s, t + 1, *args)
        scores, next_states, dets = jax.vmap(lambda x: transition_log_density(nxt, states_t, x))(x_next)
        nan = jnp.any(jnp.isnan(scores) & jnp.isfinite(lw_t)[None])
        logits = lw_t[None, :] + jnp.where(jnp.isnan(scores), -jnp.inf, scores)  # [P, N]
        b_t = jax.random.categorical(key_t, logits, axis=-1).astype(jnp.int32)
        stuck = jnp.any(jnp.all(logits == -jnp.inf, axis=-1))
        pick = lambda v: v[jnp.arange(v.shape[0]), b_t]  # [P, N, …] → path p's candidate b_t[p]
        live = jnp.isfinite(lw_t)
        non_markov = jnp.zeros((), bool)
        for s in jax.tree.leaves(next_states):
            differs = (s != pick(s)[:, None]).reshape(s.shape[:2] + (-1,)).any(-1)  # [P, N]
            non_markov = non_markov | jnp.any(differs & live[None])
        dets_next = jax.tree.map(pick, dets)
        return (b_t, gather(latent_t, b_t)), (b_t, dets_next, stuck, non_markov, nan)

    ts = jnp.arange(num_steps - 1, dtype=jnp.int32)
    head = lambda tree: jax.tree.map(lambda v: v[:-1], tree)
    xs = (ts, keys[:-1], log_weights[:-1], head(prev_states), head(latent))
    _, (b, dets, stuck, non_markov, nan) = jax.lax.scan(back, (b_last, x_last), xs, reverse=True)
    indices = jnp.concatenate([b, b_last[None]]).T  # [P, T]
    steps = jnp.arange(num_steps)[None, :]
    paths = {k: jnp.swapaxes(v, 0, 1)[indices, steps] for k, v in latent.items()}
    for k, v in choices.items():  # deterministic sites
        if k in latent:
            continue
        first = v[0][indices[:, 0]][:, None]  # step 0's: computed from init's own particle, b_0
        later = jnp.swapaxes(dets[k], 0, 1).astype(v.dtype)  # steps 1…T−1: recomputed on the path
        paths[k] = jnp.concatenate([first, later], axis=1)
    return {
        "indices": indices,
        "paths": paths,
        "init_path": gather(init_choices, indices[:, 0]),
        "non_markov": jnp.any(non_markov),
        "stuck": jnp.any(stuck),
        "nan_sites": {"<backward transition density>": jnp.any(nan)},
    }


def transition_log_density(
    step: Callable[[Any], Any], states: Any, choices: dict
) -> tuple[jax.Array, Any, dict]:
    """The log density of one step's latent ``choices`` (name → value) run from each of N candidate
    ``states`` (leading axis N): ``step(state)`` re-run with ``choices`` substituted.

    Returns ``(log_density: f32[N], next_states [N, …], deterministics [N, …])``;
    ``log_density[i] = log p(x, y | s_i)``, the step's whole joint density — latent sites, and
    observed sites and factors (these cancel in a normalisation over ``i`` unless they depend on
    ``s_i``, and are then needed). ``next_states`` are the states the step returns (equal for every
    ``i`` in a program that is Markov in its choices)."""

    def one(state):
        tr = assess(step, (state,), choices)
        return tr.score, match_state(tr.value, state), tr.deterministics

    return jax.vmap(one)(states)


def _state_of(fn: Callable[..., Any], args: tuple, choices: dict) -> Any:
    """The state ``fn(*args)`` returns with its latent ``choices`` substituted."""
    return jax.tree.map(jnp.asarray, assess(fn, args, choices).value)


def _raise_on_backward_flags(out: dict) -> None:
    if bool(out["non_markov"]):
        raise ModelError(
            "FFBS: the state a step returns depends on the previous state even with the step's latent "
            "choices fixed, so the program is not Markov in its choices and backward sampling would "
            "pair choices with states they do not imply. Return only what the step's choices "
            "determine (e.g. the latest latent value); keep running sums out of the state"
        )
    if bool(out["stuck"]):
        raise InferenceError(
            "FFBS: for some path every filtering particle gives the next step's choices zero "
            "transition density (e.g. a degenerate transition): increase num_particles"
        )


def _first(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _at(tree, t):
    return jax.tree.map(lambda x: x[t], tree)
