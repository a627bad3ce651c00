"""The tool-call formats of the common open model families (each as its chat template teaches
it), and a generic JSON fallback for models whose format is unknown."""

from __future__ import annotations

import re
from typing import Any

from sglang_core.server.partial_json import ArgumentsReader, CallsReader
from sglang_core.server.tool_parser import CallDelta, ToolCall

from sglang_plugins.tool_parsers.tagged import CallReader, TaggedCallParser, json_values


class _JsonObjectCalls(TaggedCallParser):
    """Formats whose calls are JSON objects ``{"name": ..., "arguments" or "parameters": {...}}``."""

    def calls_from(self, values: list[Any] | None) -> list[ToolCall] | None:
        """Each value an object naming a call (or a list of them); None unless all are calls."""
        if values is None:
            return None
        objects = [o for v in values for o in (v if isinstance(v, list) else [v])]
        calls = [self.call(o.get("name"), o.get("arguments", o.get("parameters"))) if isinstance(o, dict) else None
                 for o in objects]
        return calls if calls and None not in calls else None


class Llama3Parser(_JsonObjectCalls):
    """Llama 3.1 / 3.2 JSON tool calling: the output is ``{"name": ..., "parameters": {...}}``
    (several separated by ``;``), optionally after ``<|python_tag|>``."""

    start_tags = ("<|python_tag|>",)
    json_openers = "{"
    template_markers = ("<|python_tag|>", '"parameters": dictionary of argument name')

    def decode(self, block: str) -> list[ToolCall] | None:
        return self.calls_from(json_values(block.removeprefix("<|python_tag|>"), separator=";"))

    def reader(self) -> CallReader:
        return CallsReader(separator=";")


class HermesParser(_JsonObjectCalls):
    """Hermes and Qwen2.5/Qwen3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""

    start_tags = ("<tool_call>",)
    end_tag = "</tool_call>"
    template_markers = ("<tool_call>",)

    def decode(self, block: str) -> list[ToolCall] | None:
        body = block.removeprefix("<tool_call>").removesuffix("</tool_call>")
        values = json_values(body)
        return self.calls_from(values) if values is not None and len(values) == 1 else None

    def reader(self) -> CallReader:
        return CallsReader()


class MistralParser(_JsonObjectCalls):
    """Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, or in the newer
    tokenizers' form ``[TOOL_CALLS]name[ARGS]{...}`` once per call. Calls end the output."""

    start_tags = ("[TOOL_CALLS]",)
    template_markers = ("[TOOL_CALLS]",)

    def decode(self, block: str) -> list[ToolCall] | None:
        calls: list[ToolCall] = []
        for part in block.split("[TOOL_CALLS]")[1:]:
            name, found, arguments = part.partition("[ARGS]")
            if found:
                call = self.call(name.strip(), arguments.strip())
                new = [call] if call is not None else None
            else:
                new = self.calls_from(json_values(part))
            if not new:
                return None
            calls += new
        return calls or None

    def reader(self) -> CallReader:
        return _MistralCalls()


class DeepSeekV3Parser(TaggedCallParser):
    """DeepSeek-V3 (and R1): ``<｜tool▁calls▁begin｜>`` then per call
    ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>``,
    then ``<｜tool▁calls▁end｜>``."""

    start_tags = ("<｜tool▁calls▁begin｜>",)
    end_tag = "<｜tool▁calls▁end｜>"
    template_markers = ("<｜tool▁calls▁begin｜>",)
    CALL = re.compile(r"\s*<｜tool▁call▁begin｜>\s*function\s*<｜tool▁sep｜>(?P<name>[^\n`]+?)\s*"
                      r"```(?:json)?\s*(?P<arguments>.*?)\s*```\s*<｜tool▁call▁end｜>", re.DOTALL)
    HEADER = re.compile(r"<｜tool▁call▁begin｜>\s*function\s*<｜tool▁sep｜>(?P<name>[^\n`]+?)\s*```(?:json)?\s*(?=\{)")

    def decode(self, block: str) -> list[ToolCall] | None:
        body = block.removeprefix(self.start_tags[0]).removesuffix(self.end_tag)
        calls, pos = [], 0
        while body[pos:].strip():
            match = self.CALL.match(body, pos)
            call = match and self.call(match["name"], match["arguments"])
            if call is None:
                return None
            calls.append(call)
            pos = match.end()
        return calls or None

    def reader(self) -> CallReader:
        return NamedCalls("<｜tool▁call▁begin｜>", self.HEADER)


class GenericJsonParser(_JsonObjectCalls):
    """Any model: an output that is nothing but a JSON call object, or a list of them
    (``"arguments"`` or ``"parameters"``); anything else is content."""

    json_openers = "{["

    def decode(self, block: str) -> list[ToolCall] | None:
        return self.calls_from(json_values(block))

    def reader(self) -> CallReader:
        return CallsReader()


class NamedCalls:
    """Reads calls that each open with a header naming the function (matched by ``header``, which
    begins with ``opening`` and ends where the arguments object begins), then the arguments
    object. Calls are read in order: a header that does not match (yet) holds back the calls
    after it."""

    LONGEST_HEADER = 512  # a header not matched by this length is taken as none: streaming stops there

    def __init__(self, opening: str, header: re.Pattern[str]):
        self.opening, self.header = opening, header
        self._gap = ""  # the text after the last call's arguments, from the next opening on
        self._arguments: ArgumentsReader | None = None
        self._name: str | None = None
        self._calls = 0
        self._stopped = False

    def feed(self, text: str) -> list[CallDelta]:
        pieces: list[CallDelta] = []
        while text and not self._stopped:
            if self._arguments is None:
                text = self._next_call(text)
            else:  # the text after the arguments (once they end) goes on to the next call
                pieces.append(CallDelta(self._calls - 1, self._name, self._arguments.feed(text)))
                text, self._arguments = self._arguments.rest, None if self._arguments.done else self._arguments
        return pieces

    def _next_call(self, text: str) -> str:
        """Reads on in the text before a call's arguments; returns the text after its header once
        the header is certain."""
        self._gap += text
        start = self._gap.find(self.opening)
        if start < 0:  # keep what may be the start of an opening
            self._gap = self._gap[max(0, len(self._gap) - len(self.opening) + 1):]
            return ""
        self._gap = self._gap[start:]
        header = self.header.match(self._gap)
        if header is None:
            self._stopped = len(self._gap) > self.LONGEST_HEADER
            return ""
        self._name, self._calls, self._arguments = header["name"], self._calls + 1, ArgumentsReader()
        text, self._gap = self._gap[header.end():], ""
        return text


class _MistralCalls:
    """Mistral's calls after ``[TOOL_CALLS]``: a JSON list of call objects, or ``name[ARGS]{...}``
    (each form repeated after another ``[TOOL_CALLS]``), told apart by the first character."""

    NAMED = re.compile(r"\[TOOL_CALLS\]\s*(?P<name>.*?)\s*\[ARGS\]\s*(?=\{)", re.DOTALL)

    def __init__(self):
        self._start = ""  # whitespace before the first character
        self._reader: CallReader | None = None

    def feed(self, text: str) -> list[CallDelta]:
        if self._reader is None:
            self._start += text
            body = self._start.lstrip()
            if not body:
                return []
            if body[0] in "[{":
                self._reader, text = CallsReader(separator="[TOOL_CALLS]"), body
            else:
                self._reader, text = NamedCalls("[TOOL_CALLS]", self.NAMED), "[TOOL_CALLS]" + body
        return self._reader.feed(text)
