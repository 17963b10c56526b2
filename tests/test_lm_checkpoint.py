"""Checkpoint loading: sharded safetensors, and a clear CheckpointError for every bad folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import train_byte_level_bpe
from safetensors.numpy import load_file, save_file

from ppinfer.errors import CheckpointError, TokenizerError
from ppinfer.lm import Tokenizer, load

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    folder = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def broken(good, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    return folder


def test_sharded_checkpoint_loads_like_single_file(good, broken):
    tensors = load_file(broken / "model.safetensors")
    names = sorted(tensors)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, broken / file, metadata={"format": "pt"})
    (broken / "model.safetensors").unlink()
    index = {"weight_map": {n: file for file, part in halves.items() for n in part}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded, single = load(broken), load(good)
    np.testing.assert_array_equal(sharded.prefill([1, 2, 3])[0], single.prefill([1, 2, 3])[0])


def test_missing_folder_and_config(broken, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="is a file: load\\(\\) takes the checkpoint folder"):
        load(broken / "config.json")
    (broken / "model.safetensors").write_bytes(b"PK\x03\x04 a zip file, not safetensors")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load(broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(broken)


def test_unknown_model_type(broken):
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "mamba"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown model_type 'mamba'"):
        load(broken)


def test_corrupt_config_json(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(broken)


def test_missing_tensor(broken):
    tensors = load_file(broken / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks tensor 'h\.1\.mlp\.c_fc\.weight'"):
        load(broken)


def test_wrong_shape(broken):
    tensors = load_file(broken / "model.safetensors")
    tensors["transformer.wte.weight"] = np.zeros((49, 16), np.float32)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'wte\.weight'.*shape \(49, 16\).*\(50, 16\)"):
        load(broken)


def test_pickle_only_checkpoint_is_refused(broken):
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never unpickles.*safetensors"):
        load(broken)


def test_no_weights_at_all(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load(broken)


@pytest.mark.parametrize("keep", [4, 200, -100])
def test_truncated_safetensors(broken, keep):
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="truncated"):
        load(broken)


def test_missing_shard(broken):
    index = {"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*missing"):
        load(broken)


def test_bad_tokenizer_file(broken):
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError):
        load(broken)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_file(broken / "absent.json")


def test_padded_embedding_decodes_and_bad_settings_are_clear(tmp_path):
    """An embedding padded past the tokenizer (as Qwen2 ships): its extra ids decode to nothing, as
    ``vocab_bytes`` says (``complete`` raised a TokenizerError on them). An integer ``dtype`` (it
    truncated every weight to 0), an empty prompt in ``generate`` (a raw IndexError), a tokenizer
    path given to ``Tokenizer`` and ``vocab_bytes`` without a tokenizer (raw AttributeErrors)."""
    tok = train_byte_level_bpe(["hello world abc def"] * 10, 270)
    assert tok.get_vocab_size() < 320
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=320, n_embd=16, n_layer=1, n_head=2, n_positions=32, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(
        tmp_path
    )
    lm = load(tmp_path)
    assert len(lm.vocab_bytes) == 320 and lm.vocab_bytes[319] == b""
    assert lm.tokenizer.decode([319, tok.token_to_id("h")]) == "h"
    texts = lm.complete("hello", num_particles=16, max_new_tokens=8, key=1)
    assert len(texts) == 16
    import ppinfer as pp

    for bad in (np.int8, "int32", "bogus", bool):
        with pytest.raises(pp.ConfigError, match="floating-point dtype"):
            load(tmp_path, dtype=bad)
    with pytest.raises(pp.DataError, match="at least one token"):
        lm.generate("")
    assert Tokenizer(str(tmp_path / "tokenizer.json")).vocab_size == tok.get_vocab_size()
    with pytest.raises(TokenizerError, match="Tokenizer takes"):
        Tokenizer(3)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        _ = load(tmp_path).__class__(params=lm.params, config=lm.config, tokenizer=None).vocab_bytes
