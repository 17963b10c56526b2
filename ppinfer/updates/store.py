"""Saving and loading an IBIS posterior without pickle: one safetensors file.

The file holds the arrays of the :class:`~ppinfer.updates.IBISState` (particles, log weights, key,
the data so far: the history's first ``t`` batches or the running statistics) and the per-update
histories, and, in the safetensors metadata, a JSON header: the format version, the program's
identity (:func:`program_identity`, including the user's ``version`` string), the IBIS settings, the
step count, the structure of the data and a SHA-256 of every array's bytes.

Resuming is exact: the arrays round-trip bit for bit and the history buffer is rebuilt at the
capacity the uninterrupted run had (:func:`~ppinfer.updates.ibis.capacity_for`), so the next
update runs the same compiled code on the same inputs. :func:`save` writes a temporary file and
renames it, so a process killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer.errors import CheckpointError
from ppinfer.updates.ibis import IBIS, IBISState, Posterior, _grow, capacity_for

__all__ = ["save", "load", "program_identity", "FORMAT"]

FORMAT = "ppinfer.updates.ibis/1"
_HISTORY = ("ess", "resampled", "log_evidence_history", "acceptance_rate")


def save(posterior: Posterior, path: str | os.PathLike) -> None:
    """Write ``posterior`` to ``path`` (safetensors + JSON metadata; atomic rename)."""
    from safetensors.numpy import save_file

    state, cfg = posterior.ibis, posterior.config
    step = int(state.step)
    data = state.data
    if cfg.sufficient_statistics is None and data is not None:
        data = jax.tree.map(lambda b: b[:step], data)
    leaves, treedef = jax.tree.flatten(data)
    arrays = {
        "particles": state.particles,
        "log_weights": state.log_weights,
        "key": state.key,
        **{f"data/{i}": leaf for i, leaf in enumerate(leaves)},
        "history/ess": posterior.ess,
        "history/resampled": posterior.resampled,
        "history/log_evidence_history": posterior.log_evidence_history,
        "history/acceptance_rate": posterior.extras["acceptance_rate"],
        "history/stages": posterior.extras["stages"],
    }
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}
    header = {
        "format": FORMAT,
        "program": program_identity(posterior.program, cfg.version),
        "config": _config_json(cfg),
        "step": step,
        "data_structure": _structure(data),
        "checksum": _checksum(arrays),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata={"ppinfer": json.dumps(header)})
    os.replace(tmp, path)


def load(path: str | os.PathLike, program: Any, algorithm: IBIS | None = None) -> Posterior:
    """Read a posterior saved by :func:`save` for ``program``.

    ``algorithm``: the :class:`~ppinfer.updates.IBIS` settings; required when the saved run used
    ``sufficient_statistics`` (a function cannot be stored), checked against the saved settings
    otherwise. Raises :class:`~ppinfer.errors.CheckpointError` if the file is missing, truncated or
    corrupt, was written for another program (identity or version), or with other settings."""
    header, arrays = _read(Path(path))
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {header.get('format')!r}, expected {FORMAT!r}")
    if _checksum(arrays) != header.get("checksum"):
        raise CheckpointError(f"{path}: the arrays do not match their checksum (corrupt file)")
    saved_cfg = dict(header["config"])
    # Files written before adaptive tempering existed ran plain IBIS.
    saved_cfg.setdefault("tempering_ess", None)
    saved_cfg.setdefault("max_stages", IBIS.max_stages)
    if algorithm is None:
        if saved_cfg["sufficient_statistics"] is not None:
            raise CheckpointError(
                f"{path} was saved with sufficient_statistics: pass algorithm=IBIS(...) to load it"
            )
        skip = ("sufficient_statistics", "combine")
        algorithm = IBIS(**{k: v for k, v in saved_cfg.items() if k not in skip})
    if _config_json(algorithm) != saved_cfg:
        given = _config_json(algorithm)
        raise CheckpointError(f"{path}: saved with settings {saved_cfg}, loading with {given}")
    identity = program_identity(program, algorithm.version)
    if identity != header["program"]:
        raise CheckpointError(
            f"{path} holds a posterior of program {header['program']!r}, not of {identity!r}"
        )
    step = int(header["step"])
    leaves = [jnp.asarray(arrays[f"data/{i}"]) for i in range(_num_leaves(header["data_structure"]))]
    data = _unflatten(header["data_structure"], iter(leaves))
    if algorithm.sufficient_statistics is None and data is not None:
        data = _grow(data, capacity_for(step))
    state = IBISState(
        particles=jnp.asarray(arrays["particles"]),
        log_weights=jnp.asarray(arrays["log_weights"]),
        key=jnp.asarray(arrays["key"]),
        step=jnp.asarray(step, jnp.int32),
        data=data,
    )
    history = {k: arrays[f"history/{k}"] for k in _HISTORY}
    history["stages"] = arrays.get("history/stages", np.ones(step, np.int32))
    return Posterior.from_state(program, algorithm, state, history)


def program_identity(program: Any, version: str = "") -> str:
    """A stable string naming ``program``: ``module.qualname@version#hash``, the hash over its
    bytecode, constants and closure values (numbers, strings, arrays; nested functions recursively),
    so ``beta_bernoulli(1, 1)`` and ``beta_bernoulli(2, 2)`` differ. Stable across processes."""
    name = f"{getattr(program, '__module__', '?')}.{getattr(program, '__qualname__', type(program).__name__)}"
    h = hashlib.sha256()
    _hash_value(h, program, depth=0)
    return f"{name}@{version}#{h.hexdigest()[:16]}"


def _hash_value(h, value: Any, depth: int) -> None:
    if depth > 4:
        h.update(b"<deep>")
    elif isinstance(value, types.FunctionType):
        code = value.__code__
        h.update(code.co_code)
        for c in code.co_consts:
            _hash_value(h, c, depth + 1)
        for cell in value.__closure__ or ():
            try:
                _hash_value(h, cell.cell_contents, depth + 1)
            except ValueError:
                h.update(b"<empty cell>")
    elif isinstance(value, types.CodeType):
        h.update(value.co_code)
    elif isinstance(value, bool | int | float | str | bytes | type(None)):
        h.update(repr(value).encode())
    elif isinstance(value, tuple | list):
        for v in value:
            _hash_value(h, v, depth + 1)
    elif isinstance(value, np.ndarray | jax.Array | np.generic):
        arr = np.asarray(value)
        h.update(f"{arr.dtype}{arr.shape}".encode() + arr.tobytes())
    else:
        h.update(type(value).__qualname__.encode())


def _read(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"no saved posterior at {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        header = json.loads(meta["ppinfer"])
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own types for truncated or garbled files
        raise CheckpointError(f"{path} is not a readable saved posterior ({type(e).__name__}: {e})") from e
    return header, arrays


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype}:{a.shape};".encode() + a.tobytes())
    return h.hexdigest()


def _config_json(cfg: IBIS) -> dict:
    stats = cfg.sufficient_statistics
    return {
        "num_particles": int(cfg.num_particles),
        "num_moves": int(cfg.num_moves),
        "ess_threshold": float(cfg.ess_threshold),
        "sufficient_statistics": None if stats is None else program_identity(stats),
        "combine": None if cfg.combine is None else program_identity(cfg.combine),
        "version": cfg.version,
        "tempering_ess": None if cfg.tempering_ess is None else float(cfg.tempering_ess),
        "max_stages": int(cfg.max_stages),
    }


def _structure(tree: Any) -> Any:
    """JSON description of a pytree of arrays (tuples, lists, dicts with string keys, None)."""
    if tree is None:
        return None
    if isinstance(tree, tuple | list):
        return {"seq": type(tree).__name__, "items": [_structure(t) for t in tree]}
    if isinstance(tree, dict):
        return {"dict": {str(k): _structure(tree[k]) for k in sorted(tree)}}
    if isinstance(tree, np.ndarray | jax.Array | np.generic):
        return "leaf"
    raise CheckpointError(f"cannot save data of type {type(tree).__name__} (use arrays, tuples, dicts)")


def _num_leaves(s: Any) -> int:
    if s is None:
        return 0
    if s == "leaf":
        return 1
    if "seq" in s:
        return sum(_num_leaves(t) for t in s["items"])
    return sum(_num_leaves(v) for v in s["dict"].values())


def _unflatten(s: Any, leaves) -> Any:
    if s is None:
        return None
    if s == "leaf":
        return next(leaves)
    if "seq" in s:
        items = [_unflatten(t, leaves) for t in s["items"]]
        return tuple(items) if s["seq"] == "tuple" else items
    return {k: _unflatten(v, leaves) for k, v in s["dict"].items()}
