"""The static description of a decoder-only transformer, read from a Hugging Face ``config.json``.

The config is a frozen, hashable dataclass so that it can be a static argument of ``jax.jit``:
every shape the transformer uses is a function of it. Per-layer differences (a sliding window on
some layers, Gemma 3's local/global RoPE bases) are tuples with one entry per layer, which the
transformer turns into stacked arrays scanned with the layer weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np

from ppinfer.errors import CheckpointError

Architecture = Literal["gpt2", "llama"]

# model_type values whose checkpoints follow the Llama layout (RMSNorm, RoPE, gated MLP, GQA),
# possibly with extras (q/k norms, sandwich norms, soft-capping, sliding windows, experts).
LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "phi3", "gemma2", "gemma3_text", "gemma3")
SUPPORTED_MODEL_TYPES = ("gpt2", *LLAMA_FAMILY)

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_new", "gelu")
FULL, SLIDING = "full_attention", "sliding_attention"

# config.json keys of features no supported model type implements here: any truthy value is refused.
_UNSUPPORTED_KEYS = {
    "quantization_config": "quantized weights",
    "attention_chunk_size": "chunked attention",
    "attention_sink_size": "attention sinks",
    "use_attention_sink": "attention sinks",
    "num_sink_tokens": "attention sinks",
    "sinks": "attention sinks",
    "use_bidirectional_attention": "bidirectional attention",
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of a GPT-2 or Llama-family decoder.

    ``arch`` selects the block layout: ``"gpt2"`` (learned positions, LayerNorm, GELU MLP, fused
    biased projections) or ``"llama"`` (RoPE, RMSNorm, gated MLP, grouped-query attention; Qwen2
    adds biases on the q/k/v projections). The fields after ``eos_token_id`` describe the variants
    of the Llama layout (their defaults are plain Llama):

    - ``activation``: the gated MLP's activation (``silu``; ``gelu_pytorch_tanh``/``gelu_new``:
      tanh-approximated GELU, GeGLU; ``gelu``: exact).
    - ``qk_norm``: an RMSNorm over each head's query and key before RoPE (Qwen3, Gemma 3).
    - ``sandwich_norms``: Gemma 2/3 blocks, with RMSNorms after attention and after the MLP too.
    - ``norm_plus_one``: RMSNorm multiplies by ``1 + w`` in f32 (Gemma) instead of ``w``.
    - ``embed_scale``: the token embedding is multiplied by ``sqrt(hidden_size)`` (cast to the
      params' dtype, as transformers does) (Gemma).
    - ``attn_scale``: the factor on q·k (None: ``head_dim ** -0.5``; Gemma: ``query_pre_attn_scalar
      ** -0.5``); ``attn_softcap``/``final_softcap``: ``c * tanh(x / c)`` on attention scores /
      output logits (None: off).
    - ``layer_window``: one entry per layer, 0 for full causal attention, W > 0 for a sliding
      window (a query at position p sees keys at positions p - W < j <= p).
    - ``rope_tables``: the distinct RoPE inverse-frequency tables (each ``rotary_dim / 2`` floats,
      after any scaling; ``rotary_dim <= head_dim``, the rest of each head is not rotated) with
      ``rope_attention_scaling`` (a factor on cos and sin: YaRN), and ``layer_rope`` the table of
      each layer. None: one plain table from ``rope_theta``.
    - ``num_experts``/``experts_per_token``: a mixture-of-experts MLP (Mixtral) when > 0.

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
    activation: str = "silu"
    qk_norm: bool = False
    sandwich_norms: bool = False
    norm_plus_one: bool = False
    embed_scale: bool = False
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_window: tuple[int, ...] | None = None
    rope_tables: tuple[tuple[float, ...], ...] | None = None
    rope_attention_scaling: tuple[float, ...] | None = None
    layer_rope: tuple[int, ...] | None = None
    num_experts: int = 0
    experts_per_token: int = 0

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
        if self.activation not in ACTIVATIONS:
            raise CheckpointError(
                f"activation {self.activation!r} is not supported; supported: {ACTIVATIONS}"
            )
        if self.layer_window is not None and len(self.layer_window) != self.num_layers:
            raise CheckpointError(
                f"layer_window has {len(self.layer_window)} entries for {self.num_layers} layers"
            )
        if self.rope_tables is not None:
            layer_rope = self.layer_rope or (0,) * self.num_layers
            if len(layer_rope) != self.num_layers or not all(
                0 <= i < len(self.rope_tables) for i in layer_rope
            ):
                raise CheckpointError(f"layer_rope {self.layer_rope} does not index rope_tables per layer")
            for table in self.rope_tables:
                if not 1 <= 2 * len(table) <= self.head_dim:
                    raise CheckpointError(
                        f"a RoPE table of {len(table)} frequencies does not fit head_dim={self.head_dim}"
                    )
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise CheckpointError(
                f"num_experts_per_tok={self.experts_per_token} must be in "
                f"1..num_local_experts={self.num_experts}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def windowed(self) -> bool:
        """Whether any layer has a sliding window."""
        return self.layer_window is not None and any(self.layer_window)

    @property
    def per_layer_rope(self) -> bool:
        """Whether layers use different RoPE tables (Gemma 3: local and global bases)."""
        return self.rope_tables is not None and len(set(self.layer_rope or (0,))) > 1

    def rope_table(self, index: int = 0) -> tuple[np.ndarray, float]:
        """Inverse frequencies f32[rotary_dim / 2] of table ``index`` and its cos/sin factor."""
        if self.rope_tables is None:
            return _default_inv_freq(self.rope_theta, self.head_dim), 1.0
        return np.asarray(self.rope_tables[index], np.float32), float(
            (self.rope_attention_scaling or (1.0,) * len(self.rope_tables))[index]
        )


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """Translate a Hugging Face ``config.json`` dict into a :class:`TransformerConfig`.

    Raises :class:`CheckpointError` for an unknown ``model_type`` or a feature this implementation
    does not reproduce exactly (rather than silently computing different logits).
    """
    model_type = hf.get("model_type")
    try:
        if model_type == "gemma3":
            # The multimodal Gemma 3 checkpoint: its language model is read (the vision tower is not).
            text = hf.get("text_config")
            if not isinstance(text, dict):
                raise CheckpointError("config.json of a gemma3 model has no text_config object")
            text = {**text, "model_type": "gemma3"}
            for key in ("bos_token_id", "eos_token_id", "tie_word_embeddings"):
                if key in hf and key not in text:
                    text[key] = hf[key]
            hf = text
        for key, feature in _UNSUPPORTED_KEYS.items():
            if hf.get(key):
                raise CheckpointError(
                    f"{model_type} config option {key}={hf[key]!r} ({feature}) is not supported"
                )
        if model_type == "gpt2":
            return _gpt2_config(hf)
        if model_type in LLAMA_FAMILY:
            return _llama_config(hf)
    except KeyError as missing:
        raise CheckpointError(f"config.json of a {model_type} model lacks {missing}") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as error:
        raise CheckpointError(f"config.json of a {model_type} model is invalid: {error}") from None
    raise CheckpointError(
        f"unknown model_type {model_type!r} in config.json; supported: " + ", ".join(SUPPORTED_MODEL_TYPES)
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
        norm_eps=_positive_field(hf, "layer_norm_epsilon", 1e-5),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        model_type="gpt2",
        bos_token_id=_single_id(hf.get("bos_token_id")),
        eos_token_id=_single_id(hf.get("eos_token_id")),
    )


GEMMA = ("gemma2", "gemma3_text", "gemma3")

# What transformers' config classes (5.23) assume for keys a config.json may omit, where that
# differs between model types and changes the logits (the generic fallbacks are in _llama_config).
_GEMMA3_DEFAULTS = {
    "head_dim": 256,
    "sliding_window": 4096,
    "query_pre_attn_scalar": 256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
}
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    # The window transformers applies (from max_window_layers on) when use_sliding_window is set.
    "qwen2": {"max_position_embeddings": 32768, "sliding_window": 4096},
    "qwen3": {"head_dim": 128, "max_position_embeddings": 32768, "sliding_window": 4096},
    "mistral": {"sliding_window": 4096, "max_position_embeddings": 131072},
    "mixtral": {
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "phi3": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
    "gemma2": {
        "head_dim": 256,
        "sliding_window": 4096,
        "query_pre_attn_scalar": 256,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    "gemma3_text": _GEMMA3_DEFAULTS,
    "gemma3": _GEMMA3_DEFAULTS,
}


def _llama_config(hf: dict[str, Any]) -> TransformerConfig:
    model_type = hf["model_type"]
    hf = {**_CLASS_DEFAULTS.get(model_type, {}), **hf}
    gemma = model_type in GEMMA
    hidden = _count(hf, "hidden_size")
    heads = _count(hf, "num_attention_heads")
    layers = _count(hf, "num_hidden_layers")
    head_dim = hf.get("head_dim") or hidden // heads
    if gemma:
        activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    else:
        activation = hf.get("hidden_act", "silu")
    if activation not in ACTIVATIONS:
        raise CheckpointError(
            f"{model_type} hidden activation {activation!r} is not supported; supported: {ACTIVATIONS}"
        )
    layer_types = _layer_types(hf, model_type, layers)
    window = _window(hf, model_type) if SLIDING in layer_types else None
    tables, scalings, layer_rope = _rope(hf, model_type, head_dim, layer_types)
    attention_bias = bool(hf.get("attention_bias", False))
    # Qwen2 always has q/k/v biases and none on o_proj; Mistral, Mixtral and Phi-3 have none
    # (transformers ignores their attention_bias); the others follow attention_bias.
    none = (False, False)
    fixed = {"mistral": none, "mixtral": none, "phi3": none, "qwen2": (True, False)}
    qkv_bias, o_bias = fixed.get(model_type, (attention_bias, attention_bias))
    num_experts = experts_per_token = 0
    if model_type == "mixtral":
        num_experts = _count(hf, "num_local_experts")
        experts_per_token = _count(hf, "num_experts_per_tok")
    if gemma:
        query_scalar = hf.get("query_pre_attn_scalar", 256)
        if not isinstance(query_scalar, (int, float)) or query_scalar <= 0:
            raise CheckpointError(f"{model_type} query_pre_attn_scalar must be > 0, got {query_scalar!r}")
    return TransformerConfig(
        arch="llama",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=_positive_field(hf, "rms_norm_eps", 1e-6),
        rope_theta=_positive_field({"rope_theta": _theta(hf, model_type)}, "rope_theta"),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
        tie_word_embeddings=hf.get("tie_word_embeddings", gemma),
        model_type=model_type,
        bos_token_id=_single_id(hf.get("bos_token_id")),
        eos_token_id=_single_id(hf.get("eos_token_id")),
        activation=activation,
        qk_norm=model_type in ("qwen3", "gemma3_text", "gemma3"),
        sandwich_norms=gemma,
        norm_plus_one=gemma,
        embed_scale=gemma,
        attn_scale=float(query_scalar) ** -0.5 if gemma else None,
        attn_softcap=_positive_or_none(hf, "attn_logit_softcapping") if model_type == "gemma2" else None,
        final_softcap=_positive_or_none(hf, "final_logit_softcapping") if gemma else None,
        layer_window=tuple(window if t == SLIDING and window else 0 for t in layer_types),
        rope_tables=tables,
        rope_attention_scaling=scalings,
        layer_rope=layer_rope,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
    )


def _layer_types(hf: dict[str, Any], model_type: str, layers: int) -> list[str]:
    """``full_attention``/``sliding_attention`` per layer, as transformers assigns them."""
    given = hf.get("layer_types")
    if model_type == "llama":
        return [FULL] * layers  # Llama has no sliding window
    if model_type in ("mistral", "mixtral", "phi3"):
        if given is not None and model_type == "mistral":
            raise CheckpointError(
                "a mistral config with layer_types (alternating attention, as in Ministral) is not "
                "supported: transformers' Mistral ignores them"
            )
        # One window (or none) for every layer; transformers ignores layer_types here.
        return [SLIDING if hf.get("sliding_window") is not None else FULL] * layers
    if given is not None:
        if not isinstance(given, list) or len(given) != layers:
            raise CheckpointError(
                f"{model_type} layer_types must list one type per layer ({layers}), got {given!r}"
            )
        for t in given:
            if t not in (FULL, SLIDING):
                raise CheckpointError(
                    f"{model_type} layer type {t!r} is not supported (only {FULL!r} and {SLIDING!r})"
                )
        return list(given)
    if model_type == "gemma2":
        return [SLIDING if (i + 1) % 2 else FULL for i in range(layers)]
    if model_type in ("gemma3_text", "gemma3"):
        pattern = _count(
            {"sliding_window_pattern": hf.get("sliding_window_pattern", 6)}, "sliding_window_pattern"
        )
        return [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    # qwen2, qwen3: sliding layers from max_window_layers on, if use_sliding_window.
    first = hf.get("max_window_layers", 28)
    sliding = hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None
    return [SLIDING if sliding and i >= first else FULL for i in range(layers)]


def _window(hf: dict[str, Any], model_type: str) -> int | None:
    """The sliding window of the sliding layers (None: they attend to everything)."""
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        return None
    window = hf.get("sliding_window")
    if window is None:
        return None
    return _count({"sliding_window": window}, "sliding_window")


def _theta(hf: dict[str, Any], model_type: str) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if model_type in ("gemma3_text", "gemma3") and FULL in rope:
        rope = rope[FULL] or {}
    default = 1_000_000.0 if model_type in ("gemma3_text", "gemma3") else 10000.0
    return rope.get("rope_theta", hf.get("rope_theta", default))  # checked by the caller


def _rope(
    hf: dict[str, Any], model_type: str, head_dim: int, layer_types: list[str]
) -> tuple[tuple[tuple[float, ...], ...], tuple[float, ...], tuple[int, ...]]:
    """RoPE tables (inverse frequencies after scaling), their cos/sin factors, and each layer's
    table, following transformers' ``modeling_rope_utils``."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{model_type} rope_parameters must be an object, got {rope!r}")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0 and model_type != "phi3":
        raise CheckpointError(f"{model_type} partial_rotary_factor={partial} is not supported (only phi3)")
    if model_type in ("gemma3_text", "gemma3"):
        if FULL in rope or SLIDING in rope:  # transformers 5: one dict per layer type
            # An entry without rope_theta takes the top-level rope_theta (full attention) or
            # rope_local_base_freq (sliding), else the class defaults, as transformers fills them.
            full_theta = hf.get("rope_theta", 1_000_000.0)
            local_theta = hf.get("rope_local_base_freq", 10_000.0)
            specs = {
                FULL: {"rope_theta": full_theta, **(rope.get(FULL) or {})},
                SLIDING: {"rope_theta": local_theta, **(rope.get(SLIDING) or {})},
            }
        else:  # transformers 4: rope_theta (global), rope_local_base_freq, rope_scaling (global only)
            specs = {
                FULL: {**rope, "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0))},
                SLIDING: {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)},
            }
    else:
        specs = {FULL: {**rope, "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0))}}
    kinds = sorted(set(layer_types) & set(specs)) or [FULL]
    if model_type not in ("gemma3_text", "gemma3"):
        kinds = [FULL]
    tables, scalings = [], []
    for kind in kinds:
        inv_freq, scaling = _inv_freq(hf, model_type, specs[kind], head_dim, partial)
        tables.append(tuple(float(f) for f in inv_freq))
        scalings.append(float(scaling))
    index = {kind: i for i, kind in enumerate(kinds)}
    layer_rope = tuple(index.get(t, 0) for t in layer_types)
    return tuple(tables), tuple(scalings), layer_rope


def _inv_freq(
    hf: dict[str, Any], model_type: str, spec: dict[str, Any], head_dim: int, partial: float
) -> tuple[np.ndarray, float]:
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{model_type} rope_type {rope_type!r} is not supported; supported: {ROPE_TYPES}"
        )
    base = float(spec["rope_theta"])
    dim = int(head_dim * partial)
    if dim < 2:
        raise CheckpointError(
            f"{model_type}: rotary dimension {dim} (head_dim * partial_rotary_factor) is < 2"
        )
    inv_freq = _default_inv_freq(base, dim)
    if rope_type in ("default", "dynamic"):
        # Dynamic NTK scaling only changes the frequencies for sequences longer than
        # max_position_embeddings, which ppinfer refuses: inside the context it is plain RoPE.
        return inv_freq, 1.0
    factor = spec.get("factor")
    if rope_type == "linear":
        return inv_freq / np.float32(_positive(factor, "factor")), 1.0
    if "original_max_position_embeddings" in hf:
        original = hf["original_max_position_embeddings"]
    elif model_type == "phi3":
        original = 4096  # Phi3Config's default, which takes priority over rope_parameters
    else:
        original = spec.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 2048)
    original = float(_positive(original, "original_max_position_embeddings"))
    if rope_type == "llama3":
        factor = np.float32(_positive(factor, "factor"))
        low, high = float(spec["low_freq_factor"]), float(spec["high_freq_factor"])
        if high == low:
            raise CheckpointError(
                f"{model_type} llama3 rope: high_freq_factor must differ from low_freq_factor"
            )
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (np.float32(original) / wavelen - np.float32(low)) / np.float32(high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) & ~(wavelen > original / low)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    # yarn
    if factor is None:
        factor = hf.get("max_position_embeddings", 2048) / original
    factor = float(_positive(factor, "factor"))
    attention_factor = spec.get("attention_factor")
    mscale, mscale_all_dim = spec.get("mscale"), spec.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = spec.get("beta_fast") or 32
    beta_slow = spec.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if spec.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
    interpolation = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32), float(attention_factor)


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise CheckpointError(f"rope parameter {name} must be a number > 0, got {value!r}")
    return value


def _positive_or_none(hf: dict[str, Any], key: str) -> float | None:
    value = hf.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise CheckpointError(f"config.json: {key} must be a number > 0 or null, got {value!r}")
    return float(value)


def _count(hf: dict[str, Any], key: str) -> int:
    """``hf[key]`` if it is an integer >= 1 (sizes that others are divided by), else
    :class:`CheckpointError`."""
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"config.json: {key} must be an integer >= 1, got {value!r}")
    return value


def _positive_field(hf: dict[str, Any], key: str, default: float | None = None) -> float:
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
