"""Reading JSON a model is still writing, for tool-call parsers (``tool_parser.ToolParser``) and
the frontends: the calls it writes and their arguments, streamed as far as certain.

A reader is fed the text in the increments a stream delivers and keeps its place between them,
so each increment costs time in proportion to itself, not to the text so far. What it returns is
rewritten as ``json.dumps`` writes the whole value (``", "`` and ``": "`` separators, non-ASCII
kept, numbers as Python reads them), so the argument pieces streamed join into exactly the
arguments of the finished call (``ToolParser.call``). Text is rewritten only once certain: a
number once a delimiter ends it, a literal once complete, an escape once whole (a high surrogate
with the escape after it). What a reader has returned after some text is a function of that text,
however it was cut.

``CallsReader`` reads call objects (``{"name": ..., "arguments" or "parameters": {...}}``, alone
or in lists); ``ArgumentsReader`` one arguments object, for formats that write the name apart;
``JsonReader`` one JSON value, token by token, for anything else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sglang_core.server.tool_parser import CallDelta

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = re.compile(r"[-+.eE0-9]*")
_SPACE = re.compile(r"\s*")
_PLAIN = re.compile(r'[^"\\\x00-\x1f]*')  # string characters json.dumps(ensure_ascii=False) keeps as they are
_LITERALS = {"true": True, "false": False, "null": None}
_ESCAPE = re.compile(r'\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})')
_ESCAPE_START = re.compile(r"(?:\\(?:u[0-9a-fA-F]{0,3})?)?")  # an escape cut short by the end of the text
_OPENER = {"}": "{", "]": "["}
_EMPTY = {"}": "first_key", "]": "first"}  # the state in which the bracket closes an empty container
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class Token:
    """A piece of the value: ``kind`` is one of ``{ } [ ] : , key string number literal``. A
    string (``key`` or ``string``) comes in pieces as it is written: the first holds its opening
    quote, the last (``closed``) its closing quote and its whole ``value``."""

    kind: str
    text: str  # as json.dumps writes it
    depth: int  # containers open around it (a bracket: around the container it opens or closes)
    value: Any = None  # a closed key's or string's, a number's or a literal's value
    closed: bool = True  # False for a piece of a string still being written


class JsonReader:
    """One JSON value (whitespace before it skipped), fed in increments; ``feed`` returns the
    tokens the new text makes certain. ``done``: the value has ended; ``rest`` is then the text
    fed after it (from its first non-space character; empty until then). ``error``: the text
    stopped being JSON (the tokens before that point stand). Neither takes more text."""

    def __init__(self) -> None:
        self.done = False
        self.error = False
        self.rest = ""
        self._stack: list[str] = []  # the brackets of the open containers
        # value | first (a value or "]") | first_key (a key or "}") | key | colon | next ("," or the end)
        self._expect = "value"
        self._held = ""  # a literal or escape cut by the end of the text, read again with the next
        self._string: tuple[str, list[str]] | None = None  # the kind and decoded parts of an open string
        self._number: list[str] | None = None  # the characters so far of a number the text ends in

    def feed(self, text: str) -> list[Token]:
        if self.done or self.error:
            return []
        text, self._held = self._held + text, ""
        return self._read(text)

    def _read(self, text: str) -> list[Token]:
        """The tokens ``text`` (what was held back, then the new text) completes; every
        character is looked at once here, apart from what is held back (a few at most)."""
        tokens: list[Token] = []
        pos = 0
        while pos < len(text) and not self.error:
            if self._string is not None:
                pos = self._string_piece(text, pos, tokens)
                continue
            if self._number is not None:
                pos = self._number_piece(text, pos, tokens)
                continue
            pos = _SPACE.match(text, pos).end()
            if pos == len(text):
                break
            if self.done:
                self.rest = text[pos:]
                break
            pos = self._token(text, pos, tokens)
        return tokens

    def _token(self, text: str, pos: int, tokens: list[Token]) -> int:
        """Reads the token that starts at ``pos`` (past whitespace); returns where reading stopped."""
        char, depth, expect = text[pos], len(self._stack), self._expect
        if char in "}]" and self._stack and self._stack[-1] == _OPENER[char] and expect in ("next", _EMPTY[char]):
            self._stack.pop()
            tokens.append(Token(char, char, len(self._stack)))
            self._after_value()
            return pos + 1
        if char == "," and expect == "next":
            tokens.append(Token(",", ", ", depth))
            self._expect = "key" if self._stack[-1] == "{" else "value"
            return pos + 1
        if char == ":" and expect == "colon":
            tokens.append(Token(":", ": ", depth))
            self._expect = "value"
            return pos + 1
        expect = self._expect = {"first": "value", "first_key": "key"}.get(expect, expect)
        if char in "{[" and expect == "value":
            tokens.append(Token(char, char, depth))
            self._stack.append(char)
            self._expect = "first_key" if char == "{" else "first"
            return pos + 1
        if char == '"' and expect in ("key", "value"):
            self._string = ("key" if expect == "key" else "string", [])
            tokens.append(Token(self._string[0], '"', depth, closed=False))
            return pos + 1
        if expect == "value" and (char == "-" or char.isdigit()):
            self._number = []
            return pos
        if expect == "value" and char.isalpha():
            word = next((w for w in _LITERALS if text.startswith(w, pos)), None)
            if word is not None:
                tokens.append(Token("literal", word, depth, _LITERALS[word]))
                self._after_value()
                return pos + len(word)
            if any(w.startswith(text[pos:]) for w in _LITERALS):  # more of the word may follow
                self._held = text[pos:]
                return len(text)
        self.error = True
        return pos

    def _string_piece(self, text: str, pos: int, tokens: list[Token]) -> int:
        """Reads on in the open string from ``pos``: a run of plain characters, an escape, or its
        end. Returns where reading stopped."""
        kind, parts = self._string
        depth = len(self._stack)
        run = _PLAIN.match(text, pos).end()
        if run > pos:
            parts.append(text[pos:run])
            tokens.append(Token(kind, text[pos:run], depth, closed=False))
            return run
        char = text[pos]
        if char == '"':
            value = "".join(parts)
            self._string = None
            tokens.append(Token(kind, '"', depth, value))
            if kind == "key":
                self._expect = "colon"
            else:
                self._after_value()
            return pos + 1
        if char != "\\":  # JSON forbids raw control characters in strings
            self.error = True
            return pos
        escape = _ESCAPE.match(text, pos)
        if escape is None:
            return self._unfinished_escape(text, pos, pos)
        end = escape.end()
        if "\ud800" <= json.loads(f'"{escape.group()}"') <= "\udbff":  # decoded with the escape after it
            pair = _ESCAPE.match(text, end)
            if pair is None:
                return self._unfinished_escape(text, pos, end)
            end = pair.end()
        decoded = json.loads(f'"{text[pos:end]}"')
        parts.append(decoded)
        tokens.append(Token(kind, json.dumps(decoded, ensure_ascii=False)[1:-1], depth, closed=False))
        return end

    def _unfinished_escape(self, text: str, pos: int, cut: int) -> int:
        """An escape from ``pos`` that ``text`` does not complete: held back if the text from
        ``cut`` to its end may still become one, else an error."""
        if _ESCAPE_START.fullmatch(text, cut):
            self._held = text[pos:]
            return len(text)
        self.error = True
        return pos

    def _number_piece(self, text: str, pos: int, tokens: list[Token]) -> int:
        """Reads on in a number from ``pos``; it is certain once a character that cannot
        continue it follows."""
        run = _NUMBER_CHARS.match(text, pos).end()
        self._number.append(text[pos:run])
        if run == len(text):
            return run
        number, self._number = "".join(self._number), None
        if not _NUMBER.fullmatch(number):
            self.error = True
            return run
        value = json.loads(number)
        tokens.append(Token("number", json.dumps(value), len(self._stack), value))
        self._after_value()
        return run

    def _after_value(self) -> None:
        self._expect = "next"
        if not self._stack:
            self.done = True


class ArgumentsReader:
    """One call's arguments object, fed in increments: ``feed`` returns the text it adds to the
    arguments as ``json.dumps`` writes them (nothing if the value is not an object). ``done``
    and ``rest`` as ``JsonReader``'s."""

    def __init__(self) -> None:
        self._value = JsonReader()
        self._object: bool | None = None  # whether the value is an object (None: nothing read yet)

    @property
    def done(self) -> bool:
        return self._value.done

    @property
    def rest(self) -> str:
        return self._value.rest

    def feed(self, text: str) -> str:
        tokens = self._value.feed(text)
        if self._object is None and tokens:
            self._object = tokens[0].kind == "{"
        return "".join(t.text for t in tokens) if self._object else ""


class CallsReader:
    """Call objects (``{"name": ..., "arguments" or "parameters": {...}}``) in JSON values
    written one after another (``separator`` between them if given; a value may be a list of
    calls), fed in increments. ``feed`` returns ``CallDelta`` pieces numbered from 0 in the order
    the calls begin: a call's ``name`` once its string is closed, and the text its arguments
    object adds. Arguments written as a JSON string give no pieces. Reading stops for good where
    the text stops being such values."""

    def __init__(self, separator: str = "") -> None:
        self.separator = separator
        self._value: JsonReader | None = JsonReader()  # None: between values
        self._between = ""  # text after a value, until the separator is certain
        self._stopped = False
        self._calls = 0  # calls begun
        self._depth: int | None = None  # where the value's call objects stand (1 in a list, else 0)
        self._key: str | None = None  # the call object's key last read
        self._arguments = "none"  # the current call's arguments object: none | open | read

    def feed(self, text: str) -> list[CallDelta]:
        pieces: list[CallDelta] = []
        while text and not self._stopped:
            if self._value is None:
                text = self._next_value(text)
                continue
            self._add(self._value.feed(text), pieces)
            text = self._value.rest
            if self._value.error:
                self._stopped = True
            elif self._value.done:
                self._value = None
        return pieces

    def _next_value(self, text: str) -> str:
        """Past a value: the text after the separator (and whitespace), once certain."""
        self._between = (self._between + text).lstrip()
        if not self.separator or self._between.startswith(self.separator):
            text, self._between = self._between[len(self.separator):], ""
            self._value, self._depth = JsonReader(), None
            return text
        self._stopped = not self.separator.startswith(self._between)
        return ""

    def _add(self, tokens: list[Token], pieces: list[CallDelta]) -> None:
        for token in tokens:
            if self._depth is None:
                self._depth = int(token.kind == "[")
            depth = self._depth
            if token.depth == depth and token.kind == "{":
                self._calls += 1
                self._key, self._arguments = None, "none"
                continue
            if not self._calls or token.depth < depth:
                continue
            call = self._calls - 1
            if token.depth == depth + 1 and token.kind == "key" and token.closed:
                self._key = token.value
            elif token.depth == depth + 1 and self._key == "name" and token.kind == "string" and token.closed:
                pieces.append(CallDelta(call, token.value))
            elif token.depth == depth + 1 and self._key in _ARGUMENT_KEYS and token.kind == "{" \
                    and self._arguments == "none":
                self._arguments = "open"
            if self._arguments == "open":
                pieces.append(CallDelta(call, None, token.text))
                if token.depth == depth + 1 and token.kind == "}":
                    self._arguments = "read"
