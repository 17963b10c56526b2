"""The embedded default model: it loads offline, answers arithmetic in the trained format, and its
folder is a valid Hugging Face GPT-2 checkpoint (same logits in transformers)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ppinfer.lm import load_default
from ppinfer.lm.model import DEFAULT_MODEL_DIR

ANSWER_FORMAT = re.compile(r"( Step: -?\d+[+*-]-?\d+=-?\d+\.)+ A: -?\d+")


def test_default_model_folder_is_small_and_pickle_free():
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files.keys()
    assert sum(files.values()) < 30 * 2**20
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)


def test_load_default():
    lm = load_default()
    assert lm is load_default()
    assert lm.config.model_type == "gpt2" and lm.config.vocab_size == lm.tokenizer.vocab_size
    assert lm.eos_id == lm.tokenizer.eos_id == lm.tokenizer.encode("<|endoftext|>")[0]
    assert lm.tokenizer.decode(lm.tokenizer.encode("x = 12 + 345")) == "x = 12 + 345"
    assert len(lm.vocab_bytes) == lm.config.vocab_size and lm.vocab_bytes[1] == b"!"


def test_greedy_arithmetic_is_well_formed():
    lm = load_default()
    completion = lm.complete("<|endoftext|>Q: 2+3 = ?", max_new_tokens=40, temperature=0.0)[0]
    assert ANSWER_FORMAT.fullmatch(completion), completion


def test_exported_folder_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(DEFAULT_MODEL_DIR).eval()
    lm = load_default()
    prompt = lm.tokenizer.encode("<|endoftext|>def main():\n    return 17+5*3\n")
    with torch.inference_mode():
        expected = model(torch.tensor([prompt])).logits[0].numpy()
    logits, _ = lm.prefill(prompt)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
