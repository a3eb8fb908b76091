"""Chat messages -> prompt token ids, with the served model's chat template.

A checkpoint's template is the Jinja `chat_template` of its tokenizer_config.json,
rendered the way Hugging Face's `apply_chat_template` does (sandboxed Jinja,
`add_generation_prompt=True`, `bos_token`/`eos_token`), then tokenized without adding
special tokens (the template spells them).

The embedded tiny model (and a checkpoint without a template) uses SIMPLE_TEMPLATE,
one block per message and an open assistant block, after the tokenizer's usual BOS:

    <|system|>
    You are terse.
    <|user|>
    Hi
    <|assistant|>
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.http_api.errors import invalid
from services.common.logging import get_logger
from services.common.tokenizer import TINY_MODEL, Tokenizer

log = get_logger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_MESSAGES = 1024


def parse_messages(value: Any) -> list[dict[str, str]]:
    """`messages` as [{"role", "content"}] with text content; 400 naming the bad part."""
    if not isinstance(value, list) or not value:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects")
    if len(value) > MAX_MESSAGES:
        raise invalid("messages", f"messages has {len(value)} entries; at most {MAX_MESSAGES}")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid("messages", f"{where} must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise invalid("messages", f"{where}.role={role!r} must be one of {', '.join(ROLES)}")
        messages.append({"role": role, "content": _text_content(message.get("content"), where)})
    return messages


def _text_content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid("messages", f"{where}.content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else part
            raise invalid(
                "messages",
                f"{where}.content[{j}] of type {kind!r} is not supported: only text parts",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid("messages", f"{where}.content[{j}].text must be a string")
        texts.append(text)
    return "".join(texts)


class ChatTemplate:
    """Renders messages into the prompt the model was trained to continue."""

    def __init__(self, tokenizer: Tokenizer, template: str | None = None, **specials: str):
        self._tokenizer = tokenizer
        self.is_simple = template is None
        self._template = None if template is None else _compile(template)
        self._specials = specials  # bos_token, eos_token, ...

    def render(self, messages: list[dict[str, str]]) -> str:
        if self._template is None:
            blocks = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
            return "".join(blocks) + "<|assistant|>\n"
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, **self._specials
            )
        except Exception as exc:  # a template's raise_exception() or a Jinja error
            raise invalid("messages", f"messages do not fit the model's chat template: {exc}") from None  # fmt: skip

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.render(messages)
        return self._tokenizer.encode(text, add_special_tokens=self.is_simple)


def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(template)


def _special(config: dict, name: str) -> str:
    value = config.get(name) or ""
    return value.get("content", "") if isinstance(value, dict) else str(value)


def load_chat_template(model: str, tokenizer: Tokenizer) -> ChatTemplate:
    """The template of `model` ("tiny" or a checkpoint directory)."""
    if model == TINY_MODEL:
        return ChatTemplate(tokenizer)
    config_path = Path(model) / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        log.warning("chat_template_missing", model=model, fallback="simple")
        return ChatTemplate(tokenizer)
    return ChatTemplate(
        tokenizer,
        template,
        bos_token=_special(config, "bos_token"),
        eos_token=_special(config, "eos_token"),
    )
