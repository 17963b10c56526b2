"""``MCMC(kernel, num_samples, num_warmup, num_chains)``: an :func:`ppinfer.infer` algorithm.

Runs ``num_chains`` independent chains (``vmap`` or ``lax.map``) of the kernel built by a factory
(e.g. :class:`~ppinfer.mcmc.NUTS`, :class:`~ppinfer.mcmc.SingleSiteMH`): ``num_warmup`` discarded
transitions followed by ``num_samples`` recorded ones, in compiled chunks driven from Python (see
:func:`run_chains`: progress bar, Ctrl-C, draws independent of the chunking). The
:class:`MCMCResult` holds the ``C·S`` draws with equal weights; ``to_arviz()`` keeps the
``(chain, draw)`` dimensions so R-hat and ESS are computed per chain by ArviZ.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer import init_to_uniform

from ppinfer import checks
from ppinfer._compile import MemoryEstimateError, available_memory, cached_jit, split_args
from ppinfer._talk import compile_notice, interruptible, next_chunk, progress_bar
from ppinfer.errors import (
    ConfigError,
    ConvergenceWarning,
    DivergenceWarning,
    ModelError,
    UndefinedDensityWarning,
    ZeroEvidenceError,
)
from ppinfer.kernels.mh import MHInfo
from ppinfer.program import is_sequential
from ppinfer.result import Result
from ppinfer.traced import latent_sites

__all__ = ["MCMC", "MCMCResult", "run_chains"]


@dataclass(frozen=True)
class MCMC:
    """Markov chain Monte Carlo for a static program.

    Args:
        kernel: a kernel factory with ``build(program, num_warmup, sites) -> Kernel``
            (``NUTS()``, ``HMC()``, ``SingleSiteMH()``, ``Regenerate(...)``, ``ProgrammableMH(...)``,
            ``IndependenceMH(...)``), or one for sequential programs (``sequential = True``) with
            ``build_for(program, args, num_warmup) -> Kernel`` (``PMMH(...)``,
            ``ParticleGibbs(...)``); a factory may name the result (``name``) and summarise its
            infos into the result's extras (``extras(infos) -> dict``).
        num_samples: recorded draws per chain, ≥ 1.
        num_warmup: discarded transitions per chain before recording (adaptation for NUTS/HMC), ≥ 0.
        num_chains: independent chains, ≥ 1 (default 4, so that R-hat is defined).
        thinning: keep every ``thinning``-th transition, ≥ 1.
        progress_bar: a tqdm bar on stderr; ``None`` (default): shown when stderr is a terminal and
            ppinfer is not quiet (``PPINFER_QUIET``, :func:`ppinfer.set_verbosity`). The run is
            compiled once and driven in short chunks either way, so the bar never changes the
            draws, and Ctrl-C stops the run within a chunk (about a quarter of a second).
        chain_method: ``"vectorized"`` (the chains are ``vmap``ped: one batched transition) or
            ``"sequential"`` (``lax.map`` over the chains inside each chunk). The same chains in
            law, not bit for bit: the two compile to different floating-point reassociations,
            and a chain's discrete decisions (an MH accept, a NUTS tree's turn) and step-size
            adaptation amplify a last-bit difference, so the draws of one key differ after a few
            transitions (NUTS after 300 warm-up steps: step sizes 10–30% apart).
    """

    kernel: Any
    num_samples: int = 1000
    num_warmup: int = 500
    num_chains: int = 4
    thinning: int = 1
    progress_bar: bool | None = None
    chain_method: str = "vectorized"

    name = "MCMC"

    def __post_init__(self):
        if not (hasattr(self.kernel, "build") or hasattr(self.kernel, "build_for")):
            raise ConfigError(f"MCMC(kernel): expected a kernel factory such as NUTS(), got {self.kernel!r}")
        for what, v, low in (
            ("num_samples", self.num_samples, 1),
            ("num_warmup", self.num_warmup, 0),
            ("num_chains", self.num_chains, 1),
            ("thinning", self.thinning, 1),
        ):
            checks.check_int(what, v, low)
        if _total(self) > 2**31 - 1:  # transition indices are int32
            raise ConfigError(
                f"num_warmup + num_samples · thinning = {_total(self)} transitions per chain: at most "
                f"{2**31 - 1}"
            )
        if self.chain_method not in ("vectorized", "sequential"):
            raise ConfigError(f"chain_method must be 'vectorized' or 'sequential', got {self.chain_method!r}")

    def run(self, key: jax.Array, program: Any, args: tuple) -> MCMCResult:
        if is_sequential(program) and not getattr(self.kernel, "sequential", False):
            raise ConfigError(
                "MCMC needs a static program; for a sequential program use SMC, ResampleMoveSMC, "
                "PMMH or ParticleGibbs"
            )
        t0 = time.perf_counter()
        draws, infos = run_chains(key, program, args, self)  # returns when every chunk has run
        n = self.num_chains * self.num_samples
        samples = {k: jnp.reshape(v, (n, *v.shape[2:])) for k, v in draws.items()}
        result = MCMCResult(
            samples=samples,
            log_weights=jnp.full((n,), -math.log(n)),
            log_evidence=None,
            algorithm=getattr(self.kernel, "name", None) or f"{self.name}({type(self.kernel).__name__})",
            wall_time=time.perf_counter() - t0,
            extras={"num_chains": self.num_chains, "info": infos, **_kernel_extras(self.kernel, infos)},
        )
        _warn_divergences(result)
        _warn_undefined(result)
        _warn_unmixed(result)
        return result


class MCMCResult(Result):
    """A :class:`~ppinfer.Result` of equally weighted MCMC draws (``log_weights = −log N``, so
    ``logsumexp(log_weights) = 0``: the weights carry no evidence information).

    MCMC gives no evidence estimate: ``log_evidence`` is ``None`` (use
    :class:`~ppinfer.algorithms.tempered.TemperedSMC` for ``log Ẑ``). ``extras["num_chains"]`` chains
    of equal length are stored chain-major; ``extras["info"]`` holds the kernel's per-draw info
    ``[C, S, …]``. The subclass only adds chain-aware views (``chains``, ``to_arviz``, the summary)."""

    @property
    def num_chains(self) -> int:
        return int(self.extras["num_chains"])

    def chains(self) -> dict[str, jax.Array]:
        """Site name → ``[C, S, …]`` draws."""
        c = self.num_chains
        return {k: jnp.reshape(v, (c, -1, *v.shape[1:])) for k, v in self.samples.items()}

    def sample_stats(self) -> dict[str, np.ndarray]:
        """The kernel's per-draw diagnostics under ArviZ's names, each ``[C, S]``: for NUTS/HMC
        ``diverging``, ``acceptance_rate``, ``step_size``, ``n_steps`` (leapfrog steps),
        ``energy``, ``lp`` and (NUTS) ``tree_depth``; for the MH kernels ``acceptance_rate``."""
        info = self.extras.get("info")
        if hasattr(info, "_asdict"):
            info = info._asdict()
        if not isinstance(info, dict):
            return {}
        shape = (self.num_chains, self.num_particles // self.num_chains)
        out = {}
        for key, value in info.items():
            name = _STAT_NAMES.get(key)
            value = np.asarray(value) if name is not None else None
            if value is not None and value.shape == shape and name not in out:
                out[name] = value
        return out

    @property
    def num_divergences(self) -> int | None:
        """Divergent transitions among the recorded draws (``None`` for a kernel that has none)."""
        d = self.sample_stats().get("diverging")
        return None if d is None else int(np.sum(d))

    def to_arviz(self, key: int | jax.Array = 0, num_chains: int | None = None, num_draws: int | None = None):
        """An ``arviz.InferenceData`` with ``(chain, draw)`` dimensions (no resampling needed):
        ``posterior`` the draws, ``sample_stats`` :meth:`sample_stats` (``diverging``,
        ``tree_depth``, ``step_size``, ``acceptance_rate``, ``energy``, ``n_steps``, ``lp`` for
        NUTS). ``key``, ``num_chains`` and ``num_draws`` are :meth:`Result.to_arviz`'s, for weighted
        particles: the chains are the run's own, so ``num_chains`` may only be their number and
        ``num_draws`` their total (a :class:`ConfigError` otherwise)."""
        import arviz as az

        if num_chains is not None and num_chains != self.num_chains:
            raise ConfigError(
                f"to_arviz(num_chains={num_chains!r}): this MCMC result has its own {self.num_chains} chains"
            )
        if num_draws is not None and num_draws != self.num_particles:
            raise ConfigError(
                f"to_arviz(num_draws={num_draws!r}): this MCMC result has {self.num_particles} draws "
                "(thin the run instead)"
            )

        stats = self.sample_stats() or None
        posterior = {k: np.asarray(v) for k, v in self.chains().items()}
        return az.from_dict(posterior=posterior, sample_stats=stats)

    def __repr__(self) -> str:
        from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

        c = self.num_chains
        lines = [f"MCMCResult({self.algorithm}, {c} chains x {self.num_particles // c} draws, no evidence)"]
        lines += _stats_lines(self.sample_stats())
        for name, value in self.chains().items():
            x = np.asarray(value)
            if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
                lines.append(f"  {name}: shape={x.shape[2:]}")
                continue
            x = x.astype(np.float64)
            r_hat = float(split_gelman_rubin(x)) if x.shape[1] >= 4 else float("nan")
            ess = float(effective_sample_size(x)) if x.shape[1] >= 4 else float("nan")
            lines.append(f"  {name}: mean={x.mean():.4g} sd={x.std():.4g} r_hat={r_hat:.3f} ess={ess:.0f}")
        return "\n".join(lines)


_STAT_NAMES = {
    "diverging": "diverging",
    "accept_prob": "acceptance_rate",
    "acceptance_rate": "acceptance_rate",
    "step_size": "step_size",
    "num_steps": "n_steps",
    "tree_depth": "tree_depth",
    "energy": "energy",
    "lp": "lp",
}


def _stats_lines(stats: dict) -> list[str]:
    """The printout's diagnostics line(s) from :meth:`MCMCResult.sample_stats`."""
    parts = []
    if "diverging" in stats:
        d = stats["diverging"]
        per_chain = ", ".join(str(int(x)) for x in d.sum(axis=1))
        parts.append(f"divergences={int(d.sum())} ({100 * d.mean():.1f}%; per chain {per_chain})")
    if "acceptance_rate" in stats:
        parts.append(f"acceptance={float(np.mean(stats['acceptance_rate'])):.2f}")
    if "step_size" in stats:
        parts.append(f"step_size={float(np.mean(stats['step_size'])):.3g}")
    if "tree_depth" in stats:
        t = stats["tree_depth"]
        parts.append(f"tree_depth mean={float(t.mean()):.1f} max={int(t.max())}")
    return ["  " + ", ".join(parts)] if parts else []


def _warn_undefined(result: MCMCResult) -> None:
    """Warn when recorded MH transitions proposed a state whose log density is NaN (rejected, so the
    chain avoids the region where the program is undefined instead of reporting it)."""
    is_info = lambda x: isinstance(x, MHInfo)
    infos = [x for x in jax.tree.leaves(result.extras.get("info"), is_leaf=is_info) if is_info(x)]
    n = sum(int(np.sum(np.asarray(x.undefined))) for x in infos)
    if n:
        total = sum(int(np.size(np.asarray(x.log_alpha))) for x in infos)
        warnings.warn(
            f"{result.algorithm}: {n} of {total} recorded MH proposals had a NaN log density and were "
            "rejected, so the draws are from the posterior restricted to where the program's density "
            "is defined. Check the distribution parameters there (e.g. a negative scale).",
            UndefinedDensityWarning,
            stacklevel=4,
        )


R_HAT_LIMIT = 1.1
"""Split R-hat above which :class:`~ppinfer.errors.ConvergenceWarning` is raised."""


def _warn_unmixed(result: MCMCResult) -> None:
    """Warn when the chains disagree: the largest split R-hat over the elements of the real-valued
    sites is above :data:`R_HAT_LIMIT` (e.g. a PMMH chain stuck on an overestimated Ẑ)."""
    from numpyro.diagnostics import split_gelman_rubin

    c = result.num_chains
    worst, where = R_HAT_LIMIT, None
    for name, value in result.chains().items() if c >= 2 else ():
        x = np.asarray(value)
        if x.ndim < 2 or x.shape[1] < 4 or not np.issubdtype(x.dtype, np.floating):
            continue
        r = np.asarray(split_gelman_rubin(x.reshape(c, x.shape[1], -1).astype(np.float64)))
        r = r[np.isfinite(r)]  # a constant element (e.g. a fixed initial state) has no R-hat
        if r.size and r.max() > worst:
            worst, where = float(r.max()), name
    if where is not None:
        warnings.warn(
            f"{result.algorithm}: the chains disagree (split R-hat {worst:.2f} for site {where!r}, "
            f"above {R_HAT_LIMIT}): they have not mixed, so the pooled draws may be far from the "
            "posterior. Run longer (num_warmup, num_samples), or for PMMH use more particles; "
            "result.chains() shows each chain.",
            ConvergenceWarning,
            stacklevel=4,
        )


def _warn_divergences(result: MCMCResult) -> None:
    n = result.num_divergences
    if n:
        total = result.num_particles
        warnings.warn(
            f"{result.algorithm}: {n} of {total} transitions after warm-up diverged "
            f"({100 * n / total:.1f}%): the sampler could not follow the posterior there, so the "
            "draws may be biased. Reparametrise (e.g. a non-centred hierarchy) or raise "
            "target_accept_prob; result.to_arviz().sample_stats.diverging shows where.",
            DivergenceWarning,
            stacklevel=4,
        )


def run_chains(key: jax.Array, program: Callable[..., Any], args: tuple, cfg: MCMC) -> tuple[dict, Any]:
    """Compile and run ``cfg.num_chains`` chains; returns ``(draws, infos)``, leaves ``[C, S, …]``.

    The run is compiled once (chain initialisation, and a chunk of transitions: a loop with a traced
    start and length, so every chunk reuses one compilation) and driven from Python in chunks
    sized to last about :data:`CHUNK_SECONDS` each: a progress bar moves between chunks, and Ctrl-C
    (``KeyboardInterrupt``) stops the run within one chunk, discarding it. Transition ``i`` of a
    chain draws with ``fold_in(chain_key, i)``, so the draws do not depend on the chunking: the
    same key gives bit-identical draws with and without a progress bar."""
    dyn, static_key, rebuild = split_args(args)
    settings = (cfg.num_samples, cfg.num_warmup, cfg.num_chains, cfg.thinning, cfg.chain_method)
    sequential = getattr(cfg.kernel, "sequential", False)
    # A kernel over a sequential program (PMMH, ParticleGibbs) is built for the data's length (its
    # SMC loop has T steps): it is cached per argument signature too.
    shapes = _shapes(dyn) if sequential else None
    cache_key = ("mcmc", program, cfg.kernel, settings, static_key, shapes)
    what = f"MCMC({type(cfg.kernel).__name__}) of {getattr(program, '__name__', type(program).__name__)}"
    built: list = []

    def kernel() -> Any:
        """The kernel for this program, built on a compile-cache miss (a static program has passed
        its dry run on these arguments by then: ``once_per_data`` below runs before any build)."""
        if not built:
            if sequential:
                # A kernel over a sequential program (PMMH, ParticleGibbs) checks the program itself.
                built.append(cfg.kernel.build_for(program, args, cfg.num_warmup))
            else:
                checked = _improper_at_init(program)
                sites = latent_sites(checked, args)
                checks.require_latent(list(sites))
                built.append(cfg.kernel.build(program, cfg.num_warmup, sites))
        return built[0]

    # The compiled chains serve any data of these shapes, but data the program refuses (a value
    # outside a support) must be refused on every call, not only on the one that compiled (a PMMH
    # chain started at Ẑ = 0 never moves).
    if sequential:
        dry_run = lambda: built.append(cfg.kernel.build_for(program, args, cfg.num_warmup))
    else:
        dry_run = lambda: checks.dry_run(_improper_at_init(program), args, None, "running the program once")
    checks.once_per_data(cache_key, args, dry_run)

    init, _ = cached_jit((*cache_key, "init"), lambda: _init_fn(kernel(), rebuild, cfg))
    total = _total(cfg)
    first = not init.compiled_for(key, dyn)
    with compile_notice(what) if first else nullcontext():
        try:
            state, run_keys = init(key, dyn)
        except NotImplementedError as e:  # an MH kernel's prior draw of an ImproperUniform site
            raise ModelError(
                f"{what}: starting the chains failed: {checks.not_implemented_message(e)}"
            ) from e
        _check_draws_fit(state, cfg)
        buffer = _buffer_size(state, cfg)
        build_chunk = lambda: _chunk_fn(kernel(), rebuild, cfg, buffer)
        chunk, _ = cached_jit((*cache_key, "chunk", buffer), build_chunk)
        if first:
            # A zero-length chunk compiles the transition loop without running it (so the first
            # timed chunk measures transitions, not the compilation).
            chunk(state, run_keys, dyn, _i32(0), _i32(0))
    draws, infos = [], []
    done, length = 0, min(total, FIRST_CHUNK)
    with progress_bar(total, _bar_name(cfg), cfg.progress_bar) as bar, interruptible() as interrupted:
        while done < total:
            length = min(length, total - done, buffer)
            t0 = time.perf_counter()
            state, (pos, info) = chunk(state, run_keys, dyn, _i32(done), _i32(length))
            pos, info = jax.device_get((pos, info))  # waits for the chunk
            seconds = time.perf_counter() - t0
            interrupted()  # Ctrl-C lands here
            record = np.flatnonzero(_recorded(cfg, done, length))
            if record.size:
                draws.append(_take(pos, record))
                infos.append(_take(info, record))
            done += length
            bar.update(length)
            length = next_chunk(length, seconds)
    lp_fn, _ = cached_jit((*cache_key, "log_density"), lambda: _log_density_fn(kernel(), rebuild))
    _check_final_density(np.asarray(lp_fn(state, dyn)), infos, what)
    cat = lambda *xs: jnp.asarray(np.concatenate(xs, axis=1))
    return jax.tree.map(cat, *draws), jax.tree.map(cat, *infos)


def _log_density_fn(kernel, rebuild) -> Callable:
    """``(state, dyn) -> f[C]``: each chain's log density at its state (0 where the kernel does not
    expose one)."""

    def log_density(state, dyn):
        args = rebuild(dyn)
        if kernel.log_density is None:
            return jnp.zeros(jax.tree.leaves(state)[0].shape[:1])
        return jax.vmap(lambda s: kernel.log_density(s, args))(state)

    return log_density


def _check_final_density(lp: np.ndarray, infos: list, what: str) -> None:
    """Refuse chains that say nothing about the posterior: every chain's last state has density
    zero (``ZeroEvidenceError``: the data may be impossible under the program, e.g. an infinite or
    out-of-support observation, or no chain ever found the support), or a state or recorded draw
    whose log density is ``+inf``/NaN (``ModelError``: an infinite factor makes the program no
    density). Some chains (not all) at density zero: a :class:`ConvergenceWarning`."""
    recorded = [np.asarray(x["lp"]) for x in infos if isinstance(x, dict) and "lp" in x]
    bad = ~np.isfinite(lp) & (lp != -np.inf)
    if bad.any() or any(np.any(np.isnan(r) | (r == np.inf)) for r in recorded):
        raise ModelError(
            f"{what}: the program's log density is +inf or NaN at a chain's state (an infinite factor "
            "or likelihood?): the posterior is not defined there"
        )
    dead = np.flatnonzero(lp == -np.inf)
    if dead.size == lp.size:
        raise ZeroEvidenceError(
            f"{what}: every chain ended at a state of density zero (log density −inf): the data may "
            "be impossible under the program (e.g. an infinite or out-of-support observation), or no "
            "chain found the posterior's support (set init_strategy, or check the constraints)"
        )
    if dead.size:
        warnings.warn(
            f"{what}: chain(s) {dead.tolist()} ended at a state of density zero (log density −inf): "
            "they never reached the posterior's support, and their draws are not from it",
            ConvergenceWarning,
            stacklevel=4,
        )


FIRST_CHUNK = 8
"""Transitions in the first chunk (before a chunk has been timed)."""

_BUFFER_BYTES = 1 << 26
"""At most this many bytes of per-transition output (positions and infos) per chunk."""


def _init_fn(kernel, rebuild, cfg: MCMC) -> Callable:
    """``init(key, dyn) -> (state, run_keys)``: every chain's initial state, and its run key."""

    def init(key, dyn):
        args = rebuild(dyn)
        k_init, k_run = jax.random.split(key)
        state = jax.vmap(lambda k: kernel.init(k, args))(jax.random.split(k_init, cfg.num_chains))
        return state, jax.random.split(k_run, cfg.num_chains)

    return init


def _chunk_fn(kernel, rebuild, cfg: MCMC, buffer: int) -> Callable:
    """``chunk(state, run_keys, dyn, start, length) -> (state, (pos, info))``, leaves
    ``[C, buffer, …]`` of which the first ``length`` are the transitions ``start … start + length −
    1`` (``start`` and ``length`` traced: one compilation per buffer size)."""

    def transition(s, k, args):
        s, info = kernel.step(k, s, args)
        return s, (kernel.position(s, args), info)

    def one_chain(s, run_key, dyn, start, length):
        args = rebuild(dyn)
        out_shape = jax.eval_shape(lambda s, k: transition(s, k, args), s, run_key)[1]  # args stay static
        buf = jax.tree.map(lambda a: jnp.zeros((buffer, *a.shape), a.dtype), out_shape)

        def body(i, carry):
            s, buf = carry
            s, out = transition(s, jax.random.fold_in(run_key, start + i), args)
            return s, jax.tree.map(lambda b, o: b.at[i].set(o), buf, out)

        return jax.lax.fori_loop(0, length, body, (s, buf))

    def chunk(state, run_keys, dyn, start, length):
        f = lambda s, k: one_chain(s, k, dyn, start, length)
        if cfg.chain_method == "sequential":
            return jax.lax.map(lambda a: f(*a), (state, run_keys))
        return jax.vmap(f)(state, run_keys)

    return chunk


def _buffer_size(state: Any, cfg: MCMC) -> int:
    """Transitions per chunk buffer: the whole run if it fits in :data:`_BUFFER_BYTES`, the chain
    state's size standing in for one transition's output (positions and infos)."""
    per_step = sum(int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(state))
    return int(min(_total(cfg), max(16, _BUFFER_BYTES // max(1, per_step))))


def _check_draws_fit(state: Any, cfg: MCMC) -> None:
    """Refuse (:class:`~ppinfer._compile.MemoryEstimateError`) a run whose kept draws cannot fit in
    the host's available memory (the chains' state size standing in for one draw of every chain)."""
    per_draw = sum(int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(state))
    needed = per_draw * cfg.num_samples
    available, where = available_memory()
    if available is not None and needed > available:
        raise MemoryEstimateError(
            f"MCMC keeps num_chains × num_samples = {cfg.num_chains} × {cfg.num_samples} draws: about "
            f"{needed / 2**30:.1f} GiB, but {available / 2**30:.1f} GiB is available on {where}: use "
            "fewer num_samples (thinning keeps fewer of a long run)",
            needed,
            available,
        )


def _i32(x: int) -> jax.Array:
    return np.asarray(x, np.int32)


def _bar_name(cfg: MCMC) -> str:
    return f"{type(cfg.kernel).__name__} {cfg.num_chains} chains"


def _kernel_extras(kernel: Any, infos: Any) -> dict:
    """A kernel's own summary of its recorded infos (``kernel.extras(infos)``), if it has one."""
    return kernel.extras(infos) if hasattr(kernel, "extras") else {}


def _total(cfg: MCMC) -> int:
    return cfg.num_warmup + cfg.num_samples * cfg.thinning


def _recorded(cfg: MCMC, offset: int, length: int) -> np.ndarray:
    """``bool[length]``: which of the iterations ``offset … offset + length − 1`` are kept draws."""
    i = np.arange(offset, offset + length)
    return (i >= cfg.num_warmup) & ((i - cfg.num_warmup) % cfg.thinning == 0)


def _shapes(dyn: Any) -> tuple:
    """The data's structure, shapes and canonical dtypes (what a kernel over a sequential program is
    built for): NumPy and JAX arrays of one shape alike, and float64 data as JAX reads it without
    x64 (a signature that told them apart rebuilt and recompiled PMMH for NumPy data)."""
    leaves, treedef = jax.tree.flatten(dyn)
    canonical = lambda x: (np.shape(x), jax.dtypes.canonicalize_dtype(np.result_type(x)))
    return (treedef, *(canonical(x) if hasattr(x, "dtype") else type(x) for x in leaves))


def _improper_at_init(program: Callable[..., Any]) -> Callable[..., Any]:
    """``program`` with its improper-prior sites (``ImproperUniform``, which cannot be sampled) set
    by ``init_to_uniform``, so the host-side checks can run it once."""

    def value(site):
        if site["type"] == "sample" and isinstance(site["fn"], dist.ImproperUniform):
            return init_to_uniform(site)
        return None

    return lambda *args: handlers.substitute(handlers.seed(program, 0), substitute_fn=value)(*args)


def _take(tree: Any, idx: np.ndarray) -> Any:
    return jax.tree.map(lambda x: x[:, idx], tree)
