"""The n-gram LM gives exact probabilities through the same step interface as the transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppinfer.errors import ModelError
from ppinfer.lm import NGramLM


@pytest.fixture
def trigram():
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=(4, 4))
    return probs, NGramLM.from_probs(probs, bos_id=0)


def test_step_returns_exact_conditionals(trigram):
    probs, lm = trigram
    _, prompt_cache = lm.prefill([2])
    cache = jax.tree.map(lambda x: x[0], lm.init_particle_cache(prompt_cache, 1))
    logits, cache = lm.step(prompt_cache, cache, jnp.int32(3))
    np.testing.assert_allclose(np.exp(logits), probs[2, 3], rtol=1e-6)
    logits, cache = lm.step(prompt_cache, cache, jnp.int32(1))
    np.testing.assert_allclose(np.exp(logits), probs[3, 1], rtol=1e-6)
    np.testing.assert_array_equal(cache.context, [3, 1])


def test_prefill_pads_with_bos_and_scores_every_position(trigram):
    probs, lm = trigram
    logits, prompt_cache = lm.prefill([2, 1, 3])
    expected = np.stack([probs[0, 2], probs[2, 1], probs[1, 3]])
    np.testing.assert_allclose(np.exp(logits), expected, rtol=1e-6)
    np.testing.assert_array_equal(prompt_cache.context, [1, 3])


def test_sequence_probability_is_exact(trigram):
    """Sum over all length-3 continuations of the product of step probabilities is one."""
    probs, lm = trigram
    _, prompt_cache = lm.prefill([1])
    sequences = np.array(np.meshgrid(*[range(4)] * 3, indexing="ij")).reshape(3, -1).T
    cache = lm.init_particle_cache(prompt_cache, len(sequences))
    logits = jnp.broadcast_to(lm.prefill([1])[0][-1], (len(sequences), 4))
    total = jnp.zeros(len(sequences))
    for position in range(3):
        tokens = jnp.asarray(sequences[:, position], jnp.int32)
        total += jnp.take_along_axis(logits, tokens[:, None], axis=1)[:, 0]
        logits, cache = lm.decode(prompt_cache, cache, tokens)
    np.testing.assert_allclose(jnp.exp(total).sum(), 1.0, rtol=1e-5)
    a, b, c = sequences[7]
    np.testing.assert_allclose(np.exp(total[7]), probs[0, 1, a] * probs[1, a, b] * probs[a, b, c], rtol=1e-5)


def test_inactive_particles_keep_context(trigram):
    _, lm = trigram
    _, prompt_cache = lm.prefill([1, 2])
    cache = lm.init_particle_cache(prompt_cache, 2)
    _, cache = lm.decode(prompt_cache, cache, jnp.array([3, 3]), jnp.array([True, False]))
    np.testing.assert_array_equal(cache.context, [[2, 3], [1, 2]])


def test_invalid_table():
    with pytest.raises(ModelError):
        NGramLM.from_probs(np.full((3, 3), 0.5))
    with pytest.raises(ModelError):
        NGramLM.from_probs(np.full((3, 2), 0.5))


# --- the transformer's interface: EOS, start distribution, encode/tokenizer, generate ----------


def test_eos_start_and_tokenizer():
    """A bigram over the words "a", "b", "." with EOS (id 3) and BOS (id 0): the start distribution
    is the all-BOS row, set by ``start``; encode/decode round-trip; a prompt of "" starts there."""
    import ppinfer as pp
    from ppinfer import tokens as tk

    vocab = ["<s>", "a", "b", "</s>"]
    probs = np.array([[0, 0.5, 0.5, 0], [0, 0.2, 0.3, 0.5], [0, 0.6, 0.1, 0.3], [0.25] * 4])
    lm = NGramLM.from_probs(probs, bos_id=0, eos_id=3, vocab=vocab, start=[0, 0.9, 0.1, 0])
    np.testing.assert_allclose(np.exp(lm.start_log_probs), [0, 0.9, 0.1, 0], atol=1e-7)
    assert lm.tokenizer.encode("abba") == [1, 2, 2, 1] and lm.encode("ab").tolist() == [0, 1, 2]
    assert lm.tokenizer.decode([0, 1, 2, 3]) == "ab" and lm.tokenizer.eos_id == 3
    p = tk.prompt(lm, "", max_new_tokens=6)
    np.testing.assert_allclose(np.exp(p.first_logp), [0, 0.9, 0.1, 0], atol=1e-6)

    def step(ctx, t, p):
        tok = pp.sample("tok", ctx.next_token())
        pp.stop(tok == p.eos_id)  # true at EOS: particles stop
        return ctx.extend(p, tok)

    program = pp.sequential(tk.Context.start, step, 6)
    exact = pp.infer(program, p, algorithm=pp.Enumerate())
    toks, active = np.asarray(exact.samples["tok"]), np.asarray(exact.extras["active"])
    w = np.asarray(exact.weights, np.float64)
    # exact: P(the sequence is "a", EOS) = 0.9 * 0.5; without the stop it would be spread over
    # 4^5 continuations of (a, EOS)
    mass = sum(wi for row, act, wi in zip(toks, active, w, strict=True) if row[act].tolist() == [1, 3])
    assert abs(mass - 0.9 * 0.5) < 1e-5
    smc = pp.infer(program, p, algorithm=pp.SMC(2000), key=0)
    shown = tk.texts(smc, lm.tokenizer)  # positive-weight (text, weight); EOS left out
    p_a = sum(wi for text, wi in shown if text == "a")
    assert abs(p_a - 0.45) < 4 * np.sqrt(0.45 * 0.55 / smc.final_ess)

    gen = lm.generate("", key=0, num_particles=4000, max_new_tokens=2)
    first = np.asarray(gen.tokens[:, 0])
    assert abs(np.mean(first == 1) - 0.9) < 4 * np.sqrt(0.09 / 4000)
    ended = np.asarray(gen.tokens[:, 1] == 3)
    assert np.all(np.asarray(gen.lengths)[ended] == 2)
    assert set(lm.complete("b", key=1, num_particles=8, max_new_tokens=3)) <= {
        "".join(w) for n in range(4) for w in __import__("itertools").product("ab", repeat=n)
    }


def test_no_eos_is_an_error_not_a_silent_false():
    from ppinfer import tokens as tk
    from ppinfer.errors import ConfigError, DataError, TokenizerError

    lm = NGramLM.from_probs(np.full((3, 3), 1 / 3), vocab=["^", "x", "y"])
    p = tk.prompt(lm, "x", max_new_tokens=2)
    with pytest.raises(ConfigError, match="no EOS"):
        _ = p.eos_id
    with pytest.raises(TokenizerError, match="no token"):
        lm.encode("xz")
    with pytest.raises(DataError, match="token ids"):
        lm.encode([0, 5])
    with pytest.raises(ModelError, match="eos_id"):
        NGramLM.from_probs(np.full((3, 3), 1 / 3), eos_id=3)
    with pytest.raises(ModelError, match="start"):
        NGramLM.from_probs(np.full((3, 3), 1 / 3), start=[0.5, 0.5])
