"""Sequential Monte Carlo for sequential programs.

SMC is a composition of the blocks (as monad-bayes' ``smc``):

    start (spawn N + init)  →  repeat T times: advance → [resample if ESS < threshold · N]

Every block is valid, so SMC's output measure is valid: ``E[Ẑ] = Z`` and the weighted particles
estimate the posterior consistently. The loop is one ``lax.scan`` compiled with ``jax.jit``; no
resampling happens after the last step (it would only add variance).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer import checks
from ppinfer._compile import cached_jit, forget, split_args
from ppinfer.errors import ConfigError
from ppinfer.population import Population, ess, log_evidence
from ppinfer.program import SequentialProgram, is_sequential
from ppinfer.resample import check_scheme, resample, resample_groups
from ppinfer.result import Deferred, DeferredExtras, Result
from ppinfer.suspended import Sequential, advance, can_stop, keep_finished, match_state, start

__all__ = [
    "SMC",
    "run_smc",
    "run_checked",
    "smc_run",
    "smc_batch",
    "particle_sharding",
    "trace_genealogy",
    "trace_history",
    "sample_names",
]


@dataclass(frozen=True)
class SMC:
    """Sequential Monte Carlo for a :class:`~ppinfer.SequentialProgram`.

    Args:
        num_particles: N ≥ 1.
        resampling: ``"systematic"`` (default), ``"stratified"``, ``"multinomial"`` or ``"residual"``.
        ess_threshold: resample after a step when ``ESS < ess_threshold · N``; 1.0 resamples after
            every step, 0.0 never (sequential importance sampling).
        proposal: ``proposal(state, t, *args)`` proposing some of the step's latent sites (default:
            the program's own prior: the bootstrap filter). Weighted by ``log p − log q``.
        init_proposal: the same for ``init``: ``init_proposal(*args)``.
        devices: shard the particle axis over these devices (an int takes the first ``devices`` of
            ``jax.devices()``); ``N`` must be a multiple of their number. Weights, ESS, log Ẑ and
            resampling stay global (ancestors may cross devices: XLA inserts the collectives), so
            the result equals the unsharded run with the same key.
        local_resampling: with ``devices``, resample within each device's particles only (island
            resampling, :func:`~ppinfer.resample.resample_groups`): no particle crosses devices and
            only the N weights are exchanged (for the ESS); still valid (``E[Ẑ] = Z``) but noisier.
        history: record every step's choices and the genealogy (default), so that ``samples`` are
            whole trajectories ``[N, T, …]`` (the smoothing approximation) and ``ancestors`` is set.
            ``False`` records no per-step particle data (as ``particles``' ``store_history=False``): a
            pure filter, cheaper per step; ``samples`` then hold each particle's latest choices
            ``[N, …]`` (the filtering distribution of the last step) and ``init``'s choices carried
            through resampling; ``ancestors`` and ``extras["active"]`` are ``None``. ``log_weights``,
            ``log_evidence``, the ESS / resampling / log Ẑ histories and ``state`` are the same.
    """

    num_particles: int = 1000
    resampling: str = "systematic"
    ess_threshold: float = 0.5
    proposal: Callable[..., Any] | None = None
    init_proposal: Callable[..., Any] | None = None
    devices: int | tuple | None = None
    local_resampling: bool = False
    history: bool = True

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        check_scheme(self.resampling)
        checks.check_probability("ess_threshold", self.ess_threshold)
        if self.devices is not None:
            particle_sharding(self.devices, self.num_particles)
        elif self.local_resampling:
            raise ConfigError("local_resampling needs devices=... (one resampling group per device)")

    name = "SMC"

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        if not is_sequential(program):
            raise ConfigError(
                "SMC needs a sequential program (ppinfer.sequential(init, step, num_steps)); "
                "for a static program use Importance or Enumerate"
            )
        return run_smc(key, program, args, self, self.name)


def run_smc(key: jax.Array, program: SequentialProgram, args: tuple, cfg: SMC, name: str) -> Result:
    """Run SMC (checks, compiled run, genealogy) and build the :class:`Result`."""
    t0 = time.perf_counter()
    num_steps = program.steps_for(args)
    dyn, static_key, rebuild = split_args(args)
    settings = (cfg.num_particles, num_steps, cfg.resampling, cfg.ess_threshold)
    sharding = None if cfg.devices is None else particle_sharding(cfg.devices, cfg.num_particles)
    groups = sharding.mesh.size if cfg.local_resampling else 1
    history = bool(cfg.history)
    cache_key = ("smc", program, cfg.proposal, cfg.init_proposal, settings, sharding, groups, history)
    cache_key += (static_key,)

    def build():
        def compiled(key, dyn):
            return smc_run(
                key,
                program,
                rebuild(dyn),
                *settings,
                cfg.proposal,
                cfg.init_proposal,
                sharding,
                groups,
                genealogy=False,
                early_exit=True,
                history=history,
            )

        return compiled

    out, log_z = run_checked(cache_key, build, key, dyn, program, args, cfg, "SMC")
    common = {
        "log_weights": out["log_weights"],
        "log_evidence": log_z,
        "algorithm": name,
        "ess": out["ess"],
        "resampled": out["resampled"],
        "log_evidence_history": out["log_evidence_history"],
        "state": out["state"],
    }
    if not history:
        samples, site_kinds = sample_names(out["init_choices"], out["final_choices"])
        extras = {"site_kinds": site_kinds, "active": None}
        wall_time = time.perf_counter() - t0
        return Result(samples=samples, ancestors=None, wall_time=wall_time, extras=extras, **common)
    _, site_kinds = sample_names(out["init_choices"], out["history"]["choices"])
    traced = Deferred(lambda: trace_history(out["ancestors"], out["init_choices"], out["history"]))
    return Result(
        samples=Deferred(lambda: sample_names(traced()["init_choices"], traced()["trajectories"])[0]),
        ancestors=out["ancestors"],
        wall_time=time.perf_counter() - t0,
        extras=DeferredExtras({"site_kinds": site_kinds}, {"active": Deferred(lambda: traced()["active"])}),
        **common,
    )


def run_checked(
    cache_key: Any,
    build: Callable,
    key: jax.Array,
    dyn: Any,
    program: SequentialProgram,
    args: tuple,
    cfg: Any,
    name: str,
) -> tuple[dict, float]:
    """Run a particle algorithm's compiled core (cached under ``cache_key``; ``build()`` makes it:
    ``fn(key, dyn)`` returning a dict with ``log_evidence``, ``log_evidence_init``,
    ``log_evidence_history`` and ``nan_sites``) with the checks every such run needs: one eager
    one-particle dry run per compilation (clear model errors), NaN sites, and a dead population
    (log Ẑ = −inf), reported with the step where every particle became impossible. Returns
    ``(out, log_z)``."""
    fn, new = cached_jit(cache_key, build)
    if new:
        try:
            _dry_run(program, args, cfg)
        except Exception:
            forget(cache_key)  # a program that failed its checks must be checked again next time
            raise
    out = jax.block_until_ready(fn(key, dyn))
    checks.raise_on_nan_sites(out["nan_sites"], name)
    log_z = float(out["log_evidence"])
    if not np.isfinite(log_z):
        history = np.asarray(out["log_evidence_history"])
        dead = np.flatnonzero(~np.isfinite(history))
        where = (
            "after init"
            if not np.isfinite(float(out["log_evidence_init"]))
            else (f"after step {int(dead[0])}" if dead.size else "at the end")
        )
        checks.raise_if_dead(log_z, where, cfg.num_particles)
    return out, log_z


def smc_run(
    key,
    program,
    args,
    n,
    num_steps,
    scheme,
    threshold,
    proposal=None,
    init_proposal=None,
    sharding=None,
    num_groups=1,
    genealogy=True,
    early_exit=False,
    history=True,
):
    """The pure SMC core (jit/vmap-able): returns a dict with ``log_weights: f32[N]``,
    ``log_evidence: f32[]``, per-step ``ess``/``resampled``/``log_evidence_history``/``ancestors``,
    genealogy-traced ``init_choices`` ``[N, …]`` and step ``trajectories`` ``[N, T, …]``, ``active:
    bool[N, T]``, the final ``state`` and per-site NaN flags ``nan_sites``. With ``sharding`` (a
    ``NamedSharding`` of the particle axis) the population is kept sharded across devices; with
    ``num_groups > 1`` resampling is done within contiguous groups (one per device). With
    ``genealogy=False`` the per-step records are returned untraced — ``init_choices`` ``[N, …]`` and
    ``history = {"choices": [T, N, …], "active": bool[T, N]}`` indexed by pre-resampling particle —
    for :func:`trace_history` to trace later (or never). With ``early_exit=True`` the loop stops as
    soon as every particle has finished (no more forward passes for a population of finished LM
    particles); the records of the steps not run say so (inactive, not resampled, identity
    ancestors). Not reverse-differentiable then (a ``while_loop``): VSMC keeps the default. A program
    that cannot :func:`~ppinfer.stop` (:func:`~ppinfer.suspended.can_stop`) always runs a plain
    ``lax.scan`` without the finished-particle masks. With ``history=False`` nothing per particle is
    recorded per step (no ``history``/``trajectories``, ``ancestors`` or ``active``): the output has
    ``final_choices`` (each particle's latest step choices ``[N, …]``) and ``init_choices`` (carried
    through resampling), both indexed by final particle."""
    shard = (lambda tree: tree) if sharding is None else partial(_constrain, sharding)
    # Resampling reads the weights of ALL particles: they are gathered to every device (N floats, the
    # explicit cross-device traffic) so that the cumulative sums, hence the ancestors, are computed
    # exactly as on one device; the particles themselves move only where an ancestor crosses devices.
    replicate = (
        (lambda x: x) if sharding is None or num_groups > 1 else partial(_constrain, _replicated(sharding))
    )
    k_init, k_loop = jax.random.split(key)
    may_stop = can_stop(program, args, proposal, init_proposal)
    seq, init_info = start(k_init, program, args, n, init_proposal)
    seq = Sequential(shard(seq.population), seq.t)
    log_z_init = log_evidence(seq.population.log_weights)
    always = threshold >= 1.0

    # history=False: init's choices and (for a program that can stop) each particle's latest step
    # choices ride along with the particles, gathered at resampling, instead of being recorded; a
    # program that cannot stop only needs the last step's choices, after which nothing resamples.
    gathered, last = {}, None
    if not history:
        gathered["init"] = init_info.choices
        step = lambda s, k: advance(k, s, program, args, proposal)[1].choices
        step_shapes = jax.eval_shape(step, seq, k_loop)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), step_shapes)
        if may_stop:
            gathered["step"] = zeros
        else:
            last = zeros

    def body(carry, key_t):
        seq, gathered, last = carry
        k_adv, k_res = jax.random.split(key_t)
        active = ~seq.population.particles.done
        seq, info = advance(k_adv, seq, program, args, proposal, may_stop)
        if "step" in gathered:
            gathered = {**gathered, "step": keep_finished(~active, info.choices, gathered["step"])}
        if last is not None:
            last = info.choices
        pop = Population((seq.population.particles, gathered), replicate(seq.population.log_weights))
        lse = log_evidence(pop.log_weights)  # resampling preserves it: log Ẑ after this step
        ess_t = ess(pop.log_weights, lse)
        do = ((ess_t < threshold * n) | always) & (seq.t < num_steps)
        pop, ancestors = jax.lax.cond(
            do,
            _resampler(k_res, scheme, num_groups, sharding, lse),
            lambda p: (p, jnp.arange(n, dtype=jnp.int32)),
            pop,
        )
        particles, gathered = pop.particles
        record = (ess_t, do, lse, info.nan_sites)
        if history:
            # A program that cannot stop is active everywhere: nothing to record.
            record += (info.choices, active if may_stop else None, ancestors)
        seq = Sequential(shard(Population(particles, pop.log_weights)), seq.t)
        return (seq, gathered, last), record

    keys = jax.random.split(k_loop, num_steps)
    carry = (seq, gathered, last)
    if early_exit and may_stop:
        alive = lambda c: jnp.any(~c[0].population.particles.done)
        (seq, gathered, last), records, steps_run = scan_while(body, carry, keys, alive)
    else:
        (seq, gathered, last), records = jax.lax.scan(body, carry, keys)
        steps_run = None
    ess_h, resampled, log_z_h, nan_h = records[:4]
    if steps_run is not None:
        ran = jnp.arange(num_steps) < steps_run
        final_lse = log_evidence(seq.population.log_weights)
        ess_h = jnp.where(ran, ess_h, ess(seq.population.log_weights, final_lse))
        log_z_h = jnp.where(ran, log_z_h, final_lse)
    nan_sites = {**init_info.nan_sites, **{k: jnp.any(v) for k, v in nan_h.items()}}
    common = {
        "log_weights": seq.population.log_weights,
        "log_evidence": log_evidence(seq.population.log_weights),
        "log_evidence_init": log_z_init,
        "log_evidence_history": log_z_h,
        "ess": ess_h,
        "resampled": resampled,
        "state": seq.population.particles.state,
        "nan_sites": nan_sites,
    }
    if not history:
        final = gathered["step"] if last is None else last
        return {**common, "init_choices": gathered["init"], "final_choices": final}
    choices, active, ancestors = records[4:]
    if active is None:
        active = jnp.ones((num_steps, n), bool)
    if steps_run is not None:
        ancestors = jnp.where(ran[:, None], ancestors, jnp.arange(n, dtype=jnp.int32))
    if genealogy:
        traced = trace_history(ancestors, init_info.choices, {"choices": choices, "active": active})
    else:
        traced = {"init_choices": init_info.choices, "history": {"choices": choices, "active": active}}
    return {**traced, **common, "ancestors": ancestors}


def smc_batch(
    key: jax.Array,
    program: SequentialProgram,
    batched_args: tuple,
    cfg: SMC,
    devices: int | tuple | None = None,
) -> dict:
    """Many independent SMC runs in one compiled program: run ``b`` uses slice ``b`` of every array in
    ``batched_args`` (leading axis B, e.g. one dataset or one prompt per run; other arguments are
    shared) and key ``split(key, B)[b]``. The runs are vmapped, and with ``devices`` the batch axis
    is sharded over them (B must be a multiple of their number). Returns :func:`smc_run`'s dict
    with a leading batch axis (``log_evidence: f32[B]``, ``log_weights: f32[B, N]``, …)."""
    leaves = [x for x in jax.tree.leaves(batched_args) if isinstance(x, jax.Array | np.ndarray)]
    if not leaves:
        raise ConfigError("smc_batch needs at least one array argument with a leading batch axis")
    b = leaves[0].shape[0]
    axes = jax.tree.map(lambda x: 0 if isinstance(x, jax.Array | np.ndarray) else None, batched_args)
    num_steps = program.steps_for(jax.tree.map(lambda x, a: x[0] if a == 0 else x, batched_args, axes))

    def one(k, args):
        return smc_run(
            k,
            program,
            args,
            cfg.num_particles,
            num_steps,
            cfg.resampling,
            cfg.ess_threshold,
            cfg.proposal,
            cfg.init_proposal,
        )

    keys = jax.random.split(key, b)
    run = jax.jit(jax.vmap(one, in_axes=(0, axes)))
    if devices is not None:
        sharding = particle_sharding(devices, b)
        keys = jax.device_put(keys, sharding)
        batched_args = jax.tree.map(
            lambda x, a: jax.device_put(jnp.asarray(x), sharding) if a == 0 else x, batched_args, axes
        )
    return run(keys, batched_args)


def particle_sharding(devices: int | tuple, num_particles: int) -> jax.sharding.NamedSharding:
    """A ``NamedSharding`` splitting the particle axis over ``devices`` (an int: the first that many
    of ``jax.devices()``)."""
    available = jax.devices()
    if isinstance(devices, int | np.integer):
        if not 1 <= devices <= len(available):
            raise ConfigError(f"devices={devices}, but {len(available)} device(s) are available")
        devices = available[: int(devices)]
    devices = tuple(devices)
    if num_particles % len(devices):
        raise ConfigError(
            f"num_particles={num_particles} must be a multiple of the number of devices ({len(devices)})"
        )
    mesh = jax.sharding.Mesh(np.array(devices), ("particles",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("particles"))


def _resampler(key, scheme, num_groups, sharding, lse):
    """``pop -> (pop, ancestors)``: global resampling (``lse``: the weights' logsumexp), or island
    resampling within ``num_groups`` groups — per device with ``shard_map`` when sharded (no
    particle leaves its device)."""
    if num_groups == 1:
        return lambda pop: resample(key, pop, scheme, lse)
    if sharding is None:
        return lambda pop: resample_groups(key, pop, scheme, num_groups)
    spec = jax.sharding.PartitionSpec("particles")

    def local(pop):
        i = jax.lax.axis_index("particles")
        new, ancestors = resample(jax.random.fold_in(key, i), pop, scheme)
        return new, ancestors + i * pop.num_particles

    return jax.shard_map(local, mesh=sharding.mesh, in_specs=(spec,), out_specs=(spec, spec))


def _replicated(sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


def _constrain(sharding, tree):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def trace_genealogy(ancestors: jax.Array, history: Any) -> tuple[Any, jax.Array]:
    """Trace each final particle back through resampling.

    Args:
        ancestors: ``i32[T, N]``; ``ancestors[t, i]`` is the pre-resampling index that particle ``i``
            was copied from after step ``t`` (the identity when step ``t`` did not resample).
        history: a pytree of per-step values ``[T, N, …]`` indexed by pre-resampling particle.

    Returns ``(trajectories, init_index)``: ``trajectories`` has leaves ``[N, T, …]`` (final particle
    ``i``'s own history) and ``init_index: i32[N]`` is the index of each final particle's ancestor
    after ``init``."""
    n = ancestors.shape[1]

    def back(idx, xs):
        anc_t, hist_t = xs
        idx = anc_t[idx]
        return idx, jax.tree.map(lambda h: h[idx], hist_t)

    init_index, traj = jax.lax.scan(back, jnp.arange(n), (ancestors, history), reverse=True)
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), traj), init_index


def scan_while(body: Callable, carry: Any, xs: Any, keep_going: Callable[[Any], jax.Array]):
    """``lax.scan(body, carry, xs)`` that stops before a step when ``keep_going(carry)`` is false.
    Returns ``(carry, records, steps_run)``: ``records`` stacked ``[T, …]`` like ``scan``'s, zeros
    for the steps not run. A ``while_loop`` over preallocated records (shapes from ``eval_shape``)."""
    length = jax.tree.leaves(xs)[0].shape[0]
    x_at = lambda i: jax.tree.map(lambda x: x[i], xs)
    _, shapes = jax.eval_shape(body, carry, x_at(0))
    records = jax.tree.map(lambda a: jnp.zeros((length, *a.shape), a.dtype), shapes)

    def step(state):
        i, c, recs = state
        c, rec = body(c, x_at(i))
        put = lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v.astype(buf.dtype), i, 0)
        return i + 1, c, jax.tree.map(put, recs, rec)

    def cond(state):
        i, c, _ = state
        return (i < length) & keep_going(c)

    steps, carry, records = jax.lax.while_loop(cond, step, (jnp.zeros((), jnp.int32), carry, records))
    return carry, records, steps


@jax.jit
def trace_history(ancestors: jax.Array, init_choices: dict, history: dict) -> dict:
    """Trace SMC's per-step records back through the genealogy (:func:`trace_genealogy`): returns
    ``init_choices`` ``[N, …]`` of each final particle's ancestor, ``trajectories`` (the step sites,
    ``[N, T, …]``) and ``active: bool[N, T]``."""
    traced, init_index = trace_genealogy(ancestors, history)
    return {
        "init_choices": jax.tree.map(lambda x: x[init_index], init_choices),
        "trajectories": traced["choices"],
        "active": traced["active"],
    }


def sample_names(init_choices: dict, step_choices: dict) -> tuple[dict, dict]:
    """Merge init and step site values: an init site named like a step site becomes ``init/<name>``.
    Returns ``(samples, site_kinds)`` with ``site_kinds[name] = ("init" | "step", site name)``."""
    samples, kinds = {}, {}
    for k, v in init_choices.items():
        name = f"init/{k}" if k in step_choices else k
        samples[name], kinds[name] = v, ("init", k)
    for k, v in step_choices.items():
        samples[k], kinds[k] = v, ("step", k)
    return samples, kinds


def _dry_run(program: SequentialProgram, args: tuple, cfg: SMC) -> None:
    """Run init and the first step once eagerly, one particle, to report model errors clearly."""
    init_w, init_latent = checks.dry_run(program.init, args, cfg.init_proposal, "running init once")
    state = jax.tree.map(jnp.asarray, init_w.value)
    t0 = jnp.zeros((), jnp.int32)
    step = lambda s: program.step(s, t0, *args)
    prop = None if cfg.proposal is None else (lambda s: cfg.proposal(s, t0, *args))
    step_w, step_latent = checks.dry_run(step, (state,), prop, "running step 0 once")
    checks.require_latent(init_latent + step_latent)
    batched = lambda tree: jax.tree.map(lambda x: jnp.asarray(x)[None], tree)
    match_state(batched(step_w.value), batched(state))
