"""Tokenizers with SentencePiece byte fallback, chat templates, the EOS set and chat prompts, against
``transformers`` on tiny tokenizers and a tiny random Llama-3-style chat model built here; and the
clear errors for prompts and token ids that do not fit the model."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from chat_templates import GEMMA_2, LLAMA_3, LLAMA_3_2, QWEN_2_5

import ppinfer as pp
from ppinfer import tokens as tk
from ppinfer.constraints import Regex
from ppinfer.errors import CheckpointError, ConfigError, DataError, TokenizerError
from ppinfer.lm import LanguageModel, NGramLM, Tokenizer, load
from ppinfer.lm.chat import ChatTemplates, render_template

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

TEXT = "Grüße, 世界! 🙂 naïve café — привет"
CORPUS = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "Grüße aus München, naïve café au lait.",
    "The quick brown fox jumps over the lazy dog.",
] * 20
SP_SPECIAL = ["<unk>", "<s>", "</s>"]
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]


# ------------------------------------------------------------------------------------ tokenizers


def _sentencepiece_pipeline(tok, style: str) -> None:
    """Normaliser / pre-tokeniser / decoder of the three SentencePiece layouts in tokenizer.json."""
    sp_decoder = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "llama2":  # Llama 2 as first converted: prepend ▁ in the normaliser, strip it back
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([*sp_decoder, decoders.Strip(" ", 1, 0)])
    elif style == "metaspace":  # Llama 2 / Mistral as transformers converts them now
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([*sp_decoder, decoders.Strip(" ", 1, 0)])
    else:  # Gemma: spaces become ▁, no dummy prefix
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence(sp_decoder)


def sentencepiece_tokenizer(style: str, kind: str) -> tokenizers.Tokenizer:
    """A small SentencePiece-style BPE or Unigram with the 256 ``<0xNN>`` byte-fallback pieces."""
    if kind == "bpe":
        trained = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        _sentencepiece_pipeline(trained, style)
        trained.train_from_iterator(
            CORPUS, trainers.BpeTrainer(vocab_size=150, special_tokens=SP_SPECIAL, show_progress=False)
        )
        spec = json.loads(trained.to_str())["model"]
        pieces = [p for p in spec["vocab"] if p not in SP_SPECIAL]
        vocab = {p: i for i, p in enumerate(SP_SPECIAL + BYTE_PIECES + pieces)}
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
        tok = tokenizers.Tokenizer(
            models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
        )
    else:
        trained = tokenizers.Tokenizer(models.Unigram())
        _sentencepiece_pipeline(trained, style)
        trainer = trainers.UnigramTrainer(
            vocab_size=120, special_tokens=SP_SPECIAL, unk_token="<unk>", show_progress=False
        )
        trained.train_from_iterator(CORPUS, trainer)
        pieces = [(p, s) for p, s in json.loads(trained.to_str())["model"]["vocab"] if p not in SP_SPECIAL]
        vocab = [(p, 0.0) for p in SP_SPECIAL] + [(b, -100.0) for b in BYTE_PIECES] + pieces
        tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    _sentencepiece_pipeline(tok, style)
    tok.add_special_tokens(SP_SPECIAL)
    return tok


# transformers' own class for each layout (v5 rebuilds Llama/Gemma pipelines from the vocabulary itself).
SP_CASES = [
    ("llama2", "bpe", "LlamaTokenizer"),
    ("metaspace", "bpe", "LlamaTokenizer"),
    ("gemma", "bpe", "GemmaTokenizer"),
    ("llama2", "unigram", "PreTrainedTokenizerFast"),
    ("gemma", "unigram", "PreTrainedTokenizerFast"),
]


@pytest.fixture(scope="module", params=SP_CASES, ids=["-".join(c[:2]) for c in SP_CASES])
def sp_pair(request, tmp_path_factory):
    """(ppinfer Tokenizer, transformers tokenizer) of one saved SentencePiece-style folder."""
    style, kind, cls = request.param
    folder = tmp_path_factory.mktemp(f"{style}_{kind}")
    sentencepiece_tokenizer(style, kind).save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": cls, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder), style


def test_sentencepiece_ids_and_text_match_transformers(sp_pair):
    ours, theirs, style = sp_pair
    ids = ours.encode(TEXT)
    assert ids == theirs.encode(TEXT, add_special_tokens=False)
    assert any(ours.backend.id_to_token(i).startswith("<0x") for i in ids)  # byte fallback in use
    assert ours.decode(ids) == theirs.decode(ids) == TEXT
    # The exact bytes keep the dummy-prefix space (the model saw "▁Gr…"); decode drops it like HF.
    prefix = b" " if style != "gemma" else b""
    assert ours.decode_bytes(ids) == prefix + TEXT.encode()
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    with_specials = [1, *ids, 2]
    assert ours.decode(with_specials) == theirs.decode(with_specials, skip_special_tokens=True)
    assert ours.decode(with_specials, skip_special=False) == theirs.decode(with_specials)


def test_every_token_has_the_bytes_transformers_decodes(sp_pair):
    """Each token's bytes (what token-level constraints see), against HF decoding it after a plain
    token, so that no leading-space stripping applies: byte pieces are single raw bytes."""
    ours, theirs, _ = sp_pair
    anchor = ours.backend.token_to_id("a")
    table = ours.vocab_bytes
    assert len(table) == ours.vocab_size
    assert {table[ours.backend.token_to_id(p)] for p in BYTE_PIECES} == {bytes([b]) for b in range(256)}
    for i in range(ours.vocab_size):
        if i in ours.special_ids:
            continue
        expected = theirs.decode([anchor, i])
        assert ("a" + table[i].decode("utf-8", errors="replace")) == expected, (i, table[i], expected)


def test_prefix_of_byte_fallback_tokens_decodes_without_loss(sp_pair):
    ours, _, style = sp_pair
    ids = ours.encode("🙂")
    full = ours.decode_bytes(ids)
    assert full.endswith("🙂".encode())
    for cut in range(len(ids) + 1):
        assert full.startswith(ours.decode_bytes(ids[:cut]))
    assert ours.decode(ids[:-1]).endswith("\ufffd")  # a split character, never an exception


def test_decode_rejects_ids_outside_the_vocabulary(sp_pair):
    ours, _, _ = sp_pair
    for bad in (ours.vocab_size, -1):
        with pytest.raises(TokenizerError, match=f"token id {bad} is out of range"):
            ours.decode([5, bad])


# ------------------------------------------------------------------------------- chat templates


def _template_folder(tmp_path, template, name="tpl", extra=None):
    """A byte-level tokenizer folder with the Llama 3 and ChatML special tokens and ``template``
    (a string, a list of named templates, or None) in tokenizer_config.json."""
    folder = tmp_path / name
    folder.mkdir()
    llama3_tokenizer().save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        **(extra or {}),
    }
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def llama3_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE (like Llama 3's) with Llama 3's chat special tokens and ChatML's."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[*LLAMA3_SPECIAL, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*CORPUS, "system user assistant Cutting Knowledge Date Today\n\n"] * 3, trainer)
    return tok


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city — «quoted» & <escaped?>",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CHATS = {
    "user": [{"role": "user", "content": "Grüße! What is 2+2? <b>"}],
    "system": [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "привет 🙂"},
    ],
    "tool_call": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "content": "22°C"},
    ],
}
TEMPLATES = {"llama3.2": LLAMA_3_2, "llama3": LLAMA_3, "qwen2.5": QWEN_2_5, "gemma2": GEMMA_2}


@pytest.fixture(scope="module")
def template_pairs(tmp_path_factory):
    out = {}
    for name, template in TEMPLATES.items():
        folder = _template_folder(tmp_path_factory.mktemp(name), template)
        out[name] = (Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder))
    return out


def _render_both(ours, theirs, messages, **kwargs):
    """(ours, transformers') rendering, or the exception type each raised."""
    results = []
    for fn, err in ((ours.apply_chat_template, TokenizerError), (theirs.apply_chat_template, Exception)):
        try:
            results.append(fn(messages, tokenize=False, **kwargs))
        except err as error:
            results.append(
                ("raised", type(error).__name__ if fn == theirs.apply_chat_template else "ours", str(error))
            )
    return results


@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_templates_render_as_transformers_does(template_pairs, template):
    ours, theirs = template_pairs[template]
    rendered = 0
    for chat_name, chat in CHATS.items():
        for generation in (False, True):
            for extra in ({}, {"tools": TOOLS}, {"date_string": "26 Jul 2024"}):
                if chat_name == "tool_call" and template in ("llama3", "gemma2"):
                    continue  # these templates read message['content'], which the tool-call message lacks
                a, b = _render_both(ours, theirs, chat, add_generation_prompt=generation, **extra)
                if isinstance(b, tuple):  # transformers refused (e.g. Gemma's system role): so must we
                    assert isinstance(a, tuple) and b[2] in a[2], (a, b)
                else:
                    assert a == b, (template, chat_name, generation, extra)
                    rendered += 1
    assert rendered >= 6


def test_strftime_now_and_raise_exception(template_pairs):
    ours, theirs = template_pairs["llama3.2"]
    import datetime

    before = datetime.datetime.now().strftime("%d %b %Y")
    text = ours.apply_chat_template(CHATS["user"], add_generation_prompt=True)
    assert f"Today Date: {before}" in text or datetime.datetime.now().strftime("%d %b %Y") != before
    assert text == theirs.apply_chat_template(CHATS["user"], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert text.endswith("Grüße! What is 2+2? <b><|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    gemma, _ = template_pairs["gemma2"]
    with pytest.raises(TokenizerError, match="System role not supported"):
        gemma.apply_chat_template(CHATS["system"])
    with pytest.raises(TokenizerError, match="roles must alternate"):
        gemma.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_continue_final_message(template_pairs, chat_lm):
    """The text ends inside the last (partly written) message, as in transformers; tk.prompt then
    leaves the generation prompt out."""
    chat = [*CHATS["user"], {"role": "assistant", "content": "The answer is "}]
    for name in ("llama3.2", "llama3", "qwen2.5"):
        ours, theirs = template_pairs[name]
        a, b = _render_both(ours, theirs, chat, continue_final_message=True, date_string="26 Jul 2024")
        assert a == b and a.rstrip().endswith("The answer is"), name
    # Content as text blocks (coverage: never run): the last text block is the one continued.
    blocks = (
        "{% for m in messages %}<{{ m.role }}>{% for b in m.content %}[{{ b.text }}]{% endfor %}"
        "</{{ m.role }}>{% endfor %}"
    )
    chat_blocks = [
        {"role": "user", "content": [{"type": "text", "text": "Q?"}]},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "The "}, {"type": "text", "text": "answer"}],
        },
    ]
    ours, theirs = template_pairs["qwen2.5"]
    a, b = _render_both(ours, theirs, chat_blocks, continue_final_message=True, chat_template=blocks)
    assert a == b == "<user>[Q?]</user><assistant>[The ][answer", (a, b)
    with pytest.raises(TokenizerError, match="no text to continue"):
        render_template(
            blocks, [{"role": "user", "content": [{"type": "image"}]}], continue_final_message=True
        )
    with pytest.raises(TokenizerError, match='no "content" to continue'):
        render_template(blocks, [{"role": "user"}], continue_final_message=True)
    with pytest.raises(TokenizerError, match="exclude each other"):
        ours.apply_chat_template(chat, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(TokenizerError, match="does not appear"):
        render_template(
            "{{ messages[0].role }}{{ messages[0]['content'][:3] }}", chat[:1], continue_final_message=True
        )
    lm = chat_lm[0]
    p = tk.prompt(lm, messages=chat, max_new_tokens=2, continue_final_message=True, date_string="26 Jul 2024")
    expected = lm.tokenizer.apply_chat_template(
        chat, tokenize=True, continue_final_message=True, date_string="26 Jul 2024"
    )
    assert int(p.prompt_cache.length) == len(expected)
    assert lm.tokenizer.decode(expected).endswith("assistant\n\nThe answer is")


def test_template_sources_and_selection(tmp_path):
    """A list of named templates in tokenizer_config.json, chat_template.jinja taking priority,
    named templates in additional_chat_templates/, and transformers agreeing on the choice."""
    named = [{"name": "default", "template": LLAMA_3}, {"name": "tool_use", "template": QWEN_2_5}]
    folder = _template_folder(tmp_path, named, "named")
    ours, theirs = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert set(ours.chat_templates.templates) == {"default", "tool_use"} and ours.chat_template == LLAMA_3
    for kwargs in ({}, {"tools": TOOLS}, {"chat_template": "tool_use"}, {"chat_template": GEMMA_2}):
        a, b = _render_both(ours, theirs, CHATS["user"], **kwargs)
        assert a == b, kwargs
    assert "<tools>" in ours.apply_chat_template(CHATS["user"], tools=TOOLS)

    files = _template_folder(tmp_path, LLAMA_3, "files")
    (files / "chat_template.jinja").write_text(QWEN_2_5)
    (files / "additional_chat_templates").mkdir()
    (files / "additional_chat_templates" / "gemma.jinja").write_text(GEMMA_2)
    ours, theirs = Tokenizer.from_folder(files), transformers.AutoTokenizer.from_pretrained(files)
    assert ours.chat_template == QWEN_2_5
    for kwargs in ({}, {"chat_template": "gemma"}):
        a, b = _render_both(ours, theirs, CHATS["user"], add_generation_prompt=True, **kwargs)
        assert a == b, kwargs

    no_default = _template_folder(tmp_path, [{"name": "a", "template": LLAMA_3}], "nodefault")
    with pytest.raises(TokenizerError, match="no default"):
        Tokenizer.from_folder(no_default).apply_chat_template(CHATS["user"])
    none = _template_folder(tmp_path, None, "none")
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_folder(none).apply_chat_template(CHATS["user"])


def test_special_tokens_from_config_files(tmp_path):
    """bos/eos text from tokenizer_config.json (serialised AddedToken dicts too), missing ones from
    special_tokens_map.json; the tokenizer's EOS follows them; invalid JSON is a TokenizerError."""
    eot = {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False, "special": True}
    folder = _template_folder(tmp_path, LLAMA_3, "added", extra={"eos_token": eot, "bos_token": None})
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    ours = Tokenizer.from_folder(folder)
    assert ours.special_tokens == {"eos_token": "<|eot_id|>", "bos_token": "<|begin_of_text|>"}
    assert ours.eos_id == ours.backend.token_to_id("<|eot_id|>")
    assert ours.bos_id == ours.backend.token_to_id("<|begin_of_text|>")
    assert ours.apply_chat_template(CHATS["user"]).startswith("<|begin_of_text|><|start_header_id|>user")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.from_folder(folder)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_folder(tmp_path / "missing")


def test_template_environment_is_the_immutable_sandbox():
    chat = CHATS["user"]
    assert render_template("{{ messages[0].content | tojson }}", chat) == json.dumps(
        chat[0]["content"], ensure_ascii=False
    )
    assert render_template("{% for m in messages %}{% break %}{% endfor %}ok", chat) == "ok"
    assert render_template("{% generation %}{{ messages[0].role }}{% endgeneration %}", chat) == "user"
    assert (
        render_template("{{ bos_token }}|{{ x }}", chat, special_tokens={"bos_token": "<s>"}, x=3) == "<s>|3"
    )
    for unsafe, match in [
        ("{% set x = [] %}{{ x.append(1) }}", "unsafe|access to attribute"),  # immutable: no mutation
        ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "undefined|unsafe"),
        ("{% set ns = namespace(_x=1) %}", "cannot set the attribute"),
        ("{{ raise_exception('no: ' + messages[0].role) }}", "no: user"),
        ("{% if %}", "does not compile"),
    ]:
        with pytest.raises(TokenizerError, match=match):
            render_template(unsafe, chat)
    for bad in ([], "hello", ["hello"], None):
        with pytest.raises(TokenizerError, match="message"):
            render_template("{{ messages }}", bad)
    with pytest.raises(TokenizerError, match="chat_template must be"):
        ChatTemplates.from_entry(7)


# ------------------------------------------------------- a tiny Llama-3-style chat checkpoint


CONTEXT = 256


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory):
    """A random tiny LlamaForCausalLM saved with a Llama 3 style tokenizer folder (the real
    Llama 3.2 template), config.json EOS ``<|end_of_text|>`` and generation_config.json EOS
    ``[<|end_of_text|>, <|eot_id|>]``, as Llama 3 Instruct checkpoints have."""
    torch = pytest.importorskip("torch")
    folder = _template_folder(tmp_path_factory.mktemp("chat_lm"), LLAMA_3_2, "model")
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in LLAMA3_SPECIAL}
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=ids["<|end_of_text|>"],
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    generation = {
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
    }
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return load(folder), transformers.AutoTokenizer.from_pretrained(folder), ids, folder


def test_eos_set_from_config_and_generation_config(chat_lm, tmp_path):
    lm, _, ids, folder = chat_lm
    assert lm.eos_ids == (ids["<|end_of_text|>"], ids["<|eot_id|>"])
    assert lm.eos_id == ids["<|end_of_text|>"]  # the first, as before
    assert lm.tokenizer.eos_id == ids["<|end_of_text|>"] and lm.tokenizer.bos_id == ids["<|begin_of_text|>"]
    # A list in config.json too, repeats dropped, order kept.
    config = json.loads((folder / "config.json").read_text())
    for value, expected in [
        ([ids["<|eot_id|>"], 7], (ids["<|eot_id|>"], 7, ids["<|end_of_text|>"])),
        (None, None),
    ]:
        copy = tmp_path / f"copy_{value is None}"
        copy.mkdir()
        for file in folder.iterdir():
            (copy / file.name).write_bytes(file.read_bytes())
        (copy / "config.json").write_text(json.dumps({**config, "eos_token_id": value}))
        got = load(copy).eos_ids
        assert got == (expected or (ids["<|end_of_text|>"], ids["<|eot_id|>"]))
    for bad in ([1, "x"], -1, True):
        (copy / "config.json").write_text(json.dumps({**config, "eos_token_id": bad}))
        with pytest.raises(CheckpointError, match="eos_token_id must be a token id"):
            load(copy)
    # An id past the vocabulary (GPT2Config's default 50256 in a tiny config) is dropped with a warning.
    (copy / "config.json").write_text(json.dumps({**config, "eos_token_id": [10**6, ids["<|eot_id|>"]]}))
    with pytest.warns(UserWarning, match="outside the vocabulary"):
        assert ids["<|eot_id|>"] in load(copy).eos_ids


def test_generate_stops_on_any_eos(chat_lm):
    lm, _, ids, _ = chat_lm
    prompt = lm.tokenizer.encode("Hello")
    logits, _ = lm.prefill(prompt)
    first = int(jnp.argmax(logits[-1]))  # the greedy first token
    assert first not in lm.eos_ids
    # Make it a second EOS id: greedy generation ends right there.
    config = dataclasses.replace(lm.config, eos_token_ids=(ids["<|end_of_text|>"], first))
    stops = dataclasses.replace(lm, config=config).generate(
        prompt, num_particles=1, max_new_tokens=3, temperature=0.0
    )
    assert int(stops.lengths[0]) == 1 and int(stops.tokens[0, 0]) == first
    assert bool(jnp.all(stops.tokens[0, 1:] == ids["<|end_of_text|>"]))  # padded with the first EOS


def test_chat_prompt_ids_match_transformers(chat_lm):
    lm, theirs, ids, _ = chat_lm
    messages = CHATS["system"]
    p = tk.prompt(lm, messages=messages, max_new_tokens=4, date_string="26 Jul 2024")
    expected = theirs.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, date_string="26 Jul 2024"
    )
    expected = list(
        expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    )
    assert (
        lm.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, date_string="26 Jul 2024"
        )
        == expected
    )
    assert (
        expected[0] == ids["<|begin_of_text|>"]
        and expected[-2:] == lm.tokenizer.encode("assistant<|end_header_id|>\n\n")[-2:]
    )
    assert p.eos_ids == lm.eos_ids and p.eos_id == lm.eos_id
    logits, _ = lm.prefill(expected)
    np.testing.assert_allclose(
        np.asarray(p.first_logp), np.asarray(jax.nn.log_softmax(logits[-1])), atol=1e-5
    )


def _stops_at_first_eos(contexts, eos_ids, num_steps) -> bool:
    """Every particle's tokens end at its first EOS-set token, or run to the limit without one."""
    toks, lens = jax.device_get((contexts.tokens, contexts.length))
    for row, n in zip(toks, lens, strict=True):
        hits = [i for i, t in enumerate(row[:n]) if int(t) in eos_ids]
        if hits != ([n - 1] if hits else []) or (not hits and n != num_steps):
            return False
    return True


def test_chat_smc_program_stops_on_the_eos_set(chat_lm):
    """A token-level SMC program on a chat prompt through pp.infer, with a proposal that draws an
    EOS id half of the time: particles end on ``<|eot_id|>`` and on ``<|end_of_text|>``, and only there."""
    lm, _, ids, _ = chat_lm
    T = 6
    p = tk.prompt(lm, messages=CHATS["user"], max_new_tokens=T, date_string="26 Jul 2024")
    eos = jnp.asarray(p.eos_ids)
    boost = jnp.zeros(p.vocab_size).at[eos].set(1.0)

    def init(p):
        return tk.Context.start(p)

    def proposal(ctx, t, p):
        mix = 0.5 * jnp.exp(ctx.logp) + 0.5 * boost / boost.sum()
        pp.sample("tok", dist.Categorical(probs=mix))

    def step(ctx, t, p):
        tok = pp.sample("tok", ctx.next_token())
        pp.stop(p.is_eos(tok))
        return ctx.extend(p, tok)

    program = pp.sequential(init, step, T)
    good = pp.infer(program, p, algorithm=pp.SMC(64, proposal=proposal), key=0)
    assert _stops_at_first_eos(good.state, set(p.eos_ids), T)
    toks, lens = jax.device_get((good.state.tokens, good.state.length))
    last = {int(row[n - 1]) for row, n in zip(toks, lens, strict=True) if n < T}
    assert {ids["<|eot_id|>"], ids["<|end_of_text|>"]} <= last
    assert np.isfinite(good.log_evidence)
    texts = tk.texts(good.state, lm.tokenizer, lm.eos_ids)
    assert all("<|eot_id|>" not in t and "<|end_of_text|>" not in t for t in texts)
    # The check fails on what stopping only on the first EOS id (the old behaviour) gives: a particle
    # that goes on after <|eot_id|>.
    old = jax.tree.map(lambda x: x[:1], good.state)
    row = [ids["<|eot_id|>"], 7, ids["<|end_of_text|>"]]
    old = old._replace(tokens=jnp.asarray([row + [0] * (T - 3)]), length=jnp.asarray([3]))
    assert not _stops_at_first_eos(old, set(p.eos_ids), T)


def test_constrained_chat_generation_ends_on_eot_and_never_emits_control_tokens(chat_lm):
    lm, _, ids, _ = chat_lm
    p = tk.prompt(lm, messages=CHATS["user"], max_new_tokens=5, date_string="26 Jul 2024")
    # A regex every special token's spelling would match as text, were it text.
    program = tk.constrained(p, Regex(r"[a-z<|>_ ]{0,40}"))
    result = pp.infer(program, algorithm=pp.SMC(32), key=1)
    toks, lens = jax.device_get((result.state.ctx.tokens, result.state.ctx.length))
    special = set(lm.tokenizer.special_ids)
    ends = set()
    for row, n in zip(toks, lens, strict=True):
        assert int(row[n - 1]) in lm.eos_ids  # require_eos: every particle finished on an EOS id
        assert not special & {int(t) for t in row[: n - 1]}
        ends.add(int(row[n - 1]))
    assert ids["<|eot_id|>"] in ends or ids["<|end_of_text|>"] in ends
    for text, _ in tk.texts(result):
        assert "<|" not in text


# --------------------------------------------- clear errors: prompts and ids that do not fit


def _no_prefill(monkeypatch):
    """Fail if the model runs: the errors below must come before anything is compiled."""

    def refuse(*args, **kwargs):
        raise AssertionError("prefill ran before the error")

    monkeypatch.setattr(LanguageModel, "prefill", refuse)


def test_prompt_longer_than_the_context(chat_lm, monkeypatch):
    lm, _, _, _ = chat_lm
    _no_prefill(monkeypatch)
    with pytest.raises(DataError, match=f"{CONTEXT + 1} tokens, more than the model's context of {CONTEXT}"):
        tk.prompt(lm, [5] * (CONTEXT + 1), 1)
    long_chat = [{"role": "user", "content": "Hello world " * 200}]
    with pytest.raises(DataError, match="more than the model's context"):
        tk.prompt(lm, messages=long_chat, max_new_tokens=1)


def test_generation_past_the_context(chat_lm, monkeypatch):
    lm, _, _, _ = chat_lm
    _no_prefill(monkeypatch)
    with pytest.raises(ConfigError, match="plus max_new_tokens=57 exceeds the model's context of 256"):
        tk.prompt(lm, [5] * 200, 57)
    n = len(lm.tokenizer.apply_chat_template(CHATS["user"], add_generation_prompt=True, tokenize=True))
    with pytest.raises(ConfigError, match=f"at most {CONTEXT - n}"):
        tk.prompt(lm, messages=CHATS["user"], max_new_tokens=CONTEXT - n + 1)


def test_token_ids_outside_the_vocabulary(chat_lm, monkeypatch):
    lm, _, ids, _ = chat_lm
    V = lm.config.vocab_size
    ngram = NGramLM.from_probs(np.full((4, 4), 0.25))
    p = tk.prompt(lm, [1, 2], 3)
    ctx = tk.Context.start(p)
    with pytest.raises(DataError, match=f"token id {V} is out of range for a vocabulary of {V}"):
        ctx.extend(p, V)
    with pytest.raises(DataError, match="token id -1 is out of range"):
        tk.score_tokens(ctx, p, [1, -1])
    with pytest.raises(ConfigError, match=f"eos_id {V} is not a token id"):
        tk.constrained(p, Regex("a"), eos_id=V)
    _no_prefill(monkeypatch)
    for model, size in ((lm, V), (ngram, 4)):
        with pytest.raises(DataError, match=f"token id {size} is out of range for a vocabulary of {size}"):
            tk.prompt(model, [0, size], 2)
    with pytest.raises(DataError, match="integer token ids"):
        tk.prompt(lm, [0.5, 1.0], 2)


def test_prompt_argument_errors(chat_lm):
    lm, _, _, _ = chat_lm
    ngram = NGramLM.from_probs(np.full((4, 4), 0.25))
    with pytest.raises(ConfigError, match="exactly one"):
        tk.prompt(lm, "hi", 2, messages=CHATS["user"])
    with pytest.raises(ConfigError, match="exactly one"):
        tk.prompt(lm, max_new_tokens=2)
    with pytest.raises(ConfigError, match="needs max_new_tokens"):
        tk.prompt(lm, "hi")
    with pytest.raises(ConfigError, match="need messages"):
        tk.prompt(lm, "hi", 2, date_string="x")
    with pytest.raises(ConfigError, match="no tokenizer with a chat template"):
        tk.prompt(ngram, messages=CHATS["user"], max_new_tokens=2)
    plain = dataclasses.replace(lm, tokenizer=Tokenizer(lm.tokenizer.backend))
    with pytest.raises(TokenizerError, match="no chat template"):
        tk.prompt(plain, messages=CHATS["user"], max_new_tokens=2)


@pytest.mark.parametrize(
    "template, error",
    [
        ("{% for i in range(10**9) %}{% endfor %}x", "OverflowError"),  # the sandbox's range limit
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ messages[0].content + 1 }}", "TypeError"),
    ],
)
def test_a_template_that_fails_in_python_is_a_tokenizer_error(template, error):
    # These raised Python's own exceptions; any failing template is a TokenizerError (docs/lm.md).
    with pytest.raises(TokenizerError, match=f"the chat template failed: {error}"):
        render_template(template, [{"role": "user", "content": "hi"}])
