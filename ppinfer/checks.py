"""Host-side checks that turn bad programs and bad settings into clear ``ppinfer`` errors.

A program is run once eagerly (one particle, NumPyro's argument validation on) before it is compiled,
so invalid distribution parameters, out-of-support observations and shape errors are reported with
the site they happened at, instead of as NaN weights or a traceback from deep inside JAX.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.distribution import validation_enabled
from numpyro.primitives import Messenger

from ppinfer.errors import (
    BroadcastWarning,
    ConfigError,
    DataError,
    InferenceError,
    ModelError,
    PPInferError,
    ZeroEvidenceError,
)
from ppinfer.program import is_sequential

__all__ = [
    "check_num_particles",
    "check_int",
    "check_probability",
    "dry_run",
    "require_latent",
    "draws_key",
    "raise_on_nan_sites",
    "require_sequential",
    "raise_if_dead",
]


def check_num_particles(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"num_particles must be an integer >= 1, got {n!r}")
    if n > np.iinfo(np.int32).max:  # particle indices are int32 (and 2^31 particles fill a device)
        raise ConfigError(f"num_particles must be below 2^31 = {2**31}, got {n!r}")
    return int(n)


def check_int(name: str, value: Any, low: int, high: int = 2**31 - 1) -> int:
    """``value`` as an int, or :class:`ConfigError` unless it is an integer in ``[low, high]``
    (by default at most ``2^31 − 1``: counts and indices are ``int32`` in the compiled runs)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if value > high:
        raise ConfigError(f"{name} must be at most {high}, got {value!r}")
    return int(value)


def check_proposals(config: Any, names: tuple[str, ...] = ("proposal", "init_proposal")) -> None:
    """:class:`ConfigError` unless each of ``config``'s ``names`` is ``None`` or a program."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None and not callable(value):
            raise ConfigError(
                f"{type(config).__name__}({name}=...): a proposal is None or a program (a callable), "
                f"got {value!r}"
            )


def device_tuple(devices: Any) -> tuple:
    """``devices`` (a number: the first that many of ``jax.devices()``; or a sequence of distinct
    jax devices) as a tuple, or :class:`ConfigError`."""
    available = jax.devices()
    if isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ConfigError(f"devices={devices}, but {len(available)} device(s) are available")
        return tuple(available[: int(devices)])
    if isinstance(devices, str | bytes) or not isinstance(devices, Sequence | np.ndarray):
        raise ConfigError(
            f"devices must be a number of devices or a sequence of jax devices, got {devices!r}"
        )
    devices = tuple(devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise ConfigError(
            f"devices must be a number of devices or a non-empty sequence of jax devices (from "
            f"jax.devices()), got {devices!r}"
        )
    repeated = sorted({str(d) for d in devices if devices.count(d) > 1})
    if repeated:
        raise ConfigError(f"devices lists {', '.join(repeated)} more than once: each device holds one share")
    return devices


def site_names(name: str, value: Any) -> tuple[str, ...]:
    """Site names as a tuple: one name (a ``str``) or an iterable of names; :class:`ConfigError`
    for anything else (``None``, a number, a name that is not a string)."""
    if isinstance(value, str):
        return (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a site name or a sequence of site names, got {value!r}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ConfigError(f"{name} must hold site names (strings), got {bad[0]!r}")
    return names


def as_key(key: Any) -> jax.Array | np.ndarray:
    """A legacy ``uint32[2]`` key from an ``int`` (NumPy's too) seed or a ``jax.random`` key, or a
    :class:`ConfigError`."""
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        if not -(2**63) <= int(key) < 2**63:
            raise ConfigError(f"an int seed must fit in 64 bits (-2^63 <= key < 2^63), got {key!r}")
        if jax.config.jax_default_prng_impl == "threefry2x32":
            # jax.random.PRNGKey's threefry key data, computed on the host (a NumPy array: the
            # compiled run takes it in with its other arguments), not a dispatched op and a
            # transfer before the run. Without x64 JAX keeps the seed's low 32 bits.
            bits = int(key) & (2**64 - 1)
            high = bits >> 32 if jax.config.jax_enable_x64 else 0
            return np.array([high, bits & 0xFFFFFFFF], np.uint32)
        return jax.random.PRNGKey(int(key))
    if isinstance(key, jax.Array) and key.shape == (2,) and key.dtype == np.uint32:
        return key
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ConfigError(f"key must be one jax.random key, got a batch of keys of shape {key.shape}")
        data = jax.random.key_data(key)
        if data.shape != (2,) or data.dtype != np.uint32:
            raise ConfigError(
                f"key must be a threefry2x32 jax.random key (the default implementation), got one of "
                f"{jax.random.key_impl(key)}: pass an int seed or jax.random.key(seed)"
            )
        return data
    raise ConfigError(f"key must be an int seed or a jax.random key, got {key!r}")


def is_number(value: Any) -> bool:
    """A real Python or NumPy number (not a bool, a string or None)."""
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float, or :class:`ConfigError` unless it is a finite number ``> 0``."""
    if not (is_number(value) and 0 < value < np.inf):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float, or :class:`ConfigError` unless it is a number in the open ``(0, 1)``."""
    if not (is_number(value) and 0.0 < value < 1.0):
        raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def check_probability(name: str, value: Any) -> float:
    """``value`` as a float, or :class:`ConfigError` unless it is a number in ``[0, 1]`` (a bool or a
    string is not one)."""
    if isinstance(value, bool | np.bool_ | str | bytes):
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}") from e
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {v}")
    return v


def dry_run(
    fn: Callable[..., Any],
    args: tuple,
    proposal: Callable[..., Any] | None,
    what: str,
    subsampling: bool = False,
) -> tuple[Any, list[str]]:
    """Run ``fn(*args)`` once eagerly (one particle, NumPyro's argument validation on) under
    ``proposal``; return its :class:`~ppinfer.weighted.Weighted` and the names of its latent sites.

    Invalid parameters, out-of-support data, shape errors and NaN log densities become
    :class:`ModelError`/:class:`DataError` naming the site; so does a subsampled plate unless
    ``subsampling`` (VI's stochastic objectives): a minibatch's rescaled likelihood is not an
    unbiased likelihood, so weights and MCMC targets built on it are wrong."""
    from ppinfer.weighted import simulate

    key = jax.random.PRNGKey(0)
    tracker = _last_site()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        # JAX's notes on its persistent cache (an entry another process is still writing is read
        # as a miss, and compiled again) are not model errors: they stay warnings.
        warnings.filterwarnings("default", "Error (reading|writing) persistent compilation cache")
        # A value outside a support is checked below, site by site: it is an error only where the
        # support is fixed (a latent-dependent one, Uniform(0, θ), makes some executions impossible).
        warnings.filterwarnings("ignore", "Out-of-support values", UserWarning)
        try:
            # One eager run (the outer trace sees the program's sites, and the proposal's of the
            # same names): an eager LM step compiles every op it meets, so it is not run twice.
            with validation_enabled(), tracker, (sites := _SampleSites()) as trace:
                weighted, info = simulate(key, fn, args, proposal=proposal)
        except PPInferError:
            raise
        except UserWarning as w:
            kind = DataError if "support" in str(w).lower() else ModelError
            raise kind(f"{what}: {w} (at or after site {tracker.last!r})") from None
        except PROGRAM_ERRORS as e:
            where = "before any site" if tracker.last is None else f"after site {tracker.last!r}"
            raise ModelError(f"{what} failed {where}: {type(e).__name__}: {e}") from e
        except NotImplementedError as e:
            raise ModelError(f"{what} failed at site {tracker.last!r}: {not_implemented_message(e)}") from e
    if sites.subsampled and not subsampling:
        raise ModelError(
            f"{what}: plate(s) {sites.subsampled} are subsampled (subsample_size): a minibatch's "
            "rescaled likelihood is an unbiased estimate of the log-likelihood, not of the "
            "likelihood, so weights, evidence and MCMC targets built on it are wrong — subsample "
            "with VI only, or use the whole plate"
        )
    _check_returned(weighted.value, what)
    raise_on_nan_sites(info.nan_sites, what)
    _raise_on_data_outside_support(trace, what)
    _warn_on_broadcast_observations(trace, what)
    latent = [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]
    return weighted, latent


def _check_returned(value: Any, what: str) -> None:
    """A program returns arrays (a pytree of them, or nothing): its value is batched over particles."""
    for leaf in jax.tree.leaves(value):
        try:
            jnp.asarray(leaf)
        except TypeError:
            raise ModelError(
                f"{what}: the program returned {leaf!r} ({type(leaf).__name__}); a program returns "
                "arrays or numbers (or a pytree of them, or None): its value is batched over particles"
            ) from None


PROGRAM_ERRORS = (ValueError, TypeError, IndexError, KeyError, AttributeError, AssertionError)
"""What a failing user program raises (a bad parameter, shape, index or name): a ``ModelError``."""


@contextlib.contextmanager
def program_errors(what: str) -> Iterator[None]:
    """Run a user program's code inside: its :data:`PROGRAM_ERRORS` (and NumPyro's
    ``NotImplementedError`` for a site it cannot sample) become a :class:`ModelError` starting with
    ``what``; ppinfer's own errors pass through."""
    try:
        yield
    except PPInferError:
        raise
    except PROGRAM_ERRORS as e:
        raise ModelError(f"{what}: {type(e).__name__}: {e}") from e
    except NotImplementedError as e:
        raise ModelError(f"{what}: {not_implemented_message(e)}") from e


def not_implemented_message(e: NotImplementedError) -> str:
    """What a NumPyro ``NotImplementedError`` while running a program means: most often a latent
    site whose distribution cannot be sampled (``ImproperUniform``)."""
    return (
        f"NotImplementedError({str(e)!r}): a latent site's "
        "distribution cannot be sampled (e.g. dist.ImproperUniform, which only NUTS/HMC support: "
        "give the site a proper prior for the other algorithms)"
    )


def once_per_data(key: Any, args: tuple, check: Callable[[], None]) -> None:
    """Run ``check()`` (e.g. a :func:`dry_run` on ``args``) unless it already passed for ``key`` on
    arguments with these very values: a compiled run is reused for new data of the same shapes, and
    data a program refuses must be refused on every call. The values are fingerprinted on the host
    (a hash of their bytes); the last :data:`_CHECKED_SIZE` passes are remembered."""
    fingerprint = _fingerprint(args)
    memo = None if fingerprint is None else (key, fingerprint)
    with _CHECKED_LOCK:
        if memo is not None and memo in _CHECKED:
            _CHECKED.move_to_end(memo)
            return
    check()
    if memo is not None:
        with _CHECKED_LOCK:
            _CHECKED[memo] = None
            if len(_CHECKED) > _CHECKED_SIZE:
                _CHECKED.popitem(last=False)


def _fingerprint(args: tuple) -> Any:
    """A hashable summary of ``args``' values (arrays by dtype, shape and bytes), or ``None``."""
    leaves, treedef = jax.tree.flatten(args)
    parts: list = [treedef]
    for x in leaves:
        if isinstance(x, jax.Array | np.ndarray | np.generic):
            if isinstance(x, jax.core.Tracer):
                return None
            arr = np.asarray(x)
            parts.append((arr.dtype.str, arr.shape, hash(arr.tobytes())))
        else:
            try:
                hash(x)
            except TypeError:
                return None
            parts.append((type(x), x))
    return tuple(parts)


_CHECKED: OrderedDict = OrderedDict()
_CHECKED_SIZE = 256
_CHECKED_LOCK = threading.Lock()


def _raise_on_data_outside_support(trace: dict, what: str) -> None:
    """:class:`DataError` naming an observed site whose value lies outside a *fixed* support (one of
    NumPyro's constraint objects, e.g. ``boolean``, ``positive``, ``simplex``: no parameter of the
    program can make it possible). A support built from parameters (``Uniform(0, θ)``'s interval)
    is left to the run, where such a value has density zero."""
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        fn = site["fn"]
        while isinstance(fn, dist.MaskedDistribution | dist.Independent | dist.ExpandedDistribution):
            fn = fn.base_dist
        if not any(fn.support is c for c in _FIXED_SUPPORTS):
            continue
        ok = _in_support(site["fn"], site["value"])
        if ok is not None and site.get("mask") is not None:
            ok = ok | ~jnp.asarray(site["mask"])
        if ok is not None and not bool(jnp.all(ok)):
            raise DataError(
                f"{what}: the observed value of site {name!r} lies outside the support of "
                f"{type(fn).__name__} ({fn.support}): e.g. {_first_outside(site['value'], ok)}"
            )


def _warn_on_broadcast_observations(trace: dict, what: str) -> None:
    """:class:`BroadcastWarning` for an observed site with more likelihood terms (the shape of its
    log density, mask and plates included) than its value has observations: value and
    distribution (or mask) broadcast against each other, as ``(5, 1)`` data under a plate of 5 does
    (25 terms: each observation scored under every distribution). A vector observed under a scalar
    distribution, or one scalar value under a batch of distributions, is not flagged."""
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        fn, value = site["fn"], site["value"]
        value_batch = tuple(jnp.shape(value)[: max(jnp.ndim(value) - len(fn.event_shape), 0)])
        try:
            terms = tuple(jnp.shape(fn.log_prob(value)))
            if site.get("mask") is not None:
                terms = tuple(np.broadcast_shapes(terms, jnp.shape(site["mask"])))
        except Exception:  # the run reported what it could not compute
            continue
        if value_batch and int(np.prod(terms)) > int(np.prod(value_batch)):
            warnings.warn(
                f"{what}: observed site {name!r} has {int(np.prod(terms))} likelihood terms of shape "
                f"{terms} for {int(np.prod(value_batch))} observations of shape {value_batch}: value "
                f"and distribution (or its mask) broadcast against each other, so each observation "
                "is scored more than once. Reshape the data or the mask (e.g. y.reshape(-1)) unless "
                "this is meant.",
                BroadcastWarning,
                stacklevel=2,
            )


def _in_support(fn: dist.Distribution, value: Any) -> jax.Array | None:
    """``bool[…]`` shaped like ``fn.log_prob(value)``: whether each value lies in ``fn``'s support
    (a masked-out element counts as inside). ``None`` when there is nothing to check: a real-valued
    support (a NaN or infinite value already makes the density NaN or zero) or one NumPyro cannot
    check (``dependent``)."""
    ok = _support_check(fn, value)
    if ok is None:
        return None
    batch_ndim = jnp.ndim(value) - len(fn.event_shape)
    if ok.ndim > batch_ndim:  # a support whose event is smaller than the distribution's (Unit)
        ok = jnp.all(ok, axis=tuple(range(batch_ndim, ok.ndim)))
    return ok


def _support_check(fn: dist.Distribution, value: Any) -> jax.Array | None:
    if isinstance(fn, dist.MaskedDistribution):
        mask = fn._mask
        if mask is False:
            return None
        ok = _in_support(fn.base_dist, value)
        return ok if ok is None or mask is True else ok | ~jnp.asarray(mask)
    if isinstance(fn, dist.Independent | dist.ExpandedDistribution):
        return _in_support(fn.base_dist, value)  # a mask inside is kept
    support = getattr(fn, "support", None)
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if support is None or support is constraints.real or isinstance(support, constraints._Dependent):
        return None
    try:
        ok = jnp.asarray(support(value))
    except Exception:  # a constraint NumPyro cannot evaluate here: nothing checked, as before
        return None
    return ok if ok.dtype == jnp.bool_ else None


def _first_outside(value: Any, ok: jax.Array) -> str:
    value, ok = np.asarray(value), np.asarray(ok)
    if value.ndim == 0 or ok.ndim == 0:
        return f"value {value!r}"
    idx = tuple(int(i) for i in np.argwhere(~ok)[0])
    return f"element {list(idx)} = {value[idx + (...,)]!r}"


_FIXED_SUPPORTS = tuple(
    c for c in (getattr(constraints, n) for n in constraints.__all__) if isinstance(c, constraints.Constraint)
)


class _SampleSites(handlers.trace):
    """The sample sites of a run, by name; a proposal's site is replaced by the program's site of
    the same name (which comes after it), where NumPyro's ``trace`` refuses the repeated name. The
    names of subsampled plates (``subsample_size`` below the size) are in ``subsampled``."""

    def __enter__(self):
        self.subsampled = []
        return super().__enter__()

    def postprocess_message(self, msg):
        if msg["type"] == "sample":
            self.trace[msg["name"]] = msg.copy()
        elif msg["type"] == "plate" and len(msg["args"]) == 2:
            size, subsample_size = msg["args"]
            if subsample_size is not None and subsample_size < size:
                self.subsampled.append(msg["name"])


def raise_on_nan_sites(nan_sites: dict[str, Any], what: str) -> None:
    """Raise :class:`ModelError` naming the sites whose flag (any shape, on the device or the
    host) is set: a log density that was NaN or +inf there."""
    flags = jax.device_get(nan_sites)  # one transfer for every site
    bad = sorted(name for name, flag in flags.items() if np.any(flag))
    if bad:
        raise ModelError(
            f"{what}: the log density at site(s) {bad} was NaN or +inf — invalid distribution "
            "parameters (e.g. a negative scale), data outside the support, or an infinite factor "
            "(a log weight may be -inf, an impossible execution, but never +inf or NaN)"
        )


def require_sequential(program: Any, what: str, static_alternative: str = "Importance or Enumerate") -> None:
    """Raise :class:`ConfigError` unless ``program`` is a :class:`~ppinfer.SequentialProgram`
    (``what``: the algorithm; ``static_alternative``: what to use for a static program)."""
    if not is_sequential(program):
        raise ConfigError(
            f"{what} needs a sequential program (ppinfer.sequential(init, step, num_steps)); "
            f"for a static program use {static_alternative}"
        )


def raise_if_dead(log_evidence: float, where: str, num_particles: int) -> None:
    """:class:`ZeroEvidenceError` when every particle has weight zero (``log_evidence = −inf``);
    :class:`InferenceError` when it is NaN or +inf (never a valid estimate: a silent NaN result;
    a site whose log density is NaN is reported by :func:`raise_on_nan_sites` before this)."""
    if np.isnan(log_evidence) or log_evidence == np.inf:
        raise InferenceError(
            f"log Ẑ is {log_evidence} {where}".rstrip() + ": a log weight became NaN or +inf — a "
            "selection (resampling=…) returned one, an ancestor out of range (or out of its group) "
            "or only zero weights from a live population, or a move, a proposal or a site's log "
            "density gave a NaN or +inf"
        )
    if not np.isfinite(log_evidence) and log_evidence < 0:
        raise ZeroEvidenceError(
            f"all {num_particles} particles have weight zero (log weight -inf) {where}: every "
            "sampled execution violates a constraint or has zero likelihood (e.g. an observed value "
            "outside its distribution's support). Check the "
            "observations and conditions, or use a proposal that respects the constraints."
        )


def require_latent(latent: list[str]) -> None:
    if not latent:
        raise ModelError("the program makes no random choice (no latent sample site): nothing to infer")


def draws_key(fn: Callable[..., Any], args: tuple) -> bool:
    """Whether ``fn(*args)`` draws randomness through ``numpyro.prng_key()`` — random without a
    latent ``sample`` site (e.g. a step that samples LM tokens in a loop from its key) — found by
    tracing it abstractly (``jax.eval_shape``: nothing runs, no host callback is called)."""
    from ppinfer.primitives import watch_messages

    watch = watch_messages("prng_key")

    def traced():
        with watch, handlers.seed(rng_seed=jax.random.PRNGKey(0)):
            fn(*args)
        return 0

    jax.eval_shape(traced)
    return watch.seen


class _last_site(Messenger):
    def __init__(self):
        super().__init__()
        self.last = None

    def postprocess_message(self, msg):
        if msg.get("name") is not None:
            self.last = msg["name"]
