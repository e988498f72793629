"""Structured output: constraints parsed from requests, compiled by llguidance, enforced by the
engine's sampler. Every constrained output of the schema corpus must validate (jsonschema), on the
default model and on a random tiny model, greedy and sampled, alone and batched with unconstrained
requests; forks (n > 1), speculative drafts and logprobs keep to the grammar too."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

import tiny_models
from engine_helpers import c_model
from pyserve import _C
from pyserve.engine.grammar import GrammarCompiler, GrammarError, vocabulary_bytes
from pyserve.engine.sampling import SamplingParams
from pyserve.model.loader import load_model
from pyserve.protocol.errors import ProtocolError
from pyserve.protocol.structured import Constraint, constraint_from_request
from test_engine_core import Choice, assert_clean, drain

# --- the schema corpus ---------------------------------------------------------------------------

SCHEMAS: dict[str, dict] = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "format": "email"}}, "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {
        "title": {"type": "string"},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "city", "zip"]}},
        "required": ["title", "address"]},
    "array_of_objects": {"type": "object", "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
            "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
            "required": ["id", "tags"]}}}, "required": ["items"]},
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "L"]}},
        "required": ["color", "size"]},
    "any_of": {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 10}]}}, "required": ["value"]},
    "optional": {"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "boolean"}}, "required": ["a"]},
    "bounded_numbers": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -1, "maximum": 1},
        "n": {"type": "integer", "exclusiveMinimum": 0, "maximum": 100}}, "required": ["x", "n"]},
    "bool_null": {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "note": {"type": ["string", "null"]}}, "required": ["ok", "note"]},
    "pattern": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}, "required": ["code"]},
    "formats": {"type": "object", "properties": {
        "day": {"type": "string", "format": "date"}, "id": {"type": "string", "format": "uuid"}},
        "required": ["day", "id"], "additionalProperties": False},
    "array_root": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "const_strict": {"type": "object", "properties": {
        "kind": {"const": "event"}, "count": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["kind", "count"], "additionalProperties": False},
    "any_object": {"type": "object"},
}

# What each schema asks the default model for (a chat prompt).
ASKS = {
    "person": "Describe a fictional person: name, age and email.",
    "nested": "Give a shop's name and its street address.",
    "array_of_objects": "List two products with ids and tags.",
    "enums": "Pick a T-shirt colour and size.",
    "any_of": "Give me a value.",
    "optional": "Fill in the form.",
    "bounded_numbers": "Give a small number x and a count n.",
    "bool_null": "Is it raining? Add a note.",
    "pattern": "Give a flight code.",
    "formats": "Give today's date and an identifier.",
    "array_root": "List a few integers.",
    "const_strict": "Report one event count.",
    "any_object": "Describe the weather as JSON.",
}


def bounded(schema):
    """The schema with every free-text string limited to 16 characters: a random model ends a
    string only when it happens to draw a quote, so an unbounded one may outrun max_tokens."""
    if isinstance(schema, list):
        return [bounded(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (bounded(v) if k in ("items", "anyOf") else v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: bounded(v) for k, v in schema["properties"].items()}
    types = schema.get("type")
    if (types == "string" or (isinstance(types, list) and "string" in types)) and not (
            {"pattern", "format", "enum", "const", "maxLength"} & set(schema)):
        out["maxLength"] = 16
    return out


def validate(text: str, schema: dict) -> None:
    value = json.loads(text)
    jsonschema.validate(value, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def json_constraint(schema: dict, strict: bool = True) -> Constraint:
    """As OpenAI's clients send a schema (the SDK's parse() and LangChain: strict)."""
    c = constraint_from_request({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": strict}}})
    assert c is not None
    return c


# --- parsing requests ----------------------------------------------------------------------------


def test_every_spelling_reaches_the_same_constraint() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    want = json_constraint(schema, strict=False)
    assert constraint_from_request({"structured_outputs": {"json": schema}}).key == want.key
    assert constraint_from_request({"guided_json": json.dumps(schema)}).key == want.key
    strict = json_constraint(schema)
    assert json.loads(strict.data)["additionalProperties"] is False  # strict: no keys beyond those named
    assert constraint_from_request({"structured_outputs": {"json": schema, "disable_additional_properties": True}}).key \
        == strict.key
    nested = {"type": "object", "properties": {"o": {"type": "object", "properties": {}}},
              "$defs": {"d": {"type": "object"}}, "additionalProperties": True}
    closed = json.loads(json_constraint(nested).data)
    assert closed["additionalProperties"] is True  # what a schema says stands
    assert closed["properties"]["o"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert constraint_from_request({"response_format": {"type": "json_object"}}).key == \
        constraint_from_request({"structured_outputs": {"json_object": True}}).key
    assert constraint_from_request({"response_format": {"type": "text"}}) is None
    assert constraint_from_request({}) is None
    c = constraint_from_request({"guided_choice": ["yes", "no"]})
    assert (c.kind, json.loads(c.data), c.param) == ("choice", ["yes", "no"], "guided_choice")
    c = constraint_from_request({"structured_outputs": {"regex": "[0-9]+"}})
    assert (c.kind, c.data, c.param) == ("regex", "[0-9]+", "structured_outputs.regex")


@pytest.mark.parametrize("data, param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{not json"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"strict": "yes", "schema": {}}}},
     "response_format.json_schema.strict"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"nope": 1}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
])
def test_malformed_constraints_are_400_naming_the_field(data, param) -> None:
    with pytest.raises(ProtocolError) as info:
        constraint_from_request(data)
    assert info.value.param == param


# --- compiling -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = load_model(tiny_models.tiny_model_dir("llama-bpe"))
    return model, c_model(model)


@pytest.fixture(scope="module")
def default():
    model = tiny_models.default_model()
    return model, c_model(model)


def compiler_for(model) -> GrammarCompiler:
    return GrammarCompiler(model.tokenizer, model.config.vocab_size, model.eos_token_ids or [0])


def allowed(mask: np.ndarray) -> set[int]:
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    return {int(i) for i in np.flatnonzero(bits)}


def test_bad_constraints_name_the_reason(default) -> None:
    gc = compiler_for(default[0])
    for c, reason in [
        (json_constraint({"type": "strin"}), "strin"),
        (Constraint("regex", "(unclosed", "guided_regex"), "unclosed|group|regex|parse"),
        (Constraint("grammar", "start: undefined_rule", "guided_grammar"), "undefined_rule"),
    ]:
        with pytest.raises(GrammarError, match=reason):
            gc.compile(c)


def test_compiled_grammars_are_cached_per_constraint(default) -> None:
    gc = compiler_for(default[0])
    c = json_constraint(SCHEMAS["person"])
    g = gc.compile(c)
    assert gc.cached(c) is g and gc.compile(json_constraint(SCHEMAS["person"])) is g
    assert gc.cached(json_constraint(SCHEMAS["enums"])) is None


def test_vocabulary_marks_special_tokens_and_keeps_text_bytes(default) -> None:
    model = default[0]
    tok = model.tokenizer
    vb = vocabulary_bytes(tok, model.config.vocab_size)
    assert len(vb) == model.config.vocab_size
    for i in tok.all_special_ids:
        assert vb[i].startswith(b"\xff")
    ids = tok.encode('{"name": "Zoë"}', add_special_tokens=False)
    assert b"".join(vb[i] for i in ids) == '{"name": "Zoë"}'.encode()


def test_mask_walk_matches_the_text_the_grammar_accepts(default) -> None:
    """The mask admits exactly the tokens that keep the text a prefix of some match: checked
    against a regex, token by token, over the whole vocabulary (the vocabulary's bytes are what
    the grammar sees)."""
    model = default[0]
    tok = model.tokenizer
    vb = vocabulary_bytes(tok, model.config.vocab_size)
    g = compiler_for(model).compile(Constraint("regex", "(ab|cd)[0-9]{2}", "guided_regex"))
    m = g.matcher()
    full = re.compile(rb"(ab|cd)[0-9]{2}")

    def viable(text: bytes) -> bool:  # a prefix of some match (the language is small: enumerate it)
        return any(w.startswith(text) for w in (p + b"%02d" % d for p in (b"ab", b"cd") for d in range(100)))

    text = b""
    rng = np.random.default_rng(0)
    eos = set(model.eos_token_ids)
    while True:
        ok = allowed(m.mask())
        want = {i for i, b in enumerate(vb) if b and not b.startswith(b"\xff") and viable(text + b)}
        if full.fullmatch(text):
            want |= eos  # complete: EOS may come (and only then)
        assert ok == want, (text, sorted(ok ^ want)[:10])
        if m.stopped:
            break
        pick = int(rng.choice(sorted(ok - eos)))
        assert m.consume(pick)
        text += vb[pick]
    assert full.fullmatch(text) and m.accepting
    assert not m.consume(tok.encode("x", add_special_tokens=False)[0]) and m.error  # past the end: refused


# --- the engine ----------------------------------------------------------------------------------


def core(cm, model, **cfg):
    options = {"max_num_seqs": 16, "max_batch_tokens": 256, "page_size": 16, "kv_capacity_tokens": 16384,
               "max_model_len": 1024, "eos_token_ids": list(model.eos_token_ids)}
    options.update(cfg)
    return _C.EngineCore(cm, options)


def chat_ids(model, ask: str) -> list[int]:
    text = model.chat_template.render([{"role": "user", "content": ask + " Answer in JSON."}], add_generation_prompt=True)
    return model.tokenizer.encode(text, add_special_tokens=False)


def run(engine, requests: list[tuple[list[int], dict]]) -> dict[tuple[int, int], Choice]:
    for rid, (ids, params) in enumerate(requests, start=1):
        engine.add_request(rid, ids, params)
    seen: dict[tuple[int, int], Choice] = {}
    drain(engine, seen, max_steps=20000)
    assert_clean(engine)
    return seen


def text_of(model, choice: Choice) -> str:
    ids = [t for t in choice.tokens if t not in model.eos_token_ids]
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def params(grammar=None, **kw) -> dict:
    p = SamplingParams(max_tokens=kw.pop("max_tokens", 400), grammar=grammar, **kw)
    return p.to_engine()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_default_model_outputs_validate_batched_with_free_requests(default, temperature) -> None:
    model, cm = default
    gc = compiler_for(model)
    names = list(SCHEMAS)
    reqs = []
    for i, name in enumerate(names):
        reqs.append((chat_ids(model, ASKS[name]), params(gc.compile(json_constraint(SCHEMAS[name])),
                                                          temperature=temperature, seed=i)))
        if i % 3 == 0:  # unconstrained neighbours in the same batches
            reqs.append((chat_ids(model, "Tell me a story."), params(temperature=temperature, seed=i, max_tokens=40)))
    seen = run(core(cm, model), reqs)
    k = 0
    for rid, (ids, p) in enumerate(reqs, start=1):
        c = seen[(rid, 0)]
        if p["grammar"] is None:
            continue
        name = names[k]
        k += 1
        assert c.ends == [("stop", None)], (name, c.ends, text_of(model, c))
        validate(text_of(model, c), SCHEMAS[name])
    assert k == len(names)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_tiny_random_model_outputs_validate_when_sampled(tiny, batch) -> None:
    """A random model has no idea what JSON is: everything it writes that parses comes from the mask."""
    model, cm = tiny
    gc = compiler_for(model)
    names = list(SCHEMAS)
    rng = np.random.default_rng(batch)
    reqs, which = [], []
    for i in range(batch):
        name = names[(i + batch) % len(names)]
        ids = [int(t) for t in rng.integers(5, model.config.vocab_size - 5, 12)]
        reqs.append((ids, params(gc.compile(json_constraint(bounded(SCHEMAS[name]))), temperature=1.0, seed=100 + i,
                                 max_tokens=1000)))
        which.append(name)
        reqs.append((ids, params(temperature=1.0, seed=i, max_tokens=20)))  # free neighbour
    seen = run(core(cm, model, eos_token_ids=list(model.eos_token_ids or [0])), reqs)
    for j, name in enumerate(which):
        c = seen[(2 * j + 1, 0)]
        assert c.ends == [("stop", None)], (name, c.ends, text_of(model, c)[-200:])
        validate(text_of(model, c), SCHEMAS[name])


def test_every_choice_of_n_follows_the_grammar(default) -> None:
    model, cm = default
    g = compiler_for(model).compile(json_constraint(SCHEMAS["enums"]))
    seen = run(core(cm, model), [(chat_ids(model, ASKS["enums"]), params(g, temperature=1.0, seed=7, n=4))])
    assert len(seen) == 4
    for c in seen.values():
        assert c.ends == [("stop", None)]
        validate(text_of(model, c), SCHEMAS["enums"])


def test_speculative_drafts_keep_greedy_output_and_the_grammar(default) -> None:
    model, cm = default
    g = compiler_for(model).compile(json_constraint(SCHEMAS["array_of_objects"]))
    reqs = [(chat_ids(model, "Repeat after me: [1, 2, 3, 1, 2, 3]. " + ASKS["array_of_objects"]), params(g, temperature=0.0)),
            (chat_ids(model, ASKS["person"]), params(compiler_for(model).compile(json_constraint(SCHEMAS["person"])),
                                                     temperature=0.0))]
    plain = run(core(cm, model), reqs)
    e = core(cm, model, speculative_mode="ngram", spec_draft_length=4)
    spec = run(e, reqs)
    assert {k: v.tokens for k, v in spec.items()} == {k: v.tokens for k, v in plain.items()}
    assert e.stats()["spec_verifies"] > 0


def test_a_complete_grammar_ends_the_choice_before_min_tokens(default) -> None:
    """min_tokens masks EOS; when the grammar allows nothing else the choice still ends cleanly."""
    model, cm = default
    gc = compiler_for(model)
    choice = gc.compile(Constraint("choice", json.dumps(["yes", "no"]), "guided_choice"))
    empty = gc.compile(Constraint("regex", "", "guided_regex"))  # complete before anything is written
    seen = run(core(cm, model), [(chat_ids(model, "Is water wet?"), params(choice, temperature=0.0, min_tokens=8)),
                                 (chat_ids(model, "Anything?"), params(empty, temperature=0.7, seed=3, min_tokens=3))])
    assert seen[(1, 0)].ends == [("stop", None)] and text_of(model, seen[(1, 0)]) in ("yes", "no")
    assert seen[(2, 0)].ends == [("stop", None)] and text_of(model, seen[(2, 0)]) == ""


def test_vllm_whitespace_options_reach_the_grammar(default) -> None:
    model = default[0]
    tok = model.tokenizer
    gc = compiler_for(model)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

    def accepts(so: dict, text: str) -> bool:
        m = gc.compile(constraint_from_request({"structured_outputs": {"json": schema, **so}})).matcher()
        ids = tok.encode(text, add_special_tokens=False)
        return m.valid_prefix(ids) == len(ids)

    assert [accepts({}, t) for t in ('{"a":1}', '{"a": 1}', '{\n  "a": 1\n}')] == [True, True, True]
    assert [accepts({"disable_any_whitespace": True}, t) for t in ('{"a":1}', '{"a": 1}')] == [True, False]
    assert [accepts({"whitespace_pattern": " ?"}, t) for t in ('{"a": 1}', '{\n"a": 1}')] == [True, False]
    assert not accepts({}, '{"a": 1' + " " * 30 + "}")  # whitespace runs are bounded


def test_constrained_logprobs_rule_out_disallowed_tokens(default) -> None:
    model, cm = default
    g = compiler_for(model).compile(Constraint("choice", json.dumps(["yes", "no"]), "guided_choice"))
    e = core(cm, model)
    e.add_request(1, chat_ids(model, "Is water wet?"), params(g, temperature=0.0, logprobs=5))
    lps = []
    while not e.idle:
        e.step()
        for out in e.take_outputs():
            lps += out[6] or []
    vb = vocabulary_bytes(model.tokenizer, model.config.vocab_size)
    text = b"".join(vb[tok] for tok, _lp, _top in lps if tok not in model.eos_token_ids)
    assert text in (b"yes", b"no")
    # The first position's distribution is over prefixes of "yes" and "no" alone: every finite
    # top logprob is one, and their probabilities sum to 1 when fewer than 5 exist.
    finite = [(tid, lp) for tid, lp in lps[0][2] if np.isfinite(lp)]
    assert finite and all(any(w.startswith(vb[tid]) for w in (b"yes", b"no")) for tid, _ in finite)
    assert len(finite) == 5 or np.isclose(sum(np.exp(lp) for _, lp in finite), 1.0, atol=1e-4)
    stats = e.stats()
    assert stats["grammar_masks"] >= len(lps) and stats["grammar_mask_seconds"] > 0


def test_greedy_fast_path_picks_what_the_full_sampler_picks(default) -> None:
    """Greedy under a grammar takes the argmax over the allowed tokens without copying the row;
    asking for logprobs takes the full path (copy, mask, log-softmax): the same tokens either way."""
    model, cm = default
    g = compiler_for(model).compile(json_constraint(SCHEMAS["nested"]))
    ids = chat_ids(model, ASKS["nested"])
    fast = run(core(cm, model), [(ids, params(g, temperature=0.0))])
    full = run(core(cm, model), [(ids, params(g, temperature=0.0, logprobs=0))])
    assert fast[(1, 0)].tokens == full[(1, 0)].tokens and len(fast[(1, 0)].tokens) > 20


def test_gbnf_and_lark_grammars_both_constrain(default) -> None:
    """guided_grammar / structured_outputs.grammar take llama.cpp's GBNF as well as Lark."""
    model = default[0]
    tok = model.tokenizer
    gc = compiler_for(model)
    for text in ('root ::= "yes" | "no" | digit digit\ndigit ::= [0-9]', 'start: "yes" | "no" | /[0-9]{2}/'):
        m = gc.compile(Constraint("grammar", text, "guided_grammar")).matcher()
        assert all(m.valid_prefix(ids) == len(ids) for ids in [tok.encode(w, add_special_tokens=False)
                                                               for w in ("yes", "no", "42")])
        maybe = tok.encode("maybe", add_special_tokens=False)
        assert m.valid_prefix(maybe) < len(maybe)
