"""Saving and loading an IBIS posterior without pickle: one safetensors file.

The file holds the arrays of the :class:`~ppinfer.updates.IBISState` (particles, log weights, key,
the data so far: the history's first ``t`` batches or the running statistics) and the per-update
histories, and, in the safetensors metadata, a JSON header: the format version, the program's
identity (:func:`program_identity`, including the user's ``version`` string), the IBIS settings, the
step count, the structure of the data and a SHA-256 of the header and every array's bytes.

Trust: the SHA-256 detects accidental damage (a truncated, bit-flipped or hand-edited file); anyone
who can write the file can also recompute it, so it does not prove where a file came from. For
files that cross a trust boundary pass ``key=`` (bytes) to :func:`save` and :func:`load`: the
header then carries an HMAC-SHA256 of the same content under that key, and :func:`load` refuses a
file whose signature is missing or does not verify. Loading never runs code (no pickle) either way.

Resuming is exact: the arrays round-trip bit for bit and the history buffer is rebuilt at the
capacity the uninterrupted run had (:func:`~ppinfer.updates.ibis.capacity_for`), so the next
update runs the same compiled code on the same inputs. :func:`save` writes a temporary file and
renames it, so a process killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import os
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ppinfer.errors import CheckpointError, ConfigError
from ppinfer.updates.ibis import IBIS, IBISState, Posterior, _grow, capacity_for

__all__ = ["save", "load", "program_identity", "FORMAT"]

FORMAT = "ppinfer.updates.ibis/2"
_LEGACY_FORMAT = "ppinfer.updates.ibis/1"  # its checksum covered the arrays only
_UNSIGNED = ("checksum", "signature")  # the header fields that the checksum does not cover
_HISTORY = ("ess", "resampled", "log_evidence_history", "acceptance_rate")


def save(posterior: Posterior, path: str | os.PathLike, key: bytes | None = None) -> None:
    """Write ``posterior`` to ``path`` (safetensors + JSON metadata; atomic rename).

    ``key``: optional secret bytes; the file is then signed (HMAC-SHA256 of its header and arrays)
    and :func:`load` with the same key verifies it. Raises :class:`~ppinfer.errors.CheckpointError`
    if the folder of ``path`` does not exist or cannot be written."""
    from safetensors.numpy import save_file

    if not isinstance(posterior, Posterior):
        raise ConfigError(
            f"save() takes the Posterior of an IBIS run (pp.infer(..., algorithm=pp.IBIS(...))), "
            f"got {type(posterior).__name__}"
        )
    _check_key(key)
    if not isinstance(path, str | os.PathLike):
        raise CheckpointError(f"save needs a path to write to (a str or path), got {path!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save to {path}: the folder {path.parent} does not exist")

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
    }
    header["checksum"] = _checksum(arrays, header)
    if key is not None:
        header["signature"] = _signature(arrays, header, key)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(arrays, str(tmp), metadata={"ppinfer": json.dumps(header)})
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"cannot save to {path}: {e}") from e


def load(
    path: str | os.PathLike, program: Any, algorithm: IBIS | None = None, key: bytes | None = None
) -> Posterior:
    """Read a posterior saved by :func:`save` for ``program``.

    ``algorithm``: the :class:`~ppinfer.updates.IBIS` settings; required when the saved run used
    ``sufficient_statistics`` (a function cannot be stored), checked against the saved settings
    otherwise. ``key``: the secret the file was signed with (see :func:`save`); with a key, an
    unsigned file or a wrong signature is refused. Raises :class:`~ppinfer.errors.CheckpointError`
    if the file is missing, truncated or corrupt, its header is malformed or disagrees with its
    arrays, it was written for another program (identity or version), or with other settings."""
    _check_key(key)
    if not isinstance(path, str | os.PathLike):
        raise CheckpointError(f"load needs the path of a saved posterior (a str or path), got {path!r}")
    header, arrays = _read(Path(path))
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed header (a {type(header).__name__}, not an object)")
    fmt = header.get("format")
    if fmt not in (FORMAT, _LEGACY_FORMAT):
        raise CheckpointError(f"{path}: unknown format {fmt!r}, expected {FORMAT!r}")
    covered = header if fmt == FORMAT else None
    if _checksum(arrays, covered) != header.get("checksum"):
        raise CheckpointError(
            f"{path}: the header and arrays do not match their checksum (corrupt or edited file)"
        )
    if key is not None:
        signature = header.get("signature")
        if fmt != FORMAT or not isinstance(signature, str):
            raise CheckpointError(f"{path} is not signed, but a key was given: refusing to load it")
        if not hmac.compare_digest(signature, _signature(arrays, header, key)):
            raise CheckpointError(f"{path}: the signature does not verify with this key")
    try:
        return _load_checked(path, header, arrays, program, algorithm)
    except CheckpointError:
        raise
    except ConfigError as e:
        raise CheckpointError(f"{path}: the saved settings are invalid: {e}") from e
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, StopIteration, RecursionError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path}: malformed header ({what})") from e


def _load_checked(path, header: dict, arrays: dict, program: Any, algorithm: IBIS | None) -> Posterior:
    saved_cfg = header["config"]
    if not isinstance(saved_cfg, dict):
        raise CheckpointError(f"{path}: malformed header: config is a {type(saved_cfg).__name__}")
    saved_cfg = dict(saved_cfg)
    # Files written before adaptive tempering existed ran plain IBIS.
    saved_cfg.setdefault("tempering_ess", None)
    saved_cfg.setdefault("max_stages", IBIS.max_stages)
    known = set(_config_json(IBIS()))
    missing, unknown = sorted(known - set(saved_cfg)), sorted(set(saved_cfg) - known)
    if missing or unknown:
        raise CheckpointError(f"{path}: malformed header: config keys missing {missing}, unknown {unknown}")
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
    step = header["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: malformed header: step must be an integer >= 0, got {step!r}")
    n_leaves = _num_leaves(header["data_structure"])
    names = {"particles", "log_weights", "key", *(f"data/{i}" for i in range(n_leaves))}
    names |= {f"history/{k}" for k in _HISTORY}
    absent = sorted(names - set(arrays))
    if absent:
        raise CheckpointError(f"{path}: arrays {absent} are missing")
    _check_shapes(path, arrays, step, n_leaves, algorithm)
    leaves = [jnp.asarray(arrays[f"data/{i}"]) for i in range(n_leaves)]
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


def _check_shapes(path, arrays: dict, step: int, n_leaves: int, algorithm: IBIS) -> None:
    """The arrays agree with the header: ``step`` entries of history (and of saved batches), one
    particle per weight, ``num_particles`` of them, a raw two-word key."""
    n = algorithm.num_particles
    lw, particles, key = arrays["log_weights"], arrays["particles"], arrays["key"]
    if lw.shape != (n,) or particles.ndim < 1 or particles.shape[0] != n:
        raise CheckpointError(
            f"{path}: the arrays do not match the header: {n} particles expected, got log_weights "
            f"{lw.shape} and particles {particles.shape}"
        )
    if key.shape != (2,) or key.dtype != np.uint32:
        raise CheckpointError(
            f"{path}: the saved random key must be uint32[2], got {key.dtype}{list(key.shape)}"
        )
    lengths = {k: arrays[f"history/{k}"].shape[:1] for k in (*_HISTORY, "stages") if f"history/{k}" in arrays}
    if algorithm.sufficient_statistics is None:
        lengths.update({f"data/{i}": arrays[f"data/{i}"].shape[:1] for i in range(n_leaves)})
    wrong = {k: v for k, v in lengths.items() if v != (step,)}
    if wrong:
        raise CheckpointError(
            f"{path}: the header says step {step}, but these arrays have another length: "
            + ", ".join(f"{k} {list(v)}" for k, v in sorted(wrong.items()))
        )


def _check_key(key: Any) -> None:
    if key is not None and not isinstance(key, bytes | bytearray):
        raise ConfigError(f"key must be bytes (a secret for the HMAC signature), got {type(key).__name__}")
    if key is not None and len(key) == 0:
        raise ConfigError("key must not be empty")


def program_identity(program: Any, version: str = "") -> str:
    """A stable string naming ``program``: ``module.qualname@version#hash``, the hash over its
    bytecode, the names it reads, its constants, closure values and the module globals it reads
    (numbers, strings, arrays, dicts, ``functools.partial`` arguments, a distribution's parameters;
    functions recursively), so ``beta_bernoulli(1, 1)`` and ``beta_bernoulli(2, 2)`` differ, and so
    do a model with ``Normal`` and one with ``Laplace``. Stable across processes."""
    name = f"{getattr(program, '__module__', '?')}.{getattr(program, '__qualname__', type(program).__name__)}"
    h = hashlib.sha256()
    _hash_value(h, program, depth=0)
    return f"{name}@{version}#{h.hexdigest()[:16]}"


def _hash_value(h, value: Any, depth: int) -> None:
    """Feed ``value`` into ``h``: what it computes with, stably across processes (never an ``id``)."""
    if depth > 6:
        h.update(b"<deep>")
    elif isinstance(value, types.FunctionType):
        code = value.__code__
        h.update(code.co_code + repr(code.co_names).encode())
        for c in code.co_consts:
            _hash_value(h, c, depth + 1)
        for cell in value.__closure__ or ():
            try:
                _hash_value(h, cell.cell_contents, depth + 1)
            except ValueError:
                h.update(b"<empty cell>")
        # The module globals it reads (a constant, a helper function, a distribution object).
        for name in code.co_names:
            if name in value.__globals__:
                h.update(name.encode())
                _hash_value(h, value.__globals__[name], depth + 1)
    elif isinstance(value, types.CodeType):
        h.update(value.co_code + repr(value.co_names).encode())
        for c in value.co_consts:
            _hash_value(h, c, depth + 1)
    elif isinstance(value, bool | int | float | complex | str | bytes | type(None)):
        h.update(repr(value).encode())
    elif isinstance(value, tuple | list):
        h.update(b"(")
        for v in value:
            _hash_value(h, v, depth + 1)
        h.update(b")")
    elif isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value, key=repr):
            _hash_value(h, k, depth + 1)
            _hash_value(h, value[k], depth + 1)
        h.update(b"}")
    elif isinstance(value, np.ndarray | jax.Array | np.generic):
        arr = np.asarray(value)
        # A large array (a language model's weights read as a global) by 2^20 evenly spaced entries.
        step = -(-arr.size // (1 << 20)) if arr.size > (1 << 20) else 1
        h.update(f"{arr.dtype}{arr.shape}".encode() + np.ascontiguousarray(arr.ravel()[::step]).tobytes())
    elif isinstance(value, functools.partial):
        h.update(b"partial")
        for part in (value.func, value.args, value.keywords):
            _hash_value(h, part, depth + 1)
    elif type(value).__name__ == "_KeywordProgram":  # infer(program, y=...): the program itself
        h.update(repr(value.names).encode())
        _hash_value(h, value.program, depth + 1)
    elif isinstance(value, types.ModuleType | type):
        h.update(getattr(value, "__name__", "").encode())  # by name: a library, a class
    else:
        h.update(type(value).__qualname__.encode())
        _hash_object_state(h, value, depth)


def _hash_object_state(h, value: Any, depth: int) -> None:
    """An object's parameters: a pytree's leaves (a NumPyro distribution, a NamedTuple), else a
    dataclass's fields (e.g. a sequential program's init and step), else nothing."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            h.update(f.name.encode())
            _hash_value(h, getattr(value, f.name), depth + 1)
        return
    try:
        leaves = jax.tree.leaves(value)
    except Exception:  # not a pytree JAX can walk
        return
    if leaves and not (len(leaves) == 1 and leaves[0] is value):
        _hash_value(h, leaves, depth + 1)


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


def _digest(h: Any, arrays: dict[str, np.ndarray], header: dict | None) -> str:
    if header is not None:
        covered = {k: v for k, v in header.items() if k not in _UNSIGNED}
        h.update(json.dumps(covered, sort_keys=True).encode() + b"\n")
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype}:{a.shape};".encode() + a.tobytes())
    return h.hexdigest()


def _checksum(arrays: dict[str, np.ndarray], header: dict | None = None) -> str:
    """SHA-256 of the header (all but its checksum and signature; format 1: none of it) and every
    array's name, dtype, shape and bytes."""
    return _digest(hashlib.sha256(), arrays, header)


def _signature(arrays: dict[str, np.ndarray], header: dict, key: bytes) -> str:
    """HMAC-SHA256 under ``key`` of what :func:`_checksum` covers."""
    return _digest(hmac.new(bytes(key), digestmod=hashlib.sha256), arrays, header)


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
