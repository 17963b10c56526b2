"""The JAX transformer against transformers (torch) on tiny random GPT-2, Llama and Qwen2 models,
and the particle cache: shared prompt, different particle lengths, resampling by ancestors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_byte_level_bpe

from ppinfer.lm import LanguageModel, decode, init_particle_cache, lm_step, load, prefill

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 300
PROMPT = "def add(a, b):\n    return a + b\n"


def tiny_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE of exactly VOCAB tokens, trained on a few lines of Python."""
    tok = train_byte_level_bpe([PROMPT * 20, "import os\nprint(os.getcwd())\n" * 20], VOCAB)
    assert tok.get_vocab_size() <= VOCAB
    return tok


def tiny_torch_model(arch: str):
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
        return transformers.GPT2LMHeadModel(config)
    llama_like = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(rope_theta=500.0, **llama_like)
        return transformers.LlamaForCausalLM(config)
    config = transformers.Qwen2Config(tie_word_embeddings=True, **llama_like)
    return transformers.Qwen2ForCausalLM(config)


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def pair(request, tmp_path_factory):
    """(torch model, ppinfer model) with the same random weights, through a saved folder."""
    torch.manual_seed(0)
    model = tiny_torch_model(request.param).eval()
    # Random biases and norm scales, so that loading them in the wrong place cannot go unnoticed.
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                tensor.normal_(0.0, 0.1 if name.endswith("bias") else 1.0)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    return model, load(folder)


def torch_logits(model, tokens) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([list(tokens)], dtype=torch.long)).logits[0].float().numpy()


def test_prefill_matches_transformers(pair):
    model, lm = pair
    prompt = lm.tokenizer.encode(PROMPT)
    logits, cache = lm.prefill(prompt)
    assert logits.shape == (len(prompt), VOCAB) and logits.dtype == jnp.float32
    assert int(cache.length) == len(prompt)
    np.testing.assert_allclose(logits, torch_logits(model, prompt), atol=1e-4, rtol=0)


def test_decode_matches_transformers_with_particles_of_different_lengths(pair):
    model, lm = pair
    prompt = lm.tokenizer.encode(PROMPT)
    num_particles, steps = 4, 20
    _, prompt_cache = lm.prefill(prompt)
    cache = lm.init_particle_cache(prompt_cache, num_particles, steps)
    rng = np.random.default_rng(1)
    fed: list[list[int]] = [[] for _ in range(num_particles)]
    got: list[list[np.ndarray]] = [[] for _ in range(num_particles)]
    for step in range(steps):
        tokens = rng.integers(0, VOCAB, num_particles).astype(np.int32)
        # Particle 0 always steps, 1 stops after 5 tokens, 2 pauses now and then, 3 every other.
        active = np.array([True, step < 5, step % 3 != 1, step % 2 == 0])
        logits, cache = lm.decode(prompt_cache, cache, jnp.asarray(tokens), jnp.asarray(active))
        for i in np.flatnonzero(active):
            fed[i].append(int(tokens[i]))
            got[i].append(np.asarray(logits[i]))
    np.testing.assert_array_equal(cache.length, [len(f) for f in fed])
    for i in range(num_particles):
        expected = torch_logits(model, prompt + fed[i])[len(prompt) :]
        np.testing.assert_allclose(np.stack(got[i]), expected, atol=1e-4, rtol=0)


def test_one_particle_step_under_vmap_equals_decode(pair):
    _, lm = pair
    _, prompt_cache = lm.prefill(lm.tokenizer.encode(PROMPT))
    tokens = jnp.array([5, 17, 42], jnp.int32)
    cache = lm.init_particle_cache(prompt_cache, 3, 4)
    step = jax.jit(jax.vmap(lm.step, in_axes=(None, 0, 0)))
    vmapped, vmapped_cache = step(prompt_cache, cache, tokens)
    batched, batched_cache = lm.decode(prompt_cache, cache, tokens)
    np.testing.assert_allclose(vmapped, batched, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, vmapped_cache, batched_cache)
    assert vmapped.shape == (3, VOCAB)


def test_resampling_gathers_particle_state(pair):
    """After ``cache[ancestors]`` a particle continues exactly as its ancestor does."""
    _, lm = pair
    _, prompt_cache = lm.prefill(lm.tokenizer.encode(PROMPT))
    cache = lm.init_particle_cache(prompt_cache, 4, 8)
    for tokens in ([1, 2, 3, 4], [9, 8, 7, 6], [11, 12, 13, 14]):
        _, cache = lm.decode(
            prompt_cache, cache, jnp.array(tokens, jnp.int32), jnp.array([True, True, True, False])
        )
    ancestors = jnp.array([3, 3, 0, 1])
    resampled = jax.tree.map(lambda x: x[ancestors], cache)
    np.testing.assert_array_equal(resampled.length, [0, 0, 3, 3])
    token = jnp.full((4,), 21, jnp.int32)
    after_resampling, _ = lm.decode(prompt_cache, resampled, token)
    before_resampling, _ = lm.decode(prompt_cache, cache, token)
    np.testing.assert_allclose(after_resampling, before_resampling[ancestors], atol=1e-6)


def test_padded_prompt_equals_exact_prompt(pair):
    _, lm = pair
    prompt = lm.tokenizer.encode(PROMPT)
    padded = prompt + [0] * 7
    exact_logits, exact_cache = lm.prefill(prompt)
    padded_logits, padded_cache = lm.prefill(padded, length=len(prompt))
    np.testing.assert_allclose(padded_logits[: len(prompt)], exact_logits, atol=1e-5)
    token = jnp.array(33, jnp.int32)
    one = jax.tree.map(lambda x: x[0], init_particle_cache(lm.config, 1, 2))
    exact, _ = lm_step(lm.params, lm.config, exact_cache, one, token)
    padded, _ = lm_step(lm.params, lm.config, padded_cache, one, token)
    np.testing.assert_allclose(padded, exact, atol=1e-5)


def test_bf16_loads_and_runs_close_to_fp32(pair, tmp_path):
    model, lm32 = pair
    model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    model.to(torch.float32)
    lm16 = load(tmp_path, dtype=jnp.bfloat16)
    assert lm16.params["embed"].dtype == jnp.bfloat16
    prompt = jnp.asarray(lm32.tokenizer.encode(PROMPT), jnp.int32)
    logits16, prompt_cache = prefill(lm16.params, lm16.config, prompt)
    assert logits16.dtype == jnp.float32 and prompt_cache.k.dtype == jnp.bfloat16
    cache = init_particle_cache(lm16.config, 2, 3, jnp.bfloat16)
    step_logits, cache = decode(lm16.params, lm16.config, prompt_cache, cache, jnp.array([1, 2]))
    assert bool(jnp.isfinite(step_logits).all()) and cache.k.dtype == jnp.bfloat16
    logits32, _ = lm32.prefill(prompt)
    assert float(jnp.max(jnp.abs(logits16 - logits32))) < 0.1 * float(jnp.max(jnp.abs(logits32)))


def test_generate_stops_at_eos(pair):
    _, lm = pair
    assert isinstance(lm, LanguageModel) and lm.eos_id == 0
    assert len(lm.vocab_bytes) == VOCAB and lm.vocab_bytes[0] == b"<|endoftext|>"
    out = lm.generate(PROMPT, key=3, num_particles=5, max_new_tokens=12)
    assert out.tokens.shape == (5, 12) and out.lengths.shape == (5,)
    for row, length in zip(np.asarray(out.tokens), np.asarray(out.lengths), strict=True):
        assert 1 <= length <= 12
        assert (row[: length - 1] != 0).all()
        if length < 12:
            assert row[length - 1] == 0
    greedy = lm.generate(PROMPT, num_particles=2, max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(greedy.tokens[0], greedy.tokens[1])
