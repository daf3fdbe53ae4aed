"""Chat templates render exactly as transformers' apply_chat_template renders them."""
from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402

from lcrun.runtime.chat_template import ChatTemplateError, render_chat  # noqa: E402

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'user' or message.role == 'assistant') %}
        {{- raise_exception('Only user and assistant roles are supported after the system message') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Exercises trim_blocks/lstrip_blocks (plain tags, no dashes), loop controls, tojson, namespace.
FEATURES = """{% set ns = namespace(count=0) %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% if ns.count >= 3 %}{% break %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    [{{ loop.index }}/{{ loop.length }}] {{ m | tojson }}
{% endfor %}
{% if add_generation_prompt %}
ASSISTANT:{{ eos_token }}
{% endif %}
"""

MESSAGES = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "What is 2+2? <b>& \"quotes\" — héllo 日本語"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?\n"},
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    tok = Tokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _reference(hf_tokenizer, template, messages, add_generation_prompt):
    return hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("template", [CHATML, LLAMA3, FEATURES], ids=["chatml", "llama3", "features"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(hf_tokenizer, template, add_generation_prompt):
    messages = MESSAGES + [{"role": "skip", "content": "x"}] if template is FEATURES else MESSAGES
    expected = _reference(hf_tokenizer, template, messages, add_generation_prompt)
    got = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                      bos_token="<s>", eos_token="</s>")
    assert got == expected


def test_chatml_without_system_matches(hf_tokenizer):
    messages = MESSAGES[1:]
    assert render_chat(CHATML, messages) == _reference(hf_tokenizer, CHATML, messages, True)


def test_raise_exception_becomes_clear_error():
    with pytest.raises(ChatTemplateError, match="Only user and assistant"):
        render_chat(LLAMA3, [{"role": "system", "content": "a"}, {"role": "tool", "content": "b"}])


def test_missing_template_is_clear_error():
    with pytest.raises(ChatTemplateError, match="--raw"):
        render_chat(None, MESSAGES)


def test_sandbox_blocks_attribute_escape():
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__ }}", MESSAGES)
