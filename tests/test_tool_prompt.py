"""How a chat request's tools reach the prompt: a template that renders `tools` gets them as
transformers' apply_chat_template(..., tools=...) passes them (same text, byte for byte); one that
does not gets the Hermes fallback prompt and a rewritten tool conversation; and the reply format
and forcing grammar follow the template."""

from __future__ import annotations

import pytest

import tiny_models as tm
from pyserve.api.tools import chat_messages, plan_tools
from pyserve.model import ChatTemplate, default_model_path
from pyserve.protocol.requests import ChatCompletionRequest
from pyserve.protocol.tool_calls import ToolCallFormat

# A ChatML template that renders tools and tool turns the Hermes way (the shape of Qwen 2.5's).
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions. Their signatures are within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each call, reply with:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments if call.function.arguments is string else call.function.arguments | tojson }}}
</tool_call>{% if not loop.last %}
{% endif %}{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "description": "The time"}},
]
CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Oslo and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "-3 C"},
    {"role": "tool", "tool_call_id": "call_b", "content": "14 C"},
]


def request(messages=CONVERSATION, **fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.from_json({"messages": messages, "tools": TOOLS, **fields})


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:2], CONVERSATION[:2]])
def test_tools_render_as_transformers_renders_them(messages) -> None:
    req = request(messages)
    template = ChatTemplate(HERMES_TEMPLATE, "<s>", "</s>")
    msgs, extra = chat_messages(req, template)
    assert extra == {"tools": req.tools}
    ours = template.render(msgs, add_generation_prompt=True, **extra)
    hf = tm.hf_gguf_tokenizer(default_model_path())
    theirs = hf.apply_chat_template(req.messages, tools=req.tools, chat_template=HERMES_TEMPLATE, tokenize=False,
                                    add_generation_prompt=True)
    assert ours == theirs
    assert '"name": "get_weather"' in ours


def test_earlier_call_arguments_reach_the_template_as_objects() -> None:
    """OpenAI sends arguments as JSON text; templates write `arguments | tojson` (Qwen's, Llama's):
    the text must not be encoded a second time."""
    template = ChatTemplate("{{ tools | length }}{% for m in messages %}{% for c in m.tool_calls or [] %}"
                            "{{ c.function.arguments | tojson }};{% endfor %}{% endfor %}", None, None)
    msgs, extra = chat_messages(request(), template)
    assert template.render(msgs, add_generation_prompt=False, **extra) == '2{"city": "Oslo"};{"city": "Rome"};'
    assert request().messages[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'  # untouched


def test_templates_without_tools_get_the_fallback_prompt_and_rewritten_turns() -> None:
    template = tm.default_model().chat_template  # SmolLM2's: no tools variable
    req = request()
    msgs, extra = chat_messages(req, template)
    assert extra == {}
    text = template.render(msgs, add_generation_prompt=True)
    assert "<tools>" in text and '"get_weather"' in text  # the functions are listed
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>" in text and "-3 C" in text and "14 C" in text
    assert not any(m["role"] == "tool" for m in msgs)
    # tool_choice "none": no tools offered, but the earlier tool turns still render
    msgs, _ = chat_messages(request(tool_choice="none"), template)
    assert "<tools>" not in template.render(msgs) and "-3 C" in template.render(msgs)


def test_plan_follows_tool_choice_and_template() -> None:
    hermes = ChatTemplate(HERMES_TEMPLATE, None, None)
    tok = tm.default_model().tokenizer
    assert plan_tools(request(tool_choice="none"), hermes, tok) is None
    auto = plan_tools(request(), hermes, tok)
    assert auto.fmt is ToolCallFormat.HERMES and not auto.forced and auto.constraint is None
    forced = plan_tools(request(tool_choice={"type": "function", "function": {"name": "now"}}), hermes, tok)
    assert forced.forced and forced.constraint.kind == "lark" and forced.constraint.param == "tool_choice"
    assert '\\"now\\"' in forced.constraint.data and "get_weather" not in forced.constraint.data
    mistral = ChatTemplate("{{ tools }}[TOOL_CALLS]{{ messages[0].content }}", None, None)
    assert plan_tools(request(), mistral, tok).fmt is ToolCallFormat.MISTRAL
    # forced arguments take only the named keys, whatever the schema allows
    required = plan_tools(request(tool_choice="required"), hermes, tok)
    assert required.constraint.data.count('"additionalProperties": false') == 2
