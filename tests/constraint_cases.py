"""JSON Schemas and regexes for the constrained-decoding tests: varied shapes, every string,
array and number bounded so that a small model's output always ends inside max_new_tokens; and
constraints past the size bounds (``OVERSIZED``)."""

import json

S = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"n": {"type": "null"}}, "required": ["n"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}, "required": ["id"]},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"]},
    {"type": "object", "properties": {"at": {"type": "string", "format": "time"}}, "required": ["at"]},
    {"type": "object", "properties": {"uid": {"type": "string", "format": "uuid"}}, "required": ["uid"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                                      {"type": "string", "maxLength": 6}]}}, "required": ["v"]},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 1, "maximum": 5}, "b": S}, "required": ["a"]},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 1, "maximum": 5}, "b": S}, "required": ["b"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 3, "maxItems": 3},
    {"type": "string", "maxLength": 10},
    {"type": "integer", "minimum": -50, "maximum": 50},
    {"type": "boolean"},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "object", "properties": {"first": S, "last": S, "age": {"type": "integer", "minimum": 18, "maximum": 99}},
     "required": ["first", "last", "age"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[0-9]{3}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"status": {"const": "done"}}, "required": ["status"]},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}}, "required": ["level"]},
    {"type": "object", "properties": {"flag": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 3}},
     "required": ["flag", "count"]},
    {"type": "object", "properties": {"code": {"type": "string", "minLength": 2, "maxLength": 4}}, "required": ["code"]},
    {"type": "object", "properties": {"rgb": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255},
                                              "minItems": 3, "maxItems": 3}}, "required": ["rgb"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": S, "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]}, "maxItems": 2}},
        "required": ["name", "roles"]}}, "required": ["user"]},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}}, "required": ["answer"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "city": S},
     "required": ["zip", "city"]},
    {"type": "object", "properties": {"lang": {"enum": ["en", "fr", "de", "ja"]}, "text": S}, "required": ["lang", "text"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"score": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
     "required": ["score"]},
    {"type": "object", "properties": {"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}, "required": ["hex"]},
    {"type": "object", "properties": {"phone": {"type": "string", "pattern": "^\\+?[0-9]{7,10}$"}}, "required": ["phone"]},
    {"type": "object", "properties": {"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                      "genre": {"enum": ["drama", "comedy"]}}, "required": ["title", "year", "genre"]},
    {"type": "object", "properties": {"pair": {"type": "array", "items": S, "minItems": 2, "maxItems": 2}},
     "required": ["pair"]},
    {"type": "object", "properties": {"opt": {"type": "integer", "minimum": 0, "maximum": 9}}},
    {"type": "object", "properties": {"k": {"type": "string", "enum": ["a", "b"]}, "v": {"type": "boolean"}},
     "required": ["k", "v"]},
    {"type": "object", "properties": {"dates": {"type": "array", "items": {"type": "string", "format": "date"},
                                                "maxItems": 2}}, "required": ["dates"]},
    {"type": "object", "properties": {"deep": {"type": "object", "properties": {"deeper": {"type": "object",
        "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["value"]}},
        "required": ["deeper"]}}, "required": ["deep"]},
]

REGEXES = [
    r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)",
    r"[0-9]{3}-[0-9]{4}",
    r"(yes|no)",
    r"[A-Z][a-z]{2,8}",
    r"\d{4}-\d{2}-\d{2}",
    r"#[0-9a-f]{6}",
    r"(red|green|blue) (car|bike)",
    r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
    r"\(\d{3}\) \d{3}-\d{4}",
    r"-?[1-9][0-9]{0,3}",
    r"[01]{8}",
    r"(true|false)",
    r"[A-Z]{2}[0-9]{2} [A-Z]{3}",
    r"v[0-9]\.[0-9]{1,2}\.[0-9]{1,2}",
    r"The answer is [0-9]{1,2}\.",
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun)day",
    r"[0-9]{1,2}:[0-5][0-9] (AM|PM)",
    r"https://[a-z]{3,10}\.com",
    r"[a-z]+( [a-z]+){0,3}\.",
    r"\$[0-9]{1,4}\.[0-9]{2}",
    r"<b>[a-z]{1,10}</b>",
    r"[A-Za-z]{1,6}, [A-Za-z]{1,6}",
    r"(ab|cd){2,4}",
    r"[0-9a-f]{8}-[0-9a-f]{4}",
    r"Q[1-4] 20[0-9]{2}",
    r"x{1,5}y?",
    r"[aeiou]{3}",
]

# Number ranges (floats; integers open or wide): llguidance enforces them, outlines spells them
# out as regexes. A float's fraction is bounded like every string here:
# by a ``multipleOf`` that is a binary fraction (exact in floating point, so ``jsonschema``
# checks it exactly), since a small model left free keeps writing digits ("1.0000...").
RANGE_SCHEMAS = [
    {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.125},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}, "required": ["n"]},
    {"type": "integer", "minimum": 0, "maximum": 10**6},
    {"type": "object", "properties": {"t": {"type": "number", "exclusiveMinimum": -1.5, "exclusiveMaximum": 2.25,
                                            "multipleOf": 0.25}}, "required": ["t"]},
    {"type": "object", "properties": {"p": {"type": "number", "minimum": 0.0625, "maximum": 0.5,
                                            "multipleOf": 0.0625}}, "required": ["p"]},
    {"type": "object", "properties": {"big": {"type": "integer", "exclusiveMinimum": 100000, "maximum": 2000000}},
     "required": ["big"]},
    {"type": "object", "properties": {"neg": {"type": "integer", "maximum": -10}}, "required": ["neg"]},
    {"type": "array", "items": {"type": "number", "minimum": -1, "exclusiveMaximum": 1, "multipleOf": 0.5},
     "minItems": 2, "maxItems": 3},
    {"type": "object", "properties": {"price": {"type": "number", "exclusiveMinimum": 0, "multipleOf": 0.25},
                                      "qty": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 1000}},
     "required": ["price", "qty"]},
]


def _schema(**schema) -> tuple[str, str]:
    return "json_schema", json.dumps(schema)


# Constraints costly to compile (issue 13), each past a size bound: refused before compiling.
OVERSIZED = {
    "a{100000}": ("regex", "a{100000}"),
    "class{1,50000}": ("regex", "[a-z]{1,50000}"),
    "nested-repeats": ("regex", "(a{100}){100}"),
    "any{0,10000}": ("regex", ".{0,10000}"),
    "backreference": ("regex", r"(a)\1"),
    "lookahead": ("regex", "(?=a)a"),
    "negative-lookbehind": ("regex", "(?<!b)a"),
    "huge-count": ("regex", "a{99999999999}"),  # past Python's parser too
    "deep-groups": ("regex", "(" * 5000 + "a" + ")" * 5000),
    "enum-20000": _schema(enum=[f"v{i}" for i in range(20000)]),
    "enum-5000-short": _schema(enum=list(range(5000))),
    "minLength": _schema(type="string", minLength=1000000),
    "maxLength": _schema(type="string", maxLength=1000000),
    "minItems": _schema(type="array", items={"type": "integer"}, minItems=100000),
    "maxItems": _schema(type="array", maxItems=100000),
    "pattern": _schema(type="string", pattern="a{100000}"),
    "pattern-backreference": _schema(type="string", pattern=r"(a)\1"),
    "patternProperties-key": _schema(type="object", patternProperties={"x{90000}": {"type": "string"}}),
    "count-under-a-property-named-enum": _schema(type="object", properties={
        "enum": {"type": "string", "minLength": 1000000}}, required=["enum"]),
    "many-properties": _schema(type="object", properties={f"p{i}": {"type": "string"} for i in range(5000)}),
    "deep-nesting": ("json_schema", '{"type": "array", "items": ' * 100 + "{}" + "}" * 100),
    "huge-text": _schema(const="x" * 200000),
}
