"""Tokenizers from ``tokenizer.json`` (the ``tokenizers`` library), with a byte-level vocabulary.

Constraint potentials and prefix decoding work on bytes: a byte-level BPE token can hold half of a
UTF-8 character, and a SentencePiece byte-fallback token (``<0xE4>``) is one raw byte, so
:meth:`Tokenizer.decode_bytes` concatenates each token's bytes and :meth:`Tokenizer.decode` turns
them into text with ``errors="replace"`` — never a crash, never a lost byte in the byte form.

:meth:`Tokenizer.from_folder` also reads ``tokenizer_config.json`` (the special tokens' text) and
the chat templates (:mod:`ppinfer.lm.chat`), for :meth:`Tokenizer.apply_chat_template`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from ppinfer.errors import TokenizerError
from ppinfer.lm.chat import SPECIAL_TOKEN_NAMES, ChatTemplates

# Common end-of-sequence spellings, in order of preference, when neither config names one.
EOS_CANDIDATES = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<eos>")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>")

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the vocabulary as bytes and the special token ids.

    ``vocab_bytes[i]`` is the bytes token i stands for (special tokens: their UTF-8 spelling);
    ``eos_id``/``bos_id`` may be None when the files name none. ``special_tokens`` maps the named
    special tokens (``"bos_token"``, ``"eos_token"``, …) to their text, as chat templates see them;
    ``chat_templates`` holds the tokenizer's chat templates (None: it has none).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        eos_id: int | None = None,
        bos_id: int | None = None,
        special_tokens: dict[str, str] | None = None,
        chat_templates: ChatTemplates | None = None,
        model_vocab_size: int | None = None,
    ):
        if isinstance(backend, str | os.PathLike):  # a tokenizer.json's path
            backend = Tokenizer.from_file(backend).backend
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TokenizerError(
                "Tokenizer takes a tokenizers.Tokenizer or a tokenizer.json path, got "
                f"{type(backend).__name__} (a Hugging Face folder: Tokenizer.from_folder(path))"
            )
        self.backend = backend
        # A model whose embedding is padded past the tokenizer (Qwen2): those ids decode to nothing.
        self.model_vocab_size = model_vocab_size
        self.special_ids = frozenset(
            index for index, token in backend.get_added_tokens_decoder().items() if token.special
        )
        self.special_tokens = dict(special_tokens or {})
        self.chat_templates = chat_templates
        named_eos = self._named("eos_token")
        named_bos = self._named("bos_token")
        if eos_id is None:
            eos_id = named_eos if named_eos is not None else self._find(EOS_CANDIDATES)
        if bos_id is None:
            bos_id = named_bos if named_bos is not None else self._find(BOS_CANDIDATES)
        self.eos_id, self.bos_id = eos_id, bos_id

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

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        eos_id: int | None = None,
        bos_id: int | None = None,
        model_vocab_size: int | None = None,
    ) -> Tokenizer:
        """Read a Hugging Face tokenizer folder: ``tokenizer.json``, and if present
        ``tokenizer_config.json`` and ``special_tokens_map.json`` (the named special tokens) and the
        chat templates (``chat_template`` in the config, ``chat_template.jinja``,
        ``additional_chat_templates/``). Raises :class:`TokenizerError` for a missing
        ``tokenizer.json`` or an invalid file."""
        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {folder} does not exist")
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = config.get(name)
            if value is None:
                value = special_map.get(name)
            if isinstance(value, dict):  # a serialised AddedToken
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        templates = ChatTemplates.from_folder(folder, config)
        tok = cls.from_file(folder / "tokenizer.json")
        return cls(
            tok.backend,
            eos_id=eos_id,
            bos_id=bos_id,
            special_tokens=special,
            chat_templates=templates,
            model_vocab_size=model_vocab_size,
        )

    @property
    def chat_template(self) -> str | None:
        """The default chat template's text (None: none, or several without a default)."""
        return None if self.chat_templates is None else self.chat_templates.templates.get("default")

    def apply_chat_template(
        self,
        messages,
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        tools=None,
        documents=None,
        chat_template: str | None = None,
        **kwargs,
    ) -> str | list[int]:
        """The prompt of a chat, as ``transformers``' ``apply_chat_template``: the template rendered
        for ``messages`` (``[{"role": ..., "content": ...}, ...]``) — text, or its token ids when
        ``tokenize`` (encoded without adding BOS/EOS: the template writes them). ``chat_template``:
        a template name or a template itself (default: the tokenizer's). Extra keyword arguments
        are template variables (e.g. ``date_string`` for Llama 3.1+, ``enable_thinking``).
        Raises :class:`TokenizerError` if there is no template or it fails."""
        templates = self.chat_templates
        if templates is None:
            if chat_template is None:
                raise TokenizerError(
                    "this tokenizer has no chat template (no chat_template in tokenizer_config.json, "
                    "no chat_template.jinja): pass chat_template=..."
                )
            templates = ChatTemplates({})
        text = templates.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            chat_template=chat_template,
            special_tokens=self.special_tokens,
            **kwargs,
        )
        return self.encode(text) if tokenize else text

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS unless ``add_special_tokens``)."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\udcff"): no UTF-8 bytes to tokenize
            raise TokenizerError(
                f"text is not valid Unicode: {e.reason} at position {e.start} ({text[e.start : e.end]!r})"
            ) from None
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode_bytes(self, ids: Sequence[int], skip_special: bool = True) -> bytes:
        """The exact bytes of a token sequence (any prefix works, even mid-character): the
        concatenation of ``vocab_bytes``. Raises :class:`TokenizerError` for an id outside
        ``[0, vocab_size)``."""
        table = self.vocab_bytes
        ids = _token_ids(ids)
        bad = [i for i in ids if not 0 <= i < len(table)]
        if bad:
            size = len(table)
            raise TokenizerError(
                f"token id {bad[0]} is out of range for a vocabulary of {size} (ids 0..{size - 1})"
            )
        return b"".join(table[i] for i in ids if not (skip_special and i in self.special_ids))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of a token sequence, as ``transformers``' ``decode``: a split UTF-8 character becomes
        U+FFFD instead of failing, and a SentencePiece tokenizer that prefixes text with a space
        (Llama 2: ``"Hi"`` is ``"▁Hi"``) drops that space at the start (:meth:`decode_bytes` keeps it)."""
        data = self.decode_bytes(ids, skip_special)
        strip = self._leading_strip
        while strip and data[:1] == b" ":
            data, strip = data[1:], strip - 1
        return data.decode("utf-8", errors="replace")

    @functools.cached_property
    def _leading_strip(self) -> int:
        return _leading_spaces_stripped(json.loads(self.backend.to_str()).get("decoder"))

    def _named(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.backend.token_to_id(text)

    @functools.cached_property
    def vocab_bytes(self) -> list[bytes]:
        """``vocab_bytes[i]``: the bytes of token i, for all ``vocab_size`` ids (and ``b""`` for the
        ids of a model's padded embedding up to ``model_vocab_size``)."""
        spec = json.loads(self.backend.to_str())
        to_bytes = _piece_decoder(spec)
        table = [b""] * max(self.vocab_size, self.model_vocab_size or 0)
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


def _leading_spaces_stripped(decoder: dict | None) -> int:
    """How many leading spaces the decoder removes from a text (SentencePiece's dummy prefix):
    ``Strip(" ", start=n)``, or 1 for a ``Metaspace`` decoder that prepends one."""
    if not decoder:
        return 0
    kind = decoder.get("type")
    if kind == "Sequence":
        return sum(_leading_spaces_stripped(part) for part in decoder.get("decoders") or [])
    if kind == "Strip" and decoder.get("content") == " ":
        return int(decoder.get("start", 0))
    if kind == "Metaspace":
        scheme = decoder.get("prepend_scheme")
        if scheme is None:
            return int(bool(decoder.get("add_prefix_space", True)))
        return int(scheme != "never")
    return 0


def _read_json(path: Path) -> dict:
    """The JSON object in ``path`` ({} if absent); :class:`TokenizerError` if invalid."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got a {type(value).__name__}")
    return value


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


def _token_ids(ids: Any) -> list[int]:
    """``ids`` (a sequence or 1-D array of integers) as a list of ints; :class:`TokenizerError` for
    anything else (a string, ``None``, a float id: ``1.5`` is not silently truncated to 1)."""
    if isinstance(ids, str | bytes) or ids is None:
        raise TokenizerError(f"token ids must be a sequence of integers, got {type(ids).__name__}")
    arr = np.asarray(ids)
    if arr.ndim != 1 and arr.size:
        raise TokenizerError(f"token ids must be one sequence (1-D), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TokenizerError(f"token ids must be integers, got {arr.dtype} ({arr.reshape(-1)[:4].tolist()}…)")
    return [int(i) for i in arr.reshape(-1)]
