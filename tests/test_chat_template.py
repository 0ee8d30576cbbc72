"""Chat templates rendered by data/chat_template.py equal transformers' `apply_chat_template`
on the same template and messages: a template of our own that uses what released templates use
(a namespace carried through the loop, tool calls through `tojson`, an optional system turn,
`raise_exception`, loop controls, the special tokens, a caller's variable), with and without the
generation prompt; loading from tokenizer_config.json and chat_template.jinja; clear errors."""

import json

import pytest

from qnext_jax.data.chat_template import ChatTemplate
from qnext_jax.data.sources import DataError

TEMPLATE = """{%- if messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=0) %}
{%- for message in messages %}
  {%- if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
{%- endfor %}
{%- for message in messages %}
  {%- if message.role == 'system' %}{% continue %}{% endif %}
  {%- if message.role not in ['user', 'assistant', 'tool'] %}
    {{- raise_exception('unknown role ' + message.role) }}
  {%- endif %}
  {{- '<|im_start|>' + message.role + '\\n' }}
  {%- if message.role == 'assistant' and loop.index0 > ns.last_user and thinking %}
    {{- '<think>\\n\\n</think>\\n\\n' }}
  {%- endif %}
  {{- message.content | trim }}
  {%- for call in message.tool_calls or [] %}
    {{- '\\n<tool_call>' + call | tojson + '</tool_call>' }}
  {%- endfor %}
  {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}
{{- eos_token if not add_generation_prompt else '' }}"""

CONVERSATION = [
    {"role": "system", "content": "Réponds en français."},
    {"role": "user", "content": "  What is 2 + 2?  "},
    {"role": "assistant", "content": "Four.",
     "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 2, "note": "ünïcode"}}]},
    {"role": "tool", "content": "4"},
    {"role": "user", "content": "Thanks"},
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    from qnext_jax.data.tokenizer import train_byte_level_bpe

    ours = train_byte_level_bpe(["some text for a tiny vocabulary " * 10], 300)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=ours.tokenizer, chat_template=TEMPLATE, eos_token="<|endoftext|>",
        bos_token="<|endoftext|>")


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("thinking", [False, True])
def test_render_equals_transformers(hf_tokenizer, generation_prompt, thinking):
    ours = ChatTemplate(TEMPLATE, {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
    for messages in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[1:2]):
        expected = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, thinking=thinking)
        assert ours.render(messages, add_generation_prompt=generation_prompt,
                           thinking=thinking) == expected


def test_loads_from_tokenizer_config_and_template_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "tools"},
                          {"name": "default", "template": TEMPLATE}],
        "eos_token": {"content": "<|im_end|>", "special": True}}))
    template = ChatTemplate.from_model_dir(tmp_path)
    assert template.render(CONVERSATION[1:2]).endswith("<|im_end|>\n<|im_end|>")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert ChatTemplate.from_model_dir(tmp_path).render(CONVERSATION[1:2]) == "  What is 2 + 2?  !"


def test_bad_templates_and_conversations_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="no chat template"):
        ChatTemplate.from_model_dir(tmp_path)
    with pytest.raises(DataError, match="not a valid Jinja template"):
        ChatTemplate("{% for m in messages %}")
    template = ChatTemplate(TEMPLATE)
    with pytest.raises(DataError, match="unknown role narrator"):
        template.render([{"role": "narrator", "content": "Once"}])
    with pytest.raises(DataError, match="list of messages"):
        template.render("hello")
