"""Architectures beyond GPT-2/Llama against transformers (torch), on tiny random checkpoints saved
with ``save_pretrained``: RoPE scaling (llama3, linear, dynamic, yarn), Qwen2/Qwen3, Gemma 2/3,
Phi-3, Mistral with its sliding window, Mixtral; bf16/fp16 checkpoints; the CheckpointErrors.

Each parity check runs the prompt through ``prefill`` and 20 more tokens per particle through the
cached decode path (``decode`` with dense attention, and ``jax.vmap(lm_step)`` with blocked
attention over several blocks), and compares every row of logits with transformers' logits of the
whole sequence.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppinfer.lm.transformer as transformer
from ppinfer.errors import CheckpointError, ConfigError
from ppinfer.lm import config_from_hf, decode, lm_step, load, paged, prefill
from ppinfer.lm.checkpoint import read_safetensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, PROMPT_LEN, STEPS, PARTICLES = 96, 12, 20, 2
FP32_TOL = 1e-4
# bf16 keeps 8 significant bits: ppinfer and transformers round at different places (RoPE in f32
# here, cos/sin in bf16 there; expert outputs summed in f32 here), so their bf16 logits (|logit| up
# to 4.5 here) differ by a few bf16 ulps: measured 0.03-0.08 over these models.
BF16_TOL = 0.1
FP16_TOL = 0.02  # measured 0.004-0.01 against fp32

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

ROPE = dict(rope_theta=500.0)
CASES = {
    # model class, config class, config kwargs
    "llama-llama3-rope": (
        "Llama",
        dict(
            rope_parameters=dict(
                ROPE,
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            )
        ),
    ),
    "llama-linear-rope": ("Llama", dict(rope_parameters=dict(ROPE, rope_type="linear", factor=4.0))),
    "llama-dynamic-rope": ("Llama", dict(rope_parameters=dict(ROPE, rope_type="dynamic", factor=2.0))),
    "llama-yarn-rope": (
        "Llama",
        dict(rope_parameters=dict(ROPE, rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    ),
    # Qwen2's optional sliding window, from layer max_window_layers on: here layer 1 only.
    "qwen2": (
        "Qwen2",
        dict(use_sliding_window=True, sliding_window=7, max_window_layers=1, rope_parameters=ROPE),
    ),
    "qwen3": ("Qwen3", dict(head_dim=24, rope_parameters=ROPE)),
    "gemma2": (
        "Gemma2",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=6,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=1.5,
            rope_parameters=ROPE,
        ),
    ),
    "gemma3_text": (
        "Gemma3",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": dict(rope_type="default", rope_theta=50.0),
                "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=5000.0),
            },
        ),
    ),
    "phi3": ("Phi3", dict(sliding_window=9, rope_parameters=dict(ROPE, partial_rotary_factor=0.5))),
    "mistral-window": ("Mistral", dict(sliding_window=8, rope_parameters=ROPE)),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2, rope_parameters=ROPE)),
}

# Sliding window per layer (0: none) that each windowed checkpoint must load with.
WINDOWS = {"qwen2": (0, 7), "gemma2": (6, 0), "gemma3_text": (6, 0), "phi3": (9, 9), "mistral-window": (8, 8)}

# RoPE-scaling variants of Llama: only the RoPE table differs from "llama-llama3-rope", so the
# blocked-attention and bf16 runs (the same code) are done once, on llama3.
ROPE_ONLY = ("llama-linear-rope", "llama-dynamic-rope", "llama-yarn-rope")
ARCHS = sorted(set(CASES) - set(ROPE_ONLY))

# A change of the loaded config that must break parity: shows each feature is exercised.
BROKEN = {
    "llama-llama3-rope": lambda c: dataclasses.replace(c, rope_tables=None),
    "llama-linear-rope": lambda c: dataclasses.replace(c, rope_tables=None),
    "llama-yarn-rope": lambda c: dataclasses.replace(c, rope_attention_scaling=(1.0,)),
    "qwen3": lambda c: dataclasses.replace(c, qk_norm=False),
    "qwen2": lambda c: dataclasses.replace(c, layer_window=(0, 0)),
    "gemma2": lambda c: dataclasses.replace(c, attn_softcap=None),
    "gemma3_text": lambda c: dataclasses.replace(c, layer_rope=(0, 0)),
    "phi3": lambda c: dataclasses.replace(c, layer_window=(0, 0)),
    "mistral-window": lambda c: dataclasses.replace(c, layer_window=(0, 0)),
    "mixtral": lambda c: dataclasses.replace(c, experts_per_token=1),
}


def torch_model(name: str):
    family, kwargs = CASES[name]
    config = getattr(transformers, f"{family}Config" if family != "Gemma3" else "Gemma3TextConfig")(
        **COMMON, **kwargs
    )
    config._attn_implementation = "eager"
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # random norm weights and biases: loading them wrongly cannot go unnoticed
        for param_name, tensor in model.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name:
                tensor.normal_(0.0, 0.3 if param_name.endswith("bias") else 0.5)
                if "norm" in param_name and family not in ("Gemma2", "Gemma3"):
                    tensor.add_(1.0)
    return model


@functools.cache
def checkpoint(name: str, tmp_root: str) -> tuple[object, str]:
    torch.manual_seed(0)
    model = torch_model(name)
    folder = f"{tmp_root}/{name}"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("archs"))


def sequences(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, VOCAB, PROMPT_LEN)
    return np.stack([np.concatenate([prompt, rng.integers(3, VOCAB, STEPS)]) for _ in range(PARTICLES)])


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def cached_logits(lm, tokens: np.ndarray, mode: str) -> np.ndarray:
    """Logits f32[N, L, V] of prompt (prefill, shared) + continuation (one cached step a token)."""
    logits, prompt_cache = prefill(lm.params, lm.config, jnp.asarray(tokens[0, :PROMPT_LEN], jnp.int32))
    cache = transformer.init_particle_cache(lm.config, PARTICLES, STEPS, lm.dtype)
    if mode == "paged":  # blocks of 4 positions: the pool fills during the 20 steps
        cache = paged.init_paged_cache(lm.config, PARTICLES, STEPS, lm.dtype, block_size=4)
        step = functools.partial(paged.decode, lm.params, lm.config)
    elif mode == "dense":
        step = functools.partial(decode, lm.params, lm.config, attention="dense")
    else:  # what SMC runs: the one-particle step, vmapped (traced afresh: BLOCK_SIZE is read then)

        def vmapped(params, config, prompt_cache, cache, tokens):
            one = functools.partial(lm_step, params, config, prompt_cache, attention="blocked")
            return jax.vmap(one)(cache, tokens)

        step = functools.partial(jax.jit(vmapped, static_argnums=1), lm.params, lm.config)
    rows = []
    for t in range(PROMPT_LEN, PROMPT_LEN + STEPS):
        step_logits, cache = step(prompt_cache, cache, jnp.asarray(tokens[:, t], jnp.int32))
        rows.append(np.asarray(step_logits))
    shared = np.broadcast_to(np.asarray(logits), (PARTICLES, *logits.shape))
    return np.concatenate([shared, np.stack(rows, axis=1)], axis=1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_parity_prefill_and_cached_decode(name, tmp_root, monkeypatch):
    model, folder = checkpoint(name, tmp_root)
    lm = load(folder)
    assert lm.config.model_type == model.config.model_type
    if name in WINDOWS:
        assert lm.config.layer_window == WINDOWS[name]
    tokens = sequences()
    expected = torch_logits(model, tokens)
    assert np.abs(expected).max() > 0.5  # logits large enough for the tolerance to mean something
    got = cached_logits(lm, tokens, "dense")
    np.testing.assert_allclose(got, expected, atol=FP32_TOL, rtol=0)
    if name in ROPE_ONLY:
        return
    # Blocked attention over blocks of 8 positions (T = 20: three blocks, the last one clamped).
    monkeypatch.setattr(transformer, "BLOCK_SIZE", 8)
    got = cached_logits(lm, tokens, "blocked")
    np.testing.assert_allclose(got, expected, atol=FP32_TOL, rtol=0)
    # The paged cache (chosen automatically for long token programs) on the architectures it
    # implements; the others are refused, never silently wrong.
    if paged.paged_unsupported(lm.config):
        with pytest.raises(ConfigError, match="paged"):
            paged.init_paged_cache(lm.config, PARTICLES, STEPS, lm.dtype)
        return
    got = cached_logits(lm, tokens, "paged")
    np.testing.assert_allclose(got, expected, atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_parity_check_fails_without_the_feature(name, tmp_root):
    """The loaded config passes (test above); the same weights with the feature switched off do not."""
    model, folder = checkpoint(name, tmp_root)
    lm = load(folder)
    tokens = sequences()
    expected = torch_logits(model, tokens[:1])[0]
    bad = prefill(lm.params, BROKEN[name](lm.config), jnp.asarray(tokens[0], jnp.int32))[0]
    assert np.abs(np.asarray(bad) - expected).max() > 100 * FP32_TOL


@pytest.mark.parametrize("name", ARCHS)
def test_bf16_checkpoint_keeps_its_dtype_and_matches(name, tmp_root, tmp_path):
    model, _ = checkpoint(name, tmp_root)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    model16.save_pretrained(tmp_path)
    lm = load(tmp_path, dtype=None)
    assert lm.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(lm.params))
    tokens = sequences()
    got = cached_logits(lm, tokens, "dense")
    reference = torch_logits(model16, tokens)
    exact = torch_logits(model, tokens)
    # Within BF16_TOL of transformers in bf16, and at most 1.5x as far from the fp32 logits as
    # transformers' own bf16 run is (measured: 0.03-0.08 and 0.76-1.34x).
    assert np.abs(got - reference).max() <= BF16_TOL
    assert np.abs(got - exact).max() <= 1.5 * np.abs(reference - exact).max()


@pytest.mark.parametrize("name", ["gemma3_text", "mixtral"])
def test_fp16_checkpoint_keeps_its_dtype(name, tmp_root, tmp_path):
    model, _ = checkpoint(name, tmp_root)
    copy.deepcopy(model).to(torch.float16).save_pretrained(tmp_path)
    stored = read_safetensors(tmp_path / "model.safetensors")
    assert {array.dtype for array in stored.values()} == {np.dtype(np.float16)}
    lm = load(tmp_path, dtype=None)
    assert lm.dtype == jnp.float16 and load(tmp_path).dtype == jnp.float32
    tokens = sequences()
    got = cached_logits(lm, tokens, "dense")
    exact = torch_logits(model, tokens)
    assert np.abs(got - exact).max() <= FP16_TOL


def test_gemma3_multimodal_checkpoint_reads_its_language_model(tmp_path):
    """``model_type: gemma3`` (Gemma3ForConditionalGeneration): the text_config and the
    ``language_model.*`` tensors are read, the vision tower is ignored; text-only logits match."""
    torch.manual_seed(1)
    _, kwargs = CASES["gemma3_text"]
    text = {key: value for key, value in {**COMMON, **kwargs}.items() if key != "initializer_range"}
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=dict(vision, image_size=28, patch_size=14),
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 3,
        boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 1,
        initializer_range=0.1,
    )
    config._attn_implementation = "eager"
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param_name, tensor in model.named_parameters():
            if "norm" in param_name:
                tensor.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path)
    lm = load(tmp_path)
    assert lm.config.model_type == "gemma3" and lm.config.layer_window == (6, 0)
    tokens = sequences() % (VOCAB - 3)  # no image tokens
    expected = torch_logits(model, tokens)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(cached_logits(lm, tokens, "dense"), expected, atol=FP32_TOL, rtol=0)


LEGACY = {
    # transformers 4 style config.json entries (rope_scaling + rope_theta; Gemma 3's
    # rope_local_base_freq and sliding_window_pattern) as Hub checkpoints still have them.
    "Llama": dict(
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "Gemma3TextConfig": dict(
        rope_theta=1e6,
        rope_local_base_freq=1e4,
        rope_scaling=dict(rope_type="linear", factor=8.0),
        sliding_window=16,
        sliding_window_pattern=3,
        num_hidden_layers=6,
    ),
}


FAMILIES = sorted({family for family, _ in CASES.values()} - {"Gemma3"} | {"Gemma3TextConfig"})


@pytest.mark.parametrize("family", sorted(LEGACY) + [f"sparse-{family}" for family in FAMILIES])
def test_legacy_and_sparse_configs_read_like_transformers(family):
    """An old-style dict, or one with only the sizes (every other key left to the config class's
    default), read directly gives the config that transformers' own normalisation of it
    (``to_dict()`` of the config class) gives."""
    family = family.removeprefix("sparse-")
    cls = getattr(transformers, family if family.endswith("Config") else f"{family}Config")
    legacy = {**COMMON, "model_type": cls.model_type}
    legacy.update(LEGACY.get(family, {}))
    kwargs = {key: value for key, value in legacy.items() if key != "model_type"}
    normalised = cls(**kwargs).to_dict()
    assert config_from_hf(legacy) == config_from_hf(normalised)
    config = config_from_hf(legacy)
    if family not in LEGACY:
        return
    if family == "Llama":
        plain = dataclasses.replace(config, rope_tables=None).rope_table()[0]
        scaled = config.rope_table()[0]
        assert scaled[0] == plain[0] and scaled[-1] == pytest.approx(plain[-1] / 8, rel=1e-6)
    else:
        assert config.layer_window == (16, 16, 0, 16, 16, 0) and config.layer_rope == (1, 1, 0, 1, 1, 0)
        assert len(set(config.rope_tables)) == 2


def test_configs_that_rely_on_transformers_fill_ins():
    """Hunt 18: what transformers fills in, or ignores, in a sparse or hand-edited config.json."""
    # Qwen2/Qwen3 with use_sliding_window and no sliding_window key: the class default 4096, from
    # max_window_layers on (it loaded with no window, logits 1.1 off past 4096 tokens).
    for family in ("Qwen2", "Qwen3"):
        cls = getattr(transformers, f"{family}Config")
        kwargs = dict(use_sliding_window=True, max_window_layers=1)
        sparse = {**COMMON, "model_type": cls.model_type, **kwargs}
        normalised = cls(**COMMON, **kwargs).to_dict()
        assert config_from_hf(sparse) == config_from_hf(normalised)
        assert config_from_hf(sparse).layer_window == (0, 4096)
    # Gemma 3 per-layer-type rope_parameters without rope_theta: the top-level rope_theta fills the
    # full-attention entry, rope_local_base_freq the sliding one (it used 1e6 and 1e4).
    rope = {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}
    kwargs = dict(rope_parameters=rope, rope_theta=777.0, rope_local_base_freq=50.0, sliding_window=16)
    kwargs = {**COMMON, **kwargs, "num_hidden_layers": 2, "sliding_window_pattern": 2}
    sparse = {"model_type": "gemma3_text", **copy.deepcopy(kwargs)}
    normalised = transformers.Gemma3TextConfig(**copy.deepcopy(kwargs)).to_dict()
    assert normalised["rope_parameters"]["full_attention"]["rope_theta"] == 777.0
    config = config_from_hf(sparse)
    assert config == config_from_hf(normalised)
    full, sliding = config.rope_table(config.layer_rope[1])[0], config.rope_table(config.layer_rope[0])[0]
    head_dim = config.head_dim
    assert full[1] == pytest.approx(777.0 ** (-2 / head_dim), rel=1e-5)
    assert sliding[1] == pytest.approx(50.0 ** (-2 / head_dim), rel=1e-5)
    # Mistral's attention has no biases whatever attention_bias says (transformers hard-codes
    # bias=False): they were required, or loaded and added (logits 6.3 off).
    config = config_from_hf(hf_config("mistral-window", attention_bias=True))
    assert not config.qkv_bias and not config.o_bias
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, attention_bias=True))
    assert model.model.layers[0].self_attn.q_proj.bias is None


# --- CheckpointErrors for what is not supported ---------------------------------------------------


def hf_config(name: str, **changes) -> dict:
    family, kwargs = CASES[name]
    cls = getattr(transformers, f"{family}Config" if family != "Gemma3" else "Gemma3TextConfig")
    config = cls(**COMMON, **kwargs).to_dict()
    config.update(changes)
    return config


@pytest.mark.parametrize(
    "name, changes, message",
    [
        (
            "llama-linear-rope",
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
            "'longrope'",
        ),
        (
            "llama-linear-rope",
            {"rope_parameters": {"rope_type": "foo", "rope_theta": 1e4}},
            "rope_type 'foo'",
        ),
        ("llama-linear-rope", {"rope_parameters": {"rope_type": "linear", "factor": -1}}, "factor must be"),
        ("llama-llama3-rope", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "lacks 'low_freq"),
        ("llama-linear-rope", {"use_attention_sink": True}, "attention sinks"),
        ("llama-linear-rope", {"quantization_config": {"quant_method": "gptq"}}, "quantized"),
        ("llama-linear-rope", {"hidden_act": "relu2"}, "activation 'relu2'"),
        ("llama-linear-rope", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention"]}, "'chunked_attention'"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "bidirectional"),
        ("mistral-window", {"layer_types": ["full_attention"] * 2}, "Ministral"),
        ("mistral-window", {"sliding_window": 0}, "sliding_window must be"),
        ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok=5"),
        ("gemma2", {"final_logit_softcapping": -1.0}, "final_logit_softcapping"),
    ],
)
def test_unsupported_options_are_checkpoint_errors(name, changes, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(hf_config(name, **changes))


def test_unknown_model_type_through_load(tmp_root, tmp_path):
    _, folder = checkpoint("qwen3", tmp_root)
    shutil.copytree(folder, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "deepseek_v3"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown model_type 'deepseek_v3'.*supported: gpt2.*gemma2"):
        load(tmp_path / "m")
    config.update(model_type="qwen3", rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="qwen3 rope_type 'longrope' is not supported"):
        load(tmp_path / "m")
