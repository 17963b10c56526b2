"""Chat templates: the Jinja2 templates of Hugging Face tokenizers, rendered as ``transformers`` does.

A chat model's checkpoint carries a template (``chat_template`` in ``tokenizer_config.json`` — one
string, or a list of ``{"name", "template"}`` — or the files ``chat_template.jinja`` and
``additional_chat_templates/<name>.jinja``) that turns a list of messages
``[{"role": "user", "content": "..."}, ...]`` into the prompt text the model was trained on.

:class:`ChatTemplates` reads them and :meth:`ChatTemplates.render` renders one with the environment
of ``transformers.apply_chat_template``: Jinja2's *immutable sandbox* (templates come from the
Hub and are untrusted code), ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension,
the ``{% generation %}`` block (rendered as its body), the globals ``raise_exception(msg)``,
``strftime_now(fmt)``, ``namespace`` (no ``_``-prefixed attributes) and ``dict``, a ``tojson``
filter that does not HTML-escape (``ensure_ascii``, ``indent``, ``separators``, ``sort_keys``), and
the variables ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the tokenizer's
named special tokens (``bos_token``, ``eos_token``, …) and any extra keyword argument.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ppinfer.errors import TokenizerError

# The named special tokens whose text a template sees (``transformers``' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# Names a message's reasoning is passed under; templates read ``reasoning_content`` (gpt-oss: ``thinking``).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclasses.dataclass(frozen=True)
class ChatTemplates:
    """The chat templates of a tokenizer, by name (``"default"`` for a single one)."""

    templates: Mapping[str, str]

    @classmethod
    def from_folder(
        cls, folder: str | Path, tokenizer_config: Mapping[str, Any] | None = None
    ) -> ChatTemplates | None:
        """The templates of a tokenizer folder, or None if it has none. Files
        (``chat_template.jinja``, ``additional_chat_templates/*.jinja``) take priority over the
        ``chat_template`` entry of ``tokenizer_config`` (the parsed ``tokenizer_config.json``)."""
        folder = Path(folder)
        found: dict[str, str] = {}
        main = folder / "chat_template.jinja"
        if main.is_file():
            found["default"] = main.read_text(encoding="utf-8")
        extra = folder / "additional_chat_templates"
        if extra.is_dir():
            for file in sorted(extra.glob("*.jinja")):
                found[file.stem] = file.read_text(encoding="utf-8")
        if found:
            return cls(found)
        entry = (tokenizer_config or {}).get("chat_template")
        return None if entry is None else cls.from_entry(entry)

    @classmethod
    def from_entry(cls, entry: str | Sequence[Mapping[str, str]] | Mapping[str, str]) -> ChatTemplates:
        """From a ``chat_template`` value: a template string, a list of ``{"name", "template"}``
        or a ``{name: template}`` dict. Raises :class:`TokenizerError` for anything else."""
        if isinstance(entry, str):
            return cls({"default": entry})
        if isinstance(entry, Mapping):
            templates = dict(entry)
        elif isinstance(entry, Sequence):
            try:
                templates = {item["name"]: item["template"] for item in entry}
            except (TypeError, KeyError):
                raise TokenizerError(
                    "chat_template must be a string or a list of {'name': ..., 'template': ...}"
                ) from None
        else:
            raise TokenizerError(f"chat_template must be a string or a list, got {type(entry).__name__}")
        if not templates or not all(isinstance(k, str) and isinstance(v, str) for k, v in templates.items()):
            raise TokenizerError("chat_template: every template and its name must be strings")
        return cls(templates)

    def select(self, name: str | None = None, tools: Any = None) -> str:
        """The template text: ``name`` if given (a template name, or a template itself), else
        ``"tool_use"`` when tools are passed and it exists, else ``"default"``."""
        if name is not None:
            return self.templates.get(name, name)
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        raise TokenizerError(
            f"this tokenizer has several chat templates and no default: pass chat_template=one of "
            f"{sorted(self.templates)}"
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text of ``messages`` (see :func:`render_template`)."""
        template = self.select(chat_template, tools)
        return render_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            special_tokens=special_tokens,
            **kwargs,
        )


def render_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    continue_final_message: bool = False,
    **kwargs: Any,
) -> str:
    """Render a chat ``template`` (Jinja2 source) for ``messages``, as
    ``transformers``' ``apply_chat_template(messages, tokenize=False, ...)``: message keys whose value
    is None are dropped, ``special_tokens`` (``{"bos_token": "<s>", …}``) and ``kwargs`` become template
    variables (``kwargs`` win). ``continue_final_message``: the text ends inside the last message
    (its end-of-turn markup cut off), so that the model continues it — e.g. a partly written
    assistant answer. Raises :class:`TokenizerError` for an invalid message list, a template that
    does not compile, or one that fails (``raise_exception`` included) — the message names the
    cause."""
    import jinja2

    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(
                f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        message = {key: _plain(value) for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:  # older names of a message's reasoning, as transformers aliases them
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise TokenizerError("tools must be a list of JSON-schema dicts")
    if documents is not None and not all(isinstance(doc, Mapping) for doc in documents):
        raise TokenizerError("documents must be a list of dicts with 'title' and 'text'")
    variables = {**dict(special_tokens or {}), **{k: _plain(v) for k, v in kwargs.items()}}
    final = None
    if continue_final_message:
        if add_generation_prompt:
            raise TokenizerError("continue_final_message and add_generation_prompt exclude each other")
        final = _tag_final_message(chat, template)
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as error:
        raise TokenizerError(f"the chat template does not compile: {error} (line {error.lineno})") from None
    try:
        text = compiled.render(
            messages=chat,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=bool(add_generation_prompt),
            **variables,
        )
    except jinja2.TemplateError as error:
        raise TokenizerError(f"the chat template failed: {error}") from None
    except Exception as error:  # Python's own, from an expression (1 / 0, range(10**9), "a" + 1)
        raise TokenizerError(f"the chat template failed: {type(error).__name__}: {error}") from None
    if final is None:
        return text
    mark = _CONTINUE_TAG.strip()
    if final.strip() not in text or mark not in text:
        raise TokenizerError(
            "continue_final_message: the final message does not appear in the rendered chat (the "
            "template changes or drops it)"
        )
    at = text.rindex(mark)
    # The template kept the text as written, or trimmed trailing spaces that the message had.
    return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(chat: list[dict], template: str) -> str:
    """Append the continuation tag to the last message's content (its last text block); returns
    the content before the tag."""
    last = chat[-1]
    content = last.get("content")
    if content is None:
        raise TokenizerError('continue_final_message: the final message has no "content" to continue')
    if "content" not in template:
        raise TokenizerError("continue_final_message: the chat template does not read a message's content")
    if isinstance(content, str):
        last["content"] = content + _CONTINUE_TAG
        return content
    if isinstance(content, (list, tuple)):
        blocks = [dict(block) if isinstance(block, Mapping) else block for block in content]
        for block in reversed(blocks):
            if isinstance(block, dict) and "text" in block:
                before = block["text"]
                block["text"] = before + _CONTINUE_TAG
                last["content"] = blocks
                return before
    raise TokenizerError("continue_final_message: the final message has no text to continue")


def _plain(value: Any) -> Any:
    """JSON-like data only (dicts, lists, tuples, str, numbers, bools, None): anything else becomes a
    placeholder ``"<TypeName>"``, so a sandboxed template never sees an object with methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


@functools.lru_cache(maxsize=64)
def _compile(template: str):
    return _environment().from_string(template)


@functools.cache
def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}…{% endgeneration %}`` marks the assistant's tokens for training
        masks in ``transformers``; rendering keeps its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses ``_``-prefixed attributes (no way to CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set the attribute {name!r}")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = Dict()
    env.globals["namespace"] = Namespace
    return env
