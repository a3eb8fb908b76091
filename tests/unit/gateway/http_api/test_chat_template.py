"""Chat messages -> prompt ids: the simple template of the tiny model, and a checkpoint's
tokenizer_config.json template rendered like Hugging Face's apply_chat_template."""

from __future__ import annotations

import json

import pytest

from gateway.http_api.chat_template import ChatTemplate, load_chat_template, parse_messages
from gateway.http_api.errors import APIError
from services.common.tokenizer import ByteTokenizer

MESSAGES = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
]  # fmt: skip
LLAMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_simple_template_for_the_tiny_model():
    template = load_chat_template("tiny", ByteTokenizer())
    messages = parse_messages(MESSAGES)
    text = "<|system|>\nBe terse.\n<|user|>\nHi there\n<|assistant|>\n"
    assert template.render(messages) == text
    assert template.prompt_ids(messages) == [256, *text.encode()]  # BOS, then the bytes


def test_checkpoint_template_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": LLAMA_STYLE, "bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )  # fmt: skip
    template = load_chat_template(str(tmp_path), ByteTokenizer())
    text = "<s>[system]Be terse.</s>[user]Hi there</s>[assistant]"
    assert template.render(parse_messages(MESSAGES)) == text
    # The template spells the special tokens: the tokenizer adds none of its own.
    assert template.prompt_ids(parse_messages(MESSAGES)) == list(text.encode())


def test_named_templates_and_missing_template(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ messages[0]['content'] }}"}]})
    )  # fmt: skip
    assert load_chat_template(str(tmp_path), ByteTokenizer()).render(MESSAGES[:1]) == "Be terse."
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert load_chat_template(str(tmp_path), ByteTokenizer()).is_simple


def test_a_template_that_raises_is_a_400_naming_messages():
    template = ChatTemplate(
        ByteTokenizer(), "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )  # fmt: skip
    with pytest.raises(APIError) as info:
        template.render(parse_messages(MESSAGES))
    assert (info.value.status, info.value.param) == (400, "messages")
    assert info.value.message == "messages do not fit the model's chat template: user first"


def test_the_sandbox_blocks_python_internals():
    template = ChatTemplate(ByteTokenizer(), "{{ messages.__class__.__mro__ }}")
    with pytest.raises(APIError) as info:
        template.render(parse_messages(MESSAGES))
    assert info.value.param == "messages"
