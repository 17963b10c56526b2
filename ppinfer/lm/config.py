"""The static description of a decoder-only transformer, read from a Hugging Face ``config.json``.

The config is a frozen, hashable dataclass so that it can be a static argument of ``jax.jit``:
every shape the transformer uses is a function of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ppinfer.errors import CheckpointError

Architecture = Literal["gpt2", "llama"]

# model_type values whose checkpoints follow the Llama layout (RMSNorm, RoPE, SwiGLU, GQA).
LLAMA_FAMILY = ("llama", "qwen2", "mistral")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of a GPT-2 or Llama-family decoder.

    ``arch`` selects the block layout: ``"gpt2"`` (learned positions, LayerNorm, GELU MLP, fused
    biased projections) or ``"llama"`` (RoPE, RMSNorm, SwiGLU, grouped-query attention; Qwen2 adds
    biases on the q/k/v projections).

    ``eos_token_id`` is the first end-of-sequence id; ``eos_token_ids`` all of them (config.json and
    generation_config.json may list several, e.g. Llama 3 Instruct's ``<|eot_id|>``), filled by
    :func:`ppinfer.lm.load`.
    """

    arch: Architecture
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    model_type: str = "gpt2"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for field in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"config: {field} must be an integer >= 1, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """Translate a Hugging Face ``config.json`` dict into a :class:`TransformerConfig`.

    Raises :class:`CheckpointError` for an unknown ``model_type`` or a feature this implementation
    does not reproduce exactly (rather than silently computing different logits).
    """
    model_type = hf.get("model_type")
    try:
        if model_type == "gpt2":
            return _gpt2_config(hf)
        if model_type in LLAMA_FAMILY:
            return _llama_config(hf)
    except KeyError as missing:
        raise CheckpointError(f"config.json of a {model_type} model lacks {missing}") from None
    except (TypeError, ZeroDivisionError, AttributeError) as error:
        raise CheckpointError(f"config.json of a {model_type} model is invalid: {error}") from None
    raise CheckpointError(
        f"unknown model_type {model_type!r} in config.json; supported: gpt2, " + ", ".join(LLAMA_FAMILY)
    )


def _gpt2_config(hf: dict[str, Any]) -> TransformerConfig:
    unsupported = {
        "scale_attn_by_inverse_layer_idx": True,
        "scale_attn_weights": False,
        "add_cross_attention": True,
    }
    for key, bad in unsupported.items():
        if hf.get(key, not bad) == bad:
            raise CheckpointError(f"gpt2 config option {key}={bad} is not supported")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"gpt2 activation_function {hf['activation_function']!r} is not supported")
    hidden = _count(hf, "n_embd")
    heads = _count(hf, "n_head")
    if hidden % heads:
        raise CheckpointError(f"gpt2 config: n_embd={hidden} is not a multiple of n_head={heads}")
    return TransformerConfig(
        arch="gpt2",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=hf["n_positions"],
        norm_eps=_positive(hf, "layer_norm_epsilon", 1e-5),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        model_type="gpt2",
        bos_token_id=_single_id(hf.get("bos_token_id")),
        eos_token_id=_single_id(hf.get("eos_token_id")),
    )


def _llama_config(hf: dict[str, Any]) -> TransformerConfig:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"rope scaling {rope_type!r} is not supported (only plain RoPE)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    model_type = hf["model_type"]
    hidden = _count(hf, "hidden_size")
    heads = _count(hf, "num_attention_heads")
    attention_bias = hf.get("attention_bias", False)
    return TransformerConfig(
        arch="llama",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=_positive(hf, "rms_norm_eps", 1e-6),
        rope_theta=_positive({"rope_theta": rope.get("rope_theta", hf.get("rope_theta", 1e4))}, "rope_theta"),
        # Qwen2 always has q/k/v biases and none on o_proj; Llama/Mistral follow attention_bias.
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=hf.get("mlp_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        model_type=model_type,
        bos_token_id=_single_id(hf.get("bos_token_id")),
        eos_token_id=_single_id(hf.get("eos_token_id")),
    )


def _count(hf: dict[str, Any], key: str) -> int:
    """``hf[key]`` if it is an integer >= 1 (sizes that others are divided by), else
    :class:`CheckpointError`."""
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"config.json: {key} must be an integer >= 1, got {value!r}")
    return value


def _positive(hf: dict[str, Any], key: str, default: float | None = None) -> float:
    """``hf[key]`` (or ``default`` when absent) as a float if it is a finite number > 0, else
    :class:`CheckpointError` (a negative epsilon or a string would give NaN or a raw error later)."""
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise CheckpointError(f"config.json: {key} must be a finite number > 0, got {value!r}")
    return float(value)


def _single_id(value: int | list[int] | None) -> int | None:
    # Some configs list several stop ids; the first is the canonical end-of-sequence token.
    if isinstance(value, list):
        return value[0] if value else None
    return value
