"""``check_exact``: the exact expected output of the inference code users run, against ``denote``.

For a finite program and a tiny population, every random input of an algorithm can be enumerated:
the value of every discrete latent choice of every particle (init and each step) and, at every
selection, every cell of the uniforms the selection reads. :func:`check_exact` runs **the same loop
and kernel step that** :func:`ppinfer.infer` **runs** (:func:`ppinfer.algorithms.smc.run_phases`:
the start, chunked advance and output phases of the run wrapper over
:func:`ppinfer.kernels.smc.step`, with the algorithm's own selection, proposal, early exit, finished-
particle masks, history and extensions) on each such input, injected in place of the key
(:class:`~ppinfer.kernels.smc.StepNoise`), weighs it by its probability, and compares the expected
output measure

    E[ Σ_i exp(log_weights[i]) δ(trajectory_i) ]     and     E[Ẑ] = E[exp(log_evidence)]

with :func:`semantics.denote`, an interpreter that shares no code with the algorithms. A valid
algorithm gives 0 up to float64 round-off.

How the randomness is enumerated (stated assumptions):

- **Latent choices.** Each site's finite support comes from its distribution's
  ``enumerate_support``; the probability of a value is the log density the run itself reports for
  the distribution it drew from (:attr:`~ppinfer.kernels.smc.SMCInfo.log_prob_draws`, NumPyro's
  ``log_prob``). Choices of particles that have finished are fixed (they do not affect the output:
  the engine discards them). A program that draws randomness outside ``sample`` sites (e.g.
  ``numpyro.prng_key()``) is not enumerated.
- **Selections.** The check reads nothing of a selection but its outputs: for each weight vector
  it meets, it locates the points where ``select(u, log_weights)`` changes along each coordinate of
  ``u`` (a grid of 65 points, then bisection down to adjacent floats), coordinate after coordinate
  with the earlier ones fixed in their cell and the later ones at 0.5, and tests every resulting box at
  16 random points; a selection that is not piecewise constant on such boxes raises
  :class:`~ppinfer.errors.EnumerationError`. What this search cannot see, the verdict does not
  cover: two changes of the output within one grid interval that return to the same output (a
  selection wrong on an interval narrower than 1/64 of a uniform), and a change confined to a
  corner of several uniforms away from where the later ones are held (found only if a random point
  lands there).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.primitives import Messenger

from ppinfer import checks
from ppinfer._compile import locked
from ppinfer.algorithms.importance import Importance, importance_run
from ppinfer.algorithms.particle_gibbs import ParticleGibbs
from ppinfer.algorithms.smc import SMC, LoopNoise, run_phases, trace_history
from ppinfer.algorithms.steer import Steer
from ppinfer.errors import ConfigError, EnumerationError, InferenceError, ModelError
from ppinfer.infer import CONCRETE_VALUE_ERRORS, concrete_value_message
from ppinfer.kernels.select import built_in, parts
from ppinfer.kernels.smc import StepNoise
from ppinfer.program import is_sequential
from ppinfer.weighted import simulate
from semantics.denote import denote
from semantics.measure import Measure, outcome_key

__all__ = ["ExactReport", "check_exact", "selection_outcomes"]

_GRID = 65
_PROBES = 16
_MAX_RUNS = 2_000_000
_MAX_CUTS = 256
_CHUNK = 256


@dataclass(frozen=True)
class ExactReport:
    """The verdict of :func:`check_exact`.

    Attributes:
        max_abs_error: ``max(measure_error, evidence_error)``.
        ok: ``relative_error <= tol``.
        measure_error: ``max_x |E[Σ_i w_i δ(x_i)](x) − ⟦program⟧(x)|`` over outcomes.
        evidence_error: ``|E[Ẑ] − Z|``.
        expected_evidence: ``E[Ẑ]`` under the algorithm.
        evidence: ``Z``, the total mass of ``⟦program⟧``.
        num_runs: the enumerated inputs the real code was run on (leaves of positive probability).
        algorithm: the algorithm's name.
        tol: the tolerance.
        relative_error: ``max_abs_error / Z`` (``Z`` the program's mass; ``max_abs_error`` itself
            when ``Z = 0``, and for the conditional SMC kernel, whose error is between
            probabilities): the error is judged relative to the mass, so that a selection that
            ignores the weights is not passed on a program of mass 1e-19, nor round-off failed on
            one of mass 1e9.
    """

    max_abs_error: float
    ok: bool
    measure_error: float
    evidence_error: float
    expected_evidence: float
    evidence: float
    num_runs: int
    algorithm: str
    tol: float
    relative_error: float = float("nan")


@locked  # NumPyro's handler stack is one per process: other threads' tracing waits
def check_exact(program: Any, *args: Any, algorithm: Any, tol: float = 1e-8) -> ExactReport:
    """Exact check of ``algorithm`` on ``program(*args)`` (module docstring). Works for
    :class:`~ppinfer.SMC` (any selection, a user's included; history on and off; sharded or
    grouped), :class:`~ppinfer.Steer`, :class:`~ppinfer.Importance` (static and sequential programs)
    and :class:`~ppinfer.ParticleGibbs` (exact invariance of its conditional SMC kernel:
    ``max |πK − π|`` in ``max_abs_error``). Raises :class:`EnumerationError` for anything else, a
    continuous latent site, or an enumeration beyond two million runs."""
    if isinstance(algorithm, type):
        raise ConfigError(f"algorithm must be an instance, e.g. {algorithm.__name__}(2), not the class")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0:
        raise ConfigError(f"tol must be a number >= 0, got {tol!r}")
    name = getattr(algorithm, "name", type(algorithm).__name__)
    try:
        return _check_exact(program, args, algorithm, tol, name)
    except CONCRETE_VALUE_ERRORS as e:  # as pp.infer says it: a ModelError naming the line
        raise ModelError(concrete_value_message(e)) from e


def _check_exact(program: Any, args: tuple, algorithm: Any, tol: float, name: str) -> ExactReport:
    with jax.enable_x64(True):
        # float32 data in float64: the run and the reference then compute the same program (mixed
        # float32 data and float64 parameters were promoted at different points: 4e-8 apart).
        args = tuple(_as_float64(a) for a in args)  # top-level data arrays only (not an LM's weights)
        if isinstance(algorithm, ParticleGibbs):
            return _csmc_report(program, args, algorithm, tol)
        if isinstance(algorithm, Importance) and not is_sequential(program):
            expected, total_runs = _exact_importance(program, args, algorithm)
            reference = denote(program, *args)
        elif isinstance(algorithm, SMC | Steer | Importance):
            if not is_sequential(program):
                raise EnumerationError(f"{name} needs a sequential program")
            loop = _loop_of(algorithm, program, args)
            _check_draw(loop.selection, loop.num_particles)
            expected, total_runs = _exact_loop(program, args, loop)
            reference = denote(program, *args)
            if not loop.history:
                reference = reference.map(_filter_key)
        else:
            raise EnumerationError(
                f"check_exact cannot enumerate {name}: it supports SMC, Steer, Importance and ParticleGibbs"
            )
    measure, ez = expected
    measure_error = measure.max_abs_diff(reference)
    if not (
        np.isfinite(ez) and np.isfinite(measure_error)
    ):  # the step poisons an invalid selection's weights
        raise InferenceError(
            f"check_exact: {name}'s expected Ẑ is {ez}: a log weight became NaN or +inf in some run "
            "— a selection (resampling=…) returned one or an ancestor out of range, or a proposal "
            "or a site's log density did"
        )
    evidence_error = abs(ez - reference.total())
    err = max(measure_error, evidence_error)
    relative = err / reference.total() if reference.total() > 0 else err
    return ExactReport(
        max_abs_error=err,
        ok=bool(relative <= tol),
        measure_error=measure_error,
        evidence_error=evidence_error,
        expected_evidence=ez,
        evidence=reference.total(),
        num_runs=total_runs,
        algorithm=name,
        tol=tol,
        relative_error=relative,
    )


def _as_float64(x: Any) -> Any:
    if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.asarray(x, jnp.float64)
    return x


def _check_draw(selection: Any, n: int, num_draws: int = 20_000) -> None:
    """The check enumerates ``u ~ U[0, 1)^n``, but ``pp.infer`` draws a selection's uniforms with
    its own ``draw(key, n_out, dtype)`` when it has one (:func:`~ppinfer.kernels.select.
    draw_uniforms`). The built-in selections' draws are checked by the test suite; a user's is
    tested here, statistically: every coordinate of ``num_draws`` draws against ``U[0, 1)``
    (Kolmogorov–Smirnov, χ² on 100 bins and the range, each an :class:`EnumerationError` at
    p < 1e-6), since the exact verdict would otherwise be about uniforms the run never draws. A draw
    wrong on a stretch narrower than these tests resolve (about 1e-3 of [0, 1)), and dependence
    between the coordinates a selection reads, are not detected."""
    from scipy.stats import chisquare, kstest

    draw = getattr(selection, "draw", None)
    if draw is None or built_in(selection):  # a wrapper of a user's selection draws with its base's
        return
    keys = jax.random.split(jax.random.PRNGKey(12345), num_draws)
    u = np.asarray(jax.vmap(lambda k: draw(k, n, jnp.float64))(keys), np.float64)
    if u.shape != (num_draws, n):
        raise EnumerationError(f"the selection's draw(key, {n}, dtype) gave shape {u.shape[1:]}, not ({n},)")
    # Each coordinate: Kolmogorov–Smirnov (a shifted or squeezed law), χ² on 100 equal bins (a
    # missing or doubled stretch: a draw that never reaches [0.99, 1) gives p ~ 1e-40), and the
    # range (the smallest and largest draws lie within ``edge`` of 0 and 1 but with probability
    # 1e-6 each: a draw that stops short of an end by more than that is refused).
    edge = -np.log(1e-6) / num_draws
    for j in range(n):
        x = u[:, j]
        bins = np.clip((x * 100).astype(int), 0, 99)
        tests = {
            "Kolmogorov–Smirnov": kstest(x, "uniform").pvalue,
            "χ² on 100 bins": chisquare(np.bincount(bins, minlength=100)).pvalue,
            "range": 0.0 if x.min() > edge or x.max() < 1 - edge or x.min() < 0 or x.max() >= 1 else 1.0,
        }
        failed = {name: p for name, p in tests.items() if p < 1e-6}
        if failed:
            name, p = next(iter(failed.items()))
            detail = f"[{x.min():.4g}, {x.max():.4g}]" if name == "range" else f"p = {p:.1e}"
            raise EnumerationError(
                f"the selection's own draw() does not give U[0, 1) uniforms (coordinate {j}, {name}: "
                f"{detail}): check_exact enumerates U[0, 1), which pp.infer would not draw, so it "
                "cannot give this selection an exact verdict"
            )


def selection_outcomes(
    selection: Any, log_weights: Any, n_out: int | None = None
) -> list[tuple[float, tuple[int, ...], tuple[float, ...]]]:
    """The exact law of ``selection(u, log_weights)`` for ``u ~ U[0, 1)^{n_out}`` (found as in the
    module docstring): a list of ``(probability, ancestors, new_log_weights)``."""
    lw = np.asarray(log_weights, np.float64)
    n_out = lw.shape[0] if n_out is None else n_out
    with jax.enable_x64(True):
        cells = _CellFinder(selection, n_out).cells([lw])[0]
    out = []
    for sig, (vol, _) in cells.items():
        anc = np.frombuffer(sig[: 8 * n_out], np.int64)
        new = np.frombuffer(sig[8 * n_out :], np.float64)
        out.append((vol, tuple(int(a) for a in anc), tuple(float(w) for w in new)))
    return out


# ---------------------------------------------------------------------------------------------
# The SMC-family loop


def _loop_of(algorithm, program, args):
    """The loop ``pp.infer`` runs (without per-step NaN flags: a healthy run, as enumerated here)."""
    if isinstance(algorithm, Importance):
        algorithm = SMC(algorithm.num_particles, ess_threshold=0.0, proposal=algorithm.proposal)
    return replace(algorithm.loop(program, args), nan_sites=False)


def _exact_loop(program, args, loop):
    """``((Measure, E[Ẑ]), runs)`` for the loop, by a breadth-first search over noise prefixes."""
    n, num_steps, k = loop.num_particles, loop.num_steps, loop.extensions
    m = n * k
    args = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, args)
    init_sites = _latent_sites(
        lambda: simulate(jax.random.PRNGKey(0), program.init, args, proposal=loop.init_proposal)
    )
    state_shape = jax.eval_shape(
        lambda: simulate(jax.random.PRNGKey(0), program.init, args, proposal=loop.init_proposal)[0].value
    )
    zero_state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state_shape)
    t0 = jnp.zeros((), jnp.int32)
    step0 = lambda s: program.step(s, t0, *args)
    if checks.draws_key(program.init, args) or checks.draws_key(step0, (zero_state,)):
        raise EnumerationError(
            "check_exact enumerates sample sites only; this program also draws randomness from "
            "numpyro.prng_key() (e.g. tokens sampled inside a step), which it cannot enumerate"
        )
    step_prop = None if loop.proposal is None else (lambda s: loop.proposal(s, t0, *args))
    step_sites = _latent_sites(
        lambda: simulate(
            jax.random.PRNGKey(0), lambda s: program.step(s, t0, *args), (zero_state,), proposal=step_prop
        )
    )
    base, _ = parts(loop.selection)
    finder = _CellFinder(base, n)
    key = jax.random.PRNGKey(0)
    run = jax.jit(jax.vmap(lambda nz: run_phases(key, program, args, loop, nz)))

    def dummy_steps(count):
        choices = {
            s: np.broadcast_to(v[0], (count, num_steps, m, *v.shape[1:])).copy()
            for s, v in step_sites.items()
        }
        return choices, np.full((count, num_steps, n), 0.5)

    # Level "init": every combination of the N particles' init choices.
    init_values = _combinations(init_sites, n, np.ones(n, bool))
    count = _count_values(init_values, init_sites, n)
    steps_choices, uniforms = dummy_steps(count)
    nodes = {"init": init_values, "steps": steps_choices, "u": uniforms, "logp": np.zeros(count)}
    out = _run(run, nodes)
    nodes["logp"] = np.asarray(out["log_prob_draws_init"]).sum(axis=1)
    nodes = _prune(nodes)
    runs = _count(nodes)
    for t in range(num_steps):
        # Which children run step t does not depend on step t's noise.
        active = np.asarray(_run(run, nodes)["step_active"])[:, t]
        expanded = []
        for b in range(_count(nodes)):
            combos = _combinations(step_sites, m, active[b])
            child = _take(nodes, np.full(_count_values(combos, step_sites, m), b))
            for s in step_sites:
                child["steps"][s][:, t] = combos[s]
            expanded.append(child)
        nodes = _concat(expanded)
        _budget(_count(nodes))
        out = _run(run, nodes)
        live = np.asarray(out["step_active"])[:, t]
        draws = np.where(live, np.asarray(out["log_prob_draws"])[:, t], 0.0)
        nodes["logp"] = nodes["logp"] + draws.sum(axis=1)
        keep = _alive(nodes)
        nodes, out = _take(nodes, keep), _take(out, keep)
        runs += _count(nodes)
        # The selection's decision and input do not depend on its own uniforms.
        selected = np.asarray(out["resampled"])[:, t]
        pre = np.asarray(out["pre_log_weights"])[:, t]
        which = np.flatnonzero(selected)
        cells = finder.cells([pre[b] for b in which])
        expanded = [_take(nodes, np.flatnonzero(~selected))]
        for b, outcomes in zip(which, cells, strict=True):
            vols = [vol for vol, _ in outcomes.values()]
            child = _take(nodes, np.full(len(vols), b))
            child["u"][:, t] = np.stack([u for _, u in outcomes.values()])
            child["logp"] = child["logp"] + np.log(vols)
            expanded.append(child)
        nodes = _prune(_concat(expanded))
        _budget(_count(nodes))
    out = _run(run, nodes)
    return _measure(out, nodes, loop), runs


def _measure(out, nodes, loop):
    """``(Measure, E[Ẑ])`` over the leaves: each leaf's particles weighted by the leaf's
    probability, keyed like :func:`semantics.denote` (``init/<site>``, ``<t>/<site>`` for the steps
    the particle ran; a filter: ``init/<site>`` and ``last/<site>``)."""
    probs = np.exp(nodes["logp"])
    log_w = np.asarray(out["log_weights"])
    ez = float(np.sum(probs * np.exp(np.asarray(out["log_evidence"]))))
    items = []
    if loop.history:
        traced = jax.vmap(lambda a, i, h: trace_history(a, i, h, loop.extensions))(
            out["ancestors"], out["init_choices"], out["history"]
        )
        init = jax.tree.map(np.asarray, traced["init_choices"])
        traj = jax.tree.map(np.asarray, traced["trajectories"])
        active = np.asarray(traced["active"])
        for b, p in enumerate(probs):
            for i in range(log_w.shape[1]):
                choices = {f"init/{s}": v[b, i] for s, v in init.items()}
                for t in np.flatnonzero(active[b, i]):
                    choices.update({f"{t}/{s}": v[b, i, t] for s, v in traj.items()})
                items.append((outcome_key(choices), p * math.exp(log_w[b, i])))
    else:
        init = jax.tree.map(np.asarray, out["init_choices"])
        final = jax.tree.map(np.asarray, out["final_choices"])
        stepped = np.ones(log_w.shape, bool) if out["stepped"] is None else np.asarray(out["stepped"])
        for b, p in enumerate(probs):
            for i in range(log_w.shape[1]):
                choices = {f"init/{s}": v[b, i] for s, v in init.items()}
                if stepped[b, i]:  # a particle that stopped in init has no last step
                    choices.update({f"last/{s}": v[b, i] for s, v in final.items()})
                items.append((outcome_key(choices), p * math.exp(log_w[b, i])))
    return Measure(items), ez


def _filter_key(key: tuple) -> tuple:
    """A denotation outcome pushed to what a filter (``history=False``) reports: init's sites and
    the sites of the last step the trajectory ran, as ``last/<site>``."""
    steps = [int(name.split("/")[0]) for name, _ in key if not name.startswith("init/")]
    if not steps:
        return tuple((name, v) for name, v in key if name.startswith("init/"))
    last = max(steps)
    kept = {}
    for name, v in key:
        head, site = name.split("/", 1)
        if head == "init":
            kept[name] = v
        elif int(head) == last:
            kept[f"last/{site}"] = v
    return tuple(sorted(kept.items()))


# ---------------------------------------------------------------------------------------------
# Importance on a static program


def _exact_importance(program, args, algorithm):
    n = algorithm.num_particles
    args = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, args)
    sites = _latent_sites(lambda: simulate(jax.random.PRNGKey(0), program, args, proposal=algorithm.proposal))
    values = _combinations(sites, n, np.ones(n, bool))
    key = jax.random.PRNGKey(0)
    run = jax.jit(jax.vmap(lambda v: importance_run(key, program, args, n, algorithm.proposal, v)))
    out = run(values)
    probs = np.exp(np.asarray(out["log_prob_draws"]).sum(axis=1))
    log_w = np.asarray(out["log_weights"])
    choices = jax.tree.map(np.asarray, out["choices"])
    items = [
        (outcome_key({s: v[b, i] for s, v in choices.items()}), probs[b] * math.exp(log_w[b, i]))
        for b in range(len(probs))
        for i in range(n)
    ]
    ez = float(np.sum(probs * np.exp(np.asarray(out["log_evidence"]))))
    return (Measure(items), ez), len(probs)


def _csmc_report(program, args, algorithm, tol):
    from semantics.csmc import check_csmc_invariance

    err = check_csmc_invariance(program, args, algorithm.num_particles, algorithm.ancestor_sampling)
    nan = float("nan")
    return ExactReport(err, bool(err <= tol), err, 0.0, nan, nan, 0, algorithm.name, tol, err)


# ---------------------------------------------------------------------------------------------
# Latent sites and their supports


class _capture(Messenger):
    """Records each latent site's finite support (first sighting wins: a proposal's run comes
    before the program's, and it is the proposal that draws the sites it makes)."""

    def __init__(self):
        super().__init__()
        self.sites: dict[str, np.ndarray] = {}

    def process_message(self, msg):
        if msg["type"] != "sample" or msg.get("is_observed") or msg["name"] in self.sites:
            return
        name, fn = msg["name"], msg["fn"]
        if not getattr(fn, "has_enumerate_support", False):
            raise EnumerationError(
                f"site {name!r} has a distribution without finite support ({type(fn).__name__}); "
                "check_exact enumerates discrete programs only"
            )
        if msg["kwargs"].get("sample_shape"):
            raise EnumerationError(f"site {name!r}: sample_shape is not enumerated")
        try:
            with jax.ensure_compile_time_eval():
                support = np.asarray(fn.enumerate_support(expand=True))
        except Exception as e:  # a support that depends on traced values
            raise EnumerationError(f"site {name!r}: its support is not known before running ({e})") from e
        self.sites[name] = _joint_support(support, tuple(fn.batch_shape))


def _latent_sites(run) -> dict[str, np.ndarray]:
    """site → ``[K, *shape]`` every value of the site (trace of one particle, nothing computed)."""
    cap = _capture()

    def traced():
        with cap:
            run()
        return jnp.zeros(())

    jax.eval_shape(traced)
    return cap.sites


def _joint_support(support: np.ndarray, batch_shape: tuple) -> np.ndarray:
    """The values of a batched site: ``support`` is ``[K, *batch, *event]`` with one value of the
    scalar support per row; the site's values are every assignment over the batch positions."""
    if not batch_shape:
        return support
    size = math.prod(batch_shape)
    event = support.shape[1 + len(batch_shape) :]
    per = support.reshape(support.shape[0], size, *event)[:, 0]
    combos = list(itertools.product(range(per.shape[0]), repeat=size))
    values = np.stack([per[list(c)] for c in combos])
    return values.reshape(len(combos), *batch_shape, *event)


def _combinations(sites: dict, m: int, free: np.ndarray) -> dict:
    """Every joint value of ``sites`` over the ``m`` particles whose ``free`` flag is set (the others
    fixed at their first value): site → ``[C, m, …]``."""
    names = list(sites)
    sizes = [len(sites[s]) for s in names]
    per_particle = [range(math.prod(sizes)) if f else range(1) for f in free]
    total = math.prod(len(r) for r in per_particle)
    _budget(total)
    idx = np.array(list(itertools.product(*per_particle)), dtype=np.int64).reshape(total, m)
    out = {}
    stride = 1
    for s, size in zip(reversed(names), reversed(sizes), strict=True):
        out[s] = sites[s][(idx // stride) % size]
        stride *= size
    return {s: out[s] for s in names}


# ---------------------------------------------------------------------------------------------
# Breakpoints of a selection


class _CellFinder:
    """Cells of ``u ∈ [0, 1)^{n_out}`` on which ``selection(u, log_weights)`` is constant, for many
    weight vectors at once (module docstring); memoised by weight vector."""

    def __init__(self, selection, n_out):
        self.n_out = n_out
        self.eval = _batched(selection)
        self.memo: dict[bytes, dict] = {}
        self.rng = np.random.default_rng(0)

    def cells(self, weights: list[np.ndarray]) -> list[dict]:
        """For each weight vector: ``{signature: (probability, u_midpoint)}`` per distinct output."""
        todo = [w for w in {w.tobytes(): w for w in weights}.values() if w.tobytes() not in self.memo]
        if todo:
            for w, res in zip(todo, self._search(todo), strict=True):
                self.memo[w.tobytes()] = res
        return [self.memo[w.tobytes()] for w in weights]

    def _signatures(self, us: np.ndarray, ws: np.ndarray) -> list[bytes]:
        size = 1 << max(0, int(len(us) - 1).bit_length())  # pad: few distinct compiled shapes
        pad = size - len(us)
        us_p = np.concatenate([us, np.repeat(us[:1], pad, 0)])
        ws_p = np.concatenate([ws, np.repeat(ws[:1], pad, 0)])
        anc, lw = self.eval(jnp.asarray(us_p), jnp.asarray(ws_p))
        anc, lw = np.asarray(anc)[: len(us)], np.asarray(lw)[: len(us)]
        if anc.shape[1:] != (self.n_out,) or lw.shape[1:] != (self.n_out,):
            raise EnumerationError(
                f"a selection must return (ancestors: i32[{self.n_out}], log_weights: f32[{self.n_out}]); "
                f"got shapes {anc.shape[1:]} and {lw.shape[1:]}"
            )
        # Log weights rounded to 2^-40 (~1e-12): a vmapped selection's last bits can depend on the
        # batch size, and an output must not look like another one for a difference of one ulp.
        lw = lw.astype(np.float64)
        lw = np.where(np.isfinite(lw), np.round(lw * 2.0**40) / 2.0**40, lw)
        pairs = zip(anc.astype(np.int64), lw, strict=True)
        return [a.tobytes() + b.tobytes() for a, b in pairs]

    def _search(self, weights):
        n = self.n_out
        # Boxes: (weight index, lows [n], highs [n]); coordinates ≥ level are still [0, 1).
        boxes = [(i, np.zeros(n), np.ones(n)) for i in range(len(weights))]
        for level in range(n):
            boxes = self._split(boxes, weights, level)
        mids = np.stack([_inside(lo, hi, 0.5) for _, lo, hi in boxes])
        ws = np.stack([weights[i] for i, _, _ in boxes])
        # Every box must be constant: test random points across it against its midpoint (they find
        # a change the coordinate-wise search missed with probability about 1 − (1 − v)^PROBES for
        # a region of volume fraction v of its box). Midpoints and probes go in ONE batch: a
        # vmapped float32 selection's last bits can depend on the batch size.
        draw = lambda: self.rng.uniform(1e-3, 1 - 1e-3, n)
        probes = [_inside(lo, hi, draw()) for _ in range(_PROBES) for _, lo, hi in boxes]
        every = self._signatures(np.concatenate([mids, np.stack(probes)]), np.tile(ws, (1 + _PROBES, 1)))
        sigs = every[: len(boxes)]
        if every[len(boxes) :] != sigs * _PROBES:
            raise EnumerationError(
                "the selection is not piecewise constant on boxes found coordinate by coordinate "
                "(check_exact cannot enumerate it)"
            )
        results = [dict() for _ in weights]
        for (i, lo, hi), sig, mid in zip(boxes, sigs, mids, strict=True):
            vol = float(np.prod(hi - lo))
            prev = results[i].get(sig)
            results[i][sig] = (vol + (prev[0] if prev else 0.0), mid if prev is None else prev[1])
        return results

    def _split(self, boxes, weights, level):
        grid = np.concatenate([[0.0], (np.arange(_GRID) + 0.5) / _GRID, [np.nextafter(1.0, 0.0)]])

        def points(box, xs):
            _, lo, hi = box
            base = _inside(lo, hi, 0.5)
            base[level + 1 :] = 0.5
            u = np.repeat(base[None], len(xs), 0)
            u[:, level] = xs
            return u

        us = np.concatenate([points(b, grid) for b in boxes])
        ws = np.repeat(np.stack([weights[i] for i, _, _ in boxes]), len(grid), 0)
        sigs = self._signatures(us, ws)
        g = len(grid)
        pending = []  # (box index, lo, hi, sig_lo, sig_hi)
        for bi in range(len(boxes)):
            s = sigs[bi * g : (bi + 1) * g]
            pending += [(bi, grid[j], grid[j + 1], s[j], s[j + 1]) for j in range(g - 1) if s[j] != s[j + 1]]
        cuts: list[list[float]] = [[] for _ in boxes]
        while pending:
            # Bisect to adjacent floats: the cut is the first float with the new output, so every
            # cell [a, b) found is exactly constant (two changes 1e-16 apart are two cuts).
            done = [p for p in pending if (p[1] + p[2]) / 2 in (p[1], p[2])]
            for bi, _, hi, _, _ in done:
                cuts[bi].append(hi)
            pending = [p for p in pending if (p[1] + p[2]) / 2 not in (p[1], p[2])]
            if not pending:
                break
            if len(pending) > _MAX_CUTS * len(boxes):
                raise EnumerationError(
                    f"the selection's output changes at more than {_MAX_CUTS} points of one uniform: it "
                    "is not piecewise constant (check_exact cannot enumerate it)"
                )
            mids = np.array([(lo + hi) / 2 for _, lo, hi, _, _ in pending])
            us = np.concatenate([points(boxes[p[0]], mids[j : j + 1]) for j, p in enumerate(pending)])
            ws = np.stack([weights[boxes[p[0]][0]] for p in pending])
            msigs = self._signatures(us, ws)
            nxt = []
            for (bi, lo, hi, slo, shi), mid, sm in zip(pending, mids, msigs, strict=True):
                if sm != slo:
                    nxt.append((bi, lo, mid, slo, sm))
                if sm != shi:
                    nxt.append((bi, mid, hi, sm, shi))
            pending = nxt
        out = []
        for (i, lo, hi), cs in zip(boxes, cuts, strict=True):
            edges = np.unique(np.concatenate([[0.0, 1.0], cs]))
            for a, b in zip(edges[:-1], edges[1:], strict=True):
                if b > a:
                    lo2, hi2 = lo.copy(), hi.copy()
                    lo2[level], hi2[level] = a, b
                    out.append((i, lo2, hi2))
        return out


def _batched(selection):
    """``jit(vmap(selection))``, one per hashable selection (compiled once per batch size)."""
    try:
        return _BATCHED.setdefault(selection, jax.jit(jax.vmap(selection)))
    except TypeError:  # an unhashable selection: compiled for this check only
        return jax.jit(jax.vmap(selection))


_BATCHED: dict = {}


def _inside(lo: np.ndarray, hi: np.ndarray, r: Any) -> np.ndarray:
    """The point ``lo + r (hi − lo)`` of the box ``[lo, hi)``, kept inside it (a cell one float
    wide has no interior float but ``lo``)."""
    x = lo + (hi - lo) * r
    return np.where(x >= hi, lo, x)


# ---------------------------------------------------------------------------------------------
# Node bookkeeping: a batch of noise prefixes with their log probabilities


def _run(run, nodes):
    """The compiled loop on every node's noise, in chunks of one fixed size (the last one padded) so
    that the vmapped loop compiles once per check."""
    count = _count(nodes)
    outs = []
    for start in range(0, count, _CHUNK):
        idx = np.arange(start, min(start + _CHUNK, count))
        padded = _take(nodes, np.concatenate([idx, np.full(_CHUNK - len(idx), idx[0])]))
        noise = LoopNoise(
            jax.tree.map(jnp.asarray, padded["init"]),
            StepNoise(jax.tree.map(jnp.asarray, padded["steps"]), jnp.asarray(padded["u"])),
        )
        out = run(noise)
        outs.append(_take(out, np.arange(len(idx))))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _count(nodes) -> int:
    return len(nodes["logp"])


def _count_values(values: dict, sites: dict, m: int) -> int:
    leaves = jax.tree.leaves(values)
    return leaves[0].shape[0] if leaves else 1


def _take(nodes, idx):
    return jax.tree.map(lambda x: np.array(np.asarray(x)[idx]), nodes)


def _concat(parts_):
    parts_ = [p for p in parts_ if len(p["logp"])]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts_)


def _alive(nodes) -> np.ndarray:
    """Nodes of positive probability."""
    return np.flatnonzero(np.isfinite(nodes["logp"]) & (nodes["logp"] > -745))


def _prune(nodes):
    return _take(nodes, _alive(nodes))


def _budget(count: int) -> None:
    if count > _MAX_RUNS:
        raise EnumerationError(
            f"exact enumeration needs {count} runs (limit {_MAX_RUNS}); use fewer particles, steps or "
            "values per site"
        )
