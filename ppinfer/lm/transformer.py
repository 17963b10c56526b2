"""A decoder-only transformer (GPT-2 and the Llama family) as pure JAX functions.

``params`` is a dict pytree whose per-layer arrays are stacked along a leading layer axis, so the
layers run under one ``lax.scan`` (compile time independent of depth)::

    embed: [V, D]            pos_embed: [P, D] (gpt2)         lm_head: [D, V] (untied only)
    final_norm: {scale: [D], bias: [D] (gpt2)}
    layers: {attn_norm, mlp_norm: {scale: [Lyr, D], bias: [Lyr, D] (gpt2)},
             q: {w: [Lyr, D, H*hd], b?}, k, v: {w: [Lyr, D, Hkv*hd], b?},
             o: {w: [Lyr, H*hd, D], b?},
             up: {w: [Lyr, D, F], b?}, gate: {w: [Lyr, D, F]} (llama), down: {w: [Lyr, F, D], b?},
             q_norm, k_norm: {scale: [Lyr, hd]} (qk_norm), post_attn_norm, post_mlp_norm:
             {scale: [Lyr, D]} (sandwich_norms), router: {w: [Lyr, D, E]} and experts: {gate, up:
             [Lyr, E, D, F], down: [Lyr, E, F, D]} instead of gate/up/down (mixture of experts)}

Per-layer differences of the Llama-family variants (a sliding window on some layers, Gemma 3's two
RoPE tables) are stacked arrays scanned with the layer weights (:func:`_layer_extras`), never a
Python branch per layer.

Caching for sequential Monte Carlo: the prompt is run once by :func:`prefill` into a
:class:`PromptCache` shared by every particle (no particle axis). Each particle owns a
:class:`ParticleCache` holding only the keys/values of the tokens it generated; every leaf of a
batch of them has a leading particle axis, so ``jax.tree.map(lambda x: x[ancestors], cache)`` is a
resampling step. :func:`lm_step` advances ONE particle (vmap it); :func:`decode` is the batched,
jitted version.

A step reads the particle cache where it lies and writes the new token's keys/values into it with
one scatter, which XLA performs in place on a donated buffer or a loop carry: the cache is never
copied whole. Attention over the particle's own tokens is either dense (all T positions, masked at
the length: cost ∝ T from the first token) or blocked (a loop over blocks of :data:`BLOCK_SIZE`
positions up to the length, online softmax: cost ∝ the longest live particle); see
:func:`lm_step`. The blocked loop has a data-dependent trip count, so it is not reverse-mode
differentiable: differentiate through ``attention="dense"`` (or :func:`sequence_logits`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ppinfer.errors import ConfigError
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

    def layer_fn(x, inputs):
        layer, extra = inputs
        q, k, v = _qkv(config, layer, x, positions, extra)
        scores = _scores(config, q, k)
        mask = causal
        if "window" in extra:
            mask = causal & _in_window(extra["window"], positions[:, None], positions[None, :])
        out = _weighted_values(config, _softmax(jnp.where(mask, scores, _NEG)), v)
        return _finish_block(config, layer, x, out), (k, v)

    x, (k, v) = jax.lax.scan(layer_fn, x, (params["layers"], _layer_extras(config)))
    return _logits(params, config, x), PromptCache(k=k, v=v, length=length)


ATTENTION_MODES = ("auto", "dense", "blocked")
BLOCK_SIZE = 32
"""Positions per key/value block of the blocked attention."""
BLOCK_COLUMNS = 4
"""Blocks per iteration of the blocked attention's main loop (the last ``live % BLOCK_COLUMNS``
blocks run one at a time): a decode step of 64 particles at 500 cached positions took 24.9 ms with
one block per iteration and 18.8 ms with spans of 4 blocks, 14.4 and 11.8 ms at 256
(``bench_lm_long``'s model, CPU)."""
AUTO_BLOCKED_MIN_TOKENS = 64
"""``attention="auto"`` uses the blocked path when the particle cache holds at least this many
positions (``max_new_tokens``), the dense one below. Read when a step is traced: a function already
compiled keeps the path it was traced with."""


def lm_step(
    params: Params,
    config: TransformerConfig,
    prompt_cache: PromptCache,
    particle_cache: ParticleCache,
    token: jax.Array,
    attention: str = "auto",
) -> tuple[jax.Array, ParticleCache]:
    """Feed one token to ONE particle: returns logits f32[V] of the next token and its cache.

    particle_cache is a one-particle :class:`ParticleCache` (no particle axis); token: i32[].
    Pure and unjitted so that it composes: ``jax.vmap(lm_step, in_axes=(None, None, None, 0, 0))``
    steps all particles, reading the one shared ``prompt_cache``. A particle whose cache is full
    (``length == T``) still gets logits but its token's keys are dropped.

    ``attention``: ``"dense"`` attends over all T positions of the particle cache (masked at its
    length); ``"blocked"`` loops over blocks of :data:`BLOCK_SIZE` positions that hold tokens, with
    an online softmax, so a step's work grows with the particle's length, not with T (under
    ``vmap``, with the longest particle's); ``"auto"`` is blocked when T >=
    :data:`AUTO_BLOCKED_MIN_TOKENS`. The logits agree to float rounding.
    """
    return _step(params, config, prompt_cache, particle_cache, token, attention, None)


def _choose(attention: str, max_new: int) -> str:
    if attention not in ATTENTION_MODES:
        raise ConfigError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if attention == "auto":
        return "blocked" if max_new >= AUTO_BLOCKED_MIN_TOKENS else "dense"
    return attention


def _step(params, config, prompt_cache, particle_cache, token, attention, live_blocks):
    """:func:`lm_step` with ``live_blocks``: None (each particle loops over its own blocks) or an
    ``i32[]`` shared by the batch (the blocks of its longest particle: see :func:`batched_step`)."""
    attention = _choose(attention, particle_cache.k.shape[2])
    position = prompt_cache.length + particle_cache.length
    x = _embed(params, config, token[None], position[None])
    prompt_positions = jnp.arange(prompt_cache.k.shape[2])
    prompt_mask = prompt_positions < prompt_cache.length

    def layer_fn(x, inputs):
        index, layer, prompt_k, prompt_v, extra = inputs
        q, k, v = _qkv(config, layer, x, position[None], extra)
        # The particle cache is read in place at this layer (it is not a scanned input: slicing a
        # batch [N, Lyr, ...] along its layer axis would transpose the whole cache every step).
        # The new token's keys are written once, after all layers.
        layer_prompt_mask, own_start = prompt_mask, None
        if "window" in extra:  # sliding window: keys at positions <= position - window are masked
            layer_prompt_mask = prompt_mask & _in_window(extra["window"], position, prompt_positions)
            own_start = jnp.where(
                extra["window"] > 0, position - extra["window"] + 1 - prompt_cache.length, 0
            )
        if attention == "dense":
            out = _attend_dense(
                config, q, k, v, prompt_k, prompt_v, layer_prompt_mask, particle_cache, index, own_start
            )
        else:
            out = _attend_blocked(
                config,
                q,
                k,
                v,
                prompt_k,
                prompt_v,
                layer_prompt_mask,
                particle_cache,
                index,
                live_blocks,
                own_start,
            )
        return _finish_block(config, layer, x, out), (k[:, 0], v[:, 0])

    layers = jnp.arange(config.num_layers)
    inputs = (layers, params["layers"], prompt_cache.k, prompt_cache.v, _layer_extras(config))
    x, (k, v) = jax.lax.scan(layer_fn, x, inputs)
    slot = particle_cache.length
    new_cache = ParticleCache(
        k=particle_cache.k.at[:, :, slot].set(k, mode="drop"),
        v=particle_cache.v.at[:, :, slot].set(v, mode="drop"),
        length=particle_cache.length + 1,
    )
    return _logits(params, config, x)[0], new_cache


def _attend_dense(config, q, k, v, prompt_k, prompt_v, prompt_mask, cache, index, own_start=None):
    """Softmax over prompt, all T cache positions (masked at the length, and below ``own_start``
    under a sliding window) and the new token."""
    own_k = jax.lax.dynamic_index_in_dim(cache.k, index, 0, keepdims=False)
    own_v = jax.lax.dynamic_index_in_dim(cache.v, index, 0, keepdims=False)
    prompt_len = prompt_k.shape[1]
    own_mask = jnp.arange(own_k.shape[1]) < cache.length
    if own_start is not None:
        own_mask = own_mask & (jnp.arange(own_k.shape[1]) >= own_start)
    mask = jnp.concatenate([prompt_mask, own_mask, jnp.ones((1,), bool)])
    # Scores and values are taken from the three parts separately: concatenating the keys would
    # broadcast the shared prompt cache to every particle under vmap.
    scores = [_scores(config, q, prompt_k), _scores(config, q, own_k), _scores(config, q, k)]
    probs = _softmax(jnp.where(mask, jnp.concatenate(scores, axis=-1), _NEG))
    return (
        _weighted_values(config, probs[..., :prompt_len], prompt_v)
        + _weighted_values(config, probs[..., prompt_len:-1], own_v)
        + _weighted_values(config, probs[..., -1:], v)
    )


def _attend_blocked(
    config, q, k, v, prompt_k, prompt_v, prompt_mask, cache, index, live_blocks, own_start=None
):
    """The same softmax, accumulated online: prompt and new token first, then the cache in blocks
    of :data:`BLOCK_SIZE` positions up to the particle's length (or ``live_blocks`` blocks);
    positions below ``own_start`` (sliding window) are masked."""
    max_new = cache.k.shape[2]
    block = min(BLOCK_SIZE, max_new)
    # Running maximum m, normaliser z and unnormalised output acc, all f32: [Hkv, G, 1(, hd)].
    s_prompt = jnp.where(prompt_mask, _scores(config, q, prompt_k), -jnp.inf)
    s_new = _scores(config, q, k)
    m = jnp.maximum(jnp.max(s_prompt, axis=-1), s_new[..., 0])
    p_prompt, p_new = jnp.exp(s_prompt - m[..., None]), jnp.exp(s_new - m[..., None])
    z = jnp.sum(p_prompt, axis=-1) + p_new[..., 0]
    acc = _block_values(p_prompt, prompt_v) + _block_values(p_new, v)
    if live_blocks is None:
        live_blocks = (jnp.minimum(cache.length, max_new) + block - 1) // block

    def over(size):
        """The loop body over ``size`` positions from ``j * size``."""

        def body(j, carry):
            m, z, acc = carry
            # dynamic_slice clamps a span that would run past T back inside the cache: mask the
            # positions the previous span already covered.
            start = jnp.minimum(j * size, max_new - size)
            positions = start + jnp.arange(size)
            valid = (positions >= j * size) & (positions < cache.length)
            if own_start is not None:
                valid = valid & (positions >= own_start)
            shape = (1, cache.k.shape[1], size, cache.k.shape[3])
            kb = jax.lax.dynamic_slice(cache.k, (index, 0, start, 0), shape)[0]
            vb = jax.lax.dynamic_slice(cache.v, (index, 0, start, 0), shape)[0]
            s = jnp.where(valid, _scores(config, q, kb), -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            scale = jnp.exp(m - m_new)
            return m_new, z * scale + jnp.sum(p, axis=-1), acc * scale[..., None] + _block_values(p, vb)

        return body

    width = max(1, min(BLOCK_COLUMNS, max_new // block))
    m, z, acc = spans_then_blocks(live_blocks, width, lambda w: over(w * block), (m, z, acc))
    out = (acc / z[..., None]).astype(v.dtype)  # [Hkv, G, 1, hd]
    out = jnp.transpose(out, (2, 0, 1, 3))
    return out.reshape(out.shape[0], config.num_heads * config.head_dim)


def spans_then_blocks(live: jax.Array, width: int, body_of: Callable, carry: Any) -> Any:
    """A ``fori_loop`` over blocks ``0 … live − 1`` (``live`` may be traced) in spans of ``width``
    blocks, then the last ``live % width`` blocks one at a time, so that nothing past block
    ``live`` is read: ``body_of(w)`` is the loop body ``(j, carry) -> carry`` over the ``w``
    blocks from ``j * w``. Fewer, larger slices and products than one block per iteration."""
    carry = jax.lax.fori_loop(0, live // width, body_of(width), carry)
    return jax.lax.fori_loop(live // width * width, live, body_of(1), carry)


def _block_values(probs, v):
    """f32[Hkv, G, Lq, hd]: probabilities f32[Hkv, G, Lq, S] times values [Hkv, S, hd]."""
    return jnp.einsum("kgqs,ksd->kgqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def batched_step(
    params: Params,
    config: TransformerConfig,
    prompt_cache: PromptCache,
    particle_cache: ParticleCache,
    tokens: jax.Array,
    attention: str = "auto",
) -> tuple[jax.Array, ParticleCache]:
    """:func:`lm_step` for a batch of particles (unjitted: tokens i32[N], cache with a particle
    axis). Unlike ``jax.vmap(lm_step)``, the blocked attention loops over the blocks of the
    longest particle once for the whole batch (no per-particle loop bounds)."""
    live_blocks = None
    if _choose(attention, particle_cache.k.shape[3]) == "blocked":
        max_new = particle_cache.k.shape[3]
        block = min(BLOCK_SIZE, max_new)
        longest = jnp.minimum(jnp.max(particle_cache.length), max_new)
        live_blocks = (longest + block - 1) // block
    step = jax.vmap(_step, in_axes=(None, None, None, 0, 0, None, None))
    return step(params, config, prompt_cache, particle_cache, tokens, attention, live_blocks)


@functools.partial(jax.jit, static_argnums=1, static_argnames="attention", donate_argnums=3)
def decode(
    params: Params,
    config: TransformerConfig,
    prompt_cache: PromptCache,
    particle_cache: ParticleCache,
    tokens: jax.Array,
    active: jax.Array | None = None,
    attention: str = "auto",
) -> tuple[jax.Array, ParticleCache]:
    """Feed one token to every particle: the batched :func:`lm_step`, one jitted call.

    particle_cache: a batch of N particles (donated: do not reuse the argument); tokens: i32[N];
    active: bool[N] or None. An inactive (e.g. finished) particle keeps its length, so its token is
    not part of its prefix. Returns logits f32[N, V] and the updated cache. ``attention`` as in
    :func:`lm_step` (see :func:`batched_step`).
    """
    logits, new_cache = batched_step(params, config, prompt_cache, particle_cache, tokens, attention)
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
    if config.embed_scale:  # Gemma: sqrt(D), rounded to the params' dtype as transformers does
        x = x * jnp.asarray(config.hidden_size**0.5, x.dtype)
    return x


def _layer_extras(config: TransformerConfig) -> dict:
    """Per-layer scalars scanned with the layer weights, only those the config needs:
    ``window: i32[Lyr]`` (0: full attention) when a layer has a sliding window, ``inv_freq:
    f32[Lyr, rotary_dim / 2]`` and ``rope_scale: f32[Lyr]`` when layers use different RoPE tables."""
    extras = {}
    if config.windowed:
        extras["window"] = jnp.asarray(config.layer_window, jnp.int32)
    if config.per_layer_rope:
        tables = [config.rope_table(i) for i in config.layer_rope]
        extras["inv_freq"] = jnp.asarray([table for table, _ in tables], jnp.float32)
        extras["rope_scale"] = jnp.asarray([scale for _, scale in tables], jnp.float32)
    return extras


def _in_window(window, query_pos, key_pos):
    """Whether a key is inside a query's sliding window (``window == 0``: no window): keys at
    positions ``query - window < key <= query`` (causality is masked separately)."""
    return (window == 0) | (query_pos - key_pos < window)


def _qkv(config: TransformerConfig, layer, x, positions, extra=None):
    """q: [L, H, hd], k, v: [Hkv, L, hd] for hidden states x: [L, D]."""
    h = _norm(config, layer["attn_norm"], x)
    q = _dense(layer["q"], h).reshape(x.shape[0], config.num_heads, config.head_dim)
    k = _dense(layer["k"], h).reshape(x.shape[0], config.num_kv_heads, config.head_dim)
    v = _dense(layer["v"], h).reshape(x.shape[0], config.num_kv_heads, config.head_dim)
    if config.qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head, before RoPE
        q, k = _norm(config, layer["q_norm"], q), _norm(config, layer["k_norm"], k)
    if config.arch == "llama":
        cos, sin = _rope_angles(config, positions, extra)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    return q, jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)


def _scores(config: TransformerConfig, q, k):
    """Attention logits f32[Hkv, G, Lq, Lk]; query heads are grouped onto their shared kv head."""
    q = q.reshape(q.shape[0], config.num_kv_heads, config.group_size, config.head_dim)
    scores = jnp.einsum("qkgd,ksd->kgqs", q, k, preferred_element_type=jnp.float32)
    if config.attn_scale is None:
        scores = scores / jnp.sqrt(jnp.float32(config.head_dim))
    else:
        scores = scores * jnp.float32(config.attn_scale)
    if config.attn_softcap is not None:  # Gemma 2: c * tanh(s / c)
        scores = config.attn_softcap * jnp.tanh(scores / config.attn_softcap)
    return scores


def _softmax(scores):
    return jax.nn.softmax(scores, axis=-1)


def _weighted_values(config: TransformerConfig, probs, v):
    out = jnp.einsum("kgqs,ksd->qkgd", probs.astype(v.dtype), v)
    return out.reshape(out.shape[0], config.num_heads * config.head_dim)


def _finish_block(config: TransformerConfig, layer, x, attn_out):
    a = _dense(layer["o"], attn_out)
    if config.sandwich_norms:
        a = _norm(config, layer["post_attn_norm"], a)
    x = x + a
    h = _norm(config, layer["mlp_norm"], x)
    if config.arch == "gpt2":
        h = _dense(layer["down"], jax.nn.gelu(_dense(layer["up"], h), approximate=True))
    elif config.num_experts:
        h = _experts(config, layer, h)
    else:
        h = _dense(layer["down"], _activation(config, _dense(layer["gate"], h)) * _dense(layer["up"], h))
    if config.sandwich_norms:
        h = _norm(config, layer["post_mlp_norm"], h)
    return x + h


def _activation(config: TransformerConfig, x):
    if config.activation == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=config.activation != "gelu")


def _experts(config: TransformerConfig, layer, h):
    """Mixture-of-experts MLP (Mixtral) for h: [L, D]: softmax router, the top-k experts of each
    token weighted by their renormalised probabilities (transformers' order: softmax over all
    experts, top-k, divide by the top-k sum).

    Computed densely: every expert runs on every token and the others get weight 0, which costs
    ``num_experts / experts_per_token`` times the MLP FLOPs of the experts actually used (4x for
    Mixtral's 8 / 2), but has static shapes (no gather of expert weights per particle under vmap).
    """
    probs = jax.nn.softmax(_dense(layer["router"], h).astype(jnp.float32), axis=-1)  # [L, E]
    top, index = jax.lax.top_k(probs, config.experts_per_token)
    top = top / jnp.sum(top, axis=-1, keepdims=True)
    weights = jnp.sum(jax.nn.one_hot(index, config.num_experts, dtype=jnp.float32) * top[..., None], axis=-2)
    experts = layer["experts"]
    gate = jnp.einsum("ld,edf->lef", h, experts["gate"])
    up = jnp.einsum("ld,edf->lef", h, experts["up"])
    hidden = _activation(config, gate) * up * weights[..., None].astype(h.dtype)
    return jnp.einsum("lef,efd->ld", hidden, experts["down"])


def _logits(params: Params, config: TransformerConfig, x):
    h = _norm(config, params["final_norm"], x)
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    logits = jnp.matmul(h, head, preferred_element_type=jnp.float32)
    if config.final_softcap is not None:  # Gemma 2
        logits = config.final_softcap * jnp.tanh(logits / config.final_softcap)
    return logits


def _dense(p, x):
    """``x @ w (+ b)``. ``p["w"]``: float [in, out], or int8 [in, out] with per-output-channel
    ``p["w_scale"]: [out]`` (weight-only int8, ``w ≈ w_int8 * scale``: see ``ppinfer.lm.quantize``),
    converted to x's dtype inside the matmul and scaled after it."""
    if "w_scale" in p:
        y = (x @ p["w"].astype(x.dtype)) * p["w_scale"]
    else:
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
    if config.norm_plus_one:  # Gemma: (1 + w) in f32, then cast
        return (y * (1.0 + p["scale"].astype(jnp.float32))).astype(x.dtype)
    return p["scale"] * y.astype(x.dtype)


def _rope_angles(config: TransformerConfig, positions, extra=None):
    """cos, sin: f32[L, 1, rotary_dim] in the half-split layout of transformers' ``rotate_half``,
    from the config's RoPE table (or this layer's, ``extra["inv_freq"]``), times its cos/sin factor
    (YaRN's attention factor; 1 otherwise)."""
    if extra and "inv_freq" in extra:
        inv_freq, scale = extra["inv_freq"], extra["rope_scale"]
    else:
        table, scale = config.rope_table()
        inv_freq = jnp.asarray(table, jnp.float32)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if not isinstance(scale, float) or scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def _rotate(x, cos, sin):
    """RoPE on the first ``cos.shape[-1]`` features of each head (all of them unless the rotary
    dimension is partial, as in Phi-3 with partial_rotary_factor < 1); the rest pass through."""
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return jnp.concatenate([_rotate(x[..., :dim], cos, sin), x[..., dim:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
