"""What the built-in formats share: calls open with a start tag (or, for JSON-calling families,
with a ``{`` that begins the output) and run to an end tag or to the end of the output. The text
of each call goes to the format's ``decode``; text that decodes to no call stays content.

Whitespace right before a call and after one is layout, not content. While streaming, a trailing
part of the text that may still become a start tag, and trailing whitespace, are held back, so
the content streamed equals the content of the whole output however it is cut.

A format that can read its calls before they end (``reader``) streams each call's arguments as
they are written; the others stream each call whole once it ends. Each increment of the output
costs time in proportion to itself: a call's text is kept in pieces, and the reader and the
search for the end tag go on from where they stopped."""

from __future__ import annotations

import abc
import json
from typing import Protocol

from sglang_core.server.tool_parser import CallDelta, CallStream, Parsed, ToolCall, ToolParser, partial_tag_length


class CallReader(Protocol):
    def feed(self, text: str) -> list[CallDelta]:
        """The next increment of a call block's text -> the pieces of its calls it makes certain
        (as ``partial_json.CallsReader`` gives them)."""


class TaggedCallParser(ToolParser):
    start_tags: tuple[str, ...] = ()
    end_tag: str | None = None  # None: a call runs to the end of the output
    json_openers: str = ""  # characters that open a call when they begin the output ("{" for Llama)

    def __init__(self, tools: list[dict]):
        super().__init__(tools)
        self._held = ""  # output not yet returned (in a call: not yet moved into its block)
        self._in_call = False
        self._at_start = True  # nothing but whitespace seen yet
        self._after_call = False  # whitespace following a call is dropped
        self._stream = CallStream(self.tools)
        # The open call block: its text in the pieces it came in (joined only when it may end),
        # the end of it that an end tag may continue, its reader, and the start tag it skips.
        self._block: list[str] = []
        self._tail = ""
        self._reader: CallReader | None = None
        self._skip = 0

    def feed(self, text: str) -> Parsed:
        self._held += text
        return self._drain(final=False)

    def finish(self) -> Parsed:
        return self._drain(final=True)

    @abc.abstractmethod
    def decode(self, block: str) -> list[ToolCall] | None:
        """One call's text (start tag and end tag included) -> its calls; None if it is none."""

    def reader(self) -> CallReader | None:
        """A reader of one call block's text after its start tag (from the JSON opener when the
        block has none), which gives the pieces of its calls as they are written; None for a
        format that cannot tell its calls before their end."""
        return None

    def _drain(self, final: bool) -> Parsed:
        out = Parsed()
        while True:
            if not self._in_call:
                start = self._call_start()
                if start is None:
                    keep = 0 if final else self._undecided_tail()
                    self._emit(out, self._held[:len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep:]
                    return out
                self._emit(out, self._held[:start].rstrip())
                self._held, self._in_call, self._at_start = self._held[start:], True, False
                self._block, self._tail, self._reader = [], "", self.reader()
                self._skip = next((len(tag) for tag in self.start_tags if self._held.startswith(tag)), 0)
            ended = self._extend_block(out, final)
            if ended is None:
                return out
            block, calls = ended
            self._in_call = False
            if self._stream.complete(out, calls or None):
                self._after_call = True
            else:
                self._emit(out, block)

    def _extend_block(self, out: Parsed, final: bool) -> tuple[str, list[ToolCall] | None] | None:
        """Moves the held text into the open call block. Once the block has ended, returns its
        text and its calls (None: not a call), the text after it held again; until then, gives
        the new text to the block's reader. The first end tag after which the text decodes is the
        end (a string inside the call may hold the tag's text); each end tag is tried once."""
        new, self._held = self._held, ""
        if self.end_tag is not None:
            window = self._tail + new
            i = window.find(self.end_tag)
            while i >= 0:
                text = "".join(self._block) + new
                end = len(text) - len(window) + i + len(self.end_tag)
                if calls := self.decode(text[:end]):
                    self._held = text[end:]
                    return text[:end], calls
                i = window.find(self.end_tag, i + len(self.end_tag))
            self._tail = window[max(0, len(window) - len(self.end_tag) + 1):]
        self._block.append(new)
        if final:
            text = "".join(self._block)
            return text, self.decode(text)
        if self._reader is not None:
            self._stream.update(out, self._reader.feed(new[self._skip:]))
            self._skip = 0
        return None

    def _emit(self, out: Parsed, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
        if text:
            out.content += text
            self._after_call = self._at_start = False

    def _call_start(self) -> int | None:
        found = [i for i in (self._held.find(tag) for tag in self.start_tags) if i >= 0]
        if self._at_start and self.json_openers:
            body = self._held.lstrip()
            if body and body[0] in self.json_openers:
                found.append(len(self._held) - len(body))
        return min(found, default=None)

    def _undecided_tail(self) -> int:
        """How much of the held text's end may still belong to a call: the longest part that a
        start tag begins with, and the whitespace before it (it may precede a call)."""
        held = self._held
        if self._at_start and self.json_openers and not held.strip():
            return len(held)
        partial = partial_tag_length(held, self.start_tags)
        rest = held[:len(held) - partial]
        return partial + len(rest) - len(rest.rstrip())


def json_values(text: str, separator: str = "") -> list | None:
    """The JSON values ``text`` holds one after another (whitespace, and ``separator`` if given,
    between them); None if anything else is there."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return values or None
        if values and separator:
            if not text.startswith(separator, pos):
                return None
            pos += len(separator)
            while pos < len(text) and text[pos].isspace():
                pos += 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        values.append(value)
