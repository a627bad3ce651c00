"""Tool-call and reasoning parsers on outputs in each family's format (as its chat template renders an
assistant's calls, which is what the model learnt to write), whole and streamed with a chunk
boundary at every position and one character at a time: the stream must give the same content
and calls as the whole output, so no piece of a tag ever leaks as content."""

from __future__ import annotations

import json

import pytest

from sglang_core.plugins import PluginManager
from sglang_core.server.partial_json import ArgumentsReader, JsonReader
from sglang_core.server.tool_parser import CallDelta, CallStream, Parsed, ToolParser

from sglang_plugins.frontends.reasoning import reasoning_format
from sglang_plugins.frontends.tool_calling import ForcedCalls, MessageParser, MessagePiece, ToolCalling

TOOLS = [
    {"name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                    "required": ["city"]}},
    {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
]
PARIS = ("get_weather", {"city": "Paris", "unit": "celsius"})
TOKYO = ("get_time", {"zone": "Asia/Tokyo"})
TRICKY = ("get_weather", {"city": "a;b</tool_call>}{", "unit": "\u00b0C"})  # separators inside strings

# parser name -> (model output, expected content, expected calls)
CASES = {
    "llama3 json": ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
                    "", [PARIS]),
    "llama3 python_tag, two calls": (
        "llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                  '{"name": "get_time", "parameters": {"zone": "Asia/Tokyo"}}', "", [PARIS, TOKYO]),
    "llama3 text": ("llama3", "It is sunny in Paris {usually}.", "It is sunny in Paris {usually}.", []),
    "llama3 tricky strings": ("llama3", '  {"name": "get_weather", "parameters": {"city": "a;b</tool_call>}{", '
                                        '"unit": "\\u00b0C"}}', "", [TRICKY]),
    "hermes two calls with text": (
        "hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                  '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
                  '{"zone": "Asia/Tokyo"}}\n</tool_call>', "Let me check.", [PARIS, TOKYO]),
    "hermes tricky strings": ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": '
                                        '"a;b</tool_call>}{", "unit": "°C"}}\n</tool_call>\n<tool_call>\n'
                                        '{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call>',
                              "", [TRICKY, TOKYO]),
    "hermes unknown tool stays text": (
        "hermes", '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call> ok',
        '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call> ok', []),
    "hermes unclosed call at the end": ("hermes", '<tool_call>\n{"name": "get_time", "arguments": '
                                                  '{"zone": "Asia/Tokyo"}}', "", [TOKYO]),
    "hermes text only": ("hermes", "I use < and <tool but no call.", "I use < and <tool but no call.", []),
    "mistral list": ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", '
                                '"unit": "celsius"}}, {"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}]',
                     "", [PARIS, TOKYO]),
    "mistral args form": ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
                                     '[TOOL_CALLS]get_time[ARGS]{"zone": "Asia/Tokyo"}', "Sure.", [PARIS, TOKYO]),
    "deepseek_v3 two calls": (
        "deepseek_v3", "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                       '```json\n{"city": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜>\n'
                       "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n"
                       '{"zone": "Asia/Tokyo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "Checking.", [PARIS, TOKYO]),
    "deepseek_v3 broken call stays text": (
        "deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n"
                       "{zone}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n"
        "{zone}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>", []),
    "generic object": ("generic", '{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}', "", [TOKYO]),
    "generic list": ("generic", '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}},'
                                ' {"name": "get_time", "arguments": "{\\"zone\\": \\"Asia/Tokyo\\"}"}]',
                     "", [PARIS, TOKYO]),
    "generic not a call": ("generic", '{"answer": 42}', '{"answer": 42}', []),
    "generic prose": ("generic", "The answer is [42].", "The answer is [42].", []),
}


@pytest.fixture(scope="module")
def parsers():
    registry = PluginManager().registry("tool_parsers")
    return {name: registry.get(name).load() for name in ("llama3", "hermes", "mistral", "deepseek_v3", "generic")}


def normalised(parsed: Parsed) -> tuple[str, list]:
    return parsed.content, [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def assembled(deltas) -> list[tuple[str, str]]:
    """Calls put together from their streamed pieces, as a client does (OpenAI's deltas): the
    first piece of each call names it, in order of index; the rest continue its arguments."""
    calls: list[list[str]] = []
    for delta in deltas:
        if delta.name is not None:
            assert delta.index == len(calls)
            calls.append([delta.name, delta.arguments])
        else:
            calls[delta.index][1] += delta.arguments
    return [tuple(call) for call in calls]


def streamed(parser, pieces: list[str]) -> Parsed:
    """Feed the pieces; after each, every completed call must equal its streamed pieces (a call's
    pieces come no later than the call), and at the end every announced call must be completed."""
    out = Parsed()
    for piece in [*pieces, None]:
        out += parser.feed(piece) if piece is not None else parser.finish()
        whole = [(c.name, c.arguments) for c in out.calls]
        assert assembled(out.deltas)[:len(whole)] == whole
    assert len(assembled(out.deltas)) == len(out.calls)
    return out


@pytest.mark.parametrize("case", CASES)
def test_parser_on_recorded_output(parsers, case):
    name, output, content, calls = CASES[case]
    cls = parsers[name]
    expected = (content, [(n, a) for n, a in calls])
    assert normalised(cls(TOOLS).parse(output)) == expected
    assert normalised(streamed(cls(TOOLS), list(output))) == expected  # one character at a time
    for cut in range(1, len(output)):
        assert normalised(streamed(cls(TOOLS), [output[:cut], output[cut:]])) == expected, cut


LONG = {"city": "Paris " * 40, "unit": "celsius", "days": [1, 2.5, -3e2, True, None, {}], "note": "\u00b0 \\ \"é\" \U0001f600"}
# How each format writes one call of get_weather with LONG arguments.
LONG_CALLS = {
    "llama3": '<|python_tag|>{"name": "get_weather", "parameters": %s}',
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": %s}\n</tool_call>',
    "mistral": '[TOOL_CALLS]get_weather[ARGS]%s',
    "deepseek_v3": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n%s\n```"
                   "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "generic": '[{"name": "get_weather", "arguments": %s}]',
}


@pytest.mark.parametrize("name", LONG_CALLS)
def test_long_arguments_stream_in_pieces(parsers, name):
    """Every format streams a call's arguments as they are written: fed 16 characters at a time,
    the arguments come in many pieces (each as far as the text so far certainly goes), and they
    join into the call's arguments, which are LONG."""
    output = LONG_CALLS[name] % json.dumps(LONG, indent=1)  # the model's own spacing is rewritten
    out = streamed(parsers[name](TOOLS), [output[i:i + 16] for i in range(0, len(output), 16)])
    ((call_name, arguments),) = assembled(out.deltas)
    assert (call_name, json.loads(arguments)) == ("get_weather", LONG) and arguments == out.calls[0].arguments
    pieces = [d.arguments for d in out.deltas if d.arguments]
    assert len(pieces) > len(arguments) // 32, pieces
    assert all(json.dumps(LONG, ensure_ascii=False).startswith("".join(pieces[:i])) for i in range(len(pieces)))


def test_forced_calls_stream_in_pieces():
    output = json.dumps([{"name": "get_weather", "arguments": LONG}])
    out = streamed(ForcedCalls(TOOLS, None), [output[i:i + 16] for i in range(0, len(output), 16)])
    assert [(n, json.loads(a)) for n, a in assembled(out.deltas)] == [("get_weather", LONG)]
    assert len([d for d in out.deltas if d.arguments]) > 10
    named = streamed(ForcedCalls(TOOLS, "get_weather"), list(json.dumps(LONG)))
    assert assembled(named.deltas) == [("get_weather", json.dumps(LONG, ensure_ascii=False))]
    cut = json.dumps(LONG)[:40]  # max tokens ended the arguments: the call keeps them so far
    broken = streamed(ForcedCalls(TOOLS, "get_weather"), [cut])
    assert assembled(broken.deltas) == [(c.name, c.arguments) for c in broken.calls] == [("get_weather", cut)]


CODE = {"code": "for i in range(3):\n\tprint(\"\u00e9\", i)  # \U0001f600\n" * 60, "flags": [1, -2.5e3, True, None]}


def test_streaming_reads_each_character_a_bounded_number_of_times(parsers, monkeypatch):
    """Fed one character at a time, a call whose arguments run to thousands of characters costs
    time linear in its length: the JSON readers are given each character once, plus what an
    escape or literal cut short holds back (read again, whole, with the next piece); not the call
    so far on every piece. Counted, not timed: every parser, and the forced-choice reader."""
    examined: list[int] = []
    read = JsonReader._read

    def counted(reader: JsonReader, text: str):
        examined.append(len(text))
        return read(reader, text)

    monkeypatch.setattr(JsonReader, "_read", counted)
    arguments = json.dumps(CODE)  # escapes and non-ASCII as \u escapes: the worst case for held-back text
    outputs = {name: (lambda cls=parsers[name]: cls(TOOLS), LONG_CALLS[name] % arguments) for name in LONG_CALLS}
    outputs["forced named"] = (lambda: ForcedCalls(TOOLS, "get_weather"), arguments)
    outputs["forced list"] = (lambda: ForcedCalls(TOOLS, None), '[{"name": "get_weather", "arguments": %s}]' % arguments)
    for name, (build, output) in outputs.items():
        parser, deltas = build(), []
        examined.clear()
        for char in output:
            deltas += parser.feed(char).deltas
        deltas += parser.finish().deltas
        ((call_name, streamed_arguments),) = assembled(deltas)
        assert (call_name, json.loads(streamed_arguments)) == ("get_weather", CODE), name
        assert len(deltas) > len(arguments) // 2, name  # the arguments came in pieces, as written
        assert sum(examined) < 4 * len(output), (name, sum(examined), len(output))


class FunctionTagParser(ToolParser):
    """A parser as a third-party plugin writes one, with the core alone: the whole output is one
    ``<function=NAME>{...}</function>`` call, its arguments streamed as written."""

    def __init__(self, tools: list[dict]):
        super().__init__(tools)
        self.stream, self.arguments = CallStream(self.tools), ArgumentsReader()
        self.output, self.name = "", None

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        self.output += text  # short outputs only: the reader, not this, keeps long ones linear
        if self.name is None and ">" in self.output:
            self.name, _, text = self.output.removeprefix("<function=").partition(">")
        if self.name is not None:
            self.stream.update(out, [CallDelta(0, self.name, self.arguments.feed(text))])
        return out

    def finish(self) -> Parsed:
        out = Parsed()
        arguments = self.output.partition(">")[2].removesuffix("</function>")
        call = self.call(self.name, arguments) if self.output.startswith("<function=") else None
        return out if self.stream.complete(out, [call] if call else None) else Parsed(self.output)


def test_a_parser_built_on_the_core_alone_streams_calls():
    output = '<function=get_weather>{"city":"a;b</function>}{",\n"unit":"\\u00b0C"}</function>'
    for cut in range(1, len(output)):
        out = streamed(FunctionTagParser(TOOLS), [output[:cut], output[cut:]])
        assert normalised(out) == ("", [("get_weather", {"city": "a;b</function>}{", "unit": "\u00b0C"})]), cut
    pieces = streamed(FunctionTagParser(TOOLS), list(output)).deltas
    assert [d.arguments for d in pieces][:4] == ["", '{"', "c", "i"]  # the arguments come as written
    assert normalised(FunctionTagParser(TOOLS).parse("no call")) == ("no call", [])


def test_partial_tag_is_held_back(parsers):
    parser = parsers["hermes"](TOOLS)
    assert parser.feed("Hi <tool_").content == "Hi"  # the space may precede a call, the rest may be its tag
    assert parser.feed("call>\n{").content == ""
    tail = parser.feed('"name": "get_time", "arguments": {}}\n</tool_call>')
    assert tail.content == "" and [(c.name, c.arguments) for c in tail.calls] == [("get_time", "{}")]


# ---- reasoning, and both together ---------------------------------------------------------------

R1_OUTPUT = "The user wants Paris.\n</think>\n\nIt is sunny."
QWEN3_OUTPUT = "<think>\nCall the tool.\n</think>\n\nSure.<tool_call>\n" \
               '{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call>'


def split(parser_factory, output: str, cuts: list[int]) -> tuple[str, str, list]:
    parser, pieces = parser_factory(), [output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)])]
    total = MessagePiece()
    for piece in pieces:
        total += parser.feed(piece)
    total += parser.finish()
    assert assembled(total.deltas) == [(c.name, c.arguments) for c in total.calls]
    return total.reasoning, total.content, [(c.name, json.loads(c.arguments)) for c in total.calls]


@pytest.mark.parametrize("fmt, tools, output, expected", [
    ("deepseek-r1", None, R1_OUTPUT, ("The user wants Paris.\n", "It is sunny.", [])),
    ("deepseek-r1", None, "<think>\nStill thinking", ("\nStill thinking", "", [])),  # cut by max tokens
    ("qwen3", None, "No thinking </think> here.", ("", "No thinking </think> here.", [])),
    ("qwen3", "hermes", QWEN3_OUTPUT, ("\nCall the tool.\n", "Sure.", [TOKYO])),
])
def test_reasoning_then_calls_at_every_cut(parsers, fmt, tools, output, expected):
    reasoning = reasoning_format(fmt)
    factory = lambda: MessageParser(reasoning, parsers[tools](TOOLS) if tools else None, None)  # noqa: E731
    assert split(factory, output, []) == expected
    assert split(factory, output, list(range(1, len(output)))) == expected
    for cut in range(1, len(output)):
        assert split(factory, output, [cut]) == expected, cut


def test_one_call_when_parallel_calls_are_off(parsers):
    output = CASES["hermes two calls with text"][1]
    factory = lambda: MessageParser(None, parsers["hermes"](TOOLS), 1)  # noqa: E731
    assert split(factory, output, list(range(1, len(output)))) == ("", "Let me check.", [PARIS])


def test_reasoning_formats():
    assert reasoning_format("deepseek-r1").output_reasons("<|Assistant|><think>\n")
    qwen3 = reasoning_format("qwen3")
    assert qwen3.output_reasons("<|im_start|>assistant\n")
    assert not qwen3.output_reasons("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking switched off


def test_forced_output_becomes_calls():
    named, required = ForcedCalls(TOOLS, "get_time"), ForcedCalls(TOOLS, None)
    assert normalised(named.parse('{"zone": "UTC"}')) == ("", [("get_time", {"zone": "UTC"})])
    assert normalised(required.parse('[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},'
                                     ' {"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}]')) == \
        ("", [PARIS, TOKYO])
    cut = '[{"name": "get_time", "argu'  # max tokens ended it: no call, the text is content
    assert normalised(ForcedCalls(TOOLS, None).parse(cut)) == (cut, [])


class Context:
    """The part of ServerContext that ToolCalling reads before the engine is up."""

    def __init__(self, **settings):
        from sglang_core.server.settings import ServerSettings

        self.settings = ServerSettings(model_path="unused", **settings)


@pytest.mark.parametrize("settings, message", [
    ({"tool_call_parser": "hermes2"}, "tool_call_parser: unknown parser 'hermes2'; registered: deepseek_v3, generic"),
    ({"reasoning_parser": "o1"}, "reasoning_parser: unknown parser 'o1'"),
])
def test_unknown_parser_names_fail_at_mount(settings, message):
    with pytest.raises(ValueError) as err:
        ToolCalling(Context(**settings), None)
    assert str(err.value).startswith(message)


def test_tool_call_parser_setting_wins_over_the_template():
    assert ToolCalling(Context(tool_call_parser="mistral"), "<tool_call>").parser.__name__ == "MistralParser"


@pytest.mark.parametrize("template, parser", [
    ("{% for m in messages %}<tool_call>{{ m.content }}</tool_call>{% endfor %}", "hermes"),
    ("{{ '[TOOL_CALLS]' }}", "mistral"),
    ("{{'<｜tool▁calls▁begin｜>'}}", "deepseek_v3"),
    ("{{- '<|python_tag|>' -}}", "llama3"),
    ("{{ messages[0].content }}", "generic"),
])
def test_default_parser_is_chosen_from_the_chat_template(template, parser):
    chosen = ToolCalling(Context(), template).parser
    assert chosen is PluginManager().registry("tool_parsers").get(parser).load()


def test_anthropic_stream_keeps_each_piece_in_its_block(parsers):
    """Streamed one character at a time, and in pieces that each end a call and go on with text:
    every delta goes to the block that is open, and the blocks put together are the message."""
    output = CASES["hermes two calls with text"][1].replace("</tool_call>\n<tool_call>", "</tool_call>\nThen:\n"
                                                            "<tool_call>") + "\nDone."
    cuts = [output.index("celsius"), output.index("Then:") + 6, output.index("Asia"), len(output)]
    assert anthropic_blocks(parsers, list(output)) == anthropic_blocks(
        parsers, [output[a:b] for a, b in zip([0, *cuts], cuts)]) == [
        ("text", None, "Let me check."), ("tool_use", *PARIS), ("text", None, "Then:"), ("tool_use", *TOKYO),
        ("text", None, "Done.")]


def anthropic_blocks(parsers, pieces: list[str]) -> list[tuple]:
    """The hermes output in ``pieces`` through Anthropic's streamed blocks: (type, name, text or
    input) per block, checking that each delta goes to the open block."""
    from sglang_plugins.frontends.anthropic.routes import Blocks

    blocks, events = Blocks(MessageParser(None, parsers["hermes"](TOOLS), None)), []
    for i, piece in enumerate(pieces):
        events += blocks.feed(piece, final=i == len(pieces) - 1)
    built, open_index = [], None
    for event in events:
        if event["type"] == "content_block_start":
            assert open_index is None and event["index"] == len(built)
            open_index = event["index"]
            block = event["content_block"]
            built.append([block["type"], block.get("name"), ""])
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_index
            delta = event["delta"]
            built[open_index][2] += delta.get("text", delta.get("partial_json", ""))
        else:
            assert event == {"type": "content_block_stop", "index": open_index}
            open_index = None
    assert open_index is None
    return [(kind, name, json.loads(text) if kind == "tool_use" else text) for kind, name, text in built]
