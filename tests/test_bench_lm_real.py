"""The pieces of benchmarks/bench_lm_real.py and benchmarks/gpu_check.py, run on a tiny GPT-2.

Random checkpoints load into ppinfer and transformers with the same logits, both generate
functions produce N × (prompt + T) tokens, the computed KV bytes per token match the cache ppinfer
allocates, the peak-RSS probe sees an allocation, the regex check rejects a violating particle,
the profile's two matmul chains compute the same thing, and the GPU check's parity and SMC-rate
functions run (on the CPU: parity with itself is exactly 0).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppinfer.lm import load

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_lm_real as br  # noqa: E402
import gpu_check as gc  # noqa: E402
from _real_models import (  # noqa: E402
    hf_config,
    kv_bytes_per_token,
    regex_ok,
    synthetic_vocab,
    write_checkpoint,
)

TINY = hf_config("gpt2-124m", 2) | {
    "vocab_size": 400,
    "n_embd": 32,
    "n_head": 2,
    "n_inner": 64,
    "eos_token_id": 399,
}
PROMPT = [5, 9, 200, 31]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("tiny"), TINY, seed=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return load(folder), model


def test_checkpoint_loads_the_same_weights_into_both(pair):
    lm, model = pair
    gap, kl = br.logits_gap(np.asarray(lm.prefill(PROMPT)[0]), br.torch_logits(model, PROMPT))
    assert gap < 1e-4 and kl < 1e-6


def test_generate_functions_and_timing(pair):
    lm, model = pair
    fns = {"ppinfer": br.ppinfer_generate(lm, PROMPT, 3, 4), "torch": br.torch_generate(model, PROMPT, 3, 4)}
    assert fns["ppinfer"](0).tokens.shape == (3, 4)
    assert tuple(fns["torch"](0).shape) == (3, len(PROMPT) + 4)
    med = br.timed_medians(fns, reps=1)
    assert all(wall > 0 and cpu >= 0 for wall, cpu in med.values())


def test_kv_bytes_per_token_matches_the_allocated_cache(pair):
    lm, _ = pair
    _, prompt_cache = lm.prefill(PROMPT)
    cache = lm.init_particle_cache(prompt_cache, 5, 7)
    assert cache.k.nbytes + cache.v.nbytes == 5 * 7 * kv_bytes_per_token(lm.config, 4)


def test_peak_rss_sees_an_allocation():
    import mmap

    # A fresh anonymous mapping, every page touched: new resident memory. (np.ones could be served
    # from heap memory an earlier test freed but that is still resident: no growth to see.)
    with br.PeakRSS() as probe:
        block = mmap.mmap(-1, 64 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
    block.close()
    assert probe.delta >= 48 * 2**20


def test_synthetic_vocab_and_regex_check(pair):
    vocab = synthetic_vocab(400)
    assert len(vocab) == len(set(vocab)) == 400 and vocab[-1] == b"<|eos|>"
    e_token = vocab.index(b"e")
    ctx = SimpleNamespace(tokens=np.array([[65, e_token], [65, 66]]), length=np.array([2, 2]))
    fake = SimpleNamespace(state=(ctx,), weights=np.array([0.5, 0.5]))
    assert not regex_ok(fake, vocab, 399)  # a weighted particle with an "e": rejected
    fake.weights = np.array([0.0, 1.0])
    assert regex_ok(fake, vocab, 399)


def test_profile_chains_compute_the_same_products(pair):
    lm, _ = pair
    stacked_fn, stacked_args = br.layer_matmuls(lm.params, 3, stacked=True)
    listed_fn, listed_args = br.layer_matmuls(lm.params, 3, stacked=False)
    np.testing.assert_allclose(stacked_fn(*stacked_args), listed_fn(*listed_args), rtol=1e-5, atol=1e-6)


def test_gpu_check_parity_and_smc_rates_on_cpu(pair):
    lm, _ = pair
    cpu = jax.devices("cpu")[0]
    assert gc.device_report()["backend"] == jax.default_backend()
    assert gc.forward_logits(lm, PROMPT, cpu).shape == (len(PROMPT) + 8, 400)
    assert gc.parity(lm, PROMPT, cpu, cpu) == 0.0
    rates = gc.smc_rates(lm, synthetic_vocab(400), PROMPT, 4, 3, reps=1)
    assert rates["regex_ok"] == 1.0 and rates["smc_tok_s"] > 0 and rates["plain_tok_s"] > 0
    assert bool(jnp.isfinite(rates["smc_over_plain"]))
