"""A decoder-only transformer (GPT-2 and the Llama family) as pure JAX functions.

``params`` is a dict pytree whose per-layer arrays are stacked along a leading layer axis, so the
layers run under one ``lax.scan`` (compile time independent of depth)::

    embed: [V, D]            pos_embed: [P, D] (gpt2)         lm_head: [D, V] (untied only)
    final_norm: {scale: [D], bias: [D] (gpt2)}
    layers: {attn_norm, mlp_norm: {scale: [Lyr, D], bias: [Lyr, D] (gpt2)},
             q: {w: [Lyr, D, H*hd], b?}, k, v: {w: [Lyr, D, Hkv*hd], b?},
             o: {w: [Lyr, H*hd, D], b?},
             up: {w: [Lyr, D, F], b?}, gate: {w: [Lyr, D, F]} (llama), down: {w: [Lyr, F, D], b?}}

Caching for sequential Monte Carlo: the prompt is run once by :func:`prefill` into a
:class:`PromptCache` shared by every particle (no particle axis). Each particle owns a
:class:`ParticleCache` holding only the keys/values of the tokens it generated; every leaf of a
batch of them has a leading particle axis, so ``jax.tree.map(lambda x: x[ancestors], cache)`` is a
resampling step. :func:`lm_step` advances ONE particle (vmap it); :func:`decode` is the batched,
jitted version.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ppinfer.lm.config import TransformerConfig
from ppinfer.suspended import register_keep

Params = dict


class PromptCache(NamedTuple):
    """Keys and values of the shared prompt.

    k, v: [Lyr, Hkv, Lp, hd] in the params' dtype; ``length: i32[]`` is the number of real prompt
    tokens (positions ``>= length`` are padding, masked out), so prompts padded to a bucket size
    reuse one compiled function.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array


class ParticleCache(NamedTuple):
    """Keys and values of the tokens a particle generated after the prompt.

    For one particle: k, v: [Lyr, Hkv, T, hd] and ``length: i32[]`` (tokens stored, ``<= T``).
    A batch adds a leading particle axis N to every leaf (k, v: [N, Lyr, Hkv, T, hd], length:
    i32[N]); T is the fixed maximum number of new tokens. Heads come before positions so that
    attention contracts the cache in its stored layout, without a transposed copy per step.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array


def _keep_cache(done: jax.Array, new: ParticleCache, old: ParticleCache) -> ParticleCache:
    """A finished particle keeps its cache by keeping its ``length``: the slot its step wrote lies at
    ``length``, masked out of attention and overwritten by the next write (see :func:`decode`)."""
    return new._replace(length=jnp.where(done, old.length, new.length))


register_keep(ParticleCache, _keep_cache)


def init_particle_cache(
    config: TransformerConfig,
    num_particles: int,
    max_new_tokens: int,
    dtype: DTypeLike = jnp.float32,
) -> ParticleCache:
    """An empty cache for ``num_particles`` particles of at most ``max_new_tokens`` new tokens."""
    shape = (num_particles, config.num_layers, config.num_kv_heads, max_new_tokens, config.head_dim)
    return ParticleCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        length=jnp.zeros((num_particles,), jnp.int32),
    )


@functools.partial(jax.jit, static_argnums=1)
def prefill(
    params: Params, config: TransformerConfig, tokens: jax.Array, length: jax.Array | None = None
) -> tuple[jax.Array, PromptCache]:
    """Run the shared prompt once.

    tokens: i32[Lp] (optionally right-padded; ``length: i32[]`` real tokens, default Lp).
    Returns logits f32[Lp, V] (row ``length - 1`` is the distribution of the first new token) and
    the :class:`PromptCache`.
    """
    num_tokens = tokens.shape[0]
    length = jnp.asarray(num_tokens if length is None else length, jnp.int32)
    positions = jnp.arange(num_tokens)
    x = _embed(params, config, tokens, positions)
    causal = positions[:, None] >= positions[None, :]

    def layer_fn(x, layer):
        q, k, v = _qkv(config, layer, x, positions)
        scores = _scores(config, q, k)
        out = _weighted_values(config, _softmax(jnp.where(causal, scores, _NEG)), v)
        return _finish_block(config, layer, x, out), (k, v)

    x, (k, v) = jax.lax.scan(layer_fn, x, params["layers"])
    return _logits(params, config, x), PromptCache(k=k, v=v, length=length)


def lm_step(
    params: Params,
    config: TransformerConfig,
    prompt_cache: PromptCache,
    particle_cache: ParticleCache,
    token: jax.Array,
) -> tuple[jax.Array, ParticleCache]:
    """Feed one token to ONE particle: returns logits f32[V] of the next token and its cache.

    particle_cache is a one-particle :class:`ParticleCache` (no particle axis); token: i32[].
    Pure and unjitted so that it composes: ``jax.vmap(lm_step, in_axes=(None, None, None, 0, 0))``
    steps all particles, reading the one shared ``prompt_cache``. A particle whose cache is full
    (``length == T``) still gets logits but its token's keys are dropped.
    """
    position = prompt_cache.length + particle_cache.length
    x = _embed(params, config, token[None], position[None])
    prompt_len, max_new = prompt_cache.k.shape[2], particle_cache.k.shape[2]
    prompt_mask = jnp.arange(prompt_len) < prompt_cache.length
    own_mask = jnp.arange(max_new) < particle_cache.length
    mask = jnp.concatenate([prompt_mask, own_mask, jnp.ones((1,), bool)])

    def layer_fn(x, inputs):
        layer, prompt_k, prompt_v, own_k, own_v = inputs
        q, k, v = _qkv(config, layer, x, position[None])
        # Scores and values are taken from the three parts separately: concatenating the keys
        # would broadcast the shared prompt cache to every particle under vmap. The new token's
        # keys are written once, after all layers, so the cache is updated in place.
        scores = [_scores(config, q, prompt_k), _scores(config, q, own_k), _scores(config, q, k)]
        probs = _softmax(jnp.where(mask, jnp.concatenate(scores, axis=-1), _NEG))
        out = (
            _weighted_values(config, probs[..., :prompt_len], prompt_v)
            + _weighted_values(config, probs[..., prompt_len:-1], own_v)
            + _weighted_values(config, probs[..., -1:], v)
        )
        return _finish_block(config, layer, x, out), (k[:, 0], v[:, 0])

    inputs = (params["layers"], prompt_cache.k, prompt_cache.v, particle_cache.k, particle_cache.v)
    x, (k, v) = jax.lax.scan(layer_fn, x, inputs)
    slot = particle_cache.length
    new_cache = ParticleCache(
        k=particle_cache.k.at[:, :, slot].set(k, mode="drop"),
        v=particle_cache.v.at[:, :, slot].set(v, mode="drop"),
        length=particle_cache.length + 1,
    )
    return _logits(params, config, x)[0], new_cache


@functools.partial(jax.jit, static_argnums=1, donate_argnums=3)
def decode(
    params: Params,
    config: TransformerConfig,
    prompt_cache: PromptCache,
    particle_cache: ParticleCache,
    tokens: jax.Array,
    active: jax.Array | None = None,
) -> tuple[jax.Array, ParticleCache]:
    """Feed one token to every particle: the batched :func:`lm_step`, one jitted call.

    particle_cache: a batch of N particles (donated: do not reuse the argument); tokens: i32[N];
    active: bool[N] or None. An inactive (e.g. finished) particle keeps its length, so its token is
    not part of its prefix. Returns logits f32[N, V] and the updated cache.
    """
    step = jax.vmap(lm_step, in_axes=(None, None, None, 0, 0))
    logits, new_cache = step(params, config, prompt_cache, particle_cache, tokens)
    if active is not None:
        new_cache = new_cache._replace(length=jnp.where(active, new_cache.length, particle_cache.length))
    return logits, new_cache


def sequence_logits(params: Params, config: TransformerConfig, tokens: jax.Array) -> jax.Array:
    """Logits f32[B, L, V] of a batch of sequences tokens: i32[B, L] (teacher forcing, training)."""
    return jax.vmap(lambda t: prefill(params, config, t)[0])(tokens)


_NEG = jnp.finfo(jnp.float32).min


def _embed(params: Params, config: TransformerConfig, tokens, positions):
    x = params["embed"][tokens]
    if config.arch == "gpt2":
        x = x + params["pos_embed"][positions]
    return x


def _qkv(config: TransformerConfig, layer, x, positions):
    """q: [L, H, hd], k, v: [Hkv, L, hd] for hidden states x: [L, D]."""
    h = _norm(config, layer["attn_norm"], x)
    q = _dense(layer["q"], h).reshape(x.shape[0], config.num_heads, config.head_dim)
    k = _dense(layer["k"], h).reshape(x.shape[0], config.num_kv_heads, config.head_dim)
    v = _dense(layer["v"], h).reshape(x.shape[0], config.num_kv_heads, config.head_dim)
    if config.arch == "llama":
        cos, sin = _rope_angles(config, positions)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    return q, jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)


def _scores(config: TransformerConfig, q, k):
    """Attention logits f32[Hkv, G, Lq, Lk]; query heads are grouped onto their shared kv head."""
    q = q.reshape(q.shape[0], config.num_kv_heads, config.group_size, config.head_dim)
    scores = jnp.einsum("qkgd,ksd->kgqs", q, k, preferred_element_type=jnp.float32)
    return scores / jnp.sqrt(jnp.float32(config.head_dim))


def _softmax(scores):
    return jax.nn.softmax(scores, axis=-1)


def _weighted_values(config: TransformerConfig, probs, v):
    out = jnp.einsum("kgqs,ksd->qkgd", probs.astype(v.dtype), v)
    return out.reshape(out.shape[0], config.num_heads * config.head_dim)


def _finish_block(config: TransformerConfig, layer, x, attn_out):
    x = x + _dense(layer["o"], attn_out)
    h = _norm(config, layer["mlp_norm"], x)
    if config.arch == "gpt2":
        h = jax.nn.gelu(_dense(layer["up"], h), approximate=True)
    else:
        h = jax.nn.silu(_dense(layer["gate"], h)) * _dense(layer["up"], h)
    return x + _dense(layer["down"], h)


def _logits(params: Params, config: TransformerConfig, x):
    h = _norm(config, params["final_norm"], x)
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    return jnp.matmul(h, head, preferred_element_type=jnp.float32)


def _dense(p, x):
    y = x @ p["w"]
    return y + p["b"] if "b" in p else y


def _norm(config: TransformerConfig, p, x):
    # Statistics in f32 whatever the params' dtype, as transformers does.
    x32 = x.astype(jnp.float32)
    if config.arch == "gpt2":
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + config.norm_eps)
        return (y * p["scale"] + p["bias"]).astype(x.dtype)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + config.norm_eps)
    return p["scale"] * y.astype(x.dtype)


def _rope_angles(config: TransformerConfig, positions):
    """cos, sin: f32[L, 1, hd] in the half-split layout of transformers' ``rotate_half``."""
    exponents = jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
