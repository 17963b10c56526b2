"""Exact invariance check of the conditional SMC (particle Gibbs) kernel, running the real sweep.

The CSMC kernel ``K(x, x')`` (:func:`ppinfer.algorithms.particle_gibbs.csmc_step`) is valid when the
smoothing posterior ``π(x) = p(x | y)`` is stationary: ``π K = π``, for every number of particles N.

For a sequential program with finitely many discrete latent choices, :func:`csmc_transition_matrix`
computes ``K`` *exactly*. One sweep is a deterministic function of its noise
(:class:`~ppinfer.algorithms.particle_gibbs.CSMCNoise`: the free slots' latent choices at ``init`` and
every step, the resampling, ancestor-sampling and final-pick uniforms), which
:func:`~ppinfer.algorithms.particle_gibbs.csmc_step_from_noise` takes instead of a key; it also
reports the law each part of the noise is drawn from (:class:`~ppinfer.algorithms.particle_gibbs.NoiseLaw`):
the log density of each latent choice given its parent, and the log weights each uniform is inverted
against. The noise is enumerated in the order the sweep consumes it, breadth-first over all
references at once:

1. the free slots' ``init`` choices (every joint value of the latent sites' finite supports);
2. for each step ``t``: run the sweep (the later noise filled with arbitrary values, which cannot
   change what step ``t`` sees), read the log weights it resamples from at ``t`` and split each free
   slot's uniform into the cells of ``[0, 1)`` cut at the cumulative weights — the inverse-CDF draw is
   constant on a cell, so the sweep is run at the cell's midpoint and the cell's length is its
   probability; likewise the ancestor-sampling uniform; then every value of the free slots' step-``t``
   choices;
3. the final pick's uniform, split at the cumulative final weights.

A complete noise (a leaf) has probability ``Π cell lengths · exp(Σ log densities of its latent
choices)``, the densities as the sweep reports them given the parents it chose (a slot whose parent
had stopped draws nothing: only one value is kept). The leaf's run gives the new reference ``x'``,
and ``K(x, x') = Σ`` of its leaves' probabilities. The probabilities of one reference's leaves must sum
to 1, which is asserted (it fails if a support is missed or a density is wrong). Everything runs in
float64; the sweep is compiled once (vmapped over nodes in fixed-size batches).

:func:`check_csmc_invariance` returns ``max |π K − π|`` (~1e-15 when valid). A deliberately wrong
sweep can be passed as ``sweep_fn`` and must fail (tests: a sweep that does not pin the reference,
one that ancestor-samples with the wrong weights).

What the check trusts: (a) that each uniform is used only through an inverse-CDF draw against the log
weights the sweep reports (:func:`~ppinfer.resample.ancestors_from_uniforms`, itself checked exactly
by :func:`semantics.blocks.check_resample`) — a bug that distorts a uniform *inside* its cell (e.g.
``u ↦ u²`` before the draw) is invisible, as the sweep is evaluated only at cell midpoints; a bug in
the weights, the pinning, the lineages or the final pick is not; (b) that each latent site's support
does not depend on the state (true of jit-compatible programs with fixed-shape discrete sites): the
candidate values are the supports seen by one eager run of ``init`` and step 0, and a value outside a
particle's support gets density 0. The noise-driven sweep runs each slot as a one-particle
population (vmapped) where the key-driven one runs the population at once; the tests also check that
both give the same kernel (key-driven transition frequencies against ``K``, chi-square).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from scipy.special import logsumexp

from ppinfer import checks
from ppinfer.algorithms.enumerate import support_values
from ppinfer.algorithms.particle_gibbs import (
    CSMCNoise,
    Sites,
    Trajectory,
    _placeholder,
    check_program,
    csmc_step_from_noise,
)
from ppinfer.errors import ConfigError
from ppinfer.program import SequentialProgram, is_sequential
from semantics.denote import denote
from semantics.measure import outcome_key

__all__ = ["csmc_transition_matrix", "check_csmc_invariance", "csmc_posterior"]

SweepFn = Callable[..., tuple]


def csmc_posterior(program: SequentialProgram, args: tuple) -> tuple[list[tuple], np.ndarray]:
    """``(states, π)``: the trajectories of positive posterior mass (outcome keys over the latent
    sites, named ``init/<name>`` and ``<t>/<name>`` as in :func:`semantics.denote`) and their exact
    posterior probabilities ``f64[S]``."""
    with jax.enable_x64(True):
        sites = check_program(program, args, "csmc_posterior")
        return _posterior(program, args, sites)


def csmc_transition_matrix(
    program: SequentialProgram,
    args: tuple,
    num_particles: int,
    ancestor_sampling: bool = False,
    sweep_fn: SweepFn = csmc_step_from_noise,
    batch_size: int = 4096,
) -> tuple[list[tuple], np.ndarray]:
    """``(states, K)``: the trajectories of positive posterior mass (:func:`csmc_posterior`) and the
    exact transition matrix ``K: f64[S, S]`` of one CSMC sweep with ``num_particles`` particles (module
    docstring). ``sweep_fn(noise, ref, program, args, num_particles, num_steps, sites,
    ancestor_sampling) -> (ref', info, law)`` is the sweep under test (default: the real one)."""
    states, _, k = _exact(program, args, num_particles, ancestor_sampling, sweep_fn, batch_size)
    return states, k


def check_csmc_invariance(
    program: SequentialProgram,
    args: tuple,
    num_particles: int,
    ancestor_sampling: bool = False,
    sweep_fn: SweepFn = csmc_step_from_noise,
) -> float:
    """``max_x' |Σ_x π(x) K(x, x') − π(x')|`` for the exact smoothing posterior ``π`` and the exact
    CSMC transition matrix ``K`` (:func:`csmc_transition_matrix`), in float64."""
    _, pi, k = _exact(program, args, num_particles, ancestor_sampling, sweep_fn)
    return float(np.max(np.abs(pi @ k - pi)))


def _exact(program, args, num_particles, ancestor_sampling, sweep_fn, batch_size=4096):
    """``(states, π, K)`` (module docstring)."""
    if not is_sequential(program):
        raise ConfigError("csmc_transition_matrix needs a sequential program (ppinfer.sequential)")
    num_particles = checks.check_num_particles(num_particles)
    with jax.enable_x64(True):
        sites = check_program(program, args, "csmc_transition_matrix")
        num_steps = program.steps_for(args)
        states, pi = _posterior(program, args, sites)
        refs = _trajectories(program, args, sites, states, num_steps)
        cand_init, cand_step = _candidates(program, args, sites, refs)
        noise = (refs, cand_init, cand_step)
        run = _runner(
            sweep_fn, program, args, num_particles, num_steps, sites, ancestor_sampling, noise, batch_size
        )
        n = num_particles
        nodes = _Nodes(
            ref=np.arange(len(states)),
            prob=np.ones(len(states)),
            init_c=np.zeros((len(states), n), np.int64),
            step_c=np.zeros((len(states), num_steps, n), np.int64),
            resample=np.full((len(states), num_steps, n), 0.5),
            ancestor=np.full((len(states), num_steps), 0.5),
            pick=np.full((len(states), 1), 0.5),
        )
        _, law = run(nodes)
        free = np.flatnonzero(law.free[0])
        c_init = len(next(iter(cand_init.values()))) if cand_init else 1
        c_step = len(next(iter(cand_step.values())))
        for i in free:
            nodes, _ = _expand_values(nodes, c_init, "init_c", (i,))
        for t in range(num_steps):
            _, law = run(nodes)
            nodes, law = _weigh(nodes, law, t - 1, free)
            res_lw, as_lw = law.resample_log_weights[:, t], law.ancestor_log_weights[:, t]
            uniforms = [(res_lw, "resample", (t, i)) for i in free]
            if bool(law.ancestor_drawn[0]):
                uniforms.append((as_lw, "ancestor", (t,)))
            parent = np.arange(nodes.ref.shape[0])
            for log_w, field, where in uniforms:
                nodes, p = _expand_cells(nodes, log_w[parent], field, where)
                parent = parent[p]
            for i in free:
                nodes, _ = _expand_values(nodes, c_step, "step_c", (t, i))
        _, law = run(nodes)
        nodes, law = _weigh(nodes, law, num_steps - 1, free)
        nodes, _ = _expand_cells(nodes, law.final_log_weights, "pick", (0,))
        new_refs, _ = run(nodes)
        return states, pi, _accumulate(nodes, new_refs, states, sites)


class _Nodes(NamedTuple):
    """Partial noises (B of them) with their probabilities so far; arrays with a leading axis B.
    ``init_c``/``step_c`` index the candidate values of a slot's choices."""

    ref: np.ndarray
    prob: np.ndarray
    init_c: np.ndarray
    step_c: np.ndarray
    resample: np.ndarray
    ancestor: np.ndarray
    pick: np.ndarray


def _posterior(program, args, sites: Sites) -> tuple[list[tuple], np.ndarray]:
    def latent_only(key):
        return tuple((name, v) for name, v in key if _site(name) in _latent_names(name, sites))

    post = denote(program, *args).map(latent_only).normalized()
    states = sorted(k for k, m in post.mass.items() if m > 0)
    return states, np.array([post.mass[s] for s in states])


def _site(name: str) -> str:
    return name.split("/", 1)[1]


def _latent_names(name: str, sites: Sites) -> tuple[str, ...]:
    return sites.init_latent if name.startswith("init/") else sites.step_latent


def _trajectories(program, args, sites: Sites, states: list[tuple], num_steps: int) -> Trajectory:
    """The states as references: a :class:`Trajectory` with a leading axis S (latent sites only;
    steps a trajectory did not reach are zero and inactive)."""
    template = _placeholder(program, args, num_steps)
    init_t, steps_t = template.init, template.steps
    init = {k: np.zeros((len(states), *init_t[k].shape), init_t[k].dtype) for k in sites.init_latent}
    steps = {k: np.zeros((len(states), *steps_t[k].shape), steps_t[k].dtype) for k in sites.step_latent}
    active = np.zeros((len(states), num_steps), bool)
    for s, key in enumerate(states):
        for name, value in key:
            prefix, site = name.split("/", 1)
            if prefix == "init":
                init[site][s] = value
            else:
                steps[site][s, int(prefix)] = value
                active[s, int(prefix)] = True
    return Trajectory(init, steps, active)


def _candidates(program, args, sites: Sites, refs: Trajectory) -> tuple[dict, dict]:
    """Every joint value of ``init``'s and of a step's latent sites: name → ``[C, …]``, from the
    finite supports seen by one eager run of ``init`` and step 0."""
    with handlers.trace() as tr_init, handlers.seed(rng_seed=0):
        state = program.init(*args)
    state = jax.tree.map(jnp.asarray, state)
    with handlers.trace() as tr_step, handlers.seed(rng_seed=0):
        program.step(state, jnp.zeros((), jnp.int32), *args)

    def joint(trace, names, like):
        values = [support_values(k, trace[k]["fn"]) for k in names]
        combos = list(itertools.product(*values))
        return {k: np.stack([np.asarray(c[j], like[k].dtype) for c in combos]) for j, k in enumerate(names)}

    init_like = {k: v[0] for k, v in refs.init.items()}
    step_like = {k: v[0, 0] for k, v in refs.steps.items()}
    return joint(tr_init, sites.init_latent, init_like), joint(tr_step, sites.step_latent, step_like)


def _runner(
    sweep_fn, program, args, n, num_steps, sites, ancestor_sampling, tables, batch_size
) -> Callable[[_Nodes], tuple[Any, Any]]:
    """``run(nodes) -> (new_refs, law)``: the sweep on every node's noise (numpy outputs, axis B);
    ``tables``: the references and the candidate values that nodes index."""
    refs, cand_init, cand_step = tables
    refs = jax.tree.map(jnp.asarray, refs)
    cand_init = {k: jnp.asarray(v) for k, v in cand_init.items()}
    cand_step = {k: jnp.asarray(v) for k, v in cand_step.items()}

    def one(r, init_c, step_c, resample, ancestor, pick):
        ref = jax.tree.map(lambda x: x[r], refs)
        noise = CSMCNoise(
            {k: v[init_c] for k, v in cand_init.items()},
            {k: v[step_c] for k, v in cand_step.items()},
            resample,
            ancestor,
            pick,
        )
        new_ref, _, law = sweep_fn(noise, ref, program, args, n, num_steps, sites, ancestor_sampling)
        return new_ref, law

    batched = jax.jit(jax.vmap(one))

    def run(nodes: _Nodes):
        b = nodes.ref.shape[0]
        size = batch_size  # one shape: the sweep is compiled once
        outs = []
        for lo in range(0, b, size):
            fields = (nodes.ref, nodes.init_c, nodes.step_c, nodes.resample, nodes.ancestor, nodes.pick)
            part = [x[lo : lo + size] for x in fields]
            pad = size - part[0].shape[0]
            part = [np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) for x in part]
            out = jax.device_get(batched(*part))
            kept = size - pad
            outs.append(jax.tree.map(lambda x, kept=kept: x[:kept], out))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    return run


def _set(nodes: _Nodes, field: str, where: tuple, values: np.ndarray) -> None:
    """``nodes.<field>[:, *where] = values`` (in place)."""
    getattr(nodes, field)[(slice(None), *where)] = values


def _take(tree, index: np.ndarray):
    return jax.tree.map(lambda x: x[index], tree)


def _expand_values(nodes: _Nodes, count: int, field: str, where: tuple) -> tuple[_Nodes, np.ndarray]:
    """Each node → ``count`` children, one per candidate value index (their probabilities come
    later, from the densities the sweep reports). Returns the children and each one's parent."""
    parent = np.repeat(np.arange(nodes.ref.shape[0]), count)
    out = _take(nodes, parent)
    _set(out, field, where, np.tile(np.arange(count), nodes.ref.shape[0]))
    return out, parent


def _expand_cells(
    nodes: _Nodes, log_weights: np.ndarray, field: str, where: tuple
) -> tuple[_Nodes, np.ndarray]:
    """Each node → one child per non-empty cell of a uniform inverted against its ``log_weights:
    f[B, N]``: the uniform set to the cell's midpoint, the probability multiplied by the cell's
    length. Returns the children and each one's parent."""
    mids, lengths = _cells_batch(np.asarray(log_weights, np.float64))
    parent = np.repeat(np.arange(nodes.ref.shape[0]), mids.shape[1])
    out = _take(nodes, parent)
    _set(out, field, where, mids.reshape(-1))
    keep = lengths.reshape(-1) > 0
    out = out._replace(prob=out.prob * lengths.reshape(-1))
    return _take(out, keep), parent[keep]


def _cells_batch(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(midpoints, lengths)``, each ``f[B, N]``: the cells of ``[0, 1)`` that the cumulative
    normalised weights cut (cell ``i`` is where the inverse CDF gives ``i``; zero-weight particles give
    empty cells). A dead row (every weight zero) has one cell: the resampler then ignores the uniform."""
    lse = logsumexp(log_weights, axis=1, keepdims=True)
    dead = ~np.isfinite(lse)
    probs = np.exp(log_weights - np.where(dead, 0.0, lse))
    probs = np.where(dead, np.eye(1, log_weights.shape[1]), probs)
    cdf = np.cumsum(probs, axis=1)
    lo = np.concatenate([np.zeros_like(cdf[:, :1]), cdf[:, :-1]], axis=1)
    hi = np.concatenate([cdf[:, :-1], np.ones_like(cdf[:, :1])], axis=1)
    lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
    return (lo + hi) / 2, np.maximum(hi - lo, 0.0)


def _weigh(nodes: _Nodes, law, level: int, free: np.ndarray) -> tuple[_Nodes, Any]:
    """Multiply in the density of the choices of ``init`` (``level = −1``) or of step ``level``, as
    the sweep reported it (``law``, per node); a slot that drew nothing keeps only its first
    candidate value. Drops nodes of probability 0; returns the kept nodes and their laws."""
    if level < 0:
        log_p = law.init_log_prob[:, free].sum(axis=1)
        ok = np.ones_like(nodes.prob, bool)
    else:
        log_p = law.step_log_prob[:, level].sum(axis=1)
        ok = np.all(law.step_drawn[:, level] | (nodes.step_c[:, level] == 0), axis=1)
    prob = np.where(ok, nodes.prob * np.exp(log_p), 0.0)
    keep = prob > 0
    return _take(nodes._replace(prob=prob), keep), _take(law, keep)


def _accumulate(nodes: _Nodes, new_refs: Trajectory, states: list[tuple], sites: Sites) -> np.ndarray:
    """``K[ref, state(new_ref)] += prob`` over the leaves; checks each row sums to 1."""
    index = {s: j for j, s in enumerate(states)}
    b = nodes.ref.shape[0]
    active = np.asarray(new_refs.active)
    cols = [np.asarray(new_refs.init[k]).reshape(b, -1).astype(np.float64) for k in sites.init_latent]
    for k in sites.step_latent:
        v = np.asarray(new_refs.steps[k]).reshape(b, active.shape[1], -1).astype(np.float64)
        cols.append(np.where(active[:, :, None], v, 0.0).reshape(b, -1))
    cols.append(active.astype(np.float64))
    rows, first, inverse = np.unique(
        np.concatenate(cols, axis=1), axis=0, return_index=True, return_inverse=True
    )
    column = np.empty(len(rows), np.int64)
    for u, leaf in enumerate(first):
        key = _key_of(new_refs, int(leaf), sites)
        if key not in index:
            raise AssertionError(f"the sweep returned a trajectory of zero posterior mass: {key}")
        column[u] = index[key]
    k = np.zeros((len(states), len(states)))
    np.add.at(k, (nodes.ref, column[np.ravel(inverse)]), nodes.prob)
    totals = k.sum(axis=1)
    assert np.all(np.abs(totals - 1.0) < 1e-9), (
        f"the enumerated sweep outcomes of some reference do not sum to 1: {totals}"
    )
    return k


def _key_of(refs: Trajectory, leaf: int, sites: Sites) -> tuple:
    active = np.asarray(refs.active[leaf])
    choices = {f"init/{k}": np.asarray(refs.init[k][leaf]) for k in sites.init_latent}
    for k in sites.step_latent:
        for t in np.flatnonzero(active):
            choices[f"{t}/{k}"] = np.asarray(refs.steps[k][leaf, t])
    return outcome_key(choices)
