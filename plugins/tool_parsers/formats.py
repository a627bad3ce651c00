"""The tool-call formats of the common open model families (each as its chat template teaches
it), and a generic JSON fallback for models whose format is unknown."""

from __future__ import annotations

import re
from typing import Any

from sglang_core.server.tool_parser import ToolCall

from sglang_plugins.tool_parsers.partial_json import arguments_so_far, calls_so_far
from sglang_plugins.tool_parsers.tagged import TaggedCallParser, json_values


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

    def pending(self, block: str) -> list[tuple[str | None, str]]:
        return calls_so_far(block.removeprefix("<|python_tag|>"), separator=";")


class HermesParser(_JsonObjectCalls):
    """Hermes and Qwen2.5/Qwen3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""

    start_tags = ("<tool_call>",)
    end_tag = "</tool_call>"
    template_markers = ("<tool_call>",)

    def decode(self, block: str) -> list[ToolCall] | None:
        body = block.removeprefix("<tool_call>").removesuffix("</tool_call>")
        values = json_values(body)
        return self.calls_from(values) if values is not None and len(values) == 1 else None

    def pending(self, block: str) -> list[tuple[str | None, str]]:
        return calls_so_far(block.removeprefix("<tool_call>"))


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

    def pending(self, block: str) -> list[tuple[str | None, str]]:
        calls: list[tuple[str | None, str]] = []
        for part in block.split("[TOOL_CALLS]")[1:]:
            name, found, arguments = part.partition("[ARGS]")
            calls += [(name.strip(), arguments_so_far(arguments))] if found else calls_so_far(part)
        return calls


class DeepSeekV3Parser(TaggedCallParser):
    """DeepSeek-V3 (and R1): ``<｜tool▁calls▁begin｜>`` then per call
    ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>``,
    then ``<｜tool▁calls▁end｜>``."""

    start_tags = ("<｜tool▁calls▁begin｜>",)
    end_tag = "<｜tool▁calls▁end｜>"
    template_markers = ("<｜tool▁calls▁begin｜>",)
    CALL = re.compile(r"\s*<｜tool▁call▁begin｜>\s*function\s*<｜tool▁sep｜>(?P<name>[^\n`]+?)\s*"
                      r"```(?:json)?\s*(?P<arguments>.*?)\s*```\s*<｜tool▁call▁end｜>", re.DOTALL)
    HEADER = re.compile(r"<｜tool▁call▁begin｜>\s*function\s*<｜tool▁sep｜>(?P<name>[^\n`]+?)\s*```(?:json)?\s*")

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

    def pending(self, block: str) -> list[tuple[str | None, str]]:
        return [(header["name"], arguments_so_far(block, header.end())) for header in self.HEADER.finditer(block)]


class GenericJsonParser(_JsonObjectCalls):
    """Any model: an output that is nothing but a JSON call object, or a list of them
    (``"arguments"`` or ``"parameters"``); anything else is content."""

    json_openers = "{["

    def decode(self, block: str) -> list[ToolCall] | None:
        return self.calls_from(json_values(block))

    def pending(self, block: str) -> list[tuple[str | None, str]]:
        return calls_so_far(block)
