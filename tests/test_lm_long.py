"""Long generations: the blocked attention (a loop over the cache blocks that hold tokens) gives the
dense path's logits, and a decode step never copies the whole particle cache.

Random-weight GPT-2 and Llama (grouped-query) models built directly in JAX (no checkpoint), several
cache sizes (some not a multiple of the block size), particles of different lengths (a random mask
of active particles), full caches included."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppinfer.errors import ConfigError
from ppinfer.lm import TransformerConfig, decode, init_particle_cache, lm_step, prefill
from ppinfer.lm import transformer as tr

VOCAB = 97


def tiny_config(arch: str) -> TransformerConfig:
    if arch == "gpt2":
        return TransformerConfig(
            arch="gpt2", vocab_size=VOCAB, hidden_size=24, num_layers=2, num_heads=3,
            num_kv_heads=3, head_dim=8, intermediate_size=40, max_position_embeddings=128,
            norm_eps=1e-5, qkv_bias=True, o_bias=True, mlp_bias=True,
        )  # fmt: skip
    return TransformerConfig(
        arch="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, intermediate_size=48, max_position_embeddings=128, norm_eps=1e-6,
        rope_theta=500.0, tie_word_embeddings=False, model_type="llama",
    )  # fmt: skip


def random_params(config: TransformerConfig, seed: int = 0) -> dict:
    """Random weights of the layout documented in :mod:`ppinfer.lm.transformer`."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    d, f, n = config.hidden_size, config.intermediate_size, config.num_layers
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    gpt2 = config.arch == "gpt2"

    def normal(*shape, scale=0.3):
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    def dense(d_in, d_out, bias):
        p = {"w": normal(n, d_in, d_out, scale=d_in**-0.5)}
        return {**p, "b": normal(n, d_out, scale=0.1)} if bias else p

    def norm(*lead):
        p = {"scale": 1.0 + normal(*lead, d, scale=0.1)}
        return {**p, "bias": normal(*lead, d, scale=0.1)} if gpt2 else p

    layers = {
        "attn_norm": norm(n),
        "mlp_norm": norm(n),
        "q": dense(d, q_out, config.qkv_bias),
        "k": dense(d, kv_out, config.qkv_bias),
        "v": dense(d, kv_out, config.qkv_bias),
        "o": dense(q_out, d, config.o_bias),
        "up": dense(d, f, config.mlp_bias),
        "down": dense(f, d, config.mlp_bias),
    }
    params = {"embed": normal(config.vocab_size, d), "final_norm": norm(), "layers": layers}
    if gpt2:
        params["pos_embed"] = normal(config.max_position_embeddings, d)
    else:
        layers["gate"] = dense(d, f, False)
    if not config.tie_word_embeddings:
        params["lm_head"] = normal(d, config.vocab_size, scale=d**-0.5)
    return params


@functools.cache
def model(arch: str):
    config = tiny_config(arch)
    return random_params(config), config


def run_ragged(arch, max_new, num_particles=5, block=8, seed=0):
    """Step a batch of particles with the dense path, the blocked path of :func:`decode` (one
    block loop for the batch) and ``vmap(lm_step)`` (each particle its own loop bound) for
    ``max_new + 3`` steps with random tokens and a random mask of active particles (particle 0
    always active), so lengths differ and a cache fills up. Returns the three logits per step and
    the final lengths."""
    params, config = model(arch)
    rng = np.random.default_rng(seed)
    prompt = jnp.asarray(rng.integers(0, VOCAB, 6), jnp.int32)
    _, prompt_cache = prefill(params, config, prompt, jnp.int32(5))  # one padding position
    vmapped = jax.jit(
        jax.vmap(functools.partial(lm_step, attention="blocked"), in_axes=(None, None, None, 0, 0)),
        static_argnums=1,
    )
    caches = {mode: init_particle_cache(config, num_particles, max_new) for mode in ("dense", "blocked")}
    per_particle = init_particle_cache(config, num_particles, max_new)
    steps = []
    old_block = tr.BLOCK_SIZE
    tr.BLOCK_SIZE = block
    try:
        for _ in range(max_new + 3):
            tokens = jnp.asarray(rng.integers(0, VOCAB, num_particles), jnp.int32)
            active = jnp.asarray((rng.random(num_particles) < 0.7) | (np.arange(num_particles) == 0))
            out = {}
            for mode in caches:
                out[mode], caches[mode] = decode(
                    params, config, prompt_cache, caches[mode], tokens, active, attention=mode
                )
            out["vmap"], new = vmapped(params, config, prompt_cache, per_particle, tokens)
            per_particle = new._replace(length=jnp.where(active, new.length, per_particle.length))
            steps.append({k: np.asarray(v) for k, v in out.items()})
    finally:
        tr.BLOCK_SIZE = old_block
    lengths = np.asarray(caches["blocked"].length)
    np.testing.assert_array_equal(lengths, np.asarray(caches["dense"].length))
    np.testing.assert_array_equal(lengths, np.asarray(per_particle.length))
    return steps, lengths


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("max_new", [5, 16, 21, 60])
def test_blocked_attention_equals_dense_with_ragged_lengths(arch, max_new):
    """Blocks of 8: T = 5 (one short block), 16 (one span of two blocks), 21 (a span, then a block
    clamped back inside the cache), 60 (spans of four blocks, the second clamped)."""
    steps, lengths = run_ragged(arch, max_new)
    assert len(set(lengths.tolist())) > 1  # particles of different lengths
    assert lengths.max() > max_new  # and a full cache (its next keys dropped: both paths alike)
    for out in steps:
        scale = max(1.0, float(np.abs(out["dense"]).max()))
        np.testing.assert_allclose(out["blocked"], out["dense"], rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(out["vmap"], out["dense"], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_blocked_step_equals_full_prefill(arch):
    """The last step's logits equal those of running prompt + generated tokens from scratch."""
    params, config = model(arch)
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(0, VOCAB, 4), jnp.int32)
    new = rng.integers(0, VOCAB, 19)
    _, prompt_cache = prefill(params, config, prompt)
    cache = jax.tree.map(lambda x: x[0], init_particle_cache(config, 1, 40))
    step = jax.jit(functools.partial(lm_step, attention="blocked"), static_argnums=1)
    old_block = tr.BLOCK_SIZE
    tr.BLOCK_SIZE = 8
    try:
        for token in new:
            logits, cache = step(params, config, prompt_cache, cache, jnp.int32(token))
    finally:
        tr.BLOCK_SIZE = old_block
    full, _ = prefill(params, config, jnp.concatenate([prompt, jnp.asarray(new, jnp.int32)]))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[-1]), rtol=1e-5, atol=1e-5)


def test_attention_option_is_checked_and_auto_follows_the_cache_size():
    assert tr._choose("auto", tr.AUTO_BLOCKED_MIN_TOKENS - 1) == "dense"
    assert tr._choose("auto", tr.AUTO_BLOCKED_MIN_TOKENS) == "blocked"
    assert tr._choose("dense", 10_000) == "dense"
    params, config = model("gpt2")
    _, prompt_cache = prefill(params, config, jnp.arange(3, dtype=jnp.int32))
    cache = init_particle_cache(config, 2, 4)
    with pytest.raises(ConfigError, match="attention must be one of"):
        decode(params, config, prompt_cache, cache, jnp.zeros(2, jnp.int32), attention="paged")


WHOLE_COPY = re.compile(r"\s*(?:ROOT )?%\S+ = f32\[([\d,]*)\]\S* (copy|select|concatenate|transpose)\(")


def _element_count(shape: str) -> int:
    return int(np.prod([int(n) for n in shape.split(",") if n])) if shape else 1


@pytest.mark.parametrize("attention", ["dense", "blocked"])
def test_decode_updates_the_cache_in_place(attention):
    """The compiled step aliases the donated cache to its output and contains no instruction that
    copies or selects over a whole cache (the cause of a step cost ∝ T_max before: a transposed
    copy of the cache to scan over layers)."""
    params, config = model("llama")
    n, max_new = 8, 96
    _, prompt_cache = prefill(params, config, jnp.arange(3, dtype=jnp.int32))
    cache = init_particle_cache(config, n, max_new)
    hlo = (
        decode.lower(params, config, prompt_cache, cache, jnp.zeros(n, jnp.int32), attention=attention)
        .compile()
        .as_text()
    )
    aliases = re.search(r"input_output_alias=\{([^}]*\})*[^}]*\}", hlo)
    assert aliases is not None
    assert aliases.group(0).count("may-alias") + aliases.group(0).count("must-alias") >= 2
    whole = int(np.prod(cache.k.shape))
    for line in hlo.splitlines():
        found = WHOLE_COPY.match(line)
        if found:
            assert _element_count(found.group(1)) < whole, line.strip()[:200]
