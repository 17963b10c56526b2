"""Compilation cache: program arguments split into traced arrays and static Python values.

Arrays and floats are passed to the compiled function as traced inputs, so calling ``infer`` again
with new data of the same shapes reuses the compiled code; ints, strings, callables and other Python
values are static (part of the cache key). Also the host-side data checks on those arguments.

Threads: NumPyro's effect-handler stack (``numpyro.primitives._PYRO_STACK``), its argument-validation
switch and Python's warning filters are process-global, so two threads tracing programs at once
would interleave their handlers. :data:`TRACE_LOCK` is the process-wide re-entrant lock that
:func:`~ppinfer.infer` (and every other ppinfer entry point that runs a program) holds; a compiled
function from :func:`cached_jit` releases it while it runs code it has already compiled, so
concurrent ``infer`` calls trace one at a time but execute their compiled runs in parallel.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import jax
import numpy as np

from ppinfer._talk import compile_notice, run_in_chunks
from ppinfer.errors import ConfigError, DataError

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64


class _TraceLock:
    """A process-wide re-entrant lock that a thread can set aside (fully, whatever its depth) while
    it runs compiled code, and take back afterwards."""

    def __init__(self):
        self._lock = threading.RLock()
        self._local = threading.local()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def __enter__(self) -> _TraceLock:
        self._lock.acquire()
        self._local.depth = self._depth() + 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._local.depth = self._depth() - 1
        self._lock.release()

    def held(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._depth() > 0

    def released(self) -> _Released:
        """Release the lock (if this thread holds it) for the duration of the block."""
        return _Released(self)


class _Released:
    """:meth:`_TraceLock.released`'s context (a class, not a generator: entered on every run)."""

    __slots__ = ("_lock", "_depth")

    def __init__(self, lock: _TraceLock):
        self._lock = lock

    def __enter__(self) -> None:
        lock = self._lock
        self._depth = depth = lock._depth()
        for _ in range(depth):
            lock._lock.release()
        lock._local.depth = 0

    def __exit__(self, *exc: Any) -> None:
        lock = self._lock
        for _ in range(self._depth):
            lock._lock.acquire()
        lock._local.depth = self._depth


TRACE_LOCK = _TraceLock()
"""Held while a program is traced, checked or compiled (see the module docstring)."""


def locked(fn: Callable) -> Callable:
    """Decorator: run ``fn`` holding :data:`TRACE_LOCK`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with TRACE_LOCK:
            return fn(*args, **kwargs)

    return wrapper


def split_args(args: Any) -> tuple[list, Hashable, Callable[[list], Any]]:
    """``(dynamic_leaves, static_key, rebuild)`` for a pytree of program arguments."""
    leaves, treedef = jax.tree.flatten(args)
    dynamic = tuple([_is_dynamic(x) for x in leaves])  # lists, not generators: called on every run
    static = tuple([None if d else _hashable(x) for x, d in zip(leaves, dynamic, strict=True)])
    dyn_leaves = [x for x, d in zip(leaves, dynamic, strict=True) if d]
    static_values = [None if d else x for x, d in zip(leaves, dynamic, strict=True)]

    def rebuild(values: list) -> Any:
        it = iter(values)
        full = [next(it) if d else x for x, d in zip(static_values, dynamic, strict=True)]
        return jax.tree.unflatten(treedef, full)

    return dyn_leaves, (treedef, static, dynamic), rebuild


def cached_jit(
    key: Hashable, build: Callable[[], Callable], donate_argnums: tuple[int, ...] = ()
) -> tuple[Callable, bool]:
    """The jitted function cached under ``key`` (built by ``build()`` on a miss, its arguments
    ``donate_argnums`` donated) and whether it was new.

    The function traces and compiles holding :data:`TRACE_LOCK`; a call whose argument types,
    shapes and placements it has already compiled runs with the lock released (and waits for its
    result there), so other threads can trace meanwhile."""
    with TRACE_LOCK:
        fn = _CACHE.get(key)
        if fn is not None:
            _CACHE.move_to_end(key)
            return fn, False
        fn = _Jitted(jax.jit(build(), donate_argnums=donate_argnums), describe(key))
        _CACHE[key] = fn
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return fn, True


def chunked_run(
    cache_key: tuple,
    key: Any,
    dyn: Any,
    *,
    start: Callable[[Any, Any], Any],
    advance: Callable[[Any, Any, Any], Any],
    output: Callable[[Any, Any], Any],
    position: Callable[[Any], tuple[int, bool]],
    total: int,
    desc: str,
    progress: bool | None = None,
    on_compile: Callable[[tuple], None] | None = None,
    ended: Callable[[Any], Any] | None = None,
) -> Any:
    """The one run wrapper of a compiled loop in three pure phases, ``start(key, dyn) -> run``,
    ``advance(run, dyn, stop) -> run`` (steps up to ``stop``, traced, or the loop's end) and
    ``output(run, dyn) -> out``: each compiled once under ``(*cache_key, phase)``, the run donated
    to ``advance`` and to ``output``; all three compile on the first call under one compile notice
    (a chunk of no steps compiles ``advance``, so the first timed chunk measures steps only); then
    ``advance`` is driven in chunks (:func:`~ppinfer._talk.run_in_chunks`: progress bar, Ctrl-C
    between chunks, chunks sized from this loop's last pace). ``position(run) -> (steps done, finished)``;
    ``on_compile(keys)`` runs when a phase was just built (e.g. an eager dry run whose failure
    drops them). Returns ``output``'s result.

    With ``ended(run) -> bool[]`` (traced: the loop has run its last step) the three phases are
    compiled as ONE program, for a loop whose run and output are small (they are returned side by
    side, copied): ``start`` under a ``cond`` on a first-chunk flag (the first chunk's input run
    is zeros made on the host), then the chunk, then ``output`` under a ``cond`` on ``ended`` (zeros
    before the last chunk). A run that fits in one chunk is then one launch and one wait, as a
    hand-written ``jit`` loop, and a new program compiles one program instead of three."""
    arg_sig = _signature((key, dyn))
    zero_run = None if ended is None else _zero_run(cache_key, arg_sig, key, dyn, start)
    if zero_run is not None:
        # The first chunk's arguments are these zeros (fixed by the loop and ``arg_sig``), the key,
        # ``dyn`` and two scalars: ``arg_sig`` tells its compiled code (one signature per call).
        first_sig = None if arg_sig is None else ("first chunk", arg_sig)
        return _fused_run(cache_key, key, dyn, zero_run, first_sig, start, advance, output, ended,
                          position, total, desc, progress, on_compile)  # fmt: skip
    keys = tuple((*cache_key, phase) for phase in ("start", "advance", "output"))
    start_c, new_a = cached_jit(keys[0], lambda: start)
    advance_c, new_b = cached_jit(keys[1], lambda: advance, donate_argnums=(0,))
    # The run is donated to output too: its records become the output's arrays without a copy.
    output_c, new_c = cached_jit(keys[2], lambda: output, donate_argnums=(0,))
    if on_compile is not None and (new_a or new_b or new_c):
        on_compile(keys)
    # The run's types and placements are those ``start`` gives for ``(key, dyn)``: ``arg_sig``
    # tells the compiled code of every phase (one signature per call, not one per phase and chunk
    # over the run's many leaves).
    run_sig = _UNKNOWN if arg_sig is None else ("run", arg_sig)
    if not start_c.compiled_for(key, dyn, sig=arg_sig):
        with compile_notice(describe(cache_key)):
            run = advance_c(start_c(key, dyn, sig=arg_sig), dyn, np.int32(0), sig=run_sig)
            jax.block_until_ready(output_c(jax.tree.map(jax.numpy.copy, run), dyn, sig=run_sig))
    else:
        run = start_c.dispatch(key, dyn, sig=arg_sig)  # no wait: the first chunk queues behind it

    # Chunks are only dispatched: reading the position waits for one, and the last goes straight
    # to the output, which waits once for both (a short run is three dispatches and one wait).
    advance_to = lambda run, stop: advance_c.dispatch(run, dyn, np.int32(stop), sig=run_sig)
    finish = lambda run: output_c(run, dyn, sig=run_sig)
    wait_for = _released(position)
    return run_in_chunks(advance_to, wait_for, run, total, desc, progress, pace=cache_key, finish=finish)


def _released(fn: Callable) -> Callable:
    """``fn`` run with :data:`TRACE_LOCK` set aside (a wait for a chunk: other threads may trace)."""

    def call(*args: Any) -> Any:
        with TRACE_LOCK.released():
            return fn(*args)

    return call


_UNKNOWN = object()
"""Not given (a signature: :func:`_signature` computes it) or not found (a cache entry)."""


_ZERO_RUNS: OrderedDict = OrderedDict()
"""(cache key, argument signature) → the host zeros a fused loop's first chunk takes as its run
(``None``: too large to fuse)."""


FUSE_MAX_BYTES = 2 << 20
"""A loop whose run is larger than this keeps its three programs even with ``ended``: fused, the
output is copied beside the run (not donated to it), and the first chunk's zeros are copied in."""


def _zero_run(cache_key: tuple, arg_sig: Hashable | None, key: Any, dyn: Any, start: Callable) -> Any:
    """The host zeros shaped like ``start(key, dyn)`` (cached per loop and argument signature
    ``arg_sig``, that of ``(key, dyn)``), or ``None`` when the run is over :data:`FUSE_MAX_BYTES`
    or cannot be traced here (the three-phase path then reports the program's error)."""
    sig = (cache_key, arg_sig)
    with TRACE_LOCK:
        zero_run = _UNKNOWN if arg_sig is None else _ZERO_RUNS.get(sig, _UNKNOWN)
        if zero_run is not _UNKNOWN:
            _ZERO_RUNS.move_to_end(sig)
            return zero_run
        try:
            shapes = jax.eval_shape(start, key, dyn)
        except Exception:
            return None
        small = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes)) <= FUSE_MAX_BYTES
        zero_run = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes) if small else None
        if arg_sig is not None:
            _ZERO_RUNS[sig] = zero_run
            if len(_ZERO_RUNS) > _CACHE_SIZE:
                _ZERO_RUNS.popitem(last=False)
        return zero_run


def _fused_run(
    cache_key, key, dyn, zero_run, first_sig, start, advance, output, ended, position, total, desc, progress,
    on_compile,
):  # fmt: skip
    """:func:`chunked_run` with ``ended``: the three phases as one compiled program (see there)."""
    import jax.numpy as jnp

    def chunk(run, key, dyn, stop, first):
        # Cast to the host zeros' dtypes: both branches of the cond must have the same types, and
        # a weakly typed leaf of ``start`` would not.
        fresh = lambda _: jax.tree.map(lambda x, like: x.astype(like.dtype), start(key, dyn), run)
        run = advance(jax.lax.cond(first, fresh, lambda r: r, run), dyn, stop)
        shapes = jax.eval_shape(output, run, dyn)
        zeros = lambda _: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        return run, jax.lax.cond(ended(run), lambda r: output(r, dyn), zeros, run)

    fused_key = (*cache_key, "fused")
    chunk_c, new = cached_jit(fused_key, lambda: chunk, donate_argnums=(0,))
    if on_compile is not None and new:
        on_compile((fused_key,))

    def advance_to(carry: Any, stop: int) -> Any:
        """The chunk up to ``stop``; ``carry`` is ``(run, out)``, ``None`` before the first chunk."""
        if carry is None:
            return chunk_c.dispatch(zero_run, key, dyn, np.int32(stop), np.bool_(True), sig=first_sig)
        return chunk_c.dispatch(carry[0], key, dyn, np.int32(stop), np.bool_(False))

    carry = None
    if not chunk_c.compiled_for(zero_run, key, dyn, np.int32(0), np.bool_(True), sig=first_sig):
        with compile_notice(describe(cache_key)):  # a first chunk of no steps: compiles, times nothing
            carry = advance_to(None, 0)
    wait_for = _released(lambda carry: position(carry[0]))
    finish = _released(lambda carry: _ready(carry[1]))  # computed under the ``cond``: not an input
    return run_in_chunks(advance_to, wait_for, carry, total, desc, progress, pace=cache_key, finish=finish)


def _ready(out: Any) -> Any:
    """``out`` (the outputs of ONE dispatched executable, none of them an input passed through,
    which ``jit`` would return without running anything) once it has run: its buffers are ready
    together, so waiting for the first is waiting for all (no walk over every leaf)."""
    leaves = jax.tree.leaves(out)
    if leaves:
        leaves[0].block_until_ready()
    return out


def forget(key: Hashable) -> None:
    """Drop ``key`` from the cache (e.g. when the program failed its checks after compilation)."""
    with TRACE_LOCK:
        _CACHE.pop(key, None)


class _Jitted:
    """A jitted function that traces under :data:`TRACE_LOCK` and runs compiled code outside it."""

    def __init__(self, jitted: Callable, what: str = "a ppinfer program"):
        self._jitted = jitted
        self._compiled: set = set()
        self._what = what

    def __call__(self, *args: Any, sig: Any = _UNKNOWN) -> Any:
        """Run on ``args`` (waiting for the result). ``sig``: their signature if the caller knows
        it (a hashable that tells this function's compiled code apart; default
        :func:`_signature`)."""
        sig = _signature(args) if sig is _UNKNOWN else sig
        if sig is not None and sig in self._compiled:
            with TRACE_LOCK.released():
                return jax.block_until_ready(self._jitted(*args))
        with TRACE_LOCK, compile_notice(self._what), warnings.catch_warnings():  # the notice: _talk
            # A donated run whose small leaves (flags, counters) no output can reuse: nothing to tell.
            warnings.filterwarnings("ignore", "Some donated buffers were not usable", UserWarning)
            if sig is not None:
                # Compile first (jit reuses this executable for the call below) and refuse a run
                # whose buffers cannot fit before any of them is allocated.
                check_memory(self._jitted.lower(*args).compile())
            out = jax.block_until_ready(self._jitted(*args))
            if sig is not None:
                self._compiled.add(sig)
        return out

    def dispatch(self, *args: Any, sig: Any = _UNKNOWN) -> Any:
        """Like calling it, but code already compiled for ``args`` is only dispatched: the result
        may still be computing (a later call can take it as input without a wait in between)."""
        sig = _signature(args) if sig is _UNKNOWN else sig
        if sig is not None and sig in self._compiled:
            return self._jitted(*args)
        return self(*args, sig=sig)

    def compiled_for(self, *args: Any, sig: Any = _UNKNOWN) -> bool:
        """Whether a call on ``args`` runs code already compiled (no tracing, no compilation)."""
        sig = _signature(args) if sig is _UNKNOWN else sig
        return sig is not None and sig in self._compiled

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jitted, name)


class MemoryEstimateError(ConfigError):
    """A compiled run would need more memory than is available (raised before it allocates)."""

    def __init__(self, message: str, needed: int, available: int):
        super().__init__(message)
        self.needed, self.available = needed, available


def check_memory(compiled: Any) -> None:
    """Raise :class:`MemoryEstimateError` if ``compiled`` (a ``jax.stages.Compiled``) needs more
    memory for its temporaries and outputs — XLA's own buffer assignment, ``memory_analysis()`` —
    than the device has free (an accelerator's ``memory_stats()``: limit − in use; on CPU the host's
    ``MemAvailable``). Skipped when either figure is unknown, or with ``PPINFER_MEMORY_CHECK=0``."""
    if os.environ.get("PPINFER_MEMORY_CHECK", "1") == "0":
        return
    try:
        ma = compiled.memory_analysis()
        needed = int(ma.temp_size_in_bytes) + int(ma.output_size_in_bytes)
    except Exception:  # no analysis on this backend
        return
    available, where = available_memory()
    if available is None or needed <= available:
        return
    raise MemoryEstimateError(
        f"the compiled run needs an estimated {_gib(needed)} of memory (XLA's buffer assignment: "
        f"{_gib(ma.temp_size_in_bytes)} of temporaries, {_gib(ma.output_size_in_bytes)} of outputs) "
        f"but only {_gib(available)} is available on {where}: use fewer particles (or fewer steps, "
        "smaller data per particle); refused before allocating anything",
        needed,
        available,
    )


def available_memory() -> tuple[int | None, str]:
    """``(bytes free, where)`` on the default device: an accelerator's limit minus what is in use,
    or for the CPU backend the host's ``MemAvailable`` (``None`` when unknown)."""
    device = jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.device_kind}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "the host (CPU backend)"
    except OSError:
        pass
    return None, "the host"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def describe(key: Hashable) -> str:
    """A short human name for a cache key: its kind (first string) and the program's name."""
    parts = key if isinstance(key, tuple) else (key,)
    kind = next((p for p in parts if isinstance(p, str)), "program")
    kind = {"loop": "the SMC loop", "anneal": "tempered SMC", "ibis": "IBIS"}.get(kind, kind)
    for p in parts:
        if callable(p) or hasattr(p, "step"):
            fn = p if hasattr(p, "__name__") else getattr(p, "step", p)
            return f"{kind} of `{getattr(fn, '__name__', type(p).__name__)}`"
    return kind


def _signature(args: Any) -> Hashable | None:
    """What selects the compiled code for ``args`` (structure, dtypes, shapes, weak types,
    shardings), or ``None`` when it cannot be told without tracing (a tracer, an unknown leaf)."""
    leaves, treedef = jax.tree.flatten(args)
    sig: list = [treedef, bool(jax.config.jax_enable_x64)]
    for x in leaves:
        if isinstance(x, jax.core.Tracer):
            return None
        if isinstance(x, jax.Array):
            sig.append((x.shape, x.dtype, bool(getattr(x, "weak_type", False)), x.sharding))
        elif isinstance(x, np.ndarray | np.generic):
            sig.append((np.shape(x), x.dtype))
        elif type(x) in (bool, int, float, complex):
            sig.append(type(x))
        else:
            return None
    try:
        hash(tuple(sig))
    except TypeError:
        return None
    return tuple(sig)


def check_data(args: Any) -> None:
    """Raise :class:`DataError` if an argument is data ppinfer cannot use: a floating-point array
    or scalar containing NaN, complex numbers, an object array, or a pandas object."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(args)[0]:
        where = _Where(path)  # spelled out only in an error
        if type(leaf).__module__.split(".")[0] == "pandas":
            raise DataError(
                f"program argument {where} is a pandas {type(leaf).__name__}: pass its values as "
                "an array (e.g. df['y'].to_numpy() or jnp.asarray(series))"
            )
        if isinstance(leaf, complex | np.complexfloating):
            raise DataError(f"program argument {where} is a complex number: complex data is not supported")
        if isinstance(leaf, jax.core.Tracer) or not _is_dynamic_or_array(leaf):
            continue
        dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if dtype == np.object_:
            raise DataError(
                f"program argument {where} is an array of Python objects (dtype object): pass a "
                "numeric array (mixed types, strings or None in the data?)"
            )
        if dtype.kind == "c":
            raise DataError(
                f"program argument {where} has complex dtype {dtype}: complex data is not supported"
            )
        # bfloat16 and the other ml_dtypes floats are kind "V" to NumPy: floats by JAX's reckoning.
        if dtype.kind != "f" and not (dtype.kind == "V" and jax.numpy.issubdtype(dtype, jax.numpy.floating)):
            continue  # ints and bools hold no NaN; strings and bytes are static values
        arr = np.asarray(leaf)
        if np.isnan(arr if dtype.kind == "f" else arr.astype(np.float32)).any():
            raise DataError(
                f"program argument {where} contains NaN: for missing data, put any value of the "
                "support there (jnp.where(observed, y, 0.0)) and leave those entries out with "
                "fn.mask(observed); NaN data would make every weight NaN"
            )


class _Where:
    """An argument's path, as ``keystr`` spells it, computed only when formatted."""

    def __init__(self, path: Any):
        self.path = path

    def __format__(self, spec: str) -> str:
        return format(jax.tree_util.keystr(self.path) or "argument", spec)


def _is_dynamic_or_array(x: Any) -> bool:
    return _is_dynamic(x) or isinstance(x, np.ndarray | np.generic)


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | float | np.floating)


class _ById:
    """Hash an unhashable static value by identity (and keep it alive while cached)."""

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ById) and other.value is self.value


def _hashable(x: Any) -> Hashable:
    """The cache key of a static value: its type and value (``True``, ``1`` and ``np.uint8(1)`` are
    equal but trace differently), or its identity if it is unhashable."""
    try:
        hash(x)
    except TypeError:
        return _ById(x)
    return (type(x), x)
