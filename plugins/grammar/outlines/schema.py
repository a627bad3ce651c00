"""A JSON Schema rewritten into the part of JSON Schema that outlines-core compiles soundly.

outlines-core ignores some keywords (number bounds, ``multipleOf``, a ``pattern`` beside length
bounds), mishandles others (``allOf`` concatenates its branches; recursion bottoms out in ``{}``
even where properties are required; its ``email`` / ``uri`` formats can write a bare quote), and
refuses the rest. Here, before outlines-core sees the schema:

- numbers with bounds or ``multipleOf`` and the string formats outlines-core lacks or gets wrong
  become placeholders (a ``const`` string) whose regex is put in after outlines-core has written
  its own (``numbers`` spells the bounds out);
- ``$ref`` is inlined, a recursive one at most ``MAX_RECURSION`` times deep, after which what
  would recurse is pruned where the schema allows it (an optional property, an ``anyOf`` branch,
  further array items) and the schema refused where it does not;
- ``allOf`` is merged into one schema, ``oneOf`` becomes ``anyOf`` when its branches cannot
  overlap, a list of types becomes an ``anyOf``;
- keywords that would need more than a regex (``not``, ``uniqueItems``, ...) are refused by name.

Outputs are a subset of what the original schema allows: never a value it refuses.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from sglang_core.constrained.formats import FORMATS
from sglang_plugins.grammar.outlines.numbers import Bound, number_regex

MAX_RECURSION = 3

try:  # Python's own regex parser, for a pattern's length range
    import re._parser as _sre_parse
except ImportError:  # Python < 3.11
    import sre_parse as _sre_parse  # type: ignore[no-redef]

# Keywords that a regex over the output cannot enforce.
UNSUPPORTED = ("not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
               "patternProperties", "propertyNames", "dependentRequired", "dependentSchemas", "dependencies",
               "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef")
NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
# What a schema says only about how a value is described, not which values are valid.
ANNOTATIONS = ("title", "description", "default", "examples", "$comment", "$schema", "$id", "deprecated",
               "readOnly", "writeOnly", "nullable", "contentMediaType", "contentEncoding", "$anchor")
JSON_TYPES = ("string", "integer", "number", "boolean", "null", "array", "object")

# A schema that no value can take, within the recursion depth (pruned where the parent allows).
NOTHING = None


class OutlinesSchema:
    """``rewrite(schema)`` -> the schema for outlines-core, with ``regexes``: placeholder string
    -> the regex of the JSON value that replaces it (quotes included)."""

    def __init__(self, root: Any, placeholder_prefix: str):
        self.root = root
        self.prefix = placeholder_prefix
        self.regexes: dict[str, str] = {}

    def rewrite(self) -> dict:
        out = self._schema(self.root, ())
        if out is NOTHING:
            raise ValueError(f"json_schema: no finite value satisfies it within {MAX_RECURSION} levels of recursion")
        return out

    def _placeholder(self, regex: str) -> dict:
        name = f"{self.prefix}{len(self.regexes)}"
        self.regexes[name] = regex
        return {"const": name}

    def _schema(self, node: Any, refs: tuple[str, ...]) -> dict | None:
        if node is True:
            return {}
        if node is False:
            return NOTHING
        if not isinstance(node, dict):
            raise ValueError(f"json_schema: a schema must be an object or a boolean, got {node!r}")
        for key in UNSUPPORTED:
            if key in node:
                raise ValueError(f"json_schema: the '{key}' keyword is not supported by the outlines backend")
        node = {k: v for k, v in node.items() if k not in ANNOTATIONS and k not in ("$defs", "definitions")}
        if "$ref" in node:
            ref = node.pop("$ref")
            if refs.count(ref) >= MAX_RECURSION:
                return NOTHING
            return self._schema(_merge(self._resolve(ref), node), refs + (ref,))
        if "allOf" in node:
            branches = node.pop("allOf")
            merged = node
            for branch in branches:
                merged = _merge(merged, self._dereferenced(branch))
            return self._schema(merged, refs)
        for key in ("anyOf", "oneOf"):
            if key in node:
                return self._any_of(key, node.pop(key), node, refs)
        types = node.get("type")
        if isinstance(types, list):
            if len(types) == 1:
                return self._schema({**node, "type": types[0]}, refs)
            return self._any_of("type", [{**node, "type": t} for t in types], {}, refs)
        if "enum" in node or "const" in node:
            return _values(node)
        if types in ("integer", "number") or (types is None and any(k in node for k in NUMBER_KEYWORDS)):
            return self._number(node)
        if types == "string":
            return self._string(node)
        if types == "array" or (types is None and any(k in node for k in ("items", "prefixItems"))):
            return self._array(node, refs)
        if types == "object" or (types is None and "properties" in node):
            return self._object(node, refs)
        if types is not None and types not in JSON_TYPES:
            raise ValueError(f"json_schema: unknown type {types!r}")
        return node

    def _resolve(self, ref: str) -> Any:
        """The schema a local reference (``#``, ``#/$defs/name``, any JSON pointer) points at."""
        if not ref.startswith("#"):
            raise ValueError(f"json_schema: only local $ref ('#/...') is supported, got {ref!r}")
        target = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            try:
                target = target[int(part)] if isinstance(target, list) else target[part]
            except (KeyError, IndexError, ValueError, TypeError):
                raise ValueError(f"json_schema: $ref {ref!r} points at nothing") from None
        return target

    def _dereferenced(self, schema: Any) -> Any:
        """A bare ``{"$ref": ...}`` replaced by what it points at (one level), to compare or merge."""
        return self._resolve(schema["$ref"]) if isinstance(schema, dict) and list(schema) == ["$ref"] else schema

    def _any_of(self, key: str, branches: list, siblings: dict, refs: tuple[str, ...]) -> dict | None:
        if not isinstance(branches, list) or not branches:
            raise ValueError(f"json_schema: {key} must be a non-empty list")
        resolved = [self._dereferenced(b) for b in branches]
        if key == "oneOf" and not _disjoint([_merge(siblings, b) if isinstance(b, dict) else b for b in resolved]):
            raise ValueError("json_schema: 'oneOf' is supported only when its branches cannot overlap "
                             "(different types or const values); use 'anyOf'")
        kept = []
        for branch in branches:
            out = self._schema(_merge(siblings, branch) if siblings and isinstance(branch, dict) else branch, refs)
            if out is not NOTHING:
                kept.append(out)
        if not kept:
            return NOTHING
        return kept[0] if len(kept) == 1 else {"anyOf": kept}

    def _number(self, node: dict) -> dict:
        integer = node.get("type") == "integer"
        if not any(k in node for k in NUMBER_KEYWORDS):
            return {"type": node.get("type", "number")}
        lower, upper = _bound(node, "minimum", "exclusiveMinimum"), _bound(node, "maximum", "exclusiveMaximum")
        step = node.get("multipleOf")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))):
            raise ValueError(f"json_schema: multipleOf must be a number, got {step!r}")
        try:
            regex = number_regex(lower, upper, None if step is None else Decimal(str(step)), integer)
        except ValueError as exc:
            raise ValueError(f"json_schema: {exc}") from None
        return self._placeholder(regex)

    def _string(self, node: dict) -> dict:
        fmt, pattern = node.get("format"), node.get("pattern")
        regex = None
        if fmt is not None:
            if fmt not in FORMATS:
                raise ValueError(f"json_schema: string format {fmt!r} is not supported by the outlines backend")
            regex = FORMATS[fmt]
        elif pattern is not None:
            regex = pattern
        if regex is None:
            return node
        if not _keeps_to_lengths(regex, node.get("minLength", 0), node.get("maxLength")):
            raise ValueError("json_schema: a string's pattern or format together with minLength/maxLength is "
                             "supported only when the pattern alone keeps to those lengths")
        if fmt is None:  # outlines-core writes the pattern itself
            return {"type": "string", "pattern": pattern}
        return self._placeholder(f'"{regex}"')

    def _array(self, node: dict, refs: tuple[str, ...]) -> dict | None:
        out = {"type": "array"}
        low, high = node.get("minItems", 0), node.get("maxItems")
        prefix = node.get("prefixItems", node["items"] if isinstance(node.get("items"), list) else None)
        if prefix is not None:
            written = []
            for item in prefix:
                sub = self._schema(item, refs)
                if sub is NOTHING:
                    break
                written.append(sub)
            # outlines-core writes exactly the prefix items
            if not low <= len(written) <= (len(prefix) if high is None else high):
                if len(written) < low:
                    return NOTHING
                raise ValueError("json_schema: prefixItems are supported only when the array holds exactly them "
                                 "(minItems <= their count <= maxItems)")
            return {**out, "prefixItems": written, "items": False} if written else {**out, "maxItems": 0}
        if "items" in node:
            items = self._schema(node["items"], refs)
            if items is NOTHING:
                if low > 0:
                    return NOTHING
                return {**out, "maxItems": 0}
            out["items"] = items
        for key in ("minItems", "maxItems"):
            if key in node:
                out[key] = node[key]
        return out

    def _object(self, node: dict, refs: tuple[str, ...]) -> dict | None:
        for key in ("minProperties", "maxProperties"):
            if key in node:
                raise ValueError(f"json_schema: the '{key}' keyword is not supported by the outlines backend")
        required = node.get("required", [])
        properties = node.get("properties", {})
        missing = [name for name in required if name not in properties]
        if missing:
            raise ValueError(f"json_schema: required property {missing[0]!r} has no schema in 'properties'")
        out: dict[str, Any] = {"type": "object"}
        written = {}
        for name, sub in properties.items():
            value = self._schema(sub, refs)
            if value is NOTHING:
                if name in required:
                    return NOTHING
                continue
            written[name] = value
        if written or "properties" in node:
            out["properties"] = written
            out["required"] = [name for name in required if name in written]
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and not properties:  # a map of values; beside properties, outlines-core allows none
            value = self._schema(extra, refs)
            out["additionalProperties"] = False if value is NOTHING else value
        elif extra is not None:
            out["additionalProperties"] = extra if isinstance(extra, bool) else False
        return out


def _keeps_to_lengths(regex: str, low: int, high: int | None) -> bool:
    """Whether every match of ``regex`` has between ``low`` and ``high`` characters."""
    if not low and high is None:
        return True
    try:
        shortest, longest = _sre_parse.parse(regex).getwidth()
    except re.error as exc:
        raise ValueError(f"json_schema: invalid pattern {regex!r} ({exc})") from None
    return shortest >= low and (high is None or longest <= high)


def _bound(node: dict, inclusive: str, exclusive: str) -> Bound | None:
    """A lower or upper bound, in either draft's spelling (exclusiveMinimum a number, or a
    boolean qualifying minimum); the tighter of two."""
    candidates = []
    value, strict = node.get(inclusive), node.get(exclusive)
    for given, name in ((value, inclusive), (strict, exclusive)):
        if given is not None and not isinstance(given, bool) and not isinstance(given, (int, float)):
            raise ValueError(f"json_schema: {name} must be a number, got {given!r}")
    if value is not None:
        candidates.append(Bound(Decimal(str(value)), strict is True))
    if strict is not None and not isinstance(strict, bool):
        candidates.append(Bound(Decimal(str(strict)), True))
    if not candidates:
        return None
    tighter = max if inclusive == "minimum" else min
    return tighter(candidates, key=lambda b: (b.value, b.exclusive if inclusive == "minimum" else not b.exclusive))


def _values(node: dict) -> dict:
    """``enum`` / ``const``: the listed values, those of the wrong type dropped."""
    values = [node["const"]] if "const" in node else list(node["enum"])
    types = node.get("type")
    if types is not None:
        values = [v for v in values if _json_type(v) == types or (types == "number" and _json_type(v) == "integer")]
    if not values:
        return NOTHING
    return {"enum": values}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object", type(None): "null"}[type(value)]


def _merge(a: dict, b: Any) -> dict:
    """``allOf`` of two schemas as one, where that is a plain combination of their keywords."""
    if b is True:
        return a
    if not isinstance(b, dict):
        raise ValueError(f"json_schema: allOf branches must be schemas, got {b!r}")
    out = dict(a)
    for key, value in b.items():
        if key not in out or out[key] == value or key in ANNOTATIONS:
            out[key] = value
        elif key == "properties":
            out[key] = {**out[key], **{n: _merge(out[key][n], s) if n in out[key] else s for n, s in value.items()}}
        elif key == "required":
            out[key] = list(dict.fromkeys(out[key] + value))
        elif key in ("minimum", "minLength", "minItems"):
            out[key] = max(out[key], value)
        elif key in ("maximum", "maxLength", "maxItems"):
            out[key] = min(out[key], value)
        elif key in ("items", "additionalProperties") and isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _merge(out[key], value)
        else:
            raise ValueError(f"json_schema: allOf branches that both set '{key}' differently are not supported")
    return out


def _disjoint(branches: list) -> bool:
    """True when no value can satisfy two of these schemas: they differ in type, or in the const
    or enum values of the value itself or of a property both require."""
    def kinds(schema: Any) -> set[str] | None:
        if not isinstance(schema, dict):
            return None
        if "const" in schema or "enum" in schema:
            return {repr(v) for v in ([schema["const"]] if "const" in schema else schema["enum"])}
        types = schema.get("type")
        if types is None:
            return None
        types = set(types) if isinstance(types, list) else {types}
        return {f"type:{'number' if t == 'integer' else t}" for t in types}  # every integer is a number

    for i, a in enumerate(branches):
        for b in branches[i + 1:]:
            ka, kb = kinds(a), kinds(b)
            if ka is not None and kb is not None and not ka & kb and all(k.startswith("type:") for k in ka | kb):
                continue
            if ka is not None and kb is not None and not ka & kb and not any(k.startswith("type:") for k in ka | kb):
                continue
            if isinstance(a, dict) and isinstance(b, dict) and any(
                    name in set(a.get("required", ())) & set(b.get("required", ()))
                    and (x := kinds(a.get("properties", {}).get(name))) is not None
                    and (y := kinds(b.get("properties", {}).get(name))) is not None and not x & y
                    and not any(k.startswith("type:") for k in x | y)
                    for name in a.get("properties", {})):
                continue
            return False
    return True

