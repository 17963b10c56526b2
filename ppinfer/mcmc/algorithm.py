"""``MCMC(kernel, num_samples, num_warmup, num_chains)``: an :func:`ppinfer.infer` algorithm.

Runs ``num_chains`` independent chains (``vmap``) of the kernel built by a factory (e.g.
:class:`~ppinfer.mcmc.NUTS`, :class:`~ppinfer.mcmc.SingleSiteMH`), each a ``lax.scan`` of
``num_warmup`` discarded transitions followed by ``num_samples`` recorded ones. The
:class:`MCMCResult` holds the ``C·S`` draws with equal weights; ``to_arviz()`` keeps the
``(chain, draw)`` dimensions so R-hat and ESS are computed per chain by ArviZ.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer import init_to_uniform

from ppinfer import checks
from ppinfer._compile import split_args
from ppinfer.errors import ConfigError
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
        num_chains: independent chains, ≥ 1 (vmapped).
        thinning: keep every ``thinning``-th transition, ≥ 1.
        progress_bar: show a tqdm bar (the run is then compiled in chunks of transitions).
    """

    kernel: Any
    num_samples: int = 1000
    num_warmup: int = 500
    num_chains: int = 1
    thinning: int = 1
    progress_bar: bool = False

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

    def run(self, key: jax.Array, program: Any, args: tuple) -> MCMCResult:
        if is_sequential(program) and not getattr(self.kernel, "sequential", False):
            raise ConfigError(
                "MCMC needs a static program; for a sequential program use SMC, ResampleMoveSMC, "
                "PMMH or ParticleGibbs"
            )
        t0 = time.perf_counter()
        draws, infos = run_chains(key, program, args, self)
        n = self.num_chains * self.num_samples
        samples = {k: jnp.reshape(v, (n, *v.shape[2:])) for k, v in draws.items()}
        return MCMCResult(
            samples=samples,
            log_weights=jnp.full((n,), -math.log(n)),
            log_evidence=None,
            algorithm=getattr(self.kernel, "name", None) or f"{self.name}({type(self.kernel).__name__})",
            wall_time=time.perf_counter() - t0,
            extras={"num_chains": self.num_chains, "info": infos, **_kernel_extras(self.kernel, infos)},
        )


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

    def to_arviz(self, key: int | jax.Array = 0):
        """An ``arviz.InferenceData`` with ``(chain, draw)`` dimensions (no resampling needed)."""
        import arviz as az

        return az.from_dict(posterior={k: np.asarray(v) for k, v in self.chains().items()})

    def __repr__(self) -> str:
        from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

        c = self.num_chains
        lines = [f"MCMCResult({self.algorithm}, {c} chains x {self.num_particles // c} draws, no evidence)"]
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


def run_chains(key: jax.Array, program: Callable[..., Any], args: tuple, cfg: MCMC) -> tuple[dict, Any]:
    """Compile and run ``cfg.num_chains`` chains; returns ``(draws, infos)``, leaves ``[C, S, …]``.

    Without a progress bar the whole run — chain initialisation, warm-up, sampling and the selection
    of the recorded (post-warm-up, thinned) draws — is ONE compiled program (one XLA compilation of
    the kernel, no eager array work per run). With a progress bar it runs in ~20 compiled chunks,
    each chunk's transition keys derived from the chain key and the chunk's offset."""
    dyn, static_key, rebuild = split_args(args)
    settings = (cfg.num_samples, cfg.num_warmup, cfg.num_chains, cfg.thinning, cfg.progress_bar)
    cache_key = ("mcmc", program, cfg.kernel, settings, static_key)
    if cache_key not in _FACTORIES and getattr(cfg.kernel, "sequential", False):
        # A kernel over a sequential program (PMMH, ParticleGibbs) checks the program itself.
        _FACTORIES[cache_key] = _compiled(cfg.kernel.build_for(program, args, cfg.num_warmup), rebuild, cfg)
    if cache_key not in _FACTORIES:
        checked = _improper_at_init(program)
        checks.dry_run(checked, args, None, "running the program once")
        sites = latent_sites(checked, args)
        checks.require_latent(list(sites))
        kernel = cfg.kernel.build(program, cfg.num_warmup, sites)
        _FACTORIES[cache_key] = _compiled(kernel, rebuild, cfg)
        if len(_FACTORIES) > 16:
            _FACTORIES.popitem(last=False)
    fns = _FACTORIES[cache_key]
    if not cfg.progress_bar:
        return fns.run(key, dyn)
    total = _total(cfg)
    size = max(1, math.ceil(total / 20))
    state, run_keys = fns.init(key, dyn)
    draws, infos = [], []
    done = 0
    with _progress(total) as bar:
        while done < total:
            length = min(size, total - done)
            state, (pos, info) = fns.chunk(state, run_keys, dyn, done, length)
            record = np.flatnonzero(_recorded(cfg, done, length))
            if record.size:
                draws.append(_take(pos, record))
                infos.append(_take(info, record))
            done += length
            bar.update(length)
    cat = lambda *xs: jnp.concatenate(xs, axis=1)
    return jax.tree.map(cat, *draws), jax.tree.map(cat, *infos)


_FACTORIES: OrderedDict = OrderedDict()


class _Compiled(NamedTuple):
    """``run(key, dyn) -> (draws, infos)`` (the whole run), and for chunked runs ``init(key, dyn) ->
    (state, run_keys)`` and ``chunk(state, run_keys, dyn, offset, length) -> (state, (pos, info))``
    (``length`` static: at most two compilations, the last chunk may be shorter)."""

    run: Callable
    init: Callable
    chunk: Callable


def _compiled(kernel, rebuild, cfg: MCMC) -> _Compiled:
    def init(key, dyn):
        args = rebuild(dyn)
        k_init, k_run = jax.random.split(key)
        state = jax.vmap(lambda k: kernel.init(k, args))(jax.random.split(k_init, cfg.num_chains))
        return state, jax.random.split(k_run, cfg.num_chains)

    def chunk(state, run_keys, dyn, offset, length):
        args = rebuild(dyn)

        def chain(s, ks):
            def body(s, k):
                s, info = kernel.step(k, s, args)
                return s, (kernel.position(s, args), info)

            return jax.lax.scan(body, s, ks)

        return jax.vmap(chain)(state, _chunk_keys(run_keys, offset, length))

    @jax.jit
    def run(key, dyn):
        state, run_keys = init(key, dyn)
        total = _total(cfg)
        _, (pos, info) = chunk(state, run_keys, dyn, 0, total)
        record = np.flatnonzero(_recorded(cfg, 0, total))
        return _take(pos, record), _take(info, record)

    return _Compiled(run, jax.jit(init), jax.jit(chunk, static_argnums=4))


def _kernel_extras(kernel: Any, infos: Any) -> dict:
    """A kernel's own summary of its recorded infos (``kernel.extras(infos)``), if it has one."""
    return kernel.extras(infos) if hasattr(kernel, "extras") else {}


def _total(cfg: MCMC) -> int:
    return cfg.num_warmup + cfg.num_samples * cfg.thinning


def _recorded(cfg: MCMC, offset: int, length: int) -> np.ndarray:
    """``bool[length]``: which of the iterations ``offset … offset + length − 1`` are kept draws."""
    i = np.arange(offset, offset + length)
    return (i >= cfg.num_warmup) & ((i - cfg.num_warmup) % cfg.thinning == 0)


def _improper_at_init(program: Callable[..., Any]) -> Callable[..., Any]:
    """``program`` with its improper-prior sites (``ImproperUniform``, which cannot be sampled) set
    by ``init_to_uniform``, so the host-side checks can run it once."""

    def value(site):
        if site["type"] == "sample" and isinstance(site["fn"], dist.ImproperUniform):
            return init_to_uniform(site)
        return None

    return lambda *args: handlers.substitute(handlers.seed(program, 0), substitute_fn=value)(*args)


def _chunk_keys(run_keys: jax.Array, offset: int, length: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, offset), length))(run_keys)


def _take(tree: Any, idx: np.ndarray) -> Any:
    return jax.tree.map(lambda x: x[:, idx], tree)


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="MCMC")
