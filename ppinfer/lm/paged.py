"""A paged particle KV cache: particles share the blocks of their common prefixes.

Layout (one particle; a batch of N adds a leading particle axis to every leaf)::

    pool_k, pool_v: [C, Lyr, Hkv, B, hd]   this particle's share of the block pool
    table: i32[nb]                          pool ids of the particle's full blocks (-1: none)
    tail_k, tail_v: [Lyr, Hkv, B, hd]       its partially filled last block, owned outright
    length: i32[]                           tokens stored
    peak, missing: i32[]                    pool statistics (the same in every particle)

B is the block size (positions per block), ``nb = max(T // B, 1)`` the most full blocks a particle
of at most T new tokens holds, ``C = ceil(pool_factor * nb)``. Positions ``[j B, (j+1) B)`` of a
particle live in pool block ``table[j]`` for ``j < length // B`` and in the tail after that. The
pool of a batch is its ``N`` shares laid end to end: ``P = N * C`` blocks, block id ``i`` is row
``i`` of ``pool_k.reshape(P, ...)``; any particle may reference any block. (The pool is split along
the particle axis only so that it travels through the SMC engine like any per-particle state; the
engine never indexes it per particle: see :meth:`PagedCache.reindex` and :func:`_keep`.)

- **Step** (:func:`decode` for a batch; :func:`step` for one particle, whose ``jax.vmap`` runs the
  batched code through ``jax.custom_batching``): attention over the shared prompt, the particle's
  full blocks (a loop over block columns up to the longest particle, each a gather of N blocks from
  the pool), its tail and the new token, online softmax, the same arithmetic as
  :func:`ppinfer.lm.transformer.lm_step`. The new keys/values go into the tail; a tail that becomes
  full is written to a free pool block and its id appended to the table.
- **Free blocks**: a block is free when no table references it. The reference counts are recounted
  from the N tables at every step (a scatter-add of ``N * nb`` ids), so whatever the engine does to
  the tables (resampling, restoring a finished particle) the counts stay exact, and a block nobody
  references any more is reused at once.
- **Resampling** (:meth:`PagedCache.reindex`, called by :func:`ppinfer.population.gather`): copies
  the tables, tails and lengths of the ancestors — never a full block of the pool. The tail is the
  copy-on-write of the one partially filled block per particle.
- **Pool size**: fixed up front, ``P = N * ceil(pool_factor * nb)`` blocks. With ``pool_factor >=
  1`` it can never run out (each particle references at most nb blocks). Below 1 it holds only as
  many distinct blocks as that: memory ∝ the distinct blocks the run needs, which after frequent
  resampling is far below ``N * nb`` (particles descend from few ancestors). If a block cannot be
  allocated the particle's tail is not stored (its later logits would be wrong): ``missing`` counts
  such failures and :meth:`PagedCache.raise_if_exhausted` (called by :func:`ppinfer.infer` on the
  final state) raises
  :class:`~ppinfer.errors.InferenceError`. ``peak`` is the most blocks in use at once: the pool
  that would have sufficed. A finished particle still runs its step (the engine restores its state
  afterwards), and may hold one extra block for the duration of that step.

Memory: ``P`` blocks + N tails + the tables, against ``N * T`` positions per layer for the dense
:class:`~ppinfer.lm.transformer.ParticleCache`. Bytes moved per resampling: ``N`` tails and tables
(``N * B`` positions) instead of ``N * T`` positions.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from ppinfer.errors import ConfigError, InferenceError
from ppinfer.lm import transformer as tr
from ppinfer.lm.config import TransformerConfig
from ppinfer.suspended import register_keep

__all__ = [
    "PagedCache",
    "init_paged_cache",
    "step",
    "decode",
    "DEFAULT_POOL_FACTOR",
    "AUTO_PAGED_MIN_TOKENS",
]

AUTO_PAGED_MIN_TOKENS = 128
"""``tokens.prompt(..., cache="auto")`` pages the cache of a transformer when ``max_new_tokens`` is
at least this (dense below, where the step is cheaper than the paging and resampling copies little)."""

DEFAULT_POOL_FACTOR = 1.0
"""Pool blocks per particle as a fraction of the most a particle can hold (``T // B``): 1 can never
run out; below 1 saves memory when resampling makes particles share their prefixes."""


@jax.tree_util.register_pytree_node_class
class PagedCache:
    """The paged particle cache (see the module docstring for the layout). A pytree; its aux data
    is ``max_new_tokens`` (T)."""

    def __init__(self, pool_k, pool_v, table, tail_k, tail_v, length, peak, missing, max_new_tokens: int):
        self.pool_k, self.pool_v, self.table = pool_k, pool_v, table
        self.tail_k, self.tail_v, self.length = tail_k, tail_v, length
        self.peak, self.missing = peak, missing
        self.max_new_tokens = max_new_tokens

    def tree_flatten(self):
        children = (self.pool_k, self.pool_v, self.table, self.tail_k, self.tail_v, self.length)
        return (*children, self.peak, self.missing), self.max_new_tokens

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, aux)

    def replace(self, **fields) -> PagedCache:
        names = ("pool_k", "pool_v", "table", "tail_k", "tail_v", "length", "peak", "missing")
        values = {name: getattr(self, name) for name in names} | fields
        return PagedCache(**values, max_new_tokens=self.max_new_tokens)

    @property
    def block_size(self) -> int:
        return self.tail_k.shape[-2]

    def reindex(self, ancestors: jax.Array) -> PagedCache:
        """The batch of particles ``ancestors: i32[M]`` (a resampling): tables, tails and lengths
        are gathered, the pool is shared as it is. When M differs from the batch size N (Steer's
        N·K children, and their selection back to N), the pool is rebuilt with M shares, its
        referenced blocks moved to the front (one copy of the pool)."""
        ancestors = jnp.asarray(ancestors, jnp.int32)
        n, m = self.length.shape[0], ancestors.shape[0]
        take = lambda x: jnp.take(x, ancestors, axis=0, mode="clip")
        peak = jnp.broadcast_to(jnp.max(self.peak), (m,))
        missing = jnp.broadcast_to(jnp.max(self.missing), (m,))
        table = take(self.table)
        pool_k, pool_v = self.pool_k, self.pool_v
        if m != n:
            table, pool_k, pool_v, lost = _compact(table, pool_k, pool_v, m)
            missing = missing + lost
        return PagedCache(
            pool_k, pool_v, table, take(self.tail_k), take(self.tail_v), take(self.length),
            peak, missing, self.max_new_tokens,
        )  # fmt: skip

    def raise_if_exhausted(self) -> None:
        """Raise :class:`~ppinfer.errors.InferenceError` if a block could not be allocated during
        the run (the pool was too small: results would be wrong)."""
        missing = int(jnp.max(self.missing))
        if missing:
            blocks = math.prod(self.pool_k.shape[:-4])
            raise InferenceError(
                f"the paged KV cache ran out of blocks: {missing} block(s) could not be allocated "
                f"from a pool of {blocks} (up to {int(jnp.max(self.peak))} were wanted at once), so some "
                "particles lost keys/values and the result is invalid. Raise pool_factor (tokens.prompt(..., "
                "pool_factor=...); 1.0 can never run out) or use cache='dense'"
            )


def paged_unsupported(config: TransformerConfig) -> list[str]:
    """The attention features of ``config`` that the paged step does not implement (empty: fine)."""
    out = []
    if getattr(config, "layer_window", None) and any(config.layer_window):
        out.append("sliding-window layers")
    if getattr(config, "attn_scale", None) is not None:
        out.append("a custom attention scale")
    if getattr(config, "attn_softcap", None) is not None:
        out.append("attention soft-capping")
    return out


def init_paged_cache(
    config: TransformerConfig,
    num_particles: int,
    max_new_tokens: int,
    dtype: DTypeLike = jnp.float32,
    pool_factor: float = DEFAULT_POOL_FACTOR,
    block_size: int | None = None,
) -> PagedCache:
    """An empty :class:`PagedCache` for ``num_particles`` particles of at most ``max_new_tokens``.

    ``pool_factor`` (> 0): pool blocks per particle as a fraction of ``T // B``; ``block_size``:
    positions per block (default :data:`ppinfer.lm.transformer.BLOCK_SIZE`). A model whose
    attention has a sliding window, a custom score scale or soft-capping (Gemma, Mistral, Phi-3 with
    a window) is a :class:`ConfigError`: the paged step does not implement them yet."""
    unsupported = paged_unsupported(config)
    if unsupported:
        raise ConfigError(
            f"cache='paged' does not support this model's attention ({', '.join(unsupported)}): "
            "use cache='dense'"
        )
    ok = isinstance(pool_factor, numbers.Real) and not isinstance(pool_factor, bool | np.bool_)
    if not (ok and 0 < pool_factor < float("inf")):
        raise ConfigError(f"pool_factor must be a number > 0, got {pool_factor!r}")
    block = tr.BLOCK_SIZE if block_size is None else int(block_size)
    if block < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size!r}")
    max_new_tokens = int(max_new_tokens)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    full = max(max_new_tokens // block, 1)
    share = max(math.ceil(pool_factor * full), 1)
    n, lyr, hkv, hd = num_particles, config.num_layers, config.num_kv_heads, config.head_dim
    return PagedCache(
        pool_k=jnp.zeros((n, share, lyr, hkv, block, hd), dtype),
        pool_v=jnp.zeros((n, share, lyr, hkv, block, hd), dtype),
        table=jnp.full((n, full), -1, jnp.int32),
        tail_k=jnp.zeros((n, lyr, hkv, block, hd), dtype),
        tail_v=jnp.zeros((n, lyr, hkv, block, hd), dtype),
        length=jnp.zeros((n,), jnp.int32),
        peak=jnp.zeros((n,), jnp.int32),
        missing=jnp.zeros((n,), jnp.int32),
        max_new_tokens=max_new_tokens,
    )


def _keep(done: jax.Array, new: PagedCache, old: PagedCache) -> PagedCache:
    """A finished particle keeps its table and length (its step's write lies past its length and a
    block its step allocated is referenced by no table afterwards: free again). The pool is the new
    one: other particles wrote to it."""
    table = jnp.where(done[:, None], old.table, new.table)
    return new.replace(table=table, length=jnp.where(done, old.length, new.length))


register_keep(PagedCache, _keep)


def decode_batch(
    params: tr.Params,
    config: TransformerConfig,
    prompt_cache: tr.PromptCache,
    cache: PagedCache,
    tokens: jax.Array,
    active: jax.Array | None = None,
) -> tuple[jax.Array, PagedCache]:
    """Feed ``tokens: i32[N]`` to a batch of N particles (unjitted). Returns logits f32[N, V] and
    the cache. ``active: bool[N]`` or None: an inactive particle stores nothing and keeps its
    length."""
    n = tokens.shape[0]
    share, block = cache.pool_k.shape[1], cache.block_size
    rest = cache.pool_k.shape[2:]
    pool_k = cache.pool_k.reshape(n * share, *rest)
    pool_v = cache.pool_v.reshape(n * share, *rest)
    max_new = cache.max_new_tokens
    stored = jnp.minimum(cache.length, max_new)
    num_full = jnp.minimum(stored // block, cache.table.shape[1])  # blocks in the pool
    tail_len = stored - num_full * block
    position = prompt_cache.length + cache.length
    x = tr._embed(params, config, tokens, position)
    prompt_mask = jnp.arange(prompt_cache.k.shape[2]) < prompt_cache.length
    live = jnp.max(num_full)

    def layer_fn(x, inputs):
        index, layer, prompt_k, prompt_v = inputs
        q, k, v = tr._qkv(config, layer, x, position)  # q: [N, H, hd]; k, v: [Hkv, N, hd]
        out = _attend(config, q, k, v, prompt_k, prompt_v, prompt_mask, pool_k, pool_v, cache, index,
                      num_full, tail_len, live)  # fmt: skip
        return tr._finish_block(config, layer, x, out), (k, v)

    inputs = (jnp.arange(config.num_layers), params["layers"], prompt_cache.k, prompt_cache.v)
    x, (k, v) = jax.lax.scan(layer_fn, x, inputs)  # k, v: [Lyr, Hkv, N, hd]
    logits = tr._logits(params, config, x)

    is_active = jnp.ones((n,), bool) if active is None else jnp.asarray(active, bool)
    writes = is_active & (cache.length < max_new)
    rows = jnp.arange(n)
    slot = jnp.where(writes, tail_len, block)  # block: out of range, dropped
    new_k = jnp.transpose(k, (2, 0, 1, 3)).astype(cache.tail_k.dtype)  # [N, Lyr, Hkv, hd]
    new_v = jnp.transpose(v, (2, 0, 1, 3)).astype(cache.tail_v.dtype)
    tail_k = cache.tail_k.at[rows, :, :, slot].set(new_k, mode="drop")
    tail_v = cache.tail_v.at[rows, :, :, slot].set(new_v, mode="drop")
    # A tail that is now full moves to a free pool block.
    commits = writes & (tail_len == block - 1) & (num_full < cache.table.shape[1])

    def commit(operand):
        pool_k, pool_v, table = operand
        blocks, ok, in_use = _allocate(table, commits, n * share)
        target = jnp.where(ok, blocks, n * share)
        pool_k = pool_k.at[target].set(tail_k, mode="drop")
        pool_v = pool_v.at[target].set(tail_v, mode="drop")
        column = jnp.where(ok, num_full, table.shape[1])
        table = table.at[rows, column].set(blocks, mode="drop")
        return pool_k, pool_v, table, jnp.sum(commits & ~ok).astype(jnp.int32), in_use

    def skip(operand):
        return *operand, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)

    # Tails fill once every B steps: the allocation and the pool write run only then.
    operand = (pool_k, pool_v, cache.table)
    pool_k, pool_v, table, lost, in_use = jax.lax.cond(jnp.any(commits), commit, skip, operand)
    new_cache = PagedCache(
        pool_k=pool_k.reshape(cache.pool_k.shape),
        pool_v=pool_v.reshape(cache.pool_v.shape),
        table=table,
        tail_k=tail_k,
        tail_v=tail_v,
        length=jnp.where(is_active, cache.length + 1, cache.length),
        peak=jnp.maximum(cache.peak, in_use),
        missing=cache.missing + lost,
        max_new_tokens=max_new,
    )
    return logits, new_cache


COLUMNS = 8
"""Block columns of the table read per iteration of :func:`_attend`'s main loop (``COLUMNS * B``
positions; the last ``live % COLUMNS`` columns one at a time): fewer, larger gathers and products
than one block per iteration. With the particle-major layout, a decode step at 500 cached positions
took 19.7 ms against 26.0 ms before (one block per iteration, head-major), 12.6 against 17.4 at
256 (``bench_lm_long``'s model, N = 64, CPU)."""


def _attend(config, q, k, v, prompt_k, prompt_v, prompt_mask, pool_k, pool_v, cache, index,
            num_full, tail_len, live):  # fmt: skip
    """Online softmax of each particle's query over the prompt, its new token, its tail and its
    full pool blocks (a loop over groups of :data:`COLUMNS` block columns up to column ``live``).
    Everything is particle-major (``[N, Hkv, G, ...]``), the layout the gathered blocks come in, so
    the loop transposes nothing. Returns [N, H*hd]."""
    n, hkv, g, hd = q.shape[0], config.num_kv_heads, config.group_size, config.head_dim
    scale = 1.0 / jnp.sqrt(jnp.float32(hd))
    qg = q.reshape(n, hkv, g, hd)
    dot = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    # Scores f32[N, Hkv, G, S]; running maximum m, normaliser z: [N, Hkv, G]; acc: [.., hd].
    s_prompt = jnp.where(prompt_mask, dot("nkgd,ksd->nkgs", qg, prompt_k) * scale, -jnp.inf)
    s_new = dot("nkgd,knd->nkg", qg, k) * scale
    tail_k = jax.lax.dynamic_index_in_dim(cache.tail_k, index, 1, keepdims=False)  # [N, Hkv, B, hd]
    tail_v = jax.lax.dynamic_index_in_dim(cache.tail_v, index, 1, keepdims=False)
    block = tail_k.shape[2]
    tail_ok = (jnp.arange(block)[None, :] < tail_len[:, None])[:, None, None, :]  # [N, 1, 1, B]
    s_tail = jnp.where(tail_ok, dot("nkgd,nksd->nkgs", qg, tail_k) * scale, -jnp.inf)
    m = jnp.maximum(jnp.maximum(jnp.max(s_prompt, -1), s_new), jnp.max(s_tail, -1))
    p_prompt = jnp.exp(s_prompt - m[..., None])
    p_new = jnp.exp(s_new - m)
    p_tail = jnp.exp(s_tail - m[..., None])
    z = jnp.sum(p_prompt, -1) + p_new + jnp.sum(p_tail, -1)
    acc = dot("nkgs,ksd->nkgd", p_prompt.astype(prompt_v.dtype), prompt_v)
    acc = acc + p_new[..., None] * jnp.transpose(v, (1, 0, 2))[:, :, None].astype(jnp.float32)
    acc = acc + dot("nkgs,nksd->nkgd", p_tail.astype(tail_v.dtype), tail_v)
    columns = cache.table.shape[1]

    def group(width):
        """The loop body over the ``width`` block columns from ``j * width``."""

        def body(j, carry):
            m, z, acc = carry
            cols = j * width + jnp.arange(width)
            ids = cache.table[:, jnp.minimum(cols, columns - 1)]  # [N, width]
            ids = jnp.clip(ids, 0, pool_k.shape[0] - 1)
            kb, vb = pool_k[ids, index], pool_v[ids, index]  # [N, width, Hkv, B, hd]: one gather each
            s = dot("nkgd,ncksd->nkgcs", qg, kb) * scale
            ok = cols[None, :] < num_full[:, None]  # [N, width]
            s = jnp.where(ok[:, None, None, :, None], s, -jnp.inf).reshape(n, hkv, g, width * block)
            m_new = jnp.maximum(m, jnp.max(s, -1))
            p = jnp.exp(s - m_new[..., None])
            rescale = jnp.exp(m - m_new)
            pv = dot("nkgcs,ncksd->nkgd", p.reshape(n, hkv, g, width, block).astype(vb.dtype), vb)
            return m_new, z * rescale + jnp.sum(p, -1), acc * rescale[..., None] + pv

        return body

    m, z, acc = tr.spans_then_blocks(live, min(COLUMNS, columns), group, (m, z, acc))
    out = (acc / z[..., None]).astype(v.dtype)  # [N, Hkv, G, hd]
    return out.reshape(n, config.num_heads * hd)


def _allocate(table: jax.Array, wants: jax.Array, num_blocks: int):
    """Free pool blocks for the particles with ``wants: bool[N]``: ``(ids i32[N], ok bool[N],
    in_use i32[])``. A block is free when no row of ``table: i32[N, nb]`` references it (counts
    recomputed from the tables); ``in_use`` counts the referenced blocks after the allocation."""
    ids = table.reshape(-1)
    counts = jnp.zeros((num_blocks,), jnp.int32).at[jnp.where(ids >= 0, ids, num_blocks)].add(1, mode="drop")
    free = counts == 0
    n = wants.shape[0]
    (free_ids,) = jnp.nonzero(free, size=n, fill_value=num_blocks)
    rank = jnp.cumsum(wants) - 1
    blocks = free_ids[jnp.clip(rank, 0, n - 1)]
    ok = wants & (blocks < num_blocks)
    in_use = num_blocks - jnp.sum(free) + jnp.sum(ok)
    return jnp.where(ok, blocks, -1).astype(jnp.int32), ok, in_use.astype(jnp.int32)


def _compact(table, pool_k, pool_v, m):
    """The pool rebuilt with ``m`` shares, the blocks ``table: i32[M, nb]`` references first (in id
    order) and the table renumbered. Returns ``(table, pool_k, pool_v, lost)``; ``lost`` counts
    referenced blocks that did not fit (0 unless the new pool is smaller than the live blocks)."""
    n, share = pool_k.shape[0], pool_k.shape[1]
    old_blocks, new_blocks = n * share, m * share
    ids = table.reshape(-1)
    marks = jnp.where(ids >= 0, ids, old_blocks)
    referenced = jnp.zeros((old_blocks,), bool).at[marks].set(True, mode="drop")
    order = jnp.argsort(~referenced, stable=True)  # referenced blocks first, in id order
    new_id = jnp.zeros((old_blocks,), jnp.int32).at[order].set(jnp.arange(old_blocks, dtype=jnp.int32))
    source = order[jnp.minimum(jnp.arange(new_blocks), old_blocks - 1)]
    flat = lambda pool: pool.reshape(old_blocks, *pool.shape[2:])
    regroup = lambda pool: pool.reshape(m, share, *pool.shape[1:])
    pool_k, pool_v = regroup(flat(pool_k)[source]), regroup(flat(pool_v)[source])
    renumbered = new_id[jnp.clip(table, 0, old_blocks - 1)]
    fits = renumbered < new_blocks
    lost = jnp.sum((table >= 0) & ~fits).astype(jnp.int32)
    table = jnp.where((table >= 0) & fits, renumbered, -1)
    return table, pool_k, pool_v, lost


@functools.partial(jax.jit, static_argnums=1, donate_argnums=3)
def decode(
    params: tr.Params,
    config: TransformerConfig,
    prompt_cache: tr.PromptCache,
    cache: PagedCache,
    tokens: jax.Array,
    active: jax.Array | None = None,
) -> tuple[jax.Array, PagedCache]:
    """:func:`decode_batch`, jitted; the cache argument is donated (do not reuse it)."""
    return decode_batch(params, config, prompt_cache, cache, tokens, active)


def step(
    params: tr.Params,
    config: TransformerConfig,
    prompt_cache: tr.PromptCache,
    cache: PagedCache,
    token: jax.Array,
) -> tuple[jax.Array, PagedCache]:
    """Feed ``token: i32[]`` to ONE particle (no particle axis): logits f32[V] and its cache.

    ``jax.vmap`` of this function over the cache and the token runs :func:`decode_batch` on the
    whole batch (a ``jax.custom_batching`` rule): that is how the SMC engine's per-particle step
    reaches the shared pool. The parameters and the prompt cache must not be batched."""
    return _one_particle(config)(params, prompt_cache, cache, token)


@functools.cache
def _one_particle(config: TransformerConfig):
    @jax.custom_batching.custom_vmap
    def one(params, prompt_cache, cache, token):
        batched = jax.tree.map(lambda x: x[None], (cache, token))
        logits, new = decode_batch(params, config, prompt_cache, *batched)
        return logits[0], jax.tree.map(lambda x: x[0], new)

    @one.def_vmap
    def rule(axis_size, in_batched, params, prompt_cache, cache, token):
        params_batched, prompt_batched, _, _ = in_batched
        if any(jax.tree.leaves(params_batched)) or any(jax.tree.leaves(prompt_batched)):
            raise ConfigError(
                "a paged KV cache needs the model's parameters and one prompt cache shared by all "
                "particles (unbatched under vmap); use cache='dense' to vmap over them"
            )
        _, _, cache_batched, token_batched = in_batched

        def spread(x, is_batched):
            return x if is_batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))

        cache = jax.tree.map(spread, cache, cache_batched)
        token = spread(token, token_batched)
        out = decode_batch(params, config, prompt_cache, cache, token)
        return out, jax.tree.map(lambda _: True, out)

    return one
