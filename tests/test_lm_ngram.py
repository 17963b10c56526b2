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
