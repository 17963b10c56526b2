"""The SMC kernel: one pure step that every SMC-family algorithm loops over.

    state₀, info₀ = init(key, program, args, N)                      # spawn N, run ``init``
    state, info  = step(key, state, program, args, selection=…)      # [extend ×K] → advance → select

``step`` composes three valid blocks (monad-bayes' ``smc`` is the same composition):

- **extend** (``extensions = K > 1``, Steer): each particle of weight ``w`` becomes K children of
  weight ``w/K`` (a finished particle: one child of weight ``w``). Deterministic; the measure is
  unchanged.
- **advance** (:func:`~ppinfer.suspended.advance`): every running child runs the program's step and
  multiplies its weight by the *incremental* weight ``p/q`` of that step. Valid. Along a path of
  targets on a fixed space (tempered, data-annealed and waste-free SMC, IBIS) no program step
  runs: a :class:`Reweighting` carries the weights times ``γ_{t+1}/γ_t``, also valid.
- **select** (a :mod:`~ppinfer.kernels.select` selection of ``N`` slots out of ``N·K`` children,
  when ``select_now`` and the selection's trigger hold). Valid when the selection is.
- **move** (optional, resample-move): after a selection, a Markov kernel ``move(key, state) ->
  (state, info)`` (:class:`~ppinfer.kernels.mh.Kernel`) rejuvenates the particles. Valid when the
  kernel leaves the current target ``π_t`` invariant: for ``(x, w)`` properly weighted for ``π_t``,
  ``E[w f(x')] = E[w (Kf)(x)] = Z_t E_π[Kf] = Z_t E_π[f]``.

So the step is valid: ``E[⟦step(s)⟧] = ⟦s⟧`` as unnormalised measures, in particular the
running evidence estimate ``Ẑ = Σ exp(log_weights)`` is unbiased. Nothing in the step is a hidden
global or a Python-side branch on data: it is ``jit``/``vmap``-able and traced once per loop.

All of the step's randomness is explicit: the key is split into the advance key (site draws) and the
selection key (``u: f32[N]``); with ``noise`` (:class:`StepNoise`) the same step runs on injected
latent values and uniforms instead — how ``semantics.check_exact`` enumerates the randomness of the
very code :func:`ppinfer.infer` runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ppinfer.errors import ConfigError, PPInferError
from ppinfer.kernels.select import built_in, draw_uniforms, parts
from ppinfer.population import Population, gather, log_evidence_and_ess
from ppinfer.suspended import Particle, Sequential, StepInfo, advance, start

__all__ = [
    "SMCState",
    "SMCInfo",
    "StepNoise",
    "Reweighting",
    "init",
    "step",
    "extend",
    "ScanRun",
    "scan_begin",
    "scan_advance",
    "scan_while",
    "trace_genealogy",
]


class SMCState(NamedTuple):
    """A population between two steps.

    Attributes:
        particles: :class:`~ppinfer.suspended.Particle` (program ``state`` pytree and ``done:
            bool[N]``), leading axis N.
        log_weights: ``f32[N]`` unnormalised; ``logsumexp`` is log Ẑ so far.
        t: ``i32[]`` steps taken.
        carried: a pytree with leading axis N that follows the particles through every selection
            (e.g. a filter's latest choices); ``()`` when nothing rides along.
    """

    particles: Particle
    log_weights: jax.Array
    t: jax.Array
    carried: Any = ()


class SMCInfo(NamedTuple):
    """What one step did. ``M = N·K`` children were advanced (``M = N`` without extensions).

    Attributes:
        choices: the step's latent and deterministic sites per child, name → ``[M, …]``.
        active: ``bool[M]`` the child was running before the step.
        log_weights: ``f32[M]`` the children's weights before selection (incremental weight added).
        ancestors: ``i32[N]`` the child each new particle copies (identity when not selected).
        selected: ``bool[]`` whether the selection ran.
        ess: ``f32[]`` effective sample size of the children before selection.
        log_evidence: ``f32[]`` log Ẑ after this step (``logsumexp`` of the pre-selection weights;
            a valid selection preserves it in expectation, the built-in ones exactly).
        nan_sites: site → ``bool[]``, any live child's log density there was NaN.
        log_prob_draws: ``f32[M]`` log probability of each child's latent draws under the
            distributions they came from (the law of injected noise; unused on the key path).
        move: the move's info (zeros of its shape when it did not run); ``()`` without a move.
        selection: what a state-dependent selection's ``given`` reported (zeros when it did not
            run); ``()`` for the others.
    """

    choices: dict
    active: jax.Array
    log_weights: jax.Array
    ancestors: jax.Array
    selected: jax.Array
    ess: jax.Array
    log_evidence: jax.Array
    nan_sites: dict
    log_prob_draws: jax.Array
    move: Any = ()
    selection: Any = ()


class StepNoise(NamedTuple):
    """A step's randomness, injected: ``choices`` site → ``[M, …]`` latent values per child and
    ``uniforms: f32[N]`` the selection's uniforms."""

    choices: dict
    uniforms: jax.Array


def init(
    key: jax.Array,
    program: Any,
    args: tuple,
    num_particles: int,
    *,
    proposal: Callable[..., Any] | None = None,
    values: dict | None = None,
    carried: Any = (),
    pinned: tuple[dict, jax.Array] | None = None,
) -> tuple[SMCState, Any]:
    """Spawn ``num_particles`` and run ``init`` for each (weights ``−log N + log p/q``). Returns
    the state and ``init``'s :class:`~ppinfer.suspended.StepInfo` (choices, NaN flags, draw law).
    ``values`` injects ``init``'s latent draws (site → ``[N, …]``); ``pinned = (values, on)`` gives
    particle 0 one reference's latent values where ``on`` holds (conditional SMC)."""
    seq, info = start(key, program, args, num_particles, proposal, values, pinned)
    pop = seq.population
    return SMCState(pop.particles, pop.log_weights, seq.t, carried), info


def step(
    key: jax.Array,
    state: SMCState,
    program: Any,
    args: tuple,
    *,
    selection: Callable,
    proposal: Callable[..., Any] | None = None,
    extensions: int = 1,
    may_stop: bool = True,
    select_now: bool | jax.Array = True,
    update_carried: Callable[[Any, dict, jax.Array, jax.Array], Any] | None = None,
    sharding: jax.sharding.NamedSharding | None = None,
    noise: StepNoise | None = None,
    move: Callable[[jax.Array, SMCState], tuple[SMCState, Any]] | None = None,
    pinned: tuple[dict, jax.Array] | None = None,
    num_selected: int | None = None,
) -> tuple[SMCState, SMCInfo]:
    """One SMC step (see the module docstring). Returns the next state and :class:`SMCInfo`.

    Args:
        program: the sequential program whose step advances every particle, or a
            :class:`Reweighting` (a path of targets with no program step: the caller's new weights).
        selection: a :mod:`~ppinfer.kernels.select` selection; with a ``trigger`` (ESS-adaptive) it
            runs only when the trigger holds, and the population is then gathered only in that case.
        proposal: ``proposal(state, t, *args)`` for the step's latent sites (default: the prior).
        extensions: K children per particle (Steer); the selection then picks N of N·K.
        may_stop: ``False`` promises that no particle stops (no finished-particle masks).
        select_now: whether this step may select at all (SMC does not after its last step).
        update_carried: ``(carried, choices, active, t) -> carried`` before the selection gathers
            it (``t``: the index of the step just run).
        sharding: the particle axis' sharding; weights are replicated for a global selection (so
            the ancestors equal the unsharded run's), and a grouped selection with one group per
            device gathers within each device.
        noise: inject the step's randomness instead of drawing it from ``key``.
        move: a kernel ``(key, state) -> (state, info)`` run after every selection (not when the
            step did not select), leaving the target after this step invariant (resample-move).
        pinned: ``(values, on)``: particle 0 takes one reference's latent values for this step
            where ``on: bool[]`` holds (conditional SMC; with :class:`~ppinfer.kernels.select.Conditional`).
        num_selected: the selection's ``M`` slots (default N); ``M ≠ N`` needs a step that always
            selects, and a ``move`` that returns the next population (waste-free SMC: M chains
            of P states each).

    A selection whose choice depends on the advanced particles themselves, not only their weights
    (conditional SMC's ancestor sampling), has a method ``given(particles) -> (selection, info)``:
    the step calls it before selecting and records ``info`` in :attr:`SMCInfo.selection`.
    """
    n = state.log_weights.shape[0]
    m = n if num_selected is None else int(num_selected)
    k_adv, k_sel = jax.random.split(key)
    pop = Population(state.particles, state.log_weights)
    carried = state.carried
    if extensions > 1:
        pop = extend(pop, extensions)
        carried = gather(carried, jnp.repeat(jnp.arange(n), extensions))
    active = ~pop.particles.done
    values = None if noise is None else noise.choices
    if isinstance(program, Reweighting):
        if extensions > 1:
            raise ConfigError("a Reweighting step has no program to extend: extensions must be 1")
        seq, info = program.advance(pop, state.t)
    else:
        seq = Sequential(pop, state.t)
        seq, info = advance(k_adv, seq, program, args, proposal, may_stop, values, pinned, reduce_nan=False)
    if update_carried is not None:
        carried = update_carried(carried, info.choices, active, state.t)
    base, trigger = parts(selection)
    log_weights = seq.population.log_weights
    if sharding is not None and getattr(base, "num_groups", 1) % sharding.mesh.size:
        # A global selection (or groups that span devices) reads weights of several devices: they
        # are gathered to every device (N floats) so that the ancestors are computed exactly as on
        # one device; particles move only where an ancestor crosses devices. Islands that each lie
        # on one device select from their own weights.
        log_weights = _constrain(_replicated(sharding), log_weights)
    lse, ess_t = log_evidence_and_ess(log_weights)
    nan_sites = _nan_sites(info.nan_sites, lse)

    given = getattr(base, "given", None)
    selection_shapes = ()
    if given is not None:
        selection_shapes = jax.eval_shape(lambda p: given(p)[1], seq.population.particles)

    # A program that cannot stop has no finished particle: ``done`` stays all false and is not
    # gathered (one array less through every selection).
    done_fixed = not may_stop and not isinstance(program, Reweighting)
    whole = lambda state, size: Particle(state, jnp.zeros(size, bool))

    def select(operand):
        particles, carried = operand
        particles_in = whole(particles, log_weights.shape[0]) if done_fixed else particles
        chosen, selection_info = (base, ()) if given is None else given(particles_in)
        # The built-in selections take the log-sum-exp the step already has (no second pass over N).
        kwargs = {"lse": lse} if _takes_lse(chosen) else {}
        # Drawn inside the branch: a step that does not select draws nothing.
        u = draw_uniforms(chosen, k_sel, m, log_weights.dtype) if noise is None else noise.uniforms
        ancestors, new_log_weights = _checked(_call(chosen, u, log_weights, kwargs), m, log_weights.dtype)
        if not built_in(chosen):
            groups = getattr(chosen, "num_groups", 1)
            new_log_weights = _poisoned(ancestors, new_log_weights, log_weights.shape[0], lse, groups)
        moved = _gather(sharding, chosen, (particles, carried), ancestors)
        return (moved, new_log_weights, ancestors), selection_info

    def keep(operand):
        skipped = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), selection_shapes)
        return (operand, log_weights, jnp.arange(n, dtype=jnp.int32)), skipped

    operand = (seq.population.particles.state if done_fixed else seq.population.particles, carried)
    always = trigger is None and isinstance(select_now, bool) and select_now
    if always or extensions > 1:
        ((particles, carried), new_log_weights, ancestors), selection_info = select(operand)
        selected = jnp.asarray(True)
    else:
        if m != n:
            raise ConfigError(f"a step that may skip its selection keeps N = {n} particles: num_selected={m}")
        selected = jnp.asarray(select_now) & (
            True if trigger is None else _triggered(selection, log_weights, ess_t)
        )
        selected_out = jax.lax.cond(selected, select, keep, operand)
        ((particles, carried), new_log_weights, ancestors), selection_info = selected_out
    if done_fixed:
        particles = whole(particles, new_log_weights.shape[0])
    if sharding is not None:
        particles, carried, new_log_weights = _constrain(sharding, (particles, carried, new_log_weights))
    new = SMCState(particles, new_log_weights, seq.t, carried)
    move_info = ()
    if move is not None:
        # Its own key (folded in, so the advance and selection draws are those of a run without it).
        k_move = jax.random.fold_in(key, 2)
        if always or extensions > 1:
            new, move_info = move(k_move, new)
        else:
            shapes = jax.eval_shape(move, k_move, new)[1]
            skipped = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            new, move_info = jax.lax.cond(selected, lambda s: move(k_move, s), lambda s: (s, skipped), new)
    step_info = SMCInfo(
        choices=info.choices,
        active=active,
        log_weights=seq.population.log_weights,  # as sharded: a record need not be replicated
        ancestors=ancestors,
        selected=selected,
        ess=ess_t,
        log_evidence=lse,
        nan_sites=nan_sites,
        log_prob_draws=info.log_prob_draws,
        move=move_info,
        selection=selection_info,
    )
    return new, step_info


class Reweighting(NamedTuple):
    """The advance block of a step along a path of targets ``γ_0, γ_1, …`` on a fixed space, with
    no program step to run (tempered and data-annealed SMC, IBIS): every particle's new log weight
    ``log_weights: f[N] = log w + log γ_{t+1}(x)/γ_t(x)``, computed by the caller. Valid like a
    program's advance when ``γ_t > 0`` wherever ``γ_{t+1} > 0``: if ``(x, w)`` is properly
    weighted for ``γ_t``, ``(x, w·γ_{t+1}/γ_t)`` is for ``γ_{t+1}``. Pass it to :func:`step` as
    the program (with ``args = ()``); the step's choices are ``choices`` (site → ``[N, …]``)."""

    log_weights: jax.Array
    choices: dict = {}

    def advance(self, pop: Population, t: jax.Array) -> tuple[Sequential, StepInfo]:
        old, new = pop.log_weights, self.log_weights.astype(pop.log_weights.dtype)
        increments = jnp.where(jnp.isneginf(old), 0.0, new - old)
        info = StepInfo(dict(self.choices), increments, {}, jnp.zeros_like(new))
        return Sequential(Population(pop.particles, new), t + 1), info


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


class ScanRun(NamedTuple):
    """A :func:`scan_while` between chunks: the ``carry``, the per-step inputs ``xs`` ``[T, …]``,
    the ``records`` so far (``[T, …]``, zeros for the steps not run) and ``steps: i32[]`` run."""

    carry: Any
    xs: Any
    records: Any
    steps: jax.Array


def scan_begin(body: Callable, carry: Any, xs: Any) -> ScanRun:
    """The :class:`ScanRun` of ``lax.scan(body, carry, xs)`` before its first step (records
    preallocated, shapes from ``eval_shape``)."""
    length = jax.tree.leaves(xs)[0].shape[0]
    _, shapes = jax.eval_shape(body, carry, jax.tree.map(lambda x: x[0], xs))
    records = jax.tree.map(lambda a: jnp.zeros((length, *a.shape), a.dtype), shapes)
    return ScanRun(carry, xs, records, jnp.zeros((), jnp.int32))


def scan_advance(
    body: Callable, run: ScanRun, stop: Any = None, keep_going: Callable[[Any], jax.Array] | None = None
) -> ScanRun:
    """Steps ``run.steps … stop − 1`` of the scan (``stop`` may be traced, so one compilation
    serves every chunk; default: to the end), stopping before a step when ``keep_going(carry)``
    is false. Step ``i`` reads ``xs[i]``, so how a scan is cut into chunks does not change it."""
    length = jax.tree.leaves(run.xs)[0].shape[0]
    end = length if stop is None else jnp.minimum(stop, length)

    def one(r: ScanRun) -> ScanRun:
        i = r.steps
        carry, rec = body(r.carry, jax.tree.map(lambda x: x[i], r.xs))
        put = lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v.astype(buf.dtype), i, 0)
        return r._replace(carry=carry, records=jax.tree.map(put, r.records, rec), steps=i + 1)

    def cond(r: ScanRun) -> jax.Array:
        going = r.steps < end
        return going if keep_going is None else going & keep_going(r.carry)

    return jax.lax.while_loop(cond, one, run)


def scan_while(body: Callable, carry: Any, xs: Any, keep_going: Callable[[Any], jax.Array]):
    """``lax.scan(body, carry, xs)`` that stops before a step when ``keep_going(carry)`` is false.
    Returns ``(carry, records, steps_run)``: ``records`` stacked ``[T, …]`` like ``scan``'s, zeros
    for the steps not run (:func:`scan_begin` then :func:`scan_advance` to the end)."""
    run = scan_advance(body, scan_begin(body, carry, xs), keep_going=keep_going)
    return run.carry, run.records, run.steps


def trace_genealogy(ancestors: jax.Array, history: Any, extensions: int = 1) -> tuple[Any, jax.Array]:
    """Trace each final particle back through the selections.

    Args:
        ancestors: ``i32[T, N]``; ``ancestors[t, i]`` is the child (of ``N·K``) that particle ``i``
            was copied from after step ``t`` (the identity when step ``t`` did not select); its
            parent particle before the step is ``ancestors[t, i] // K``.
        history: a pytree of per-step values ``[T, N·K, …]`` indexed by child.
        extensions: K.

    Returns ``(trajectories, init_index)``: ``trajectories`` has leaves ``[N, T, …]`` (final
    particle ``i``'s own history) and ``init_index: i32[N]`` the index of each final particle's
    ancestor after ``init``."""
    n = ancestors.shape[1]

    def back(idx, xs):
        anc_t, hist_t = xs
        child = anc_t[idx]
        return (child // extensions).astype(idx.dtype), jax.tree.map(lambda h: h[child], hist_t)

    init_index, traj = jax.lax.scan(back, jnp.arange(n), (ancestors, history), reverse=True)
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), traj), init_index


def _nan_sites(flags: dict, lse: jax.Array) -> dict:
    """site → ``bool[]``: whether any child's log density there was NaN (or +inf), from the
    per-child ``flags`` (``bool[M]``, finished children masked). A flagged site makes that child's
    log weight NaN or +inf, hence ``lse`` too (NaN and +inf propagate through ``logsumexp``), so the
    per-site reductions run only when ``lse`` says so: a healthy step pays no pass over the
    children for its NaN check (measured on a bootstrap filter: ~3 % of its run time)."""
    if not flags:  # a Reweighting step has no sites
        return {}
    bad = jnp.isnan(lse) | (lse == jnp.inf)
    reduce = lambda f: {k: jnp.any(v) for k, v in f.items()}
    healthy = lambda f: {k: jnp.zeros((), bool) for k in f}
    return jax.lax.cond(bad, reduce, healthy, flags)


def _takes_lse(selection) -> bool:
    """Whether ``selection`` accepts the ``lse`` keyword (the built-in selections do)."""
    try:
        return "lse" in inspect.signature(selection).parameters
    except (TypeError, ValueError):
        return False


def _call(selection, u, log_weights, kwargs):
    """``selection(u, log_weights, **kwargs)`` (:func:`_selection_code`)."""
    return _selection_code(
        lambda: selection(u, log_weights, **kwargs),
        f"the selection {selection!r}",
        f"(u: f32[{u.shape[0]}], log_weights: f32[{log_weights.shape[0]}])",
    )


def _selection_code(run: Callable[[], Any], what: str, inputs: str) -> Any:
    """``run()``, a selection's code, traced inside the step; an exception it raises is a
    :class:`ConfigError` naming ``what`` and its ``inputs`` (JAX's errors about traced values too:
    NumPy code in a selection is the selection's error, not the program's)."""
    try:
        return run()
    except PPInferError:
        raise
    except Exception as e:
        raise ConfigError(f"{what} failed on {inputs}: {type(e).__name__}: {e}") from e


def _poisoned(
    ancestors: jax.Array, log_weights: jax.Array, n_in: int, lse_in: jax.Array, groups: int = 1
) -> jax.Array:
    """A user's selection's new log weights, all NaN when it returned an ancestor outside
    ``[0, n_in)`` (or, declaring ``num_groups``, outside its slot's group), a NaN or +inf log
    weight, or only −inf weights from a population of positive mass (``lse_in`` finite: the
    selection lost Ẑ): a gather would silently clamp the index, and the dead population would be
    blamed on the model, so the run's log Ẑ is made NaN instead and the run wrapper reports the
    selection (one pass over N, paid only by selections that are not
    :func:`~ppinfer.kernels.select.built_in`)."""
    bad = jnp.any((ancestors < 0) | (ancestors >= n_in)) | jnp.any(
        jnp.isnan(log_weights) | (log_weights == jnp.inf)
    )
    bad = bad | (jnp.all(log_weights == -jnp.inf) & jnp.isfinite(lse_in))
    if groups > 1:
        n_out = ancestors.shape[0]
        slot_group = jnp.arange(n_out) // (n_out // groups)
        bad = bad | jnp.any(ancestors // (n_in // groups) != slot_group)
    return jnp.where(bad, jnp.nan, log_weights)


def _triggered(selection, log_weights: jax.Array, ess_value: jax.Array) -> jax.Array:
    """``bool[]``: whether ``selection``'s trigger holds; a trigger that raises while the step is
    traced, or returns anything but one boolean, is a :class:`ConfigError` naming the selection."""
    out = _selection_code(
        lambda: parts(selection)[1](log_weights, ess_value),
        f"the trigger of the selection {selection!r}",
        f"(log_weights: f32[{log_weights.shape[0]}], ess: f32[])",
    )
    if jnp.shape(out) != () or not jnp.issubdtype(jnp.asarray(out).dtype, jnp.bool_):
        raise ConfigError(
            f"the trigger of the selection {selection!r} must return one boolean (bool[]), got "
            f"{jnp.asarray(out).dtype}{list(jnp.shape(out))}"
        )
    return out


def _checked(out, n: int, dtype) -> tuple[jax.Array, jax.Array]:
    """A selection's output as ``(i32[n], dtype[n])``, or a clear error naming what it returned."""
    try:
        ancestors, new_log_weights = out
        ok = jnp.shape(ancestors) == (n,) and jnp.shape(new_log_weights) == (n,)
    except (TypeError, ValueError):
        ok = False
    if ok and not jnp.issubdtype(jnp.asarray(ancestors).dtype, jnp.integer):  # a cast would truncate
        raise ConfigError(
            f"a selection's ancestors must be integers (i32[{n}]), got {jnp.asarray(ancestors).dtype}"
        )
    if not ok:
        raise ConfigError(
            f"a selection must return (ancestors: i32[{n}], log_weights: f32[{n}]); got {out!r}"
        )
    if not jnp.issubdtype(jnp.asarray(new_log_weights).dtype, jnp.floating):
        raise ConfigError(
            f"a selection's log weights must be floats (f32[{n}]), got {jnp.asarray(new_log_weights).dtype}"
        )
    ancestors = jnp.asarray(ancestors)
    if ancestors.dtype.itemsize > 4:  # a 64-bit index past int32 would wrap into range: made −1
        ancestors = jnp.where((ancestors < 0) | (ancestors > jnp.iinfo(jnp.int32).max), -1, ancestors)
    return ancestors.astype(jnp.int32), jnp.asarray(new_log_weights).astype(dtype)


def _gather(sharding, selection, tree, ancestors):
    """``tree`` indexed by ``ancestors`` along the particle axis; a grouped selection on a sharded
    population whose groups are its devices gathers within each device (``shard_map``: no
    particle crosses devices)."""
    groups = getattr(selection, "num_groups", 1)
    if sharding is None or groups == 1 or groups != sharding.mesh.size:
        return gather(tree, ancestors)
    spec = jax.sharding.PartitionSpec("particles")

    def local(tree, ancestors):
        m = jax.tree.leaves(tree)[0].shape[0]
        return gather(tree, ancestors - jax.lax.axis_index("particles") * m)

    return jax.shard_map(local, mesh=sharding.mesh, in_specs=(spec, spec), out_specs=spec)(tree, ancestors)


def _replicated(sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


def _constrain(sharding, tree):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)
