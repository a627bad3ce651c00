"""Tool calling and reasoning output for the chat frontends (OpenAI's and Anthropic's), whatever
their wire format: the server's parsers (``--tool-call-parser``, ``--reasoning-parser``), the
constraint that forces calls (OpenAI's ``required`` or a named function, Anthropic's ``any`` or
``tool``), and the parser that splits a generated message into reasoning, content and calls.

A forced choice constrains the output with a JSON Schema built from the tools' parameters (the
request's ``json_schema`` path): a named function's output is its arguments object, ``required``
writes ``[{"name": ..., "arguments": {...}}, ...]``; either is then returned as calls. With a
reasoning parser, a constraint starts only once the reasoning has ended (``constraint_after_ids``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from sglang_core.plugins import PluginManager
from sglang_core.server.context import ServerContext
from sglang_core.server.partial_json import ArgumentsReader, CallsReader
from sglang_core.server.tool_parser import CallDelta, CallStream, Parsed, ToolCall, ToolParser

from sglang_plugins.frontends.reasoning import END, ReasoningFormat, ReasoningParser, reasoning_format

FALLBACK_PARSER = "generic"
NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class Function:
    """A tool the client offers, in either API's terms."""

    name: str
    parameters: dict[str, Any]
    description: str | None = None

    def for_template(self) -> dict[str, Any]:
        """As chat templates take tools (``apply_chat_template(tools=...)``): OpenAI's shape."""
        function = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass
class ToolUse:
    """A request's tools and how it lets the model use them. ``mode``: ``auto`` (the model
    decides; calls are parsed from its text), ``none`` (no calls), ``required`` (at least one
    call), ``named`` (exactly one call of ``name``)."""

    functions: list[Function]
    mode: Literal["auto", "none", "required", "named"] = "auto"
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def schema(self) -> dict[str, Any]:
        """The JSON Schema a forced choice constrains the output to."""
        if self.mode == "named":
            return next(f.parameters for f in self.functions if f.name == self.name)
        calls = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False} for f in self.functions]
        items = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return {"type": "array", "items": items, "minItems": 1, **({} if self.parallel else {"maxItems": 1})}


class ForcedCalls(ToolParser):
    """The output of a forced choice, read as the calls its schema describes; their arguments
    stream as they are written. An output cut short (max tokens) before any call's arguments
    began is no call: it is returned as content; a call cut inside its arguments keeps them so far."""

    def __init__(self, tools: list[dict[str, Any]], name: str | None):
        super().__init__(tools)
        self.name = name  # the named function, or None for a list of calls
        self._pieces: list[str] = []  # the output so far
        self._stream = CallStream(self.tools)
        self._reader = ArgumentsReader() if name is not None else CallsReader()

    def feed(self, text: str) -> Parsed:
        self._pieces.append(text)
        out = Parsed()
        self._stream.update(out, [CallDelta(0, self.name, self._reader.feed(text))] if self.name is not None
                            else self._reader.feed(text))
        return out

    def finish(self) -> Parsed:
        output = "".join(self._pieces)
        try:
            value = json.loads(output)
            pairs = [(self.name, value)] if self.name is not None else [
                (v.get("name"), v.get("arguments")) if isinstance(v, dict) else (None, None)
                for v in (value if isinstance(value, list) else [])]
        except ValueError:
            pairs = []
        calls = [self.call(name, arguments) for name, arguments in pairs]
        out = Parsed()
        return out if self._stream.complete(out, calls if calls and None not in calls else None) else \
            Parsed(output)


@dataclass
class MessagePiece:
    """What some output adds to the assistant message: completed calls, and the pieces of calls
    (``deltas``, for streaming: every call's pieces come no later than the call)."""

    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    deltas: list[CallDelta] = field(default_factory=list)

    def __add__(self, other: MessagePiece) -> MessagePiece:
        return MessagePiece(self.reasoning + other.reasoning, self.content + other.content, self.calls + other.calls,
                            self.deltas + other.deltas)


class MessageParser:
    """Splits one generated message, fed in increments, into reasoning, content and calls."""

    def __init__(self, reasoning: ReasoningFormat | None, tools: ToolParser | None, max_calls: int | None):
        self.reasoning = ReasoningParser(reasoning) if reasoning is not None else None
        self.tools = tools
        self.max_calls = max_calls  # 1 when parallel calls are off
        self.calls = 0
        self.announced = 0  # calls whose first piece has been given

    def feed(self, text: str) -> MessagePiece:
        return self._piece(*(self.reasoning.feed(text) if self.reasoning else ("", text)), final=False)

    def finish(self) -> MessagePiece:
        return self._piece(*(self.reasoning.finish() if self.reasoning else ("", "")), final=True)

    def _piece(self, reasoning: str, answer: str, final: bool) -> MessagePiece:
        if self.tools is None:
            return MessagePiece(reasoning, answer)
        parsed = self.tools.feed(answer)
        if final:
            parsed += self.tools.finish()
        deltas = parsed.deltas
        self.announced = max([self.announced, *(d.index + 1 for d in deltas)])
        for index, call in enumerate(parsed.calls, self.calls):
            if index >= self.announced:  # a parser that does not stream calls: each streams whole
                deltas.append(CallDelta(index, call.name, call.arguments))
                self.announced = index + 1
        calls = parsed.calls
        if self.max_calls is not None:
            calls = calls[:max(0, self.max_calls - self.calls)]
            deltas = [d for d in deltas if d.index < self.max_calls]
        self.calls += len(calls)
        return MessagePiece(reasoning, parsed.content, calls, deltas)


class ToolCalling:
    """One frontend's view of the server's tool-call and reasoning parsers. Names are checked
    when the frontend mounts; the default tool parser is chosen from the chat template once the
    engine (and its tokenizer) is up."""

    def __init__(self, ctx: ServerContext, template: str | None):
        self.ctx, self.template = ctx, template
        self.parsers = PluginManager(ctx.settings.plugins).registry("tool_parsers")
        name = ctx.settings.tool_call_parser
        if name is not None and name not in self.parsers:
            raise ValueError(f"tool_call_parser: unknown parser {name!r}; registered: "
                             f"{', '.join(sorted(self.parsers.names()))}")
        self.reasoning = reasoning_format(ctx.settings.reasoning_parser)
        self._parser: type[ToolParser] | None = None

    @property
    def parser(self) -> type[ToolParser]:
        """``--tool-call-parser``, else the first parser whose markers the chat template holds,
        else the generic one."""
        if self._parser is None:
            name = self.ctx.settings.tool_call_parser
            if name is None:
                text = self.template or self.ctx.engine.tokenizer.chat_template or ""
                classes = {r.name: r.load() for r in self.parsers}
                name = next((n for n, cls in classes.items() if any(m in text for m in cls.template_markers)),
                            FALLBACK_PARSER)
            self._parser = self.parsers.get(name).load()
        return self._parser

    def prepare(self, use: ToolUse | None, prompt_ids: list[int],
                params: dict[str, Any]) -> Callable[[], MessageParser] | None:
        """Adjust a request's engine sampling ``params`` for its tools and the reasoning parser
        (validate them after); return what builds the parser of each of its outputs (None: they
        are plain text)."""
        if use is not None and use.forced:
            if "regex" in params or "json_schema" in params:
                raise ValueError("tool_choice: a forced tool choice cannot be combined with another output "
                                 "constraint (response_format, regex, json_schema)")
            params["json_schema"] = json.dumps(use.schema())
        tokenizer = self.ctx.engine.tokenizer
        reasons = self.reasoning is not None and self.reasoning.output_reasons(tokenizer.decode(prompt_ids[-16:]))
        if reasons and ("regex" in params or "json_schema" in params):
            params["constraint_after_ids"] = tokenizer(END, add_special_tokens=False)["input_ids"]
        tools = [f.for_template()["function"] for f in use.functions] if use is not None else []
        tool_parser: Callable[[], ToolParser] | None = None
        if use is not None and use.forced:
            tool_parser = functools.partial(ForcedCalls, tools, use.name)
        elif use is not None and use.mode == "auto" and use.functions:
            tool_parser = functools.partial(self.parser, tools)
        if tool_parser is None and self.reasoning is None:
            return None
        # Call and reasoning tags are often special tokens: keep them in the text unless told not to.
        params.setdefault("skip_special_tokens", False)
        reasoning, max_calls = self.reasoning, None if use is None or use.parallel else 1
        return lambda: MessageParser(reasoning, tool_parser() if tool_parser else None, max_calls)
