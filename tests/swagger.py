"""Check requests and responses against CGB's own Swagger 2.0 document (tests/fixtures/cgb-swagger.json).

A small validator for the subset of Swagger the document uses: path templates, query / formData / body
parameters (the document marks required body properties with ``required: true`` inside each property),
enums, and JSON types of response bodies with ``$ref``. It returns a list of problems; empty means valid.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

SPEC_PATH = Path(__file__).parent / "fixtures" / "cgb-swagger.json"
API_PREFIX = "/api"

# The document types Custom_field.value as a string but says "type == 0 then value is string, else value is
# a number"; the contract (cgb-api.md §4) follows the prose.
NUMBER_AS_STRING_OK = {"value"}


@cache
def spec() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SPEC_PATH.read_text())
    return data


def find_operation(method: str, path: str) -> tuple[str, dict[str, Any], dict[str, str]] | None:
    """The (template, operation, path params) the request matches, preferring literal segments."""
    if path.startswith(API_PREFIX):
        path = path[len(API_PREFIX) :]
    candidates = []
    for template, ops in spec()["paths"].items():
        op = ops.get(method.lower())
        if op is None:
            continue
        names = re.findall(r"{(\w+)}", template)
        pattern = "^" + re.sub(r"{\w+}", "([^/]+)", template) + "$"
        m = re.match(pattern, path)
        if m:
            candidates.append((len(names), template, op, dict(zip(names, m.groups(), strict=True))))
    if not candidates:
        return None
    candidates.sort(key=lambda c: c[0])
    _, template, op, params = candidates[0]
    return template, op, params


def check_request(method: str, path: str, query: dict[str, str], content_type: str | None, body: Any) -> list[str]:
    found = find_operation(method, path)
    if found is None:
        return [f"{method} {path}: no such operation in the spec"]
    template, op, path_params = found
    where = f"{method} {template}"
    problems: list[str] = []
    params = op.get("parameters", [])
    for p in params:
        name, location = p["name"], p["in"]
        if location == "path":
            value = path_params.get(name, "")
            if p.get("type") == "integer" and not re.fullmatch(r"-?\d+", value):
                problems.append(f"{where}: path {name}={value!r} is not an integer")
        elif location == "query":
            if p.get("required") and name not in query:
                problems.append(f"{where}: query {name} missing")
        elif location == "formData":
            if content_type != "application/x-www-form-urlencoded":
                problems.append(f"{where}: form field {name} needs a form body, got {content_type}")
            elif p.get("required") and (not isinstance(body, dict) or name not in body):
                problems.append(f"{where}: form field {name} missing")
        elif location == "body":
            if content_type != "application/json":
                problems.append(f"{where}: needs a JSON body, got {content_type}")
                continue
            problems.extend(_check_body(where, p.get("schema", {}), body))
    known_query = {p["name"] for p in params if p["in"] == "query"}
    problems.extend(f"{where}: unknown query {k}" for k in query if k not in known_query)
    if not any(p["in"] in ("body", "formData") for p in params) and body not in (None, "", {}):
        problems.append(f"{where}: takes no body, got {body!r}")
    return problems


def _check_body(where: str, schema: dict[str, Any], body: Any) -> list[str]:
    if not isinstance(body, dict):
        return [f"{where}: body is not an object"]
    problems: list[str] = []
    props = schema.get("properties", {})
    for name, prop in props.items():
        if prop.get("required") is True and name not in body:
            problems.append(f"{where}: body.{name} missing")
    for name, value in body.items():
        if name not in props:
            problems.append(f"{where}: body.{name} is not in the spec")
            continue
        prop = props[name]
        if "enum" in prop and value not in prop["enum"]:
            problems.append(f"{where}: body.{name}={value!r} not in {prop['enum']}")
        problems.extend(_check_type(f"{where}: body.{name}", prop, value))
    return problems


def check_response(method: str, path: str, status: int, body: Any) -> list[str]:
    found = find_operation(method, path)
    if found is None:
        return [f"{method} {path}: no such operation in the spec"]
    template, op, _ = found
    responses = op.get("responses", {})
    declared = responses.get(str(status)) or responses.get("default")
    if declared is None:
        return [f"{method} {template}: status {status} is not declared ({sorted(responses)})"]
    schema = declared.get("schema")
    if schema is None:
        return []
    return _check_type(f"{method} {template} -> {status}", schema, body)


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        resolved: dict[str, Any] = spec()["definitions"][ref.rsplit("/", 1)[1]]
        return resolved
    return schema


def _check_type(where: str, schema: dict[str, Any], value: Any) -> list[str]:
    schema = _resolve(schema)
    kind = schema.get("type") or ("object" if "properties" in schema else None)
    if kind is None:
        return []
    ok = {
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "string": isinstance(value, str)
        or (where.rsplit(".", 1)[-1] in NUMBER_AS_STRING_OK and isinstance(value, (int, float))),
        "boolean": isinstance(value, bool),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
    }.get(kind, True)
    if not ok:
        return [f"{where}: {value!r} is not {kind}"]
    problems: list[str] = []
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            problems.extend(_check_type(f"{where}[{i}]", schema["items"], item))
    if kind == "object":
        for name, prop in schema.get("properties", {}).items():
            if name in value:
                problems.extend(_check_type(f"{where}.{name}", prop, value[name]))
    return problems
