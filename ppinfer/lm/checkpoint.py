"""Read Hugging Face checkpoint folders (``config.json`` + safetensors) into transformer params.

Only safetensors are read, with a small parser of the format (an 8-byte header length, a JSON
header, raw little-endian data) so that bf16 works without torch and every malformed file gets a
:class:`CheckpointError` naming it. Pickle-based ``.bin``/``.pt`` files are never opened.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.typing import DTypeLike

from ppinfer.errors import CheckpointError
from ppinfer.lm.config import TransformerConfig, config_from_hf
from ppinfer.lm.transformer import Params

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_config(path: str | Path) -> tuple[TransformerConfig, dict[str, Any]]:
    """The :class:`TransformerConfig` and the raw dict of ``path/config.json``."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path} is a file: load() takes the checkpoint folder (here {path.parent})")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        hf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got a {type(hf).__name__}")
    return config_from_hf(hf), hf


def load_params(path: str | Path, config: TransformerConfig, dtype: DTypeLike | None = jnp.float32) -> Params:
    """Read every safetensors file of ``path`` into the params pytree of ``config``, cast to dtype
    (None: the checkpoint's own floating dtype, that of its token embedding: BF16, F16 or F32; an
    F64 checkpoint becomes float32, JAX's default).

    Raises :class:`CheckpointError` for missing/truncated files, missing tensors and wrong shapes.
    """
    tensors = read_safetensors_folder(Path(path))
    strip = _prefix_stripper(tensors)
    named = {strip(name): array for name, array in tensors.items()}
    get = _Getter(named, path)
    build = _gpt2_params if config.arch == "gpt2" else _llama_params
    params = build(config, get)
    if dtype is None:
        dtype = checkpoint_dtype(params["embed"])
    return _cast(params, dtype)


def checkpoint_dtype(array: np.ndarray) -> np.dtype:
    """The dtype params keep with ``load(..., dtype=None)``: the array's, float64 -> float32."""
    return np.dtype(np.float32) if array.dtype == np.float64 else array.dtype


def read_safetensors_folder(path: Path) -> dict[str, np.ndarray]:
    """All tensors of the folder's ``model.safetensors`` or of the shards its index lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index} is not a valid safetensors index: {error}") from None
        files = [path / _shard_name(index, name) for name in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path} only has pickle weights ({', '.join(pickles)}); ppinfer never unpickles "
                "(it can run arbitrary code). Convert them to safetensors, e.g. "
                "model.save_pretrained(folder, safe_serialization=True) in transformers."
            )
        raise CheckpointError(f"{path} has no *.safetensors weights")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"safetensors shard {file} listed in the index is missing")
        tensors.update(read_safetensors(file))
    return tensors


def _shard_name(index: Path, name: Any) -> str:
    """``name`` if it is a plain file name inside the checkpoint folder, else :class:`CheckpointError`
    (an index must not make ppinfer read files elsewhere: ``../../x``, ``/etc/x``, ``C:\\x``)."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: shard names must be non-empty strings, got {name!r}")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or ":" in name or "\0" in name:
        raise CheckpointError(
            f"{index}: shard name {name!r} points outside the checkpoint folder; refusing to read it"
        )
    return name


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file, as (memory-mapped) numpy arrays."""
    data = np.memmap(file, dtype=np.uint8, mode="r") if file.stat().st_size else np.zeros(0)
    if data.size < 8:
        raise CheckpointError(f"{file} is truncated: no safetensors header")
    (header_size,) = struct.unpack("<Q", data[:8].tobytes())
    if 8 + header_size > data.size:
        first = data[8:9].tobytes()
        what = "truncated" if first == b"{" else "not a safetensors file (no JSON header)"
        raise CheckpointError(f"{file} is {what}: a header of {header_size} bytes does not fit in the file")
    try:
        header = json.loads(data[8 : 8 + header_size].tobytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{file} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{file}: the safetensors header must be a JSON object, got a {type(header).__name__}"
        )
    header.pop("__metadata__", None)
    body = data[8 + header_size :]
    return {name: _tensor(file, name, entry, body) for name, entry in header.items()}


_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


_FLOAT_DTYPES = tuple(np.dtype(t) for t in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16))


def _tensor(file: Path, name: str, entry: Any, body: np.ndarray) -> np.ndarray:
    bad = f"{file}: bad header entry for tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{bad}: expected an object, got {entry!r}")
    try:
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape, offsets = entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{bad} (missing or unknown {e})") from None
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise CheckpointError(f"{bad}: shape must be a list of integers >= 0, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise CheckpointError(f"{bad}: data_offsets must be two integers >= 0, got {offsets!r}")
    start, end = offsets
    if start > end:
        raise CheckpointError(f"{bad}: data_offsets {offsets} end before they start")
    if end > body.size:
        raise CheckpointError(f"{file} is truncated: tensor {name!r} ends past the end of file")
    size = dtype.itemsize * math.prod(shape)  # Python ints: a huge shape cannot overflow
    if end - start != size:
        raise CheckpointError(f"{file}: tensor {name!r} byte size does not match shape {tuple(shape)}")
    return body[start:end].view(dtype).reshape(tuple(shape))


def _is_count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _prefix_stripper(tensors: dict[str, np.ndarray]) -> Callable[[str], str]:
    # Hub checkpoints name GPT-2 tensors with or without the "transformer." prefix.
    if any(name.startswith("transformer.") for name in tensors):
        return lambda name: name.removeprefix("transformer.")
    # The multimodal Gemma 3 checkpoint nests its language model (transformers 4 and 5 layouts).
    renames = (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    )
    if any(name.startswith(old) for name in tensors for old, _ in renames):

        def rename(name: str) -> str:
            for old, new in renames:
                if name.startswith(old):
                    return new + name.removeprefix(old)
            return name

        return rename
    return lambda name: name


class _Getter:
    """Fetches named tensors, checking they exist and have the shape the config implies."""

    def __init__(self, tensors: dict[str, np.ndarray], path: str | Path):
        self.tensors = tensors
        self.path = path

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise CheckpointError(f"checkpoint {self.path} lacks tensor {name!r}")
        array = self.tensors[name]
        if array.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} in {self.path} has dtype {array.dtype}; weights must be floating "
                "point (F32, F16, BF16, F64): the header's dtype is wrong"
            )
        if array.shape != shape:
            raise CheckpointError(
                f"tensor {name!r} in {self.path} has shape {array.shape}, config implies {shape}"
            )
        if not np.isfinite(array).all():
            raise CheckpointError(
                f"tensor {name!r} in {self.path} contains NaN or infinite values: the checkpoint is "
                "corrupt (every logit would be NaN)"
            )
        return array

    def layers(self, template: str, shape: tuple[int, ...], num_layers: int) -> np.ndarray:
        return np.stack([self(template.format(i), shape) for i in range(num_layers)])


def _gpt2_params(config: TransformerConfig, get: _Getter) -> Params:
    d, f, n = config.hidden_size, config.intermediate_size, config.num_layers
    qkv_w = get.layers("h.{}.attn.c_attn.weight", (d, 3 * d), n)
    qkv_b = get.layers("h.{}.attn.c_attn.bias", (3 * d,), n)
    q_w, k_w, v_w = np.split(qkv_w, 3, axis=-1)
    q_b, k_b, v_b = np.split(qkv_b, 3, axis=-1)

    def norm(name):
        return {
            "scale": get.layers(f"h.{{}}.{name}.weight", (d,), n),
            "bias": get.layers(f"h.{{}}.{name}.bias", (d,), n),
        }

    def conv1d(name, shape):  # GPT-2's Conv1D stores [in, out] already
        return {
            "w": get.layers(f"h.{{}}.{name}.weight", shape, n),
            "b": get.layers(f"h.{{}}.{name}.bias", (shape[1],), n),
        }

    params = {
        "embed": get("wte.weight", (config.vocab_size, d)),
        "pos_embed": get("wpe.weight", (config.max_position_embeddings, d)),
        "final_norm": {"scale": get("ln_f.weight", (d,)), "bias": get("ln_f.bias", (d,))},
        "layers": {
            "attn_norm": norm("ln_1"),
            "mlp_norm": norm("ln_2"),
            "q": {"w": q_w, "b": q_b},
            "k": {"w": k_w, "b": k_b},
            "v": {"w": v_w, "b": v_b},
            "o": conv1d("attn.c_proj", (d, d)),
            "up": conv1d("mlp.c_fc", (d, f)),
            "down": conv1d("mlp.c_proj", (f, d)),
        },
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = get("lm_head.weight", (config.vocab_size, d)).T
    return params


def _llama_params(config: TransformerConfig, get: _Getter) -> Params:
    d, f, n = config.hidden_size, config.intermediate_size, config.num_layers
    hd = config.head_dim
    q_out = config.num_heads * hd
    kv_out = config.num_kv_heads * hd
    prefix = "model.layers.{}."

    def linear(name, out_features, in_features, bias):
        # torch Linear stores [out, in]; the JAX side multiplies x @ w with w: [in, out].
        w = get.layers(prefix + name + ".weight", (out_features, in_features), n)
        p = {"w": np.swapaxes(w, 1, 2)}
        if bias:
            p["b"] = get.layers(prefix + name + ".bias", (out_features,), n)
        return p

    def norm(name, size=d):
        return {"scale": get.layers(prefix + name + ".weight", (size,), n)}

    layers = {"attn_norm": norm("input_layernorm")}
    if config.sandwich_norms:  # Gemma 2/3: norms before and after attention and the MLP
        layers["post_attn_norm"] = norm("post_attention_layernorm")
        layers["mlp_norm"] = norm("pre_feedforward_layernorm")
        layers["post_mlp_norm"] = norm("post_feedforward_layernorm")
    else:
        layers["mlp_norm"] = norm("post_attention_layernorm")
    if config.model_type == "phi3":  # fused q/k/v and gate/up projections, split here
        qkv = get.layers(prefix + "self_attn.qkv_proj.weight", (q_out + 2 * kv_out, d), n)
        qkv = np.swapaxes(qkv, 1, 2)
        layers["q"] = {"w": qkv[..., :q_out]}
        layers["k"] = {"w": qkv[..., q_out : q_out + kv_out]}
        layers["v"] = {"w": qkv[..., q_out + kv_out :]}
    else:
        layers["q"] = linear("self_attn.q_proj", q_out, d, config.qkv_bias)
        layers["k"] = linear("self_attn.k_proj", kv_out, d, config.qkv_bias)
        layers["v"] = linear("self_attn.v_proj", kv_out, d, config.qkv_bias)
    layers["o"] = linear("self_attn.o_proj", d, q_out, config.o_bias)
    if config.qk_norm:
        layers["q_norm"] = norm("self_attn.q_norm", hd)
        layers["k_norm"] = norm("self_attn.k_norm", hd)
    if config.num_experts:
        layers.update(_expert_params(config, get))
    elif config.model_type == "phi3":
        gate_up = np.swapaxes(get.layers(prefix + "mlp.gate_up_proj.weight", (2 * f, d), n), 1, 2)
        layers["gate"] = {"w": gate_up[..., :f]}
        layers["up"] = {"w": gate_up[..., f:]}
        layers["down"] = linear("mlp.down_proj", d, f, False)
    else:
        layers["gate"] = linear("mlp.gate_proj", f, d, config.mlp_bias)
        layers["up"] = linear("mlp.up_proj", f, d, config.mlp_bias)
        layers["down"] = linear("mlp.down_proj", d, f, config.mlp_bias)
    params = {
        "embed": get("model.embed_tokens.weight", (config.vocab_size, d)),
        "final_norm": {"scale": get("model.norm.weight", (d,))},
        "layers": layers,
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = get("lm_head.weight", (config.vocab_size, d)).T
    return params


def _expert_params(config: TransformerConfig, get: _Getter) -> Params:
    """Mixtral's router ``{w: [Lyr, D, E]}`` and experts ``{gate, up: [Lyr, E, D, F], down: [Lyr, E,
    F, D]}``, from the per-expert layout of Hub checkpoints (``block_sparse_moe.experts.j.w1/w3/w2``)
    or the fused one of transformers 5 (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``)."""
    d, f, n, e = config.hidden_size, config.intermediate_size, config.num_layers, config.num_experts
    fused = "model.layers.0.mlp.experts.gate_up_proj" in get.tensors
    if fused:
        router = get.layers("model.layers.{}.mlp.gate.weight", (e, d), n)
        gate_up = get.layers("model.layers.{}.mlp.experts.gate_up_proj", (e, 2 * f, d), n)
        down = get.layers("model.layers.{}.mlp.experts.down_proj", (e, d, f), n)
        gate, up = gate_up[:, :, :f], gate_up[:, :, f:]
    else:
        base = "model.layers.{}.block_sparse_moe."
        router = get.layers(base + "gate.weight", (e, d), n)

        def experts(name, shape):
            return np.stack(
                [get.layers(base + f"experts.{j}.{name}.weight", shape, n) for j in range(e)], axis=1
            )

        gate, up, down = experts("w1", (f, d)), experts("w3", (f, d)), experts("w2", (d, f))
    return {
        "router": {"w": np.swapaxes(router, 1, 2)},
        "experts": {
            "gate": np.swapaxes(gate, 2, 3),
            "up": np.swapaxes(up, 2, 3),
            "down": np.swapaxes(down, 2, 3),
        },
    }


def _cast(params: Params, dtype: DTypeLike) -> Params:
    if isinstance(params, dict):
        return {key: _cast(value, dtype) for key, value in params.items()}
    return jnp.asarray(np.asarray(params), dtype=dtype)
