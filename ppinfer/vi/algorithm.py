"""``VI``: fit a guide by stochastic optimisation of an objective, then sample from it.

``infer(model, *args, algorithm=VI(objective, guide, optax.adam(1e-2), num_steps=1000), key=0)``
maximises the objective with ``optax`` in jitted chunks of ``chunk_size`` steps (one ``lax.scan``
each; the Python loop runs once per chunk, to report progress and stop on a non-finite objective).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from numpyro import handlers

from ppinfer import checks
from ppinfer._compile import _hashable, cached_jit, split_args
from ppinfer._talk import compile_notice, interruptible, next_chunk, progress_bar
from ppinfer.algorithms.smc import SMC, run_smc
from ppinfer.errors import ConfigError, InferenceError
from ppinfer.program import is_sequential
from ppinfer.result import Result
from ppinfer.vi.density import sample_particles
from ppinfer.vi.estimators import Estimators, check_estimators
from ppinfer.vi.objectives import Objective
from ppinfer.vi.params import ParamSpec, bind_params, constrain, find_params, unconstrain
from ppinfer.vi.vsmc import VSMC

__all__ = ["VI", "FitState", "StepInfo", "build_step", "fit", "init_fit_state"]

WEIGHTINGS = ("importance", "equal")


@dataclass(frozen=True, eq=False)
class VI:
    """Variational inference: maximise ``objective`` over the ``param`` sites of ``guide``.

    Args:
        objective: an :class:`~ppinfer.vi.Objective` (``elbo``, ``iwelbo``, ``renyi``, ``rws``…) for
            a static program, or :class:`~ppinfer.vi.VSMC` for a sequential one (``guide`` is then
            the SMC proposal ``guide(state, t, *args)``).
        guide: a program with the model's arguments (NumPyro guides and autoguides work).
        optimizer: an ``optax.GradientTransformation``; it *minimises* ``−objective`` over the
            unconstrained parameters. Build the objective, the optimizer and the ``VI`` once and
            reuse them: each new ``optax.adam(…)`` or ``elbo(…)`` object is a new configuration,
            compiled again (about 1 s here), as equal-looking closures cannot be told apart.
        num_steps: optimisation steps ≥ 1.
        num_particles: N draws in the returned :class:`~ppinfer.Result`.
        estimators: per-site gradient estimators (``None``: reparam where possible, else reinforce).
        baseline_decay: the score-function baseline is an exponential moving average (this decay,
            bias-corrected) of the objective's past values: independent of the current draw, so the
            gradient stays unbiased.
        weighting: ``"importance"``: the Result's ``log_weights`` are ``log p(x, y) − log q(x) −
            log N`` of the N guide draws, so ``log_evidence`` is the importance-sampling estimate
            ``log Ẑ`` (``E[Ẑ] = Z``) with the fitted guide as proposal; ``"equal"``: the same draws
            and ``log_evidence`` with equal weights ``log Ẑ − log N`` (plain draws from the guide).
            For a sequential program the Result is an SMC run (N particles) with the fitted proposal.
        progress_bar: a tqdm progress bar with the objective (stderr); ``None`` (default): shown
            when stderr is a terminal and ppinfer is not quiet. Never changes the result. (The
            name every algorithm uses; ``progress`` is its older name, still accepted.)
        chunk_size: the most optimisation steps per compiled chunk (chunks are sized to last about
            a quarter of a second, so Ctrl-C stops the fit promptly; step ``i`` always draws with
            ``fold_in(key, i)``, so the chunking does not change the result).
        init_params: optional *constrained* initial values, name → array, overriding the programs'.

    The Result's ``extras``: ``params`` (fitted, constrained), ``objective_trace: f32[num_steps]``
    (the objective's monitored value at each step), ``objective`` (its name), ``weighting``.
    """

    objective: Objective | VSMC
    guide: Callable[..., Any]
    optimizer: optax.GradientTransformation
    num_steps: int
    num_particles: int = 1000
    estimators: Estimators = None
    baseline_decay: float = 0.9
    weighting: str = "importance"
    progress: bool | None = None
    chunk_size: int = 500
    init_params: dict[str, Any] | None = None
    progress_bar: bool | None = None
    name = "VI"

    def __post_init__(self):
        n = self.num_steps
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ConfigError(f"VI needs num_steps >= 1, got {n!r}")
        checks.check_num_particles(self.num_particles)
        checks.check_int("chunk_size", self.chunk_size, 1)
        if not isinstance(self.objective, Objective | VSMC):
            raise ConfigError(
                f"objective must be an Objective (e.g. ppinfer.vi.elbo(), iwelbo(K), renyi(alpha)) or "
                f"VSMC(...), got {self.objective!r}"
            )
        if None not in (self.progress, self.progress_bar) and self.progress != self.progress_bar:
            raise ConfigError(
                f"progress={self.progress!r} and progress_bar={self.progress_bar!r} disagree: "
                "progress is the older name of progress_bar; give one"
            )
        checks.check_probability("baseline_decay", self.baseline_decay)
        check_estimators(self.estimators)
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not callable(self.guide):
            raise ConfigError(f"guide must be a program (a callable), got {self.guide!r}")
        if self.init_params is not None and not isinstance(self.init_params, Mapping):
            raise ConfigError(f"init_params must be a dict of param name → value, got {self.init_params!r}")
        if not hasattr(self.optimizer, "update"):
            raise ConfigError(f"optimizer must be an optax GradientTransformation, got {self.optimizer!r}")

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        t0 = time.perf_counter()
        sequential = is_sequential(program)
        if sequential != isinstance(self.objective, VSMC):
            raise ConfigError(
                "use the VSMC objective with a sequential program, and a particle objective "
                "(elbo, iwelbo, …) with a static one"
            )
        if not sequential:  # the data, before a fit that would only report a non-finite objective
            what = "running the program once"
            dry_run = lambda: checks.dry_run(program, args, None, what, subsampling=True)
            checks.once_per_data(("vi", program, split_args(args)[1]), args, dry_run)
        k_init, k_fit, k_draw = jax.random.split(key, 3)
        spec = _param_spec(k_init, program, self.guide, self.objective, args, self.init_params)
        if not spec.init:
            raise ConfigError("the guide has no numpyro.param site: nothing to optimise")
        if isinstance(self.estimators, Mapping):
            _check_estimator_sites(k_init, program, self.guide, args, spec, self.estimators)
        u, trace = fit(
            k_fit, program, self.guide, self.objective, self.optimizer, spec, args, self.num_steps,
            self.estimators, self.baseline_decay, self.chunk_size,
            self.progress if self.progress_bar is None else self.progress_bar,
        )  # fmt: skip
        params = constrain(u, spec.constraints)
        if sequential:
            smc = SMC(
                self.num_particles,
                resampling="systematic",
                proposal=bind_params(self.guide, params),
                init_proposal=_bound(self.objective.init_proposal, params),
            )
            result = run_smc(k_draw, program, args, smc, self.name)
        else:
            result = self._draw(k_draw, program, params, args)
        result.wall_time = time.perf_counter() - t0
        result.extras.update(
            params=params,
            objective_trace=trace,
            objective=self.objective.name,
            weighting="smc" if sequential else self.weighting,
        )
        return result

    def _draw(self, key: jax.Array, model: Any, params: dict, args: tuple) -> Result:
        n, full = self.num_particles, self.objective.full_coverage
        dyn, static_key, rebuild = split_args(args)

        def build():
            return lambda key, params, dyn: sample_particles(
                key, model, self.guide, params, rebuild(dyn), n, fixed_samples=True, full_coverage=full
            )

        draw, _ = cached_jit(("vi-draw", model, self.guide, n, full, static_key), build)
        ps = draw(key, params, dyn)
        log_w = ps.log_weight - math.log(n)
        log_z = jax.scipy.special.logsumexp(log_w)
        checks.raise_if_dead(float(log_z), "under the fitted guide", n)
        if self.weighting == "equal":
            log_w = jnp.full_like(log_w, log_z - math.log(n))
        point = _point_mass_sites(key, self.guide, params, args)
        # A point-mass (Delta, AutoDelta) guide has no density: log p − log q is log p(x̂, y), not an
        # importance weight, and its log-mean-exp no estimate of log Z (MAP, not evidence).
        result = Result(
            samples=ps.choices,
            log_weights=log_w,
            log_evidence=None if point else float(log_z),
            algorithm=self.name,
        )
        if point:
            result.extras["point_mass_sites"] = point
        return result


def _point_mass_sites(key: jax.Array, guide: Callable[..., Any], params: dict, args: tuple) -> list[str]:
    """The latent sites the fitted guide draws from a point mass (``dist.Delta``)."""
    with handlers.trace() as tr, handlers.seed(rng_seed=key), handlers.substitute(data=params):
        guide(*args)
    return sorted(
        n
        for n, s in tr.items()
        if s["type"] == "sample" and not s["is_observed"] and isinstance(s["fn"], dist.Delta)
    )


class FitState(NamedTuple):
    """The optimisation loop's carry: unconstrained ``params``, optax state, the baseline's moving
    average ``baseline_sum: f32[]`` (bias-corrected by ``1 − decay^count``), ``count: i32[]`` of
    finite steps and ``step: i32[]``."""

    params: dict[str, jax.Array]
    opt_state: Any
    baseline_sum: jax.Array
    count: jax.Array
    step: jax.Array


class StepInfo(NamedTuple):
    """What one optimisation step reports: the objective's monitored value ``objective: f32[]`` at
    the step's parameters (before the update) and ``finite: bool[]`` (objective and gradient
    finite)."""

    objective: jax.Array
    finite: jax.Array


def init_fit_state(params: dict[str, jax.Array], optimizer: optax.GradientTransformation) -> FitState:
    """The :class:`FitState` at unconstrained ``params`` (step 0, no baseline yet)."""
    zero = jnp.zeros((), jnp.int32)
    return FitState(params, optimizer.init(params), jnp.zeros(()), zero, zero)


def build_step(
    model: Any,
    guide: Callable[..., Any],
    objective: Objective | VSMC,
    optimizer: optax.GradientTransformation,
    constraints: dict[str, Any],
    estimators: Estimators = None,
    baseline_decay: float = 0.9,
) -> Callable[[jax.Array, FitState, tuple], tuple[FitState, StepInfo]]:
    """One optimisation step ``step(key, state, args) -> (state, info)`` (pure; jit/scan it):
    draws the objective's surrogate with ``key`` at ``constrain(state.params)`` and applies
    ``optimizer``'s update for ``−∇surrogate`` (an unbiased estimate of ``−∇objective``; the
    score-function baseline is the bias-corrected moving average of past values, independent of
    this draw). The step is taken even when ``info.finite`` is false (the parameters are then not
    finite either): the caller stops at the first such step, as :func:`fit` does."""

    def step(key: jax.Array, state: FitState, args: tuple) -> tuple[FitState, StepInfo]:
        baseline = jnp.where(
            state.count > 0, state.baseline_sum / (1 - baseline_decay ** state.count.astype(float)), 0.0
        )

        def loss(u):
            surr, mon = objective.surrogate(
                key, model, guide, constrain(u, constraints), args, estimators, baseline
            )
            return -surr, (mon, jax.lax.stop_gradient(surr))

        (_, (mon, value)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        # One fused reduction: the sum of all gradient entries is finite iff each is (barring an
        # overflow of the sum, itself a divergence worth stopping on).
        grad_sum = sum((jnp.sum(g) for g in jax.tree.leaves(grads)), jnp.zeros(()))
        finite = jnp.isfinite(value) & jnp.isfinite(mon) & jnp.isfinite(grad_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = FitState(
            optax.apply_updates(state.params, updates),
            opt_state,
            baseline_decay * state.baseline_sum + (1 - baseline_decay) * value,
            state.count + 1,
            state.step + 1,
        )
        return new, StepInfo(mon, finite)

    return step


def fit(
    key: jax.Array,
    model: Any,
    guide: Callable[..., Any],
    objective: Objective | VSMC,
    optimizer: optax.GradientTransformation,
    spec: ParamSpec,
    args: tuple,
    num_steps: int,
    estimators: Estimators = None,
    baseline_decay: float = 0.9,
    chunk_size: int = 500,
    progress: bool | None = False,
) -> tuple[dict[str, jax.Array], np.ndarray]:
    """Maximise ``objective`` from ``spec.init`` with :func:`build_step`; step ``i`` draws with
    ``fold_in(key, i)``. Returns the fitted *unconstrained* params and the objective trace
    ``f32[num_steps]``. The steps run in compiled loops of at most ``chunk_size`` steps (one
    compilation: the last, shorter chunk reuses it with a smaller trip count).

    Raises :class:`InferenceError` at the first step whose objective or gradient is not finite (the
    run stops; no parameters are returned)."""
    dyn, static_key, rebuild = split_args(args)
    chunk = min(chunk_size, num_steps)
    constraints = tuple(sorted((name, _hashable(c)) for name, c in spec.constraints.items()))
    settings = (objective, optimizer, constraints, estimators, baseline_decay, chunk)
    cache_key = ("vi", model, guide, tuple(_hashable(x) for x in settings), static_key)

    def build():
        step = build_step(model, guide, objective, optimizer, spec.constraints, estimators, baseline_decay)

        def run_chunk(state, key, dyn, length):
            def body(i, carry):
                s, mon, finite = carry
                s, info = step(jax.random.fold_in(key, s.step), s, rebuild(dyn))
                return s, mon.at[i].set(info.objective), finite.at[i].set(info.finite)

            init = (state, jnp.zeros(chunk, jnp.result_type(float)), jnp.ones(chunk, bool))
            return jax.lax.fori_loop(0, length, body, init)

        return run_chunk

    # The one compile cache: a second fit of the same model, guide and settings reuses the code.
    compiled, _ = cached_jit(cache_key, build)
    run_chunk = lambda state, dyn, length: compiled(state, key, dyn, length)

    state = init_fit_state(spec.init, optimizer)
    traces = []
    with compile_notice(f"VI ({objective.name}) of {getattr(model, '__name__', type(model).__name__)}"):
        # A zero-length chunk compiles the loop without taking a step.
        jax.block_until_ready(run_chunk(state, dyn, jnp.asarray(0, jnp.int32)))
    start, length = 0, min(chunk, 8)
    with progress_bar(num_steps, f"VI {objective.name}", progress) as bar, interruptible() as interrupted:
        while start < num_steps:
            length = min(length, chunk, num_steps - start)
            t0 = time.perf_counter()
            state, mon, finite = run_chunk(state, dyn, jnp.asarray(length, jnp.int32))
            mon, finite = np.asarray(mon)[:length], np.asarray(finite)[:length]  # waits for the chunk
            seconds = time.perf_counter() - t0
            interrupted()  # Ctrl-C lands here
            bad = np.flatnonzero(~finite)
            if bad.size:
                raise InferenceError(
                    f"the objective or its gradient was not finite (NaN/inf) at optimisation step "
                    f"{start + int(bad[0])}: value {mon[bad[0]]}; lower the learning rate or check the "
                    "model and guide for invalid parameters"
                )
            traces.append(mon)
            start += length
            bar.update(length)
            bar.set_postfix_str(f"{objective.name}={mon[-1]:.4g}")
            length = next_chunk(length, seconds)
    return state.params, np.concatenate(traces)


def _guide_run(key, program, guide, args) -> tuple[Callable[..., Any], tuple]:
    """``(fn, fn_args)``: one run of the guide (for a sequential program, its proposal at step 0)."""
    if not is_sequential(program):
        return guide, args
    with handlers.seed(rng_seed=key):
        state = jax.tree.map(jnp.asarray, program.init(*args))
    t0 = jnp.zeros((), jnp.int32)
    return lambda: guide(state, t0, *args), ()


def _check_estimator_sites(key, program, guide, args, spec: ParamSpec, estimators: Mapping) -> None:
    """Raise :class:`ConfigError` if ``estimators`` names a site the guide does not sample (a
    misspelled name would leave that site on its default estimator without a word)."""
    fn, fn_args = _guide_run(key, program, guide, args)
    params = constrain(spec.init, spec.constraints)
    with handlers.trace() as tr, handlers.seed(rng_seed=key), handlers.substitute(data=params):
        fn(*fn_args)
    sampled = sorted(n for n, s in tr.items() if s["type"] == "sample" and not s.get("is_observed"))
    unknown = sorted(set(estimators) - set(sampled))
    if unknown:
        raise ConfigError(
            f"estimators names {unknown}, which the guide does not sample (it samples {sampled})"
        )


def _param_spec(key, program, guide, objective, args, init_params) -> ParamSpec:
    runs = [_guide_run(key, program, guide, args)]
    if is_sequential(program):
        if objective.init_proposal is not None:
            runs.append((objective.init_proposal, args))
    else:
        runs.append((program, args))
    spec = find_params(key, runs)
    for name, value in (init_params or {}).items():
        if name not in spec.init:
            raise ConfigError(f"init_params names {name!r}, which is not a param site")
        constraint = spec.constraints[name]
        shape = constrain({name: spec.init[name]}, {name: constraint})[name].shape
        value = jnp.asarray(value, dtype=jnp.result_type(float))
        if value.shape != shape:
            raise ConfigError(
                f"init_params[{name!r}] has shape {value.shape}, but the param site has shape {shape}"
            )
        if not bool(jnp.all(constraint(value))):
            raise ConfigError(
                f"init_params[{name!r}] = {value} lies outside the param's constraint {constraint}"
            )
        spec.init[name] = unconstrain(value, constraint)
    return spec


def _bound(fn, params):
    return None if fn is None else bind_params(fn, params)
