"""Structured output as requests ask for it: what the generated text must match.

Three spellings reach the same `Constraint`:
- OpenAI's `response_format`: {"type": "text"} (none), {"type": "json_object"} (any JSON object),
  {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}; with
  `strict: true` objects take no properties beyond those named (as OpenAI's strict mode);
- vLLM's `structured_outputs`: {"json": schema, "regex": str, "choice": [str], "grammar": str
  (GBNF or Lark), "json_object": true}, exactly one of them;
- vLLM's older top-level `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

A request may use one of them. Pure data and validation: compiling the constraint into a grammar
is the engine's (pyserve/engine/grammar.py), and a constraint it cannot compile is a 400 naming
`param`, with the compiler's reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

from pyserve.protocol.errors import ProtocolError

ConstraintKind = Literal["json_schema", "regex", "choice", "grammar", "lark"]

_ANY_OBJECT = {"type": "object"}
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `data` is text: a JSON schema serialised (json_schema), a
    regex, a JSON array of strings (choice), a GBNF or Lark grammar (grammar), or a Lark grammar
    of our own making (lark: tool calls). `param` names the request field it came from."""

    kind: ConstraintKind
    data: str
    param: str = "response_format"

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.data)


def _json_schema(schema: Any, param: str, *, closed: bool = False, guidance: dict[str, Any] | None = None) -> Constraint:
    """A JSON-schema constraint from a schema given as an object, a JSON text or a boolean;
    `closed`: strict mode (closed_objects); `guidance`: llguidance's JSON options for it."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ProtocolError(f"'{param}' is not valid JSON: {e}.", param=param) from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ProtocolError(f"'{param}' must be a JSON schema object, got {type(schema).__name__}.", param=param)
    if closed:
        schema = closed_objects(schema)
    if guidance:  # llguidance reads its JSON options from the schema; the schema's own win
        schema = {**schema, "x-guidance": {**guidance, **(schema.get("x-guidance") or {})}}
    # Key order kept: properties come out in it.
    return Constraint("json_schema", json.dumps(schema, separators=(",", ":")), param)


def closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that does not say
    otherwise: OpenAI's strict mode (and vLLM's disable_additional_properties). Without it a model
    may go on inventing keys until max_tokens cuts the JSON short."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    for key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in schema[key].items()}
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema \
            and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SUBSCHEMAS = {"items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "if", "then", "else", "contains",
               "additionalItems", "additionalProperties", "propertyNames", "unevaluatedItems",
               "unevaluatedProperties"}


def _response_format(fmt: Any) -> Constraint | None:
    if not isinstance(fmt, dict):
        raise ProtocolError(f"'response_format' must be an object, got {type(fmt).__name__}.", param="response_format")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_schema(_ANY_OBJECT, "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise ProtocolError("'response_format.json_schema' must be an object with a 'schema'.",
                                param="response_format.json_schema")
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise ProtocolError("'response_format.json_schema.name' must be a string.",
                                param="response_format.json_schema.name")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ProtocolError("'response_format.json_schema.strict' must be a boolean.",
                                param="response_format.json_schema.strict")
        # OpenAI's SDK sends the schema under "schema"; a few clients under "json_schema".
        schema = spec.get("schema", spec.get("json_schema", _ANY_OBJECT))
        # A schema that does not compile is the whole response_format's fault (what OpenAI names).
        return replace(_json_schema(schema, "response_format.json_schema.schema", closed=bool(strict)),
                       param="response_format")
    raise ProtocolError(
        f"'response_format.type' must be one of 'text', 'json_object', 'json_schema', got {kind!r}.",
        param="response_format.type",
    )


def _choice_text(choices: Any, param: str) -> str:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ProtocolError(f"'{param}' must be a non-empty array of strings.", param=param)
    return json.dumps(choices)


def _vllm(kind: str, value: Any, param: str, closed: bool = False, guidance: dict[str, Any] | None = None) -> Constraint:
    if kind == "json":
        return _json_schema(value, param, closed=closed, guidance=guidance)
    if kind == "json_object":
        if value is not True:
            raise ProtocolError(f"'{param}' must be true when given.", param=param)
        return _json_schema(_ANY_OBJECT, param)
    if kind == "choice":
        return Constraint("choice", _choice_text(value, param), param)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"'{param}' must be a non-empty string.", param=param)
    return Constraint("regex" if kind == "regex" else "grammar", value, param)


def _whitespace(so: dict[str, Any]) -> dict[str, Any]:
    """vLLM's whitespace options as llguidance's JSON options."""
    out: dict[str, Any] = {}
    pattern = so.get("whitespace_pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise ProtocolError("'structured_outputs.whitespace_pattern' must be a string.",
                                param="structured_outputs.whitespace_pattern")
        out["whitespace_pattern"] = pattern
    if so.get("disable_any_whitespace") is True:
        out["whitespace_flexible"] = False  # compact JSON: no whitespace between tokens
        out.pop("whitespace_pattern", None)
    return out


def constraint_from_request(data: dict[str, Any]) -> Constraint | None:
    """The request's output constraint, or None. Raises ProtocolError for a malformed one or for
    more than one."""
    found: list[Constraint] = []
    if data.get("response_format") is not None:
        c = _response_format(data["response_format"])
        if c is not None:
            found.append(c)
    so = data.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise ProtocolError("'structured_outputs' must be an object.", param="structured_outputs")
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object") if so.get(k) not in (None, False)]
        # disable_fallback is vLLM's "no other backend": there is none here either.
        unknown = sorted(set(so) - {"json", "regex", "choice", "grammar", "json_object", "whitespace_pattern",
                                    "disable_fallback", "disable_any_whitespace", "disable_additional_properties"})
        if unknown:
            raise ProtocolError(f"'structured_outputs' has unknown fields: {', '.join(unknown)}.",
                                param="structured_outputs")
        if len(given) > 1:
            raise ProtocolError(f"'structured_outputs' takes one of json, regex, choice, grammar, json_object; "
                                f"got {', '.join(given)}.", param="structured_outputs")
        if given:
            closed = so.get("disable_additional_properties") is True
            found.append(_vllm(given[0], so[given[0]], f"structured_outputs.{given[0]}", closed, _whitespace(so)))
    for field, kind in _GUIDED.items():
        if data.get(field) is not None:
            found.append(_vllm(kind, data[field], field))
    if len(found) > 1:
        names = ", ".join(c.param for c in found)
        raise ProtocolError(f"Only one output constraint may be given, got {names}.", param=found[1].param)
    return found[0] if found else None
