"""Tokenizer: round trips, the byte vocabulary, UTF-8 characters split across tokens, specials."""

from __future__ import annotations

import pytest
import tokenizers
from conftest import train_byte_level_bpe

from ppinfer.errors import TokenizerError
from ppinfer.lm import Tokenizer

TEXT = "print('héllo wörld') # 🙂 naïve café\n"


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return Tokenizer(train_byte_level_bpe(["print('hello world')\n" * 50], 320))


def test_round_trip_and_agreement_with_tokenizers(byte_level):
    ids = byte_level.encode(TEXT)
    assert byte_level.decode(ids) == TEXT
    assert byte_level.decode(ids) == byte_level.backend.decode(ids)
    assert byte_level.decode_bytes(ids) == TEXT.encode()


def test_vocab_bytes_cover_every_byte(byte_level):
    table = byte_level.vocab_bytes
    assert len(table) == byte_level.vocab_size
    single = {t for t in table if len(t) == 1}
    assert single == {bytes([b]) for b in range(256)}
    for index in byte_level.encode("hello world"):
        assert table[index] == byte_level.backend.decode([index]).encode()


def test_prefix_splitting_a_utf8_character_decodes_without_loss(byte_level):
    ids = byte_level.encode("🙂é")
    assert len(ids) == 6  # untrained characters fall back to one token per UTF-8 byte
    for cut in range(len(ids) + 1):
        prefix = ids[:cut]
        assert byte_level.decode_bytes(prefix) == "🙂é".encode()[:cut]
        text = byte_level.decode(prefix)
        assert text == "🙂é".encode()[:cut].decode("utf-8", errors="replace")
    assert byte_level.decode(ids[:2]) == "\ufffd"


def test_special_tokens(byte_level):
    assert byte_level.eos_id == 0 and byte_level.bos_id is None
    assert byte_level.special_ids == {0}
    ids = [0, *byte_level.encode("hi"), 0]
    assert byte_level.decode(ids) == "hi"
    assert byte_level.decode(ids, skip_special=False) == "<|endoftext|>hi<|endoftext|>"
    assert byte_level.vocab_bytes[0] == b"<|endoftext|>"
    assert Tokenizer(byte_level.backend, eos_id=5).eos_id == 5


def test_sentencepiece_style_vocabulary():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0xC3>": 3, "<0xA9>": 4, "\u2581a": 5, "b": 6}
    model = tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    wrapped = Tokenizer(tok)
    assert (wrapped.bos_id, wrapped.eos_id) == (1, 2)
    assert wrapped.vocab_bytes[3:7] == [b"\xc3", b"\xa9", b" a", b"b"]
    assert wrapped.decode([5, 3]) == " a\ufffd"
    assert wrapped.decode([5, 3, 4, 6]) == " aéb"


def test_encode_rejects_non_text(byte_level):
    with pytest.raises(TokenizerError):
        byte_level.encode(b"bytes")
