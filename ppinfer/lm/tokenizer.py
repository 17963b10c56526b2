"""Tokenizers from ``tokenizer.json`` (the ``tokenizers`` library), with a byte-level vocabulary.

Constraint potentials and prefix decoding work on bytes: a byte-level BPE token can hold half of a
UTF-8 character, so :meth:`Tokenizer.decode_bytes` concatenates each token's bytes and
:meth:`Tokenizer.decode` turns them into text with ``errors="replace"`` — never a crash, never a
lost byte in the byte form.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import tokenizers

from ppinfer.errors import TokenizerError

# Common end-of-sequence spellings, in order of preference, when neither config names one.
EOS_CANDIDATES = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<eos>")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>")

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the vocabulary as bytes and the special token ids.

    ``vocab_bytes[i]`` is the bytes token i stands for (special tokens: their UTF-8 spelling);
    ``eos_id``/``bos_id`` may be None when the files name none.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        eos_id: int | None = None,
        bos_id: int | None = None,
    ):
        self.backend = backend
        self.special_ids = frozenset(
            index for index, token in backend.get_added_tokens_decoder().items() if token.special
        )
        self.eos_id = eos_id if eos_id is not None else self._find(EOS_CANDIDATES)
        self.bos_id = bos_id if bos_id is not None else self._find(BOS_CANDIDATES)

    @classmethod
    def from_file(cls, path: str | Path, eos_id: int | None = None, bos_id: int | None = None) -> Tokenizer:
        """Read a ``tokenizer.json``; raises :class:`TokenizerError` if absent or invalid."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{path} is not a valid tokenizer.json: {error}") from None
        return cls(backend, eos_id=eos_id, bos_id=bos_id)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS unless ``add_special_tokens``)."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode_bytes(self, ids: Sequence[int], skip_special: bool = True) -> bytes:
        """The exact bytes of a token sequence (any prefix works, even mid-character)."""
        table = self.vocab_bytes
        return b"".join(table[i] for i in map(int, ids) if not (skip_special and i in self.special_ids))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of a token sequence; a split UTF-8 character becomes U+FFFD instead of failing."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    @functools.cached_property
    def vocab_bytes(self) -> list[bytes]:
        """``vocab_bytes[i]``: the bytes of token i, for all ``vocab_size`` ids."""
        spec = json.loads(self.backend.to_str())
        to_bytes = _piece_decoder(spec)
        table = [b""] * self.vocab_size
        for piece, index in self.backend.get_vocab(with_added_tokens=True).items():
            table[index] = to_bytes(piece)
        for index, token in self.backend.get_added_tokens_decoder().items():
            table[index] = token.content.encode()
        return table

    def _find(self, candidates: tuple[str, ...]) -> int | None:
        for text in candidates:
            index = self.backend.token_to_id(text)
            if index is not None:
                return index
        return None


def _piece_decoder(spec: dict):
    """Maps a vocabulary string to its bytes for the tokenizer's encoding of bytes."""
    if _mentions(spec.get("decoder"), "ByteLevel") or _mentions(spec.get("pre_tokenizer"), "ByteLevel"):
        alphabet = {char: byte for byte, char in _gpt2_byte_alphabet().items()}

        def byte_level(piece: str) -> bytes:
            # Added tokens are stored verbatim, outside the byte alphabet.
            if all(char in alphabet for char in piece):
                return bytes(alphabet[char] for char in piece)
            return piece.encode()

        return byte_level

    # SentencePiece-style (Llama 2, Mistral): "▁" is a space, "<0xAB>" a raw byte.
    def sentencepiece(piece: str) -> bytes:
        match = _BYTE_FALLBACK.match(piece)
        return bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode()

    return sentencepiece


def _mentions(component: dict | None, kind: str) -> bool:
    if not component:
        return False
    if component.get("type") == kind:
        return True
    parts = component.get("decoders") or component.get("pretokenizers") or []
    return any(_mentions(part, kind) for part in parts)


@functools.cache
def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (``bytes_to_unicode``)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}
