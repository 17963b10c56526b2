"""The paged KV cache (``ppinfer.lm.paged``): a block pool shared by the particles, block tables,
resampling by table copies.

Random-weight GPT-2 and grouped-query Llama models (``tests/test_lm_long.py``), blocks of 4
positions so that short runs fill, share and free many blocks. Checked: paged logits equal dense
logits (ragged lengths, full caches, the batched ``decode`` and the per-particle ``vmap(step)`` the
SMC engine runs, one particle alone); after a resampling every particle continues exactly like its
ancestor; blocks nobody references are reused (a pool smaller than the blocks a run writes never
runs out under frequent resampling) and an exhausted pool is an ``InferenceError``, not a wrong
result; SMC and Steer through ``pp.infer`` give the dense run's tokens and evidence; the exact
check of ``semantics.check_exact`` passes with the paged path forced on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_lm_long import VOCAB, model, random_params

import ppinfer as pp
from ppinfer import tokens as tk
from ppinfer.errors import ConfigError, InferenceError
from ppinfer.lm import LanguageModel, NGramLM, TransformerConfig, decode, init_particle_cache, paged, prefill
from ppinfer.lm import transformer as tr
from ppinfer.population import gather
from semantics import check_exact, denote

BLOCK = 4


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(tr, "BLOCK_SIZE", BLOCK)


def tolerance(out):
    return {"rtol": 1e-5, "atol": 1e-5 * max(1.0, float(np.abs(out).max()))}


PROMPT = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, 6), jnp.int32)


def prompt_cache_of(arch):
    params, config = model(arch)
    return params, config, prefill(params, config, PROMPT, jnp.int32(5))[1]  # one padding position


@pytest.mark.parametrize(
    "arch, max_new, columns",
    [("gpt2", 10, paged.COLUMNS), ("llama", 10, paged.COLUMNS), ("llama", 30, 3)],
)
def test_paged_logits_equal_dense_with_ragged_lengths(arch, max_new, columns, monkeypatch):
    """Batched ``decode`` and the engine's per-particle ``vmap(step)`` against the dense path, for
    more steps than the cache holds (T = 10 is not a multiple of the block). With T = 30 (7 block
    columns) and 3 columns per loop iteration, the attention runs two groups of 3 then one column
    alone, with particles' lengths ragged inside a group."""
    monkeypatch.setattr(paged, "COLUMNS", columns)
    params, config, pc = prompt_cache_of(arch)
    n = 5
    rng = np.random.default_rng(1)
    dense = init_particle_cache(config, n, max_new)
    batch = paged.init_paged_cache(config, n, max_new)
    one = paged.init_paged_cache(config, n, max_new)
    vstep = jax.jit(jax.vmap(paged.step, in_axes=(None, None, None, 0, 0)), static_argnums=1)
    for _ in range(max_new + 3):
        tokens = jnp.asarray(rng.integers(0, VOCAB, n), jnp.int32)
        active = jnp.asarray((rng.random(n) < 0.7) | (np.arange(n) == 0))
        want, dense = decode(params, config, pc, dense, tokens, active, attention="dense")
        got, batch = paged.decode(params, config, pc, batch, tokens, active)
        np.testing.assert_allclose(got, want, **tolerance(want))
        got, new = vstep(params, config, pc, one, tokens)
        np.testing.assert_allclose(got, want, **tolerance(want))
        one = paged._keep(~active, new, one)  # the engine's rule for particles that did not step
    lengths = np.asarray(batch.length)
    np.testing.assert_array_equal(lengths, np.asarray(dense.length))
    assert len(set(lengths.tolist())) > 1 and lengths.max() > max_new  # ragged, one cache full
    assert int(jnp.max(batch.missing)) == 0 and int(jnp.max(batch.peak)) > n


def test_one_particle_step_equals_prefill():
    """``paged.step`` on one particle, unbatched (no custom batching rule), gives the logits of
    running prompt + tokens from scratch."""
    params, config, pc = prompt_cache_of("llama")
    tokens = np.random.default_rng(2).integers(0, VOCAB, 11)
    single = jax.tree.map(lambda x: x[0], paged.init_paged_cache(config, 1, len(tokens)))
    step = jax.jit(paged.step, static_argnums=1)
    for token in tokens:
        logits, single = step(params, config, pc, single, jnp.int32(token))
    full, _ = prefill(params, config, jnp.concatenate([PROMPT[:5], jnp.asarray(tokens, jnp.int32)]))
    np.testing.assert_allclose(logits, full[-1], **tolerance(full[-1]))
    assert int(single.length) == 11 and int(jnp.sum(single.table >= 0)) == 2


def run_with_resampling(config, params, pc, n, steps, factor, rng, ancestors_of):
    """Step a paged and a dense batch side by side, resampling both after every step with
    ``ancestors_of(t)`` (paged: ``population.gather``, which calls ``PagedCache.reindex``; dense:
    ``x[ancestors]``). Returns both caches and the largest logit difference."""
    pool = paged.init_paged_cache(config, n, steps, pool_factor=factor)
    dense = init_particle_cache(config, n, steps)
    worst = 0.0
    for t in range(steps):
        tokens = jnp.asarray(rng.integers(0, VOCAB, n), jnp.int32)
        got, pool = paged.decode(params, config, pc, pool, tokens)
        want, dense = decode(params, config, pc, dense, tokens, attention="dense")
        worst = max(worst, float(jnp.max(jnp.abs(got - want))))
        ancestors = jnp.asarray(ancestors_of(t), jnp.int32)
        pool_k = pool.pool_k
        pool = gather(pool, ancestors)
        assert pool.pool_k is pool_k  # the pool is shared, not copied
        dense = jax.tree.map(lambda x, a=ancestors: x[a], dense)
    return pool, dense, worst


def test_resampled_particles_continue_like_their_ancestors():
    """After a resampling each particle's next logits (same token) equal its ancestor's before the
    resampling would have been, also when siblings then diverge: the dense cache gathered with
    ``x[ancestors]`` is the reference at every step."""
    params, config, pc = prompt_cache_of("llama")
    rng = np.random.default_rng(3)
    n, steps = 8, 16
    fixed = [3, 3, 3, 0, 5, 3, 7, 3]
    pool, dense, worst = run_with_resampling(
        config, params, pc, n, steps, 1.0, rng, lambda t: fixed if t % 5 == 2 else rng.integers(0, n, n)
    )
    assert worst < 1e-4
    table = np.asarray(pool.table)
    assert (table[:, 0] == table[0, 0]).all()  # one shared first block: no copy per particle
    tokens = jnp.full((n,), 7, jnp.int32)
    got, _ = paged.decode(params, config, pc, pool, tokens)
    want, _ = decode(params, config, pc, dense, tokens, attention="dense")
    np.testing.assert_allclose(got, want, **tolerance(want))


def test_blocks_are_reused_and_a_small_pool_never_runs_out_under_frequent_resampling():
    """16 steps of 8 particles write 8 * 4 = 32 blocks; resampling onto few ancestors every step
    lets a pool of 8 * ceil(0.4 * 4) = 16 blocks hold them all: freed blocks are reused, no
    allocation fails, and the logits stay the dense ones."""
    params, config, pc = prompt_cache_of("llama")
    rng = np.random.default_rng(4)
    n, steps = 8, 16
    weights = np.array([8, 4, 2, 1, 1, 1, 1, 1], float)
    pool, _, worst = run_with_resampling(
        config, params, pc, n, steps, 0.4, rng, lambda t: rng.choice(n, n, p=weights / weights.sum())
    )
    assert worst < 1e-4
    size = int(np.prod(pool.pool_k.shape[:2]))
    assert size == 16 < n * steps // BLOCK
    assert int(jnp.max(pool.missing)) == 0
    assert 0 < int(jnp.max(pool.peak)) < size
    pool.raise_if_exhausted()  # no error


def test_an_exhausted_pool_is_an_error_not_a_wrong_result():
    """Without resampling 8 particles need 8 * 4 distinct blocks; a pool of 8 cannot hold them."""
    params, config, pc = prompt_cache_of("llama")
    rng = np.random.default_rng(5)
    pool, _, worst = run_with_resampling(config, params, pc, 8, 16, 0.25, rng, lambda t: np.arange(8))
    assert int(jnp.max(pool.missing)) > 0 and worst > 1e-3  # the lost keys change the logits
    with pytest.raises(InferenceError, match="ran out of blocks.*pool_factor"):
        pool.raise_if_exhausted()


# --- through pp.infer -------------------------------------------------------------------------------

STOP = 11  # a particle stops on a token ≡ 0 (mod STOP)


def tiny_lm():
    params, config = model("llama")
    return LanguageModel(params, config, None)


def init(p):
    return tk.Context.start(p)


def banned_step(ctx, t, p):
    tok = pp.sample("tok", ctx.next_token())
    pp.condition("not_banned", tok % 3 != 1)
    pp.stop(tok % STOP == 0)
    return ctx.extend(p, tok)


def run_both(algorithm, steps=14, factor=0.5):
    lm = tiny_lm()
    program = pp.sequential(init, banned_step, steps)
    out = {}
    for cache in ("dense", "paged"):
        p = tk.prompt(lm, [1, 2, 3], steps, cache=cache, pool_factor=factor if cache == "paged" else None)
        out[cache] = pp.infer(program, p, algorithm=algorithm, key=7)
    return out


def test_smc_paged_equals_dense():
    """Bootstrap SMC resampling every step with stopping particles (the engine restores a finished
    particle's table and length): same tokens, weights and evidence as the dense cache."""
    out = run_both(pp.SMC(8, ess_threshold=1.0))
    dense, paged_run = out["dense"], out["paged"]
    lengths = np.asarray(paged_run.state.length)
    assert int(np.sum(paged_run.resampled)) >= 8
    assert lengths.min() < 14 and lengths.max() >= 2 * BLOCK  # some stopped, some filled blocks
    np.testing.assert_array_equal(np.asarray(paged_run.state.tokens), np.asarray(dense.state.tokens))
    np.testing.assert_allclose(paged_run.log_weights, dense.log_weights, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(paged_run.log_evidence, dense.log_evidence, rtol=1e-5)
    cache = paged_run.state.cache
    assert isinstance(cache, paged.PagedCache) and int(jnp.max(cache.missing)) == 0


def test_steer_paged_equals_dense():
    """Steer's N·K children and their selection back to N change the batch size: the pool is
    rebuilt (``PagedCache.reindex`` with M != N) and the results stay the dense ones."""
    out = run_both(pp.Steer(4, 2), steps=9, factor=1.0)
    np.testing.assert_array_equal(
        np.asarray(out["paged"].state.tokens), np.asarray(out["dense"].state.tokens)
    )
    np.testing.assert_allclose(out["paged"].log_evidence, out["dense"].log_evidence, rtol=1e-5)


def test_infer_raises_when_the_pool_runs_out():
    lm = tiny_lm()
    program = pp.sequential(init, banned_step, 16)
    p = tk.prompt(lm, [1, 2], 16, cache="paged", pool_factor=0.25)
    # ESS threshold 0: never resamples, so 8 particles need up to 8 * 4 blocks; the pool has 8.
    with pytest.raises(InferenceError, match="ran out of blocks"):
        pp.infer(program, p, algorithm=pp.SMC(8, ess_threshold=0.0), key=0)


# --- the exact check with the paged path forced on ----------------------------------------------

V3, EOS3, T3 = 3, 0, 3


@functools.cache
def lm3():
    config = TransformerConfig(
        arch="llama", vocab_size=V3, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
        head_dim=8, intermediate_size=16, max_position_embeddings=16, norm_eps=1e-6,
        tie_word_embeddings=False, model_type="llama", eos_token_id=EOS3,
    )  # fmt: skip
    return LanguageModel(random_params(config, seed=3), config, None)


def f64(x=1.0):
    return jnp.asarray(x, jnp.result_type(float))


def exact_step(ctx, t, p):
    prev = jnp.where(ctx.length > 0, ctx.tokens[jnp.maximum(ctx.length - 1, 0)], -1)
    tok = pp.sample("tok", ctx.next_token(f64()))
    pp.condition("no_repeat", (tok != prev) | (tok == EOS3))
    pp.factor("likes_2", 0.7 * (tok == 2))
    pp.stop(tok == EOS3)
    return ctx.extend(p, tok)


def test_check_exact_passes_with_the_paged_cache(monkeypatch):
    """``check_exact`` runs the compiled SMC loop on every value of its randomness (N = 2, T = 3,
    blocks of 1 position: every token fills a block, resampling shares them) and compares the
    expected output with the program's exact denotation; the paged program's denotation equals the
    dense program's."""
    monkeypatch.setattr(tr, "BLOCK_SIZE", 1)
    program = pp.sequential(init, exact_step, T3)
    prompts = {c: tk.prompt(lm3(), [EOS3], T3, cache=c) for c in ("dense", "paged")}
    report = check_exact(program, prompts["paged"], algorithm=pp.SMC(2, ess_threshold=1.0), tol=1e-6)
    assert report.ok and report.num_runs > 1, report
    with jax.enable_x64(True):
        difference = denote(program, prompts["paged"]).max_abs_diff(denote(program, prompts["dense"]))
    assert difference < 1e-6


# --- options ------------------------------------------------------------------------------------


def test_cache_options_are_checked_and_auto_pages_long_transformer_runs():
    lm = tiny_lm()
    assert tk.prompt(lm, [1], paged.AUTO_PAGED_MIN_TOKENS - 1).cache == "dense"
    long = min(paged.AUTO_PAGED_MIN_TOKENS, lm.config.max_position_embeddings - 1)
    if long >= paged.AUTO_PAGED_MIN_TOKENS:
        assert tk.prompt(lm, [1], long).cache == "paged"
    ngram = NGramLM.from_probs(np.full((3, 3), 1 / 3))
    assert tk.prompt(ngram, [0], 500).cache == "dense"
    with pytest.raises(ConfigError, match="cache must be"):
        tk.prompt(lm, [1], 4, cache="pages")
    with pytest.raises(ConfigError, match="needs a transformer"):
        tk.prompt(ngram, [0], 4, cache="paged")
    with pytest.raises(ConfigError, match="pool_factor applies"):
        tk.prompt(lm, [1], 4, cache="dense", pool_factor=0.5)
    with pytest.raises(ConfigError, match="pool_factor must be"):
        tk.prompt(lm, [1], 4, cache="paged", pool_factor=0)
    assert tk.prompt(lm, [1], 4, cache="paged", pool_factor=np.float32(0.5)).cache == "paged"  # NumPy scalars
    with pytest.raises(ConfigError, match="cache must be"):
        lm.generate([1], max_new_tokens=2, cache="pages")


def test_generate_with_the_paged_cache_equals_dense():
    lm = tiny_lm()
    dense = lm.generate([1, 2], key=0, num_particles=3, max_new_tokens=10, temperature=0.0)
    pages = lm.generate([1, 2], key=0, num_particles=3, max_new_tokens=10, temperature=0.0, cache="paged")
    np.testing.assert_array_equal(np.asarray(pages.tokens), np.asarray(dense.tokens))


def test_paged_decode_updates_the_pool_in_place():
    """The compiled step aliases the donated cache to its output and never copies the pool."""
    from test_lm_long import WHOLE_COPY, _element_count

    params, config = model("llama")
    n = 8
    _, pc = prefill(params, config, jnp.arange(3, dtype=jnp.int32))
    cache = paged.init_paged_cache(config, n, 96)
    hlo = paged.decode.lower(params, config, pc, cache, jnp.zeros(n, jnp.int32)).compile().as_text()
    assert hlo.count("may-alias") + hlo.count("must-alias") >= 8
    pool = int(np.prod(cache.pool_k.shape))
    copies = [found.group(1) for line in hlo.splitlines() if (found := WHOLE_COPY.match(line))]
    assert copies and all(_element_count(shape) < pool for shape in copies)
