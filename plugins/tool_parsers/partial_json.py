"""Reading JSON a model is still writing: the calls and the argument text certain so far.

A call's arguments stream as the model writes them, rewritten as ``json.dumps`` writes the whole
value (``", "`` and ``": "`` separators, non-ASCII kept, numbers as Python reads them), so the
pieces streamed join into exactly the arguments of the finished call. Text is rewritten only as
far as it is certain: a number once a delimiter ends it, a literal once complete, an escape once
whole (a high surrogate with its pair). Everything here is a function of the text so far, so the
result for a longer text extends the result for a shorter one however the text was cut.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = re.compile(r"[-+.eE0-9]*")
_LITERALS = {"true": True, "false": False, "null": None}
_ESCAPE = re.compile(r'\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})')
_ESCAPE_START = re.compile(r"(?:\\(?:u[0-9a-fA-F]{0,3})?)?")  # an escape cut short by the end of the text
_OPENER = {"}": "{", "]": "["}
_EMPTY = {"}": "first_key", "]": "first"}  # the state in which the bracket closes an empty container


@dataclass
class Token:
    kind: str  # { } [ ] : , key string number literal
    text: str  # as json.dumps writes it (a string so far: from its opening quote)
    depth: int  # containers open around it (a bracket: around the container it opens or closes)
    value: Any = None  # a key's, closed string's, number's or literal's value
    closed: bool = True  # False for a string still being written


@dataclass
class Scan:
    tokens: list[Token]
    end: int | None  # where the value ended in the text (None: not yet)
    error: bool  # the text stops being JSON (the tokens are those before that point)

    def text(self, start: int = 0, stop: int | None = None) -> str:
        return "".join(t.text for t in self.tokens[start:stop])


def scan(text: str, pos: int = 0) -> Scan:
    """The tokens of the JSON value that starts at ``pos`` (after whitespace), as far as ``text``
    has certainly written them."""
    tokens: list[Token] = []
    stack: list[str] = []  # the brackets of the open containers
    # value | first (a value or "]") | first_key (a key or "}") | key | colon | next ("," or the end) | done
    expect = "value"

    def after_value() -> str:
        return "next" if stack else "done"

    while pos < len(text):
        char = text[pos]
        if char.isspace():
            pos += 1
            continue
        if expect == "done":
            return Scan(tokens, pos, False)
        depth = len(stack)
        if char in "}]" and stack and stack[-1] == _OPENER[char] and expect in ("next", _EMPTY[char]):
            stack.pop()
            tokens.append(Token(char, char, len(stack)))
            expect, pos = after_value(), pos + 1
            continue
        if char == "," and expect == "next":
            tokens.append(Token(",", ", ", depth))
            expect, pos = ("key" if stack[-1] == "{" else "value"), pos + 1
            continue
        if char == ":" and expect == "colon":
            tokens.append(Token(":", ": ", depth))
            expect, pos = "value", pos + 1
            continue
        expect = {"first": "value", "first_key": "key"}.get(expect, expect)
        if char in "{[" and expect == "value":
            tokens.append(Token(char, char, depth))
            stack.append(char)
            expect, pos = ("first_key" if char == "{" else "first"), pos + 1
        elif char == '"' and expect in ("key", "value"):
            token, pos, error = _string(text, pos, "key" if expect == "key" else "string", depth)
            tokens.append(token)
            if not token.closed:
                return Scan(tokens, None, error)
            expect = "colon" if token.kind == "key" else after_value()
        elif expect == "value" and (char == "-" or char.isdigit()):
            run = _NUMBER_CHARS.match(text, pos).end()
            if run == len(text):  # more of the number may follow
                return Scan(tokens, None, False)
            if not _NUMBER.fullmatch(text, pos, run):
                return Scan(tokens, None, True)
            value = json.loads(text[pos:run])
            tokens.append(Token("number", json.dumps(value), depth, value))
            expect, pos = after_value(), run
        elif expect == "value" and char.isalpha():
            word = next((w for w in _LITERALS if text.startswith(w, pos)), None)
            if word is None:
                rest = text[pos:]
                return Scan(tokens, None, not any(w.startswith(rest) for w in _LITERALS))
            tokens.append(Token("literal", word, depth, _LITERALS[word]))
            expect, pos = after_value(), pos + len(word)
        else:
            return Scan(tokens, None, True)
    return Scan(tokens, pos if expect == "done" else None, False)


def _string(text: str, pos: int, kind: str, depth: int) -> tuple[Token, int, bool]:
    """The string opening at ``pos``: its token (as far as certain), where reading stopped (past
    its closing quote when closed) and whether it stopped at an error."""
    chars, i = [], pos + 1
    while i < len(text):
        char = text[i]
        if char == '"':
            value = "".join(chars)
            return Token(kind, json.dumps(value, ensure_ascii=False), depth, value), i + 1, False
        if char == "\\":
            escape = _ESCAPE.match(text, i)
            if escape is None:  # an error unless the escape is merely unfinished
                return _open(kind, chars, depth), i, not _ESCAPE_START.fullmatch(text, i)
            decoded = json.loads(f'"{escape.group()}"')
            end = escape.end()
            if "\ud800" <= decoded <= "\udbff":  # a high surrogate: decoded with the low one that follows
                pair = _ESCAPE.match(text, end)
                if pair is None:
                    return _open(kind, chars, depth), i, not _ESCAPE_START.fullmatch(text, end)
                decoded, end = json.loads(f'"{escape.group()}{pair.group()}"'), pair.end()
            chars.append(decoded)
            i = end
            continue
        if char < " ":  # JSON forbids raw control characters in strings
            return _open(kind, chars, depth), i, True
        chars.append(char)
        i += 1
    return _open(kind, chars, depth), i, False


def _open(kind: str, chars: list[str], depth: int) -> Token:
    """A string still being written: its opening quote and the characters so far."""
    return Token(kind, json.dumps("".join(chars), ensure_ascii=False)[:-1], depth, None, closed=False)


def arguments_so_far(text: str, pos: int = 0) -> str:
    """The arguments object that starts at ``pos``: its text as ``json.dumps`` writes it, as far
    as certain (empty if no object starts there)."""
    result = scan(text, pos)
    return result.text() if result.tokens and result.tokens[0].kind == "{" else ""


def call_objects(result: Scan, depth: int) -> list[tuple[str | None, str]]:
    """The call objects (``{"name": ..., "arguments" or "parameters": {...}}``) standing at
    ``depth`` in a scan: each one's name (None until its string is closed) and the text of its
    arguments object so far ("" until one begins)."""
    calls: list[list[Any]] = []
    key, start = None, None
    for i, token in enumerate(result.tokens):
        if token.depth == depth and token.kind == "{":
            calls.append([None, ""])
        elif not calls or token.depth < depth:
            continue
        elif token.depth == depth + 1 and token.kind == "key":
            key = token.value
        elif token.depth == depth + 1 and key == "name" and token.kind == "string" and token.closed:
            calls[-1][0] = token.value
        elif token.depth == depth + 1 and key in ("arguments", "parameters") and token.kind == "{":
            start = i
        if start is not None:
            calls[-1][1] = result.text(start, i + 1)
            if token.depth == depth + 1 and token.kind == "}":  # the arguments object closed
                start = None
    return [tuple(call) for call in calls]


def calls_so_far(text: str, separator: str = "") -> list[tuple[str | None, str]]:
    """The call objects in JSON values written one after another (``separator`` between them if
    given; a value may be a list of calls), as far as written: each one's name and arguments."""
    calls: list[tuple[str | None, str]] = []
    pos = 0
    while True:
        result = scan(text, pos)
        list_of_calls = bool(result.tokens) and result.tokens[0].kind == "["
        calls += call_objects(result, int(list_of_calls))
        if result.end is None:
            return calls
        pos = result.end
        if separator:
            rest = text[pos:].lstrip()
            if not rest.startswith(separator):
                return calls
            pos = len(text) - len(rest) + len(separator)
