"""JAX's persistent compilation cache, on by default: a program compiled once is loaded from disk
by the next process instead of being compiled again (a token-level SMC program or NUTS takes tens of
seconds to compile on CPU).

The cache lives in ``$PPINFER_CACHE_DIR`` or ``$XDG_CACHE_HOME/ppinfer/jax`` (``~/.cache/ppinfer/jax``).
Opt out with ``PPINFER_COMPILATION_CACHE=0``. A cache folder the user has already configured for JAX
(``jax_compilation_cache_dir``) is left as it is. JAX keys each entry by the program, the JAX/XLA
version and the device, so a stale entry is never used.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["enable_persistent_cache", "cache_dir"]


def cache_dir() -> Path:
    """The folder ppinfer points JAX's persistent compilation cache at."""
    if os.environ.get("PPINFER_CACHE_DIR"):
        return Path(os.environ["PPINFER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ppinfer" / "jax"


def enable_persistent_cache() -> str | None:
    """Point JAX's persistent compilation cache at :func:`cache_dir` (unless opted out or already
    configured) and cache every compilation, however short: the eager one-particle dry run before
    a new program's first run compiles each op it meets (~150 programs of ~20 ms for a token
    program), which a new process would otherwise compile again (``bench_first_call``: a warm
    process's first regex-constrained SMC call 4.2 s → 1.6 s; the entries add ~0.6 MB). Returns
    the folder, or ``None`` when it is off or cannot be created."""
    setting = os.environ.get("PPINFER_COMPILATION_CACHE", "1").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return None
    if setting not in ("", "1", "true", "yes", "on"):
        import warnings

        warnings.warn(
            f"PPINFER_COMPILATION_CACHE={setting!r} is not one of 1/0, true/false, yes/no, on/off: "
            "the persistent compilation cache stays on",
            stacklevel=2,
        )
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile every time, as without the cache
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return str(folder)
