"""Tool calls: template reading, whole-text parsing, streaming under random splits, fallback
messages, and llguidance grammars checked with a real matcher over a byte-level test tokenizer."""
from __future__ import annotations

import ast
import itertools
import json
import random
import string
from pathlib import Path
from typing import Any

import llguidance
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from pyserve.protocol import tool_calls as tc
from pyserve.protocol.errors import ProtocolError
from pyserve.protocol.tool_calls import (
    MISTRAL_MARKER,
    ContentDelta,
    ParsedOutput,
    ToolCall,
    ToolCallDelta,
    ToolCallFormat,
    ToolCallStreamParser,
    add_tools_system_prompt,
    detect_tool_call_format,
    parse_tool_calls,
    render_tool_messages_fallback,
    template_supports_tools,
    tool_call_grammar,
    tool_choice_named,
    tools_system_prompt,
)

HERMES, LLAMA, MISTRAL = ToolCallFormat.HERMES, ToolCallFormat.LLAMA3_JSON, ToolCallFormat.MISTRAL


def counting_ids() -> tc.IdFactory:
    counter = itertools.count()
    return lambda: f"call_{next(counter):024x}"


def parse(text: str, fmt: ToolCallFormat) -> ParsedOutput:
    return parse_tool_calls(text, fmt, new_id=counting_ids())


def calls_of(parsed: ParsedOutput) -> list[tuple[str, Any]]:
    return [(call.name, json.loads(call.arguments)) for call in parsed.tool_calls]


def test_package_is_pure_logic():
    files = sorted(Path(tc.__file__).parent.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "formats.py", "parse.py", "stream.py", "prompt.py", "grammar.py"}
    for file in files:
        tree = ast.parse(file.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in imported if m.startswith(("pyserve.engine", "pyserve.api", "pyserve.http"))}, file
        assert "pyserve.protocol.errors" not in imported, file  # request validation lives in requests.py


def test_public_names_used_by_the_api_are_exported():
    for name in ("HERMES_CLOSE", "HERMES_OPEN", "MISTRAL_MARKER", "PYTHON_TAG", "ContentDelta", "ParsedOutput",
                 "ToolCallDelta", "ToolCallFormat", "ToolCallStreamParser", "add_tools_system_prompt",
                 "detect_tool_call_format", "parse_tool_calls", "render_tool_messages_fallback",
                 "template_supports_tools", "tool_call_grammar"):
        assert name in tc.__all__ and hasattr(tc, name), name


# ---------------------------------------------------------------------------------------------
# Templates

QWEN_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}"
    "{{- tool | tojson }}{%- endfor %}{{- '</tools>\\n<tool_call>\\n{\"name\": ...}\\n</tool_call>' }}"
    "{%- endif %}"
)
LLAMA31_TEMPLATE = (
    "{%- if tools is not none and not tools_in_user_message %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{{- '{\"name\": \"' + tool_call.name + '\", ' }}"
    "{{- '\"parameters\": ' }}{{- tool_call.arguments | tojson }}{%- endfor %}"
    "{%- if builtin_tools is defined %}{{- '<|python_tag|>' }}{%- endif %}"
)
MISTRAL_TEMPLATE = "{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{%- endif %}[TOOL_CALLS]"
PLAIN_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"


@pytest.mark.parametrize(
    "template, fmt",
    [
        (QWEN_TEMPLATE, HERMES),
        (LLAMA31_TEMPLATE, LLAMA),
        ("{{ '<|python_tag|>' }}", LLAMA),
        ("{% if 'ipython' %}{{ '\"parameters\": ' }}{% endif %}", LLAMA),
        (MISTRAL_TEMPLATE, MISTRAL),
        (PLAIN_TEMPLATE, HERMES),
        (None, HERMES),
        ("", HERMES),
    ],
)
def test_detect_tool_call_format(template, fmt):
    assert detect_tool_call_format(template) is fmt


@pytest.mark.parametrize(
    "template, supported",
    [
        (QWEN_TEMPLATE, True),
        (LLAMA31_TEMPLATE, True),
        (MISTRAL_TEMPLATE, True),
        ("{{ tools | tojson }}", True),
        (PLAIN_TEMPLATE, False),
        ("{% if tools_in_user_message %}{% endif %}", False),  # another variable
        ("You have tools at hand. {{ messages }}", False),  # the word outside Jinja code
        (None, False),
    ],
)
def test_template_supports_tools(template, supported):
    assert template_supports_tools(template) is supported


def test_template_supports_tools_is_memoised():
    template_supports_tools.cache_clear()
    assert template_supports_tools(QWEN_TEMPLATE) and template_supports_tools(QWEN_TEMPLATE)
    info = template_supports_tools.cache_info()
    assert (info.hits, info.misses) == (1, 1) and info.maxsize is not None and info.maxsize <= 16


# ---------------------------------------------------------------------------------------------
# Whole-text parsing

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'


def test_hermes_single_call():
    parsed = parse(f"<tool_call>\n{WEATHER}\n</tool_call>", HERMES)
    assert parsed.content is None
    assert parsed.tool_calls == [
        ToolCall("call_" + "0" * 24, "get_weather", '{"city": "Paris", "unit": "celsius"}')
    ]


def test_hermes_several_calls_with_content_before():
    text = f'Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{{"name": "now", "arguments": {{}}}}\n</tool_call>\n'
    parsed = parse(text, HERMES)
    assert parsed.content == "Let me look."
    assert calls_of(parsed) == [("get_weather", {"city": "Paris", "unit": "celsius"}), ("now", {})]
    assert [c.id for c in parsed.tool_calls] == ["call_" + "0" * 24, "call_" + "0" * 23 + "1"]


@pytest.mark.parametrize(
    "block",
    [
        '<tool_call>\n{"name": "f", "arguments": {bad}}\n</tool_call>',  # bad JSON
        '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',  # empty name
        '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',  # arguments not an object
        '<tool_call>\n{"name": "f", "arguments": {"x": NaN}}\n</tool_call>',  # not JSON
        '<tool_call>{"name": "f"} {"name": "g"}</tool_call>',  # two objects in one block
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n',  # unterminated and unparsable
    ],
)
def test_hermes_malformed_call_stays_content(block):
    text = f"Before. {block}"
    parsed = parse(text, HERMES)
    assert parsed.tool_calls == []
    assert parsed.content == text.strip()


def test_hermes_malformed_and_good_calls_mixed():
    bad = '<tool_call>\n{"name": "f", "arguments": {bad}}\n</tool_call>'
    parsed = parse(f"{bad}\n<tool_call>\n{WEATHER}\n</tool_call>", HERMES)
    assert parsed.content == bad
    assert calls_of(parsed) == [("get_weather", {"city": "Paris", "unit": "celsius"})]


def test_hermes_lenient_variants():
    # Unterminated last block (the model stopped at EOS), arguments as a JSON string, "parameters",
    # no arguments at all, compact JSON, non-ASCII kept as is.
    text = (
        '<tool_call>{"name":"a","arguments":"{\\"x\\": 1}"}</tool_call>'
        '<tool_call>{"name": "b", "parameters": {"q": "café"}}</tool_call>'
        '<tool_call>{"name": "c"}</tool_call>'
        '<tool_call>\n{"name": "d", "arguments": {"n": [1, {"m": null}]}}\n'
    )
    parsed = parse(text, HERMES)
    assert parsed.content is None
    assert calls_of(parsed) == [("a", {"x": 1}), ("b", {"q": "café"}), ("c", {}), ("d", {"n": [1, {"m": None}]})]
    assert parsed.tool_calls[1].arguments == '{"q": "café"}'  # ensure_ascii=False


def test_llama_calls():
    one = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert calls_of(parse(one, LLAMA)) == [("get_weather", {"city": "Paris"})]
    assert calls_of(parse(f"  <|python_tag|>{one}\n", LLAMA)) == [("get_weather", {"city": "Paris"})]
    several = parse(f'{one}; {{"name": "now", "arguments": {{}}}};', LLAMA)
    assert several.content is None
    assert calls_of(several) == [("get_weather", {"city": "Paris"}), ("now", {})]


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        'Calling: {"name": "f", "parameters": {}}',  # text before: not a call in this format
        '{"name": "f", "parameters": {}} and then text',  # text after
        '{"name": "f", "parameters": {}',  # broken JSON
        '{"city": "Paris"}',  # JSON, but not a call
        '<|python_tag|>brave_search.call(query="x")',  # a built-in tool: not ours to parse
        "<|python_tag|>",
    ],
)
def test_llama_non_calls_are_content(text):
    parsed = parse(f"\n{text} ", LLAMA)
    assert parsed == ParsedOutput(text, [])


def test_mistral_calls():
    text = 'Sure. [TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'
    parsed = parse(text, MISTRAL)
    assert parsed.content == "Sure."
    assert calls_of(parsed) == [("a", {"x": 1}), ("b", {})]
    assert calls_of(parse('[TOOL_CALLS]{"name": "a", "arguments": {}}', MISTRAL)) == [("a", {})]


@pytest.mark.parametrize(
    "text",
    [
        "[TOOL_CALLS] I will not call anything",
        '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}',  # unterminated
        "[TOOL_CALLS][]",
        '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"nope": 1}]',  # one bad element spoils the array
        '[TOOL_CALLS][{"name": "a", "arguments": {bad}}]',
    ],
)
def test_mistral_malformed_stays_content(text):
    assert parse(text, MISTRAL) == ParsedOutput(text, [])


def test_mistral_marker_retried_after_a_bad_one():
    text = '[TOOL_CALLS] oops [TOOL_CALLS][{"name": "a", "arguments": {}}] done'
    parsed = parse(text, MISTRAL)
    assert parsed.content == "[TOOL_CALLS] oops  done"
    assert calls_of(parsed) == [("a", {})]


def test_openai_shapes():
    call = ToolCall("call_1", "f", "{}")
    assert call.to_openai() == {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    first = ToolCallDelta(0, "call_1", "f", "")
    assert first.to_openai() == {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert ToolCallDelta(0, None, None, '{"a"').to_openai() == {"index": 0, "function": {"arguments": '{"a"'}}


def is_openai_id(call_id: str) -> bool:
    return len(call_id) == 29 and call_id.startswith("call_") and set(call_id[5:]) <= set(string.hexdigits)


def is_mistral_id(call_id: str) -> bool:
    # What Mistral's chat templates demand of an id sent back to them: 9 alphanumerics, no more.
    return len(call_id) == 9 and set(call_id) <= set(string.ascii_letters + string.digits)


def test_default_ids_look_like_openai():
    ids = [call.id for call in parse_tool_calls(f"<tool_call>{WEATHER}</tool_call>" * 2, HERMES).tool_calls]
    assert len(set(ids)) == 2
    assert all(is_openai_id(i) for i in ids)
    llama = parse_tool_calls('{"name": "f", "parameters": {}}', LLAMA).tool_calls
    assert is_openai_id(llama[0].id)


def test_default_ids_of_mistral_are_nine_alphanumerics():
    text = '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]'
    ids = [call.id for call in parse_tool_calls(text, MISTRAL).tool_calls]
    assert len(set(ids)) == 2 and all(is_mistral_id(i) for i in ids)
    parser = ToolCallStreamParser(MISTRAL, stream_arguments=True)
    streamed = [e.id for e in parser.feed(text) + parser.finish() if isinstance(e, ToolCallDelta) and e.id]
    assert len(streamed) == 2 and all(is_mistral_id(i) for i in streamed)
    whole = ToolCallStreamParser(MISTRAL)
    assert all(is_mistral_id(e.id) for e in whole.feed(text) + whole.finish() if isinstance(e, ToolCallDelta))
    assert tc.default_id_factory(MISTRAL) is tc.new_mistral_tool_call_id
    assert tc.default_id_factory("hermes") is tc.new_tool_call_id
    assert len({tc.new_mistral_tool_call_id() for _ in range(1000)}) == 1000
    other = ToolCallStreamParser(HERMES)
    assert all(is_openai_id(e.id) for e in other.feed(f"<tool_call>{WEATHER}</tool_call>") if isinstance(e, ToolCallDelta))


# ---------------------------------------------------------------------------------------------
# Streaming


def stream(text: str, fmt: ToolCallFormat, cuts: list[int], *, stream_arguments: bool = False) -> list[Any]:
    parser = ToolCallStreamParser(fmt, stream_arguments=stream_arguments, new_id=counting_ids())
    events: list[Any] = []
    bounds = [0, *cuts, len(text)]
    for a, b in zip(bounds, bounds[1:]):
        events += parser.feed(text[a:b])
    events += parser.finish()
    assert parser.tool_call_count == len({e.index for e in events if isinstance(e, ToolCallDelta)})
    return events


def assemble(events: list[Any]) -> ParsedOutput:
    """What a client builds from the deltas, checking the OpenAI delta rules on the way."""
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ToolCallDelta):
            if event.index not in calls:
                assert event.index == len(calls) and event.id and event.name  # first delta: id + name
                calls[event.index] = [event.id, event.name, event.arguments]
            else:
                assert event.id is None and event.name is None and event.arguments
                calls[event.index][2] += event.arguments
    return ParsedOutput(content or None, [ToolCall(*fields) for fields in calls.values()])


def random_cuts(rng: random.Random, text: str) -> list[int]:
    if not text:
        return []
    return sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text) + 1, 12))))


def random_arguments(rng: random.Random) -> dict[str, Any]:
    values = ["Paris", 'quote " and \\ slash', "brace } ] {", "<tool_call>", "[TOOL_CALLS]", "café ✓", 3, -2.5, True, None, [], [1, "x"], {"deep": {"er": [{}]}}]
    return {rng.choice(["city", "q", "n", "opts", "ü"]) + str(i): rng.choice(values) for i in range(rng.randint(0, 3))}


def random_call_json(rng: random.Random, key: str = "arguments", *, plain: bool = False) -> str:
    """One call object, in the varied spellings models produce (plain: name first, object args)."""
    name = rng.choice(["get_weather", "search", "now", "f"])
    arguments: Any = random_arguments(rng)
    style = "plain" if plain else rng.choice(["plain", "plain", "compact", "indent", "args-first", "string-args"])
    if style == "string-args":
        arguments = json.dumps(arguments)
    obj = {key: arguments, "name": name} if style == "args-first" else {"name": name, key: arguments}
    if style == "compact":
        return json.dumps(obj, separators=(",", ":"))
    return json.dumps(obj, indent=2 if style == "indent" else None, ensure_ascii=rng.random() < 0.5)


CONTENT = ["", "Sure.", "Let me check the weather.\n", "  ", "a < b, [x] {y}", "<tool", "<tool_cal", "tool_call>", "[TOOL_", "[TOOL_CALLS", "}", "café ✓ 中文", "\n\n", "<|python", "{not json", "</tool_call>"]


def hermes_output(rng: random.Random, *, well_formed: bool) -> str:
    parts = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["content", "call", "call"] + ([] if well_formed else ["bad", "bad"]))
        if kind == "content":
            parts.append(rng.choice(CONTENT))
        elif kind == "call":
            parts.append(f"<tool_call>\n{random_call_json(rng)}\n</tool_call>")
        else:
            parts.append(rng.choice([
                '<tool_call>\n{"name": "f", "arguments": {bad}}\n</tool_call>',
                '<tool_call>{"arguments": {}}</tool_call>',
                "<tool_call>not json</tool_call>",
                '<tool_call>{"name": "f", "arguments": {"s": "</tool_call>"}}</tool_call>',  # cut at the tag
                '<tool_call>{"name": "g", "arguments": {"a": 1}} trailing</tool_call>',
            ]))
    if not well_formed and rng.random() < 0.3:  # the model stopped inside a block
        parts.append(rng.choice(['<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n', '<tool_call>\n{"name": "f", "arg', "<tool_call>"]))
    return rng.choice(["", "\n", " "]).join(parts)


def mistral_output(rng: random.Random, *, well_formed: bool) -> str:
    parts = [rng.choice(CONTENT)]
    for _ in range(rng.randint(0, 2)):
        calls = ", ".join(random_call_json(rng) for _ in range(rng.randint(1, 3)))
        parts.append(f"[TOOL_CALLS]{rng.choice(['', ' ', chr(10)])}[{calls}]")
        if not well_formed:
            parts.append(rng.choice([
                "[TOOL_CALLS] nothing",
                "[TOOL_CALLS][]",
                '[TOOL_CALLS][{"name": "f", "arguments": {bad}}]',
                '[TOOL_CALLS][{"name": "a", "arguments": {"s": "[TOOL_CALLS]"}}, oops]',
                '[TOOL_CALLS][{"name": "f"',
            ]))
        parts.append(rng.choice(CONTENT))
    return rng.choice(["", " "]).join(parts)


def llama_output(rng: random.Random, *, well_formed: bool) -> str:
    if well_formed or rng.random() < 0.5:
        key = rng.choice(["parameters", "parameters", "arguments"])
        calls = rng.choice([";", "; ", ";\n"]).join(random_call_json(rng, key) for _ in range(rng.randint(1, 3)))
        return rng.choice(["", "\n", "<|python_tag|>", " <|python_tag|> "]) + calls + rng.choice(["", ";", "\n"])
    return rng.choice([
        "The weather is fine.",
        '{"name": "f", "parameters": {}} and then text',
        '{"name": "f", "parameters": {"a": 1}',
        '<|python_tag|>brave_search.call(query="x")',
        "<|python",
        '{"city": "Paris"}',
        "  ",
        "",
    ])


OUTPUTS = {HERMES: hermes_output, MISTRAL: mistral_output, LLAMA: llama_output}


@pytest.mark.parametrize("fmt", list(ToolCallFormat))
def test_stream_matches_whole_text_parse_under_random_splits(fmt):
    rng = random.Random(f"splits-{fmt.value}")
    for _ in range(150):
        text = OUTPUTS[fmt](rng, well_formed=False)
        expected = parse(text, fmt)
        for _ in range(8):
            cuts = random_cuts(rng, text)
            assert assemble(stream(text, fmt, cuts)) == expected, (text, cuts)


@pytest.mark.parametrize("fmt", list(ToolCallFormat))
def test_streamed_arguments_agree_with_whole_text_parse(fmt):
    # stream_arguments=True sends the raw argument text: equal as JSON values, not as strings.
    rng = random.Random(f"incremental-{fmt.value}")
    for _ in range(150):
        text = OUTPUTS[fmt](rng, well_formed=True)
        expected = parse(text, fmt)
        for _ in range(8):
            cuts = random_cuts(rng, text)
            got = assemble(stream(text, fmt, cuts, stream_arguments=True))
            assert got.content == expected.content, (text, cuts)
            assert [(c.id, c.name, json.loads(c.arguments)) for c in got.tool_calls] == [
                (c.id, c.name, json.loads(c.arguments)) for c in expected.tool_calls
            ], (text, cuts)


@pytest.mark.parametrize("fmt", list(ToolCallFormat))
def test_streamed_arguments_arrive_before_the_call_closes(fmt):
    arguments = '{"city": "Paris", "days": [1, 2, 3]}'
    text = {
        HERMES: f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>',
        LLAMA: f'{{"name": "get_weather", "parameters": {arguments}}}',
        MISTRAL: f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {arguments}}}]',
    }[fmt]
    parser = ToolCallStreamParser(fmt, stream_arguments=True, new_id=counting_ids())
    events_before_end = [event for ch in text[:-1] for event in parser.feed(ch)]
    assert events_before_end[0] == ToolCallDelta(0, "call_" + "0" * 24, "get_weather", "")
    assert "".join(e.arguments for e in events_before_end) == arguments  # every piece, before the end
    assert len(events_before_end) > 10  # piece by piece, not at once
    assert parser.feed(text[-1]) + parser.finish() == []


@pytest.mark.parametrize("fmt", list(ToolCallFormat))
def test_streamed_call_cut_off_is_not_sent_again_as_content(fmt):
    # A forced call cut by max_tokens after its name and part of its arguments went out: finish()
    # must not send the block again as content (it once sent "<tool_call>\n{"name": ..." whole).
    head = {
        HERMES: '<tool_call>\n{"name": "get_weather", "arguments": ',
        LLAMA: '{"name": "get_weather", "parameters": ',
        MISTRAL: '[TOOL_CALLS][{"name": "get_weather", "arguments": ',
    }[fmt]
    parser = ToolCallStreamParser(fmt, stream_arguments=True, new_id=counting_ids())
    events = parser.feed(head) + parser.feed('{"city": "Pa') + parser.feed("ri")
    events += parser.finish()
    assert events == [
        ToolCallDelta(0, "call_" + "0" * 24, "get_weather", ""),
        ToolCallDelta(0, None, None, '{"city": "Pa'),
        ToolCallDelta(0, None, None, "ri"),
    ]
    assert parser.tool_call_count == 1


@pytest.mark.parametrize(
    "fmt, text, content",
    [
        # What follows a streamed call in a region that then proves malformed is content, once.
        (HERMES, '<tool_call>{"name": "f", "arguments": {"a": 1}} trailing</tool_call> after', "trailing after"),
        (HERMES, '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_', None),  # the tag cut off
        (MISTRAL, '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"nope": 1}] after', '{"nope": 1}] after'),
        (MISTRAL, '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"na', '{"na'),
        (LLAMA, '{"name": "f", "parameters": {"a": 1}} and then text', "and then text"),
    ],
)
def test_streamed_call_in_a_malformed_region_leaves_only_the_rest_as_content(fmt, text, content):
    for cuts in ([], list(range(1, len(text)))):  # whole, and one character at a time
        got = assemble(stream(text, fmt, cuts, stream_arguments=True))
        assert got.content == content, cuts
        assert [(c.name, c.arguments) for c in got.tool_calls] == [("f", '{"a": 1}')]


def forced_output(rng: random.Random, fmt: ToolCallFormat) -> str:
    """What a forcing grammar lets a model write: calls only, json.dumps-style."""
    calls = [random_call_json(rng, "parameters" if fmt is LLAMA else "arguments", plain=True) for _ in range(rng.randint(1, 3))]
    if fmt is HERMES:
        return "\n".join(f"<tool_call>\n{call}\n</tool_call>" for call in calls)
    if fmt is LLAMA:
        return "; ".join(calls)
    return f"{MISTRAL_MARKER}[{', '.join(calls)}]"


@pytest.mark.parametrize("fmt", list(ToolCallFormat))
def test_streamed_calls_cut_anywhere_send_no_text_twice(fmt):
    rng = random.Random(f"cut-{fmt.value}")
    for _ in range(150):
        full = forced_output(rng, fmt)
        text = full[: rng.randint(0, len(full))]  # max_tokens struck here
        got = assemble(stream(text, fmt, random_cuts(rng, text), stream_arguments=True))
        arguments = "".join(c.arguments for c in got.tool_calls)
        names = "".join(c.name for c in got.tool_calls)
        # Every character out came in once: the streamed pieces are the text's, content the rest.
        assert len(got.content or "") + len(arguments) + len(names) <= len(text), (text, got)
        pos = 0
        for call in got.tool_calls:  # the streamed arguments are the text's, in order
            pos = text.index(call.arguments, pos) + len(call.arguments)
        assert (got.content or "") in text[pos:], (text, got)  # content only comes after them


def test_stream_holds_back_a_possible_marker():
    parser = ToolCallStreamParser(HERMES, new_id=counting_ids())
    assert parser.feed("Hello <tool") == [ContentDelta("Hello")]  # the space waits with "<tool"
    assert parser.feed("box> here") == [ContentDelta(" <toolbox> here")]
    assert parser.feed(" <tool_") == []
    assert parser.feed(f"call>{WEATHER}</tool_") == []
    assert parser.feed("call>\n") == [ToolCallDelta(0, "call_" + "0" * 24, "get_weather", '{"city": "Paris", "unit": "celsius"}')]
    assert parser.feed("[TOOL_") == [ContentDelta(" \n[TOOL_")]  # held whitespace goes with it
    assert parser.finish() == []
    assert parser.tool_call_count == 1

    mistral = ToolCallStreamParser(MISTRAL, new_id=counting_ids())
    assert mistral.feed("Sure [TOOL_") == [ContentDelta("Sure")]
    assert mistral.feed("CALLS] [") == []
    assert "".join(e.text for e in mistral.finish()) == " [TOOL_CALLS] ["  # unterminated: content


def test_stream_llama_content_flows_once_it_cannot_be_a_call():
    parser = ToolCallStreamParser(LLAMA, new_id=counting_ids())
    assert parser.feed("  <|pyth") == []
    assert parser.feed("on_tag|> ") == []
    assert parser.feed("Hi") == [ContentDelta("<|python_tag|> Hi")]
    assert parser.feed(" there") == [ContentDelta(" there")]
    held = ToolCallStreamParser(LLAMA, new_id=counting_ids())
    assert held.feed('{"name": "f", "parameters": {}}') == []  # text may still follow: wait for the end
    assert held.finish() == [ToolCallDelta(0, "call_" + "0" * 24, "f", "{}")]


def test_stream_feed_after_finish_is_an_error():
    parser = ToolCallStreamParser(HERMES)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


# ---------------------------------------------------------------------------------------------
# Templates without tool support

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def test_tools_system_prompt_lists_functions_and_the_call_format():
    prompt = tools_system_prompt(TOOLS)
    listing = prompt.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line)["function"] for line in listing] == [
        TOOLS[0]["function"],
        {"name": "now", "parameters": {"type": "object"}},
    ]
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in prompt


def test_add_tools_system_prompt():
    prompt = tools_system_prompt(TOOLS)
    user = {"role": "user", "content": "hi"}
    assert add_tools_system_prompt([user], TOOLS) == [{"role": "system", "content": prompt}, user]
    merged = add_tools_system_prompt([{"role": "system", "content": "Be brief."}, user], TOOLS)
    assert merged[0] == {"role": "system", "content": f"{prompt}\n\nBe brief."}
    parts = add_tools_system_prompt([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}], TOOLS)
    assert parts[0]["content"][1] == {"type": "text", "text": "Be brief."}


def test_render_tool_messages_fallback_round_trips_through_the_parser():
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "21 C"}]},
        {"role": "assistant", "content": "Paris 18 C, Rome 21 C."},
    ]
    out = render_tool_messages_fallback(messages)
    assert [m["role"] for m in out] == ["user", "assistant", "user", "assistant"]
    assert "tool_calls" not in out[1]
    parsed = parse(out[1]["content"], HERMES)
    assert parsed.content == "Checking."
    assert calls_of(parsed) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert out[2]["content"] == (
        "<tool_response>\ntool_call_id: call_1\n18 C\n</tool_response>\n"
        "<tool_response>\ntool_call_id: call_2\n21 C\n</tool_response>"
    )
    assert out[0] == messages[0] and out[3] == messages[4]
    assert messages[1]["tool_calls"]  # the input is left alone


# ---------------------------------------------------------------------------------------------
# Grammars


def byte_level_tokenizer(*specials: str) -> llguidance.LLTokenizer:
    """256 byte tokens (no merges) plus special tokens: enough to drive a matcher byte by byte."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<|endoftext|>", *specials):
        vocab[special] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in ("<|endoftext|>", *specials)])
    return llguidance.LLTokenizer(tokenizer.to_str())


TOKENIZER = byte_level_tokenizer()
TOKENIZER_WITH_TOOL_CALLS_TOKEN = byte_level_tokenizer("[TOOL_CALLS]")  # id 257


def compile_grammar(lark: str) -> str:
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    assert llguidance.LLMatcher.validate_grammar(grammar) == "", lark
    return grammar


def accepts(lark: str, text: str, tokenizer: llguidance.LLTokenizer = TOKENIZER) -> bool:
    matcher = llguidance.LLMatcher(tokenizer, compile_grammar(lark), log_level=0)
    return matcher.consume_tokens(tokenizer.tokenize_str(text, parse_special=True)) and matcher.is_accepting()


def call_text(fmt: ToolCallFormat, calls: list[tuple[str, str]]) -> str:
    """Calls as each format writes them (json.dumps spacing), arguments given as JSON text."""
    key = "parameters" if fmt is LLAMA else "arguments"
    objects = [f'{{"name": {json.dumps(name)}, "{key}": {arguments}}}' for name, arguments in calls]
    if fmt is HERMES:
        return "\n".join(f"<tool_call>\n{obj}\n</tool_call>" for obj in objects)
    if fmt is LLAMA:
        return "; ".join(objects)
    return f"[TOOL_CALLS][{', '.join(objects)}]"


NAMED = {"type": "function", "function": {"name": "get_weather"}}
PARIS = '{"city": "Paris", "unit": "celsius"}'


@pytest.mark.parametrize("fmt", list(ToolCallFormat))
@pytest.mark.parametrize("choice, parallel", [("required", False), ("required", True), (NAMED, True)])
def test_grammar_is_valid_and_reads_back(fmt, choice, parallel):
    grammar = tool_call_grammar(TOOLS, choice, fmt, parallel)
    compile_grammar(grammar)
    one = call_text(fmt, [("get_weather", PARIS)])
    two = call_text(fmt, [("get_weather", PARIS), ("now", "{}")])
    assert accepts(grammar, one)
    assert accepts(grammar, two) is (parallel and choice == "required")
    assert accepts(grammar, call_text(fmt, [("now", "{}")])) is (choice == "required")
    for text in (one, two):  # what the grammar lets out, the parser reads back as calls
        parsed = parse(text, fmt)
        assert parsed.content is None and parsed.tool_calls


@pytest.mark.parametrize("fmt", list(ToolCallFormat))
def test_grammar_rejects_wrong_names_and_schema_violations(fmt):
    grammar = tool_call_grammar(TOOLS, "required", fmt, True)
    assert accepts(grammar, call_text(fmt, [("get_weather", '{"city": "Paris"}')]))
    assert accepts(grammar, call_text(fmt, [("now", '{"anything": [1]}')]))  # no parameters: any object
    assert not accepts(grammar, call_text(fmt, [("get_wether", '{"city": "Paris"}')]))  # unknown name
    assert not accepts(grammar, call_text(fmt, [("get_weather", '{"unit": "celsius"}')]))  # city missing
    assert not accepts(grammar, call_text(fmt, [("get_weather", '{"city": 7}')]))  # wrong type
    assert not accepts(grammar, call_text(fmt, [("get_weather", '{"city": "P", "unit": "kelvin"}')]))  # enum
    assert not accepts(grammar, call_text(fmt, [("now", "[]")]))  # not an object
    assert not accepts(grammar, "Sure! " + call_text(fmt, [("now", "{}")]))  # no text before the call
    assert not accepts(grammar, call_text(fmt, [("get_weather", PARIS)])[:-1])  # incomplete


def test_grammar_whitespace_flexibility():
    grammar = tool_call_grammar(TOOLS, NAMED, HERMES, False)
    assert accepts(grammar, '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>')
    assert accepts(grammar, '<tool_call>\n{"name": "get_weather", "arguments": {\n  "city": "Paris"\n}}\n</tool_call>')
    assert not accepts(grammar, '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    assert not accepts(grammar, '<tool_call>\n{"name":  "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


def test_grammar_named_function_forces_exactly_that_call():
    grammar = tool_call_grammar(TOOLS, {"type": "function", "function": {"name": "now"}}, LLAMA, True)
    assert accepts(grammar, '{"name": "now", "parameters": {}}')
    assert not accepts(grammar, '{"name": "now", "parameters": {}}; {"name": "now", "parameters": {}}')
    assert not accepts(grammar, '{"name": "get_weather", "parameters": {"city": "Paris"}}')


def test_grammar_marker_as_special_token():
    text = call_text(MISTRAL, [("now", "{}")])
    as_token = tool_call_grammar(TOOLS, "required", MISTRAL, False, special_tokens={"[TOOL_CALLS]": 257})
    assert "<[257]>" in as_token
    assert accepts(as_token, text, TOKENIZER_WITH_TOOL_CALLS_TOKEN)
    as_text = tool_call_grammar(TOOLS, "required", MISTRAL, False)
    assert not accepts(as_text, text, TOKENIZER_WITH_TOOL_CALLS_TOKEN)  # a special token is not its spelling
    assert accepts(as_text, text, TOKENIZER)


def test_grammar_output_streams_with_arguments():
    # Grammar-forced output is what stream_arguments=True is for: check the two agree.
    rng = random.Random("grammar-stream")
    for fmt in ToolCallFormat:
        grammar = tool_call_grammar(TOOLS, "required", fmt, True)
        text = call_text(fmt, [("get_weather", PARIS), ("now", '{"x": "}</tool_call>]"}'.replace("</tool_call>", "<"))])
        assert accepts(grammar, text)
        got = assemble(stream(text, fmt, random_cuts(rng, text), stream_arguments=True))
        assert calls_of(got) == calls_of(parse(text, fmt))


@pytest.mark.parametrize(
    "choice",
    ["auto", "none", {"type": "function", "function": {"name": "missing"}}],
)
def test_grammar_asserts_a_choice_that_forces_a_call(choice):
    # requests.py answers these with a 400 naming tool_choice; here they are a caller's bug.
    with pytest.raises(ValueError) as err:
        tool_call_grammar(TOOLS, choice, HERMES, False)
    assert not isinstance(err.value, ProtocolError)
    with pytest.raises(ValueError):
        tool_call_grammar([], "required", HERMES, False)


@pytest.mark.parametrize("fmt", list(ToolCallFormat))
def test_grammar_arguments_are_an_object_even_when_the_schema_omits_type(fmt):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": "integer"}}}}}]
    grammar = tool_call_grammar(tools, "required", fmt, False)
    assert accepts(grammar, call_text(fmt, [("f", '{"a": 1}')]))
    assert accepts(grammar, call_text(fmt, [("f", "{}")]))
    for not_an_object in ("7", '"x"', "[1]", "null"):
        assert not accepts(grammar, call_text(fmt, [("f", not_an_object)])), not_an_object
    assert not accepts(grammar, call_text(fmt, [("f", '{"a": "x"}')]))  # the properties still hold
    assert tools[0]["function"]["parameters"] == {"properties": {"a": {"type": "integer"}}}  # left alone
    typed = [{"type": "function", "function": {"name": "f", "parameters": {"type": ["object", "null"]}}}]
    assert accepts(tool_call_grammar(typed, "required", fmt, False), call_text(fmt, [("f", "null")]))  # a type is kept


def test_tool_choice_named():
    assert tool_choice_named(NAMED) == "get_weather"
    assert tool_choice_named("required") is None
    assert tool_choice_named({"type": "function"}) is None
