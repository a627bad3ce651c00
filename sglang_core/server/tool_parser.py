"""The interface a tool-call parser plugin implements (hook ``register_tool_parsers``).

A model asked to call tools writes the calls into its text, each family in its own format
(``<tool_call>{...}</tool_call>``, ``[TOOL_CALLS][...]``, ...). A parser reads that text, whole or
in the increments a stream delivers, and splits it into the normal content and the calls. It is
built per generated message, so it may keep state between increments.

Streaming safety is the parser's contract: ``feed`` returns as content only text that can no
longer become part of a call, so a chunk boundary inside a tag never leaks half a tag as content.
A parser that can read a call before it ends returns its pieces as ``deltas`` (``CallStream``
keeps the books; ``partial_json`` reads calls and arguments written as JSON, a piece at a time);
calls a parser finishes without deltas stream whole when they complete.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text


@dataclass
class CallDelta:
    """A piece of a call being written: the first piece of the message's call ``index`` (from 0)
    has its ``name``; ``arguments`` continues its arguments' text. A call's pieces join into the
    arguments of the ``ToolCall`` that completes it."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class Parsed:
    """What some model text adds to the message: content to show, completed tool calls, and the
    pieces of calls being written (``deltas``, for streaming)."""

    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    deltas: list[CallDelta] = field(default_factory=list)

    def __add__(self, other: Parsed) -> Parsed:
        return Parsed(self.content + other.content, self.calls + other.calls, self.deltas + other.deltas)


class ToolParser(abc.ABC):
    """Built as ``cls(tools)``: ``tools`` are the request's functions as OpenAI describes them
    (``{"name", "description", "parameters"}``). A call naming none of them is not a call: its
    text stays content."""

    # Text found in a chat template whose model writes calls in this format (so ``--tool-call-parser``
    # can default from the model); empty for a parser that no template announces.
    template_markers: tuple[str, ...] = ()

    def __init__(self, tools: list[dict[str, Any]]):
        self.tools = {tool["name"]: tool for tool in tools}

    @abc.abstractmethod
    def feed(self, text: str) -> Parsed:
        """The next increment of the model's output; returns what is now certain."""

    @abc.abstractmethod
    def finish(self) -> Parsed:
        """The output has ended: return everything still held back."""

    def parse(self, text: str) -> Parsed:
        """A whole output at once."""
        return self.feed(text) + self.finish()

    def call(self, name: Any, arguments: Any) -> ToolCall | None:
        """A call from a decoded name and arguments (an object, or JSON text of one); None when
        the name is no tool of the request or the arguments are no object."""
        if arguments is None:  # a call of a function without parameters
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(name, str) or name not in self.tools or not isinstance(arguments, dict):
            return None
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def partial_tag_length(text: str, tags: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that one of ``tags`` begins with (without being
    all of it): how much a streaming parser must hold back until the next increment decides."""
    return max((k for tag in tags for k in range(1, min(len(tag), len(text) + 1))
                if tag.startswith(text[len(text) - k:])), default=0)


class CallStream:
    """The books of a parser that streams calls while they are written: what it has read and
    announced of the calls in the text it is reading now (a call block), so that the message's
    deltas give each call's name once and then its arguments as they grow, and the calls that
    complete the block carry exactly the arguments streamed. Each update costs time in proportion
    to the pieces it brings, however long the calls are."""

    def __init__(self, tools: dict[str, Any]):
        self.tools = tools
        self.first = 0  # the message's index of the block's first call
        self._names: list[str | None] = []  # per call of the block, as read
        self._arguments: list[list[str]] = []  # per call of the block: the pieces of its arguments read
        self._sent: list[int] = []  # per announced call: how many of its pieces its deltas hold
        self._length: list[int] = []  # per call: the length of its arguments read

    def update(self, out: Parsed, pieces: list[CallDelta]) -> None:
        """Adds the pieces a reader (``partial_json.CallsReader``, ...) read of the block's
        calls: ``index`` counts the block's calls from 0, ``name`` (on any piece) is the call's
        name once known, ``arguments`` continues its arguments' text as the completed call will
        have it. A call is announced once its name is a tool and its arguments have begun past
        their opening brace; calls are announced in order."""
        touched: set[int] = set()
        for piece in pieces:
            while len(self._names) <= piece.index:
                self._names.append(None)
                self._arguments.append([])
                self._length.append(0)
            if piece.name is not None and piece.index >= len(self._sent):
                self._names[piece.index] = piece.name
            if piece.arguments:
                self._arguments[piece.index].append(piece.arguments)
                self._length[piece.index] += len(piece.arguments)
                touched.add(piece.index)
        for i in sorted(touched):
            if i < len(self._sent):
                self._send(out, i)
        while len(self._sent) < len(self._names):
            i = len(self._sent)
            if self._names[i] not in self.tools or self._length[i] < 2:
                return
            out.deltas.append(CallDelta(self.first + i, self._names[i]))
            self._sent.append(0)
            self._send(out, i)

    def _send(self, out: Parsed, i: int) -> None:
        new = self._arguments[i][self._sent[i]:]
        if new:
            out.deltas.append(CallDelta(self.first + i, None, "".join(new)))
            self._sent[i] = len(self._arguments[i])

    def complete(self, out: Parsed, calls: list[ToolCall] | None) -> bool:
        """The block has ended with ``calls`` (None: its text is no call). Calls already announced
        get the rest of their arguments; a block that stops being a call after announcing some
        keeps them, cut where it broke (as a call cut by the token limit is). Returns whether the
        block gave calls."""
        streamed = [ToolCall(self._names[i], "".join(self._arguments[i])) for i in range(len(self._sent))]
        if calls is None:
            calls = streamed or None
        for i, call in enumerate(calls or ()):
            if i < len(streamed):
                done = streamed[i].arguments
                if len(call.arguments) > len(done) and call.arguments.startswith(done):
                    out.deltas.append(CallDelta(self.first + i, None, call.arguments[len(done):]))
            else:
                out.deltas.append(CallDelta(self.first + i, call.name, call.arguments))
        out.calls += calls or []
        self.first += len(calls or ())
        self._names, self._arguments, self._sent, self._length = [], [], [], []
        return calls is not None
