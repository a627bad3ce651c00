"""The interface a tool-call parser plugin implements (hook ``register_tool_parsers``).

A model asked to call tools writes the calls into its text, each family in its own format
(``<tool_call>{...}</tool_call>``, ``[TOOL_CALLS][...]``, ...). A parser reads that text, whole or
in the increments a stream delivers, and splits it into the normal content and the calls. It is
built per generated message, so it may keep state between increments.

Streaming safety is the parser's contract: ``feed`` returns as content only text that can no
longer become part of a call, so a chunk boundary inside a tag never leaks half a tag as content.
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
class Parsed:
    """What some model text adds to the message: content to show, and completed tool calls."""

    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def __add__(self, other: Parsed) -> Parsed:
        return Parsed(self.content + other.content, self.calls + other.calls)


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
