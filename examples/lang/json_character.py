"""Constrained decoding with a JSON Schema: a character description that always parses."""

from __future__ import annotations

import json
from typing import Any

import sglang_core as sgl

CHARACTER_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "house": {"type": "string", "enum": ["Gryffindor", "Slytherin", "Ravenclaw", "Hufflepuff"]},
        "blood_status": {"type": "string", "enum": ["Pure-blood", "Half-blood", "Muggle-born"]},
    },
    "required": ["name", "house", "blood_status"],
    "additionalProperties": False,
}


@sgl.function
def character_gen(s, name: str):
    s += name + " is a character in Harry Potter. Please fill in the following information about this character.\n"
    s += sgl.gen("json_output", max_tokens=64, json_schema=CHARACTER_SCHEMA)


def main(backend: Any) -> dict:
    state = character_gen.run(name="Hermione Granger", backend=backend, temperature=0)
    return {"json_output": state["json_output"], "character": json.loads(state["json_output"])}


if __name__ == "__main__":
    from _cli import run_example

    run_example(main, __doc__)
