"""Tool calling and reasoning output on the OpenAI and Anthropic APIs, driven by the official
clients against one real server of the default model (SmolLM2-135M-Instruct) with a chat template
that renders tools (tests/tool_chat_template.jinja, Hermes-style, so the server picks the hermes
parser itself) and ``--reasoning-parser qwen3``.

The small model does not call tools by itself, so: forced choices (OpenAI ``required`` / a named
function, Anthropic ``any`` / ``tool``) must give arguments that validate against the tool's
schema (``jsonschema``) at temperature 0 and 1; ``auto`` is proven with the model's output held
to a call's text by a regex (the parsers' own tests cover each family); streamed deltas must
reassemble to the non-streamed calls; a conversation with calls and results must render exactly as
the tokenizer's own ``apply_chat_template(tools=...)`` renders it (prompt tokens, and greedy text
equal to a completion of the reference prompt ids). Reasoning is shown with the output held by a
regex to a think block and an answer; a constraint that waits for the end of the reasoning
(``constraint_after_ids``) must leave the tokens before it as the unconstrained greedy ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

import anthropic
import jsonschema
import openai
import pytest

TEMPLATE = Path(__file__).with_name("tool_chat_template.jinja")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 16}, "dst": {"type": "boolean"}},
        "required": ["zone", "dst"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} somewhere", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time in Tokyo?"}]
# A call's text in the template's (Hermes) format: what auto mode must find in the output.
CALL_REGEX = r'Sure\.\n<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "[A-Za-z]{1,8}", "dst": true\}\}\n</tool_call>'
MAX = 64


@pytest.fixture(scope="module")
def server(tool_server):
    return tool_server  # shared with the constrained-output HTTP tests (tests/conftest.py)


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def reference_prompt(hf_tokenizer):
    """A conversation through the tokenizer's own apply_chat_template with the tools (and any
    further template variables): token ids."""
    def render(messages: list[dict], tools: list[dict] | None = TOOLS, **variables) -> list[int]:
        text = hf_tokenizer.apply_chat_template(messages, tools=tools, chat_template=TEMPLATE.read_text(),
                                                tokenize=False, add_generation_prompt=True, **variables)
        return hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    return render


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


def streamed_calls(stream, pieces: list[int] | None = None) -> tuple[list[tuple[str, dict]], str, str]:
    """Reassemble streamed tool_calls deltas (checking OpenAI's shape); also the content and the
    finish reason. ``pieces`` gets the number of argument deltas of each call."""
    calls: dict[int, dict] = {}
    pieces = [] if pieces is None else pieces
    content, finish = "", None
    for chunk in stream:
        (choice,) = chunk.choices
        finish = choice.finish_reason or finish
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or ():
            if delta.index not in calls:  # the first delta: id, type and name, empty arguments
                assert delta.id.startswith("call_") and delta.type == "function"
                assert delta.function.name and delta.function.arguments == ""
                calls[delta.index] = {"name": delta.function.name, "arguments": ""}
                pieces.append(0)
            else:
                assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments
                pieces[delta.index] += 1
    assert sorted(calls) == list(range(len(calls)))
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], content, finish


# ---- OpenAI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0, 1])
def test_openai_forced_choices_validate(oai, temperature):
    named = oai.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=MAX, n=3, seed=7,
                                        tool_choice={"type": "function", "function": {"name": "get_time"}},
                                        temperature=temperature)
    required = oai.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=MAX, n=3, seed=7,
                                           tool_choice="required", parallel_tool_calls=False,
                                           temperature=temperature)
    for resp, names in ((named, {"get_time"}), (required, set(SCHEMAS))):
        for choice in resp.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            ((name, arguments),) = calls_of(choice.message)  # named and non-parallel: exactly one call
            assert name in names
            jsonschema.validate(arguments, SCHEMAS[name])
            assert choice.message.tool_calls[0].id.startswith("call_")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_openai_streamed_calls_reassemble(oai, choice):
    kwargs = {"model": "m", "messages": ASK, "tools": TOOLS, "tool_choice": choice, "max_tokens": MAX,
              "temperature": 0}
    whole = oai.chat.completions.create(**kwargs).choices[0]
    pieces: list[int] = []
    calls, content, finish = streamed_calls(oai.chat.completions.create(**kwargs, stream=True), pieces)
    assert calls == calls_of(whole.message) and calls and finish == whole.finish_reason == "tool_calls"
    assert content == ""
    assert all(count > 3 for count in pieces), pieces  # the arguments stream as the model writes them
    texts = [c.function.arguments for c in whole.message.tool_calls]  # and join into the very same text
    assert [json.dumps(arguments, ensure_ascii=False) for _, arguments in calls] == texts


def test_openai_auto_finds_calls_in_text(oai):
    kwargs = {"model": "m", "messages": ASK, "tools": TOOLS, "max_tokens": MAX, "temperature": 0,
              "extra_body": {"regex": CALL_REGEX}}  # tool_choice left out: auto, OpenAI's default with tools
    whole = oai.chat.completions.create(**kwargs).choices[0]
    ((name, arguments),) = calls_of(whole.message)
    assert name == "get_time" and arguments["dst"] is True and whole.message.content == "Sure."
    assert whole.finish_reason == "tool_calls"
    calls, content, finish = streamed_calls(oai.chat.completions.create(**kwargs, stream=True))
    assert (calls, content, finish) == ([(name, arguments)], "Sure.", "tool_calls")  # no tag leaked as content
    # tool_choice none: the same output is text.
    plain = oai.chat.completions.create(**kwargs, tool_choice="none").choices[0]
    assert plain.message.tool_calls is None and plain.message.content.startswith("Sure.\n<tool_call>")


TOKYO = {"zone": "Asia/Tokyo", "dst": False}
# The conversation after a call and its result, as chat templates take it (arguments an object).
ROUND_TRIP = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
                  {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": TOKYO}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": "09:41"}]


def test_openai_tool_results_round_trip(oai, hf_tokenizer, reference_prompt):
    messages = [*ROUND_TRIP[:1], {**ROUND_TRIP[1], "tool_calls": [{**ROUND_TRIP[1]["tool_calls"][0], "function": {
        "name": "get_time", "arguments": json.dumps(TOKYO)}}]}, ROUND_TRIP[2]]  # OpenAI sends arguments as text
    resp = oai.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=8, temperature=0)
    ids = reference_prompt(ROUND_TRIP)
    text = hf_tokenizer.decode(ids)
    assert '"zone": "Asia/Tokyo"' in text and "09:41" in text and '"get_weather"' in text  # all rendered
    assert resp.usage.prompt_tokens == len(ids)
    completion = oai.completions.create(model="m", prompt=ids, max_tokens=8, temperature=0)
    assert resp.choices[0].message.content == completion.choices[0].text


@pytest.mark.parametrize("kwargs, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools.2.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}},
     "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{bad"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"messages": [*ASK, {"role": "tool", "content": "09:41"}]}, "messages.1.tool_call_id"),
    ({"extra_body": {"chat_template_kwargs": "enable_thinking"}}, "chat_template_kwargs"),
    ({"extra_body": {"chat_template_kwargs": {"add_generation_prompt": False}}}, "chat_template_kwargs"),
    ({"extra_body": {"chat_template_kwargs": {"messages": []}}}, "chat_template_kwargs"),
    ({"extra_body": {"chat_template_kwargs": {"tools": []}}}, "chat_template_kwargs"),
])
def test_openai_bad_tools_are_400(oai, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(**{"model": "m", "messages": ASK, "max_tokens": 4, **kwargs})
    assert err.value.param == param and err.value.body["type"] == "invalid_request_error"
    assert err.value.body["message"].startswith(param)


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_openai_chat_template_kwargs(oai, reference_prompt, enable_thinking):
    """The variables reach the template: the prompt is the tokenizer's own rendering with them
    (tokens, and greedy text equal to a completion of the reference ids). With thinking switched
    off the output has no reasoning to split, and a constraint holds from its first token."""
    ids = reference_prompt(ASK, tools=None, enable_thinking=enable_thinking)
    assert ids != reference_prompt(ASK, tools=None, enable_thinking=not enable_thinking)
    variables = {"chat_template_kwargs": {"enable_thinking": enable_thinking}}
    resp = oai.chat.completions.create(model="m", messages=ASK, max_tokens=8, temperature=0, extra_body=variables)
    completion = oai.completions.create(model="m", prompt=ids, max_tokens=8, temperature=0)
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.choices[0].message.content == completion.choices[0].text
    if not enable_thinking:
        held = oai.chat.completions.create(model="m", messages=ASK, max_tokens=MAX, temperature=0, extra_body={
            **variables, "json_schema": TIME}).choices[0].message
        jsonschema.validate(json.loads(held.content), TIME)
        assert (held.model_extra or {}).get("reasoning_content") is None


# ---- Anthropic ------------------------------------------------------------------------------

CLAUDE_TOOLS = [{"name": name, "description": f"{name} somewhere", "input_schema": schema}
                for name, schema in SCHEMAS.items()]


def uses(message) -> list[tuple[str, dict]]:
    return [(b.name, b.input) for b in message.content if b.type == "tool_use"]


@pytest.mark.parametrize("temperature", [0, 1])
def test_anthropic_forced_choices_validate(claude, temperature):
    for choice, names in (({"type": "tool", "name": "get_weather"}, {"get_weather"}),
                          ({"type": "any", "disable_parallel_tool_use": True}, set(SCHEMAS))):
        for seed in range(2):
            msg = claude.messages.create(model="m", max_tokens=MAX, messages=ASK, tools=CLAUDE_TOOLS,
                                         tool_choice=choice, extra_body={"temperature": temperature, "seed": seed})
            assert msg.stop_reason == "tool_use"
            ((name, arguments),) = uses(msg)
            assert name in names and msg.content[-1].id.startswith("toolu_")
            jsonschema.validate(arguments, SCHEMAS[name])


def test_anthropic_streamed_tool_use_reassembles(claude, server):
    body = {"model": "m", "max_tokens": MAX, "messages": ASK, "tools": CLAUDE_TOOLS,
            "tool_choice": {"type": "any"}, "temperature": 0}
    whole = claude.messages.create(**{k: v for k, v in body.items() if k != "temperature"},
                                   extra_body={"temperature": 0})
    with claude.messages.stream(**{k: v for k, v in body.items() if k != "temperature"},
                                extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    assert uses(final) == uses(whole) and uses(whole) and final.stop_reason == whole.stop_reason == "tool_use"
    # On the wire: each tool_use block opens with an empty input, its input comes in input_json_delta.
    with httpx.stream("POST", server.url + "/v1/messages", json={**body, "stream": True}, timeout=120) as resp:
        events = [json.loads(line[len("data: "):]) for line in resp.iter_lines() if line.startswith("data: ")]
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert starts and all(e["content_block"]["type"] == "tool_use" and e["content_block"]["input"] == {}
                          for e in starts)
    for start in starts:
        parts = [e["delta"] for e in events if e["type"] == "content_block_delta" and e["index"] == start["index"]]
        assert len(parts) > 3 and all(p["type"] == "input_json_delta" for p in parts)  # written as generated
        assert json.loads("".join(p["partial_json"] for p in parts)) == uses(whole)[start["index"]][1]
    assert [e["type"] for e in events].count("content_block_stop") == len(starts)


def test_anthropic_auto_finds_calls_in_text(claude):
    kwargs = {"model": "m", "max_tokens": MAX, "messages": ASK, "tools": CLAUDE_TOOLS,
              "extra_body": {"temperature": 0, "regex": CALL_REGEX}}
    msg = claude.messages.create(**kwargs)
    assert [b.type for b in msg.content] == ["text", "tool_use"] and msg.content[0].text == "Sure."
    assert uses(msg)[0][0] == "get_time" and msg.stop_reason == "tool_use"
    with claude.messages.stream(**kwargs) as stream:
        assert "".join(stream.text_stream) == "Sure."  # no tag leaked as text
        assert uses(stream.get_final_message()) == uses(msg)


def test_anthropic_tool_results_round_trip(claude, reference_prompt):
    messages = [*ASK, {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "get_time", "input": TOKYO}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "09:41"}]}]
    ids = reference_prompt(ROUND_TRIP)
    counted = claude.messages.count_tokens(model="m", messages=messages, tools=CLAUDE_TOOLS)
    msg = claude.messages.create(model="m", max_tokens=8, messages=messages, tools=CLAUDE_TOOLS,
                                 tool_choice={"type": "none"}, extra_body={"temperature": 0})
    assert counted.input_tokens == msg.usage.input_tokens == len(ids)
    completion = openai.OpenAI(base_url=str(claude.base_url).rstrip("/") + "/v1", api_key="x").completions.create(
        model="m", prompt=ids, max_tokens=8, temperature=0)
    assert msg.content[0].text == completion.choices[0].text


@pytest.mark.parametrize("body, message", [
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema: Field required"),
    ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "tools.0.input_schema.type: must be 'object'"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search", "input_schema": {"type": "object"}}]},
     "tools.0.type: 'web_search_20250305' is a tool Anthropic's servers run"),
    ({"tools": CLAUDE_TOOLS, "tool_choice": {"type": "tool", "name": "launch"}},
     "tool_choice.name: no tool named 'launch'"),
    ({"tools": CLAUDE_TOOLS, "tool_choice": {"type": "sometimes"}}, "tool_choice.type: "),
    ({"tool_choice": {"type": "any"}}, "tool_choice.type: 'any' needs tools"),
    ({"messages": [*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": "x", "name": "get_time"}]},
                   {"role": "user", "content": "ok"}]}, "messages.1.content.0.input: Field required"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "09:41"}]}]},
     "messages.0.content.0.tool_use_id: Field required"),
    ({"messages": [*ASK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "x", "name": "get_time", "input": {}}]}]},
     "messages.1: a final assistant message cannot hold tool_use"),
])
def test_anthropic_bad_tools_are_400(claude, body, message):
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.post("/v1/messages", body={"model": "m", "max_tokens": 4, "messages": ASK, **body}, cast_to=object)
    error = err.value.body
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(message), error


# ---- reasoning ------------------------------------------------------------------------------

THINK_REGEX = r"<think>\n[a-z]{2,8}( [a-z]{2,8}){1,3}\.\n</think>\n\n[A-Z][a-z]{2,8}\."
REASONING, ANSWER = r"\n[a-z]{2,8}( [a-z]{2,8}){1,3}\.\n", r"[A-Z][a-z]{2,8}\."  # the parts a parser returns


def test_openai_reasoning_content(oai):
    kwargs = {"model": "m", "messages": ASK, "max_tokens": MAX, "temperature": 0,
              "extra_body": {"regex": THINK_REGEX}}
    message = oai.chat.completions.create(**kwargs).choices[0].message
    assert re.fullmatch(REASONING, message.reasoning_content) and re.fullmatch(ANSWER, message.content)
    streamed = {"reasoning_content": "", "content": ""}
    for chunk in oai.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        streamed["content"] += delta.content or ""
        streamed["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
    assert streamed == {"reasoning_content": message.reasoning_content, "content": message.content}


def test_anthropic_thinking_blocks(claude):
    kwargs = {"model": "m", "max_tokens": MAX, "messages": ASK, "extra_body": {"temperature": 0, "regex": THINK_REGEX}}
    msg = claude.messages.create(**kwargs)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert re.fullmatch(REASONING, msg.content[0].thinking) and re.fullmatch(ANSWER, msg.content[1].text)
    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == \
        [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in msg.content]


def test_anthropic_thinking_switches_the_template(claude, reference_prompt):
    """``thinking`` is the template's ``enable_thinking``; left out, the template's default."""
    for thinking, variables in (({"type": "enabled", "budget_tokens": 1024}, {"enable_thinking": True}),
                                ({"type": "disabled"}, {"enable_thinking": False}), (None, {})):
        extra = {"thinking": thinking} if thinking else {}
        counted = claude.messages.count_tokens(model="m", messages=ASK, **extra)
        assert counted.input_tokens == len(reference_prompt(ASK, tools=None, **variables)), thinking
    with pytest.raises(anthropic.BadRequestError, match="thinking.type: must be 'enabled' or 'disabled'"):
        claude.messages.count_tokens(model="m", messages=ASK, thinking={"type": "sometimes"})


def test_constraint_waits_for_the_end_of_reasoning(server, reference_prompt):
    """``constraint_after_ids``: the tokens up to and including the trigger are the unconstrained
    greedy ones; what follows matches the constraint."""
    ids = reference_prompt(ASK)

    def generate(**params) -> dict:
        body = {"input_ids": ids, "sampling_params": {"temperature": 0, **params}, "return_logprob": True,
                "return_text_in_logprobs": True}
        return httpx.post(server.url + "/generate", json=body, timeout=120).json()

    free = generate(max_new_tokens=4)
    greedy = [token for _, token, _ in free["meta_info"]["output_token_logprobs"]]
    held = generate(max_new_tokens=12, regex="[0-9]{3}", constraint_after_ids=greedy[1:3])
    out = [token for _, token, _ in held["meta_info"]["output_token_logprobs"]]
    assert out[:3] == greedy[:3]
    texts = [text for _, _, text in held["meta_info"]["output_token_logprobs"]]
    assert re.fullmatch("[0-9]{3}", "".join(texts[3:]))
