"""The HF export used by benchmarks/bench_lm_peers.py: the peers must run exactly our model.

Checks with ``transformers`` only (not the peer libraries): the exported GPT-2 folder gives the JAX
model's logits within 1e-4 (whole sequence, and step by step through HF's KV cache), its tokenizer
encodes like ppinfer's, ppinfer reloads it bit-for-bit, and the benchmark skips cleanly without the
peers.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from ppinfer.errors import CheckpointError
from ppinfer.lm import LanguageModel, load, load_default, sequence_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _hf_export import export_gpt2  # noqa: E402

TEXT = "<|endoftext|>import os, sys\ndef main(argv):\n    return 12+7 = ? Step: 1+2=3. A: 3 é"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    lm = load_default()
    folder = export_gpt2(lm, tmp_path_factory.mktemp("hf") / "default_lm")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return lm, folder, model


def test_hf_logits_match_jax_model(exported):
    lm, _, model = exported
    ids = lm.tokenizer.encode(TEXT)
    assert len(ids) > 30
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits.numpy()[0]
    ours = np.asarray(sequence_logits(lm.params, lm.config, jnp.asarray([ids])))[0]
    assert hf.shape == ours.shape == (len(ids), lm.config.vocab_size)
    np.testing.assert_allclose(hf, ours, rtol=0, atol=1e-4)
    assert np.ptp(ours) > 1.0  # real logits, not a degenerate model that would match trivially


def test_hf_incremental_decoding_matches_jax_steps(exported):
    """The peers decode token by token with HF's KV cache; ppinfer with its particle cache."""
    lm, _, model = exported
    ids = lm.tokenizer.encode(TEXT)[:12]
    prompt, rest = ids[:3], ids[3:]
    logits, prompt_cache = lm.prefill(prompt)
    cache = lm.init_particle_cache(prompt_cache, 1, len(rest))
    ours = [np.asarray(logits[-1])]
    for token in rest:
        step_logits, cache = lm.decode(prompt_cache, cache, jnp.asarray([token], jnp.int32))
        ours.append(np.asarray(step_logits[0]))
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        hf, past = [out.logits[0, -1].numpy()], out.past_key_values
        for token in rest:
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            hf.append(out.logits[0, -1].numpy())
            past = out.past_key_values
    np.testing.assert_allclose(np.stack(hf), np.stack(ours), rtol=0, atol=1e-4)


def test_hf_tokenizer_matches_ppinfer(exported):
    lm, folder, _ = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = lm.tokenizer.encode(TEXT)
    assert tokenizer.encode(TEXT) == ids
    assert ids[0] == lm.eos_id == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == TEXT
    assert len(tokenizer) == lm.config.vocab_size


def test_export_reloads_bit_for_bit(exported):
    lm, folder, _ = exported
    again = load(folder)
    assert again.config.arch == "gpt2" and again.eos_id == lm.eos_id
    flat = dict(_leaves(lm.params))
    assert dict(_leaves(again.params)).keys() == flat.keys()
    for name, array in _leaves(again.params):
        np.testing.assert_array_equal(np.asarray(array), np.asarray(flat[name]), err_msg=name)


def test_export_refuses_non_gpt2(exported, tmp_path):
    lm, _, _ = exported
    llama = LanguageModel(lm.params, dataclasses.replace(lm.config, arch="llama"), lm.tokenizer)
    with pytest.raises(CheckpointError, match="only GPT-2"):
        export_gpt2(llama, tmp_path / "x")
    with pytest.raises(CheckpointError, match="no tokenizer"):
        export_gpt2(LanguageModel(lm.params, lm.config, None), tmp_path / "y")


def test_benchmark_skips_cleanly_without_peers(monkeypatch, capsys):
    import bench_lm_peers

    missing = {"llamppl": "No module named 'llamppl'", "genlm": "No module named 'genlm'"}
    monkeypatch.setattr(bench_lm_peers, "available_peers", lambda: ({}, missing))
    monkeypatch.setattr(sys, "argv", ["bench_lm_peers.py", "--quick"])
    bench_lm_peers.main()
    out = capsys.readouterr().out
    assert "SKIP llamppl: not installed (No module named 'llamppl')" in out
    assert "SKIPPED: no peer library is installed" in out
    assert "RESULT" not in out


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}/{key}")
    else:
        yield prefix, tree
