"""Render the server's OpenAPI document as docs/api.md (tests/test_openapi.py checks that the
committed page is what this writes):

    python docs/render_api.py > docs/api.md

The document is the app's own (``build_app``; no engine is started), so the page lists exactly the
routes, fields, bounds and defaults the server validates with.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from sglang_core.sampling.params import SamplingParams
from sglang_core.server.app import build_app
from sglang_core.server.openapi import REF
from sglang_core.server.settings import ServerSettings

# Vendor fields that no model lists: unknown fields are accepted and ignored by the OpenAI and
# Anthropic routes (never by the native ones, which refuse them); these are the ones clients send.
IGNORED_VENDOR_FIELDS = {
    "ChatRequest": ["store", "metadata", "service_tier", "reasoning_effort", "modalities", "audio", "prediction",
                    "web_search_options", "functions", "function_call"],
    "CompletionRequest": [],
    "MessagesRequest": ["container", "mcp_servers", "service_tier"],
}

HEADER = """# HTTP API reference

Generated from the server's OpenAPI document by `python docs/render_api.py > docs/api.md`; a
running server serves the same document at `/openapi.json` and an interactive page at `/docs`
(`sglang-core serve`, then open `http://127.0.0.1:30000/docs`).

Every request body is checked strictly (a string where a number belongs is a 400 naming the field,
never coerced). The OpenAI and Anthropic routes accept and ignore fields they do not know, as the
vendors' APIs do; the native (SGLang 0.2.10) routes refuse them. Bounds marked below that the
body model does not check are checked by the engine's sampling rules: a 400 either way.

Support: **honoured** (the server acts on it), **ignored** (accepted, no effect), **refused** (a 400
naming the field, beyond what the description allows).

Errors: the OpenAI envelope `{"error": {"message", "type", "param", "code"}}` on every route but
`/v1/messages*`, which answer in Anthropic's `{"type": "error", "error": {"type", "message"}}`.
Statuses: {statuses}.
"""


def type_of(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return f"[{schema['$ref'].removeprefix(REF)}](#{schema['$ref'].removeprefix(REF).lower()})"
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " \\| ".join(json.dumps(v) for v in schema["enum"])
    if "anyOf" in schema:
        return " \\| ".join(type_of(option) for option in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        items = type_of(schema.get("items", {}))
        return f"array of ({items})" if "|" in items else f"array of {items}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {type_of(schema['additionalProperties'])}"
    return kind


def bounds_of(schema: dict[str, Any]) -> str:
    parts = []
    for option in [schema, *schema.get("anyOf", [])]:
        for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("minLength", "length >="),
                          ("minItems", "items >="), ("pattern", "matches")):
            if key in option:
                value = f"`{option[key]}`" if key == "pattern" else option[key]
                parts.append(f"{sign} {value}")
    return ", ".join(dict.fromkeys(parts))


def support_of(description: str) -> str:
    if description.startswith("accepted and ignored"):
        return "ignored"
    if description.startswith("refused"):
        return "refused"
    return "honoured"


def model_section(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", ""]
    if schema.get("description"):
        lines += [" ".join(schema["description"].split()), ""]
    properties = schema.get("properties")
    if not properties:
        lines += [f"Type: {type_of(schema)}.", ""]
        return lines
    required = set(schema.get("required", ()))
    body = name.endswith(("Request", "Body", "Conversation")) or name == "Conversation"
    head = "| field | type | required | default | bounds |" + (" support |" if body else "") + " description |"
    lines += [head, "|" + "---|" * head.count(" |")]
    for field, sub in properties.items():
        description = sub.get("description", "")
        default = "" if field in required or "default" not in sub else f"`{json.dumps(sub['default'])}`"
        row = [field, type_of(sub), "yes" if field in required else "", default, bounds_of(sub)]
        if body:
            row.append(support_of(description))
        lines.append("| " + " | ".join([*row, description.replace("|", "\\|")]) + " |")
    if body:
        for field in IGNORED_VENDOR_FIELDS.get(name, []):
            lines.append(f"| {field} | any | | | |" + " ignored |" + " a vendor field this server does not model |")
    return lines + [""]


def sampling_params_section() -> list[str]:
    """The native API's ``sampling_params`` (SGLang 0.2.10's names): the engine's own
    ``SamplingParams`` fields, every one honoured; any other key is refused."""
    lines = ["## SGLang 0.2.10 sampling_params (native /generate)", "",
             "Every key below is honoured; any other key is refused (a 400 naming it). A null value is "
             "the default.", "", "| key | default |", "|---|---|"]
    for param in dataclasses.fields(SamplingParams):
        lines.append(f"| {param.name} | `{json.dumps(param.default)}` |")
    return lines + [""]


def render(document: dict[str, Any]) -> str:
    statuses = {}
    lines = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            lines += [f"## {method.upper()} {path}", ""]
            if operation.get("summary"):
                lines += [operation["summary"] + ".", ""]
            content = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if content:
                lines += [f"Request body: {type_of(content['schema'])}."]
                if "example" in content:
                    lines += ["", "```json", json.dumps(content["example"]), "```"]
                lines += [""]
            for status, response in operation["responses"].items():
                if status != "200":
                    statuses[status] = response["description"]
                    continue
                kinds = [f"`{kind}` {type_of(c['schema'])}" for kind, c in response.get("content", {}).items()]
                lines += [f"200: {', '.join(kinds) if kinds else 'no content'}.", ""]
    lines += sampling_params_section()
    lines += ["# Models", ""]
    for name, schema in sorted(document["components"]["schemas"].items()):
        lines += model_section(name, schema)
    status_list = "; ".join(f"{status} {why}" for status, why in sorted(statuses.items()))
    return HEADER.replace("{statuses}", status_list) + "\n" + "\n".join(lines).rstrip() + "\n"


def main() -> None:
    sys.stdout.write(render(build_app(ServerSettings()).openapi()))


if __name__ == "__main__":
    main()
