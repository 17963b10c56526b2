"""Runs that talk: the compile notice, progress bars and the verbosity switch.

- **Compile notice.** :func:`compile_notice` wraps a call that may compile. The time JAX spends
  tracing, lowering and compiling inside it (JAX's own monitoring events, so execution is not
  counted) is logged at ``INFO`` on the ``ppinfer`` logger; when it exceeds
  :data:`NOTICE_AFTER_S` seconds it is also printed as one line on stderr (unless quiet, below, or
  the ``ppinfer`` logger already shows ``INFO`` records). A first call still running after
  :data:`NOTICE_AFTER_S` seconds prints ``compiling …`` at once, so a long compilation is not
  silent.
- **Progress bars.** :func:`progress_bar` is a tqdm bar on stderr, shown only when stderr is a
  terminal and the run is not quiet (``progress=True`` forces it, ``False`` turns it off). Bars
  are updated between compiled chunks of a run; they never touch the random stream.
- **Ctrl-C.** :func:`interruptible` turns SIGINT into a flag that a chunked run checks between
  its chunks, so the interrupt lands there as ``KeyboardInterrupt`` (and is never raised, and
  lost, inside a finaliser that happened to run when the signal arrived).
- **Quiet.** ``PPINFER_QUIET=1`` in the environment, or :func:`set_verbosity` (``0`` quiet,
  ``1`` default), turns the stderr notices and the automatic bars off.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

__all__ = [
    "set_verbosity",
    "verbose",
    "compile_notice",
    "progress_bar",
    "interruptible",
    "next_chunk",
    "run_in_chunks",
    "NOTICE_AFTER_S",
    "logger",
]

logger = logging.getLogger("ppinfer")

NOTICE_AFTER_S = 1.0
"""Compilations longer than this (seconds) are announced on stderr."""

CHUNK_SECONDS = 0.25
"""Target duration of one compiled chunk of a long run (MCMC transitions, VI steps, SMC steps): a
progress bar moves, and Ctrl-C lands, between chunks."""

_VERBOSITY: int | None = None


def set_verbosity(level: int | bool) -> None:
    """``0``/``False``: no compile notices on stderr and no automatic progress bars; ``1``/``True``:
    the default (notices for compilations over a second, bars on a terminal). Overrides
    ``PPINFER_QUIET``. The ``ppinfer`` logger gets the notices at ``INFO`` either way."""
    from ppinfer.errors import ConfigError

    if isinstance(level, bool):
        level = int(level)
    if not isinstance(level, int) or level not in (0, 1):
        raise ConfigError(f"set_verbosity takes 0 (quiet) or 1 (default), got {level!r}")
    global _VERBOSITY
    _VERBOSITY = level


def verbose() -> bool:
    """Whether notices go to stderr: :func:`set_verbosity`, else not ``PPINFER_QUIET=1``."""
    if _VERBOSITY is not None:
        return _VERBOSITY > 0
    return os.environ.get("PPINFER_QUIET", "").lower() not in ("1", "true", "yes", "on")


# JAX reports the time each compilation phase took through its monitoring events; the listener adds
# them to the innermost active notice of the calling thread (compilation runs in the caller's thread).
_PHASES = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "xla",
}
_LOCAL = threading.local()
_LISTENING = False


def _listener(event: str, duration: float, **_: Any) -> None:
    phase = _PHASES.get(event)
    stack = getattr(_LOCAL, "stack", None)
    if phase is not None and stack:
        stack[-1][phase] = stack[-1].get(phase, 0.0) + float(duration)


def _cache_hit_listener(event: str, **_: Any) -> None:
    stack = getattr(_LOCAL, "stack", None)
    if event == "/jax/compilation_cache/cache_hits" and stack:
        stack[-1]["cache_hits"] = stack[-1].get("cache_hits", 0) + 1


def _listen() -> None:
    global _LISTENING
    if not _LISTENING:
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(_listener)
        monitoring.register_event_listener(_cache_hit_listener)
        _LISTENING = True


def _to_stderr() -> bool:
    # Not twice: a user whose logging already shows ppinfer's INFO records sees the notice there.
    return verbose() and not (logger.isEnabledFor(logging.INFO) and logger.hasHandlers())


@contextmanager
def compile_notice(what: str) -> Iterator[dict]:
    """Time the compilation inside the block (see the module docstring); yields the dict of phase
    times (``trace``, ``lower``, ``xla`` seconds, ``cache_hits``) filled as the block runs. A
    notice inside another (in the same thread) adds its times to the outer one and prints nothing."""
    _listen()
    stack = _LOCAL.__dict__.setdefault("stack", [])
    if stack:  # inside another notice (a run of several compiled parts): that one reports it all
        yield stack[-1]
        return
    record: dict = {}
    stack.append(record)
    announced = threading.Event()

    def announce() -> None:
        announced.set()
        print(f"ppinfer: compiling {what} (first call with these shapes; later calls reuse it)…",
              file=sys.stderr, flush=True)  # fmt: skip

    timer = threading.Timer(NOTICE_AFTER_S, announce) if _to_stderr() else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        if timer is not None:
            timer.cancel()
        stack.pop()
        total = time.perf_counter() - t0
        compile_s = sum(record.get(k, 0.0) for k in ("trace", "lower", "xla"))
        if compile_s > 0 or announced.is_set():
            hits = record.get("cache_hits", 0)
            cached = f", {hits} program(s) loaded from the persistent cache" if hits else ""
            msg = (
                f"compiled {what} in {compile_s:.1f} s (tracing {record.get('trace', 0.0):.1f} s, "
                f"XLA {record.get('xla', 0.0):.1f} s{cached}); first call {total:.1f} s in all"
            )
            logger.info(msg)
            if (compile_s > NOTICE_AFTER_S or announced.is_set()) and _to_stderr():
                print(f"ppinfer: {msg}", file=sys.stderr, flush=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def show_progress(progress: bool | None) -> bool:
    """Whether to show a bar: ``progress`` if given, else when stderr is a terminal and not quiet."""
    if progress is not None:
        return bool(progress)
    isatty = getattr(sys.stderr, "isatty", None)
    return verbose() and bool(isatty and isatty())


@contextmanager
def progress_bar(total: int, desc: str, progress: bool | None) -> Iterator[Any]:
    """A tqdm bar of ``total`` units on stderr (a no-op bar when :func:`show_progress` says no);
    closed when the block ends, also by an exception (e.g. ``KeyboardInterrupt``)."""
    if not show_progress(progress):
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=True, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


class interruptible:  # noqa: N801 (a context manager used like a function)
    """For a run driven in compiled chunks: ``with interruptible() as check:`` gives ``check()``,
    which raises ``KeyboardInterrupt`` if Ctrl-C (SIGINT) came since the block began. While the
    block runs, SIGINT only sets a flag (a second one raises at once). Python's default handler
    raises wherever the main thread next runs bytecode — possibly inside a finaliser (``__del__``,
    a weakref callback: JAX runs many), where the exception is printed as "ignored" and the run
    goes on. Outside the main thread, or when the program has its own SIGINT handler, ``check``
    does nothing and the handler stays. (A class, not a generator: a short run enters it on every
    call.)"""

    __slots__ = ("_hits", "_previous")

    def __enter__(self) -> Callable[[], None]:
        self._hits, self._previous = [], None
        if (
            threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            return _no_check
        self._previous = signal.signal(signal.SIGINT, self._flag)
        return self._check

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            if exc[0] is None:
                self._check()  # a signal after the last check still interrupts

    def _flag(self, signum: int, frame: Any) -> None:
        self._hits.append(signum)
        if len(self._hits) > 1:  # pressed again: the user insists
            raise KeyboardInterrupt

    def _check(self) -> None:
        if self._hits:
            raise KeyboardInterrupt


def _no_check() -> None:
    pass


FIRST_CHUNK = 8
"""Steps in the first chunk of :func:`run_in_chunks` (before a chunk has been timed)."""

BAR_AFTER_S = 1.0
"""A chunked run shows its automatic progress bar only when it is expected to last longer."""


def next_chunk(length: int, seconds: float) -> int:
    """The length of the chunk after one of ``length`` steps that took ``seconds``: about
    :data:`CHUNK_SECONDS`, growing at most 8-fold. In a multi-process run (``jax.distributed``)
    the timing is ignored and chunks grow 8-fold: every process must run the same chunks, since
    each compiled chunk meets the other processes in its collectives (timed chunks differ between
    processes and deadlock them)."""
    import jax

    if jax.process_count() > 1:
        return 8 * length
    per_step = seconds / max(length, 1)
    return int(min(8 * length, max(1, CHUNK_SECONDS / max(per_step, 1e-9))))


_PACE: dict = {}
"""Seconds per step of the last chunked run of each compiled loop, by ``hash`` of its ``pace`` key
(hashed once per run; two keys of one hash would only size each other's chunks): a later run
sizes its first chunk from it (a short run then takes one chunk)."""

_PACE_SIZE = 512
_PACE_LOCK = threading.Lock()


def run_in_chunks(
    advance: Callable[[Any, int], Any],
    position: Callable[[Any], tuple[int, bool]],
    carry: Any,
    total: int,
    desc: str,
    progress: bool | None,
    pace: Any = None,
    finish: Callable[[Any], Any] | None = None,
) -> Any:
    """Drive a compiled loop of at most ``total`` steps in chunks from Python and return its final
    carry. ``advance(carry, stop)`` runs the steps up to ``stop`` (fewer if the loop ends first;
    ``stop`` should be traced, so one compilation serves every chunk); ``position(carry)`` reads
    ``(steps done, finished)`` back (waiting for the chunk). Chunks are sized to last about
    :data:`CHUNK_SECONDS` (:func:`next_chunk`). The first has :data:`FIRST_CHUNK` steps, or, when
    an earlier run of the same loop (the hashable ``pace`` key) was timed, as many as fit in
    :data:`CHUNK_SECONDS` at its pace: a short run is then one compiled call. Between chunks a bar
    moves (``progress``; ``None``: on a terminal, for a run expected to last over
    :data:`BAR_AFTER_S`) and Ctrl-C lands as ``KeyboardInterrupt`` (:func:`interruptible`),
    discarding the run.

    With ``finish(carry) -> out`` the result is ``finish``'s, and the chunk that reaches ``total``
    goes to ``finish`` without its position being read: the loop has ended there whatever it says
    (``advance`` may then only dispatch its work, and ``finish`` wait once for both)."""
    import jax

    pace = None if pace is None else hash(pace)
    known = _PACE.get(pace) if pace is not None and jax.process_count() == 1 else None
    length = FIRST_CHUNK if known is None else max(1, int(CHUNK_SECONDS / max(known, 1e-9)))
    with interruptible() as interrupted, ExitStack() as stack:  # the stack: a bar, if one is shown
        bar, done = None, 0
        while done < total:
            t0 = time.perf_counter()
            stop = min(total, done + length)
            carry = advance(carry, stop)
            if finish is not None and stop == total:
                carry, finish = finish(carry), None  # the last chunk: one wait for it and the output
                steps, finished = total, True  # at most: a loop may end early (pace errs fast)
            else:
                steps, finished = position(carry)
            seconds = time.perf_counter() - t0
            interrupted()  # the chunk has run: Ctrl-C lands here
            ran, done = steps - done, steps
            per_step = seconds / max(ran, 1)
            if pace is not None and ran:
                with _PACE_LOCK:  # two threads' runs may finish at once
                    _PACE.pop(pace, None)
                    _PACE[pace] = per_step
                    if len(_PACE) > _PACE_SIZE:
                        _PACE.pop(next(iter(_PACE)))
            if bar is None and (progress or (progress is None and per_step * total > BAR_AFTER_S)):
                bar = stack.enter_context(progress_bar(total, desc, progress))
                bar.update(done - ran)
            if bar is not None:
                bar.update(ran if not finished else total - done + ran)
            if finished:
                break
            length = next_chunk(length, per_step * length)
    return carry if finish is None else finish(carry)  # a loop that ended before ``total``
