"""The hosted-API backends of the frontend language (OpenAI, LiteLLM, Vertex AI).

OpenAI and LiteLLM run against a real ``sglang-core serve`` (the embedded default model) through
its OpenAI-compatible ``/v1``; ``select`` on the completion path is checked against Hugging Face
transformers' logprobs on the same weights. Vertex AI cannot be reached from here: its requests
are built with the ``google-genai`` SDK's own types and checked, and sent through the SDK to an
``httpx.MockTransport`` that records the wire request and answers with a fixed Gemini response.
"""

from __future__ import annotations

import base64
import json
import re
import sys

import httpx
import jsonschema
import pytest
import torch

from sglang_core.lang.backend import GenParams, Image, MissingExtraError, Prompt, UnsupportedError
from sglang_core.plugins import PluginManager
from sglang_plugins.backends.api_common import openai_messages
from sglang_plugins.backends.litellm.backend import LiteLLMBackend
from sglang_plugins.backends.openai.backend import OpenAIBackend, is_chat_model_name
from sglang_plugins.backends.vertexai.backend import VertexAIBackend

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
CHAT = Prompt(text=f"{QUESTION}\n", messages=({"role": "user", "content": QUESTION},
                                              {"role": "assistant", "content": ""}), open_role="assistant")
TEXT = Prompt(text="The capital of France is")
GREEDY = GenParams(max_tokens=12, temperature=0.0)
PHONE = r"[0-9]{3}-[0-9]{4}"
SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 12}, "is_capital": {"type": "boolean"}},
          "required": ["city", "is_capital"], "additionalProperties": False}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(16))


@pytest.fixture(scope="module")
def server(lang_server):
    return lang_server  # the default model's session-wide server (conftest.py)


def make_backend(kind: str, url: str, **kwargs):
    if kind == "openai_chat":
        return OpenAIBackend(MODEL, base_url=url + "/v1", max_retries=0, **kwargs)
    if kind == "openai_completion":
        return OpenAIBackend(MODEL, base_url=url + "/v1", is_chat_model=False, max_retries=0, **kwargs)
    return LiteLLMBackend(f"openai/{MODEL}", api_base=url + "/v1", api_key="x",
                          sglang_extensions=kwargs.pop("sglang_extensions", True), **kwargs)


@pytest.fixture(scope="module", params=["openai_chat", "openai_completion", "litellm"])
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def backend(kind, server):
    backend = make_backend(kind, server.url)
    yield backend
    backend.shutdown()


def prompt_for(kind: str) -> Prompt:
    return TEXT if kind == "openai_completion" else CHAT


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), dim=-1)


# ---- registration -------------------------------------------------------------------------------

def test_backends_registered_and_built_by_name(server):
    registry = PluginManager().registry("api_backends")
    assert {"openai", "litellm", "vertexai"} <= set(registry.names())
    backend = registry.get("openai").load()(MODEL, base_url=server.url + "/v1")
    assert isinstance(backend, OpenAIBackend) and backend.is_chat_model and backend.sglang_extensions


def test_chat_model_detection():
    assert is_chat_model_name("gpt-4o") and is_chat_model_name(MODEL) and is_chat_model_name("o3-mini")
    for name in ("gpt-3.5-turbo-instruct", "davinci-002", "babbage-002", "text-davinci-003"):
        assert not is_chat_model_name(name)
    assert not OpenAIBackend("gpt-3.5-turbo-instruct", api_key="x").supports_images
    assert not OpenAIBackend("gpt-4o", api_key="x").sglang_extensions


# ---- generation against the real server -----------------------------------------------------------

def test_generate_and_stream_agree(kind, backend):
    whole = backend.generate(prompt_for(kind), GREEDY)
    assert whole.text and whole.meta_info["completion_tokens"] <= 12
    assert whole.meta_info["prompt_tokens"] > 0 and whole.meta_info["finish_reason"]["type"] in ("stop", "length")
    *pieces, final = list(backend.generate_stream(prompt_for(kind), GREEDY))
    assert len(pieces) >= 2 and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == final.text == whole.text
    assert final.meta_info["completion_tokens"] == whole.meta_info["completion_tokens"]


def test_stop_and_max_tokens(kind, backend):
    full = backend.generate(prompt_for(kind), GREEDY).text
    word = full.split()[2]  # a word the unstopped output reaches
    stopped = backend.generate(prompt_for(kind), GenParams(max_tokens=12, temperature=0.0, stop=(word,)))
    assert stopped.text == full[:full.index(word)] and stopped.meta_info["finish_reason"] == {"type": "stop"}
    short = backend.generate(prompt_for(kind), GenParams(max_tokens=3, temperature=0.0))
    assert short.meta_info["completion_tokens"] == 3 and short.meta_info["finish_reason"] == {"type": "length"}
    assert full.startswith(short.text)


def test_regex_and_json_schema(kind, backend):
    out = backend.generate(prompt_for(kind), GenParams(max_tokens=16, temperature=0.0, regex=PHONE))
    assert re.fullmatch(PHONE, out.text)
    out = backend.generate(prompt_for(kind), GenParams(max_tokens=60, temperature=0.0, json_schema=json.dumps(SCHEMA)))
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_top_k_and_logprobs_reach_the_server(kind, backend):
    greedy = backend.generate(prompt_for(kind), GenParams(max_tokens=6, temperature=0.0))
    # top_k=1 leaves only the most likely token, so sampling at temperature 1 is greedy.
    top1 = backend.generate(prompt_for(kind), GenParams(max_tokens=6, temperature=1.0, top_k=1, return_logprob=True,
                                                        top_logprobs_num=2))
    assert top1.text == greedy.text
    logprobs = top1.meta_info["output_token_logprobs"]
    assert len(logprobs) == top1.meta_info["completion_tokens"] == len(top1.meta_info["output_top_logprobs"])
    assert "".join(token for _, _, token in logprobs) == top1.text
    for (lp, _, token), top in zip(logprobs, top1.meta_info["output_top_logprobs"]):
        assert lp <= 0 and top[0] == (lp, None, token)  # greedy: each token is its position's best


def test_extensions_refused_unless_enabled(kind, server):
    backend = make_backend(kind, server.url, sglang_extensions=False)
    with pytest.raises(UnsupportedError, match="^top_k: "):
        backend.generate(prompt_for(kind), GenParams(top_k=3))
    with pytest.raises(UnsupportedError, match="^regex: "):
        backend.generate(prompt_for(kind), GenParams(regex="a+"))


# ---- select ----------------------------------------------------------------------------------------

SELECT_CASES = [
    ("The capital of France is", [" Paris", " London", " a small village in Peru"]),
    ("My favourite colour is", [" blue", " the colour of the sky at noon", " red"]),
]


def hf_choice_logprobs(hf_model, hf_tokenizer, prompt: str, choice: str) -> tuple[list[float], list[float]]:
    """Each choice token's logprob after the prompt, and the same tokens' logprobs alone (the
    first of them has none and counts 0)."""
    prompt_ids, ids = hf_tokenizer(prompt)["input_ids"], hf_tokenizer(prompt + choice)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
    start = max(1, min(start, len(ids) - 1))
    joint = hf_logprobs(hf_model, ids)
    alone = hf_logprobs(hf_model, ids[start:])
    conditional = [float(joint[p - 1, ids[p]]) for p in range(start, len(ids))]
    unconditional = [0.0] + [float(alone[p - 1, ids[start + p]]) for p in range(1, len(ids) - start)]
    return conditional, unconditional


@pytest.mark.parametrize("prompt, choices", SELECT_CASES)
@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection",
                                    "unconditional_likelihood_normalized"])
def test_completion_select_matches_hf(server, hf_model, hf_tokenizer, prompt, choices, method):
    backend = make_backend("openai_completion", server.url)
    reference = [hf_choice_logprobs(hf_model, hf_tokenizer, prompt, c) for c in choices]
    if method == "token_length_normalized":
        key = [sum(cond) / len(cond) for cond, _ in reference]
    elif method == "greedy_token_selection":
        key = [cond for cond, _ in reference]  # first token, ties by the next (no ties in these cases)
    else:
        key = [sum(c - u for c, u in zip(cond, uncond)) / len(cond) for cond, uncond in reference]
    best = max(range(len(choices)), key=key.__getitem__)
    result = backend.select(Prompt(text=prompt), choices, 0.0, method)
    assert (result.index, result.choice) == (best, choices[best])
    for got, (want, _) in zip(result.meta_info["token_logprobs"], reference):
        assert got == pytest.approx(want, abs=2e-3)
    if method == "unconditional_likelihood_normalized":
        for got, (_, want) in zip(result.meta_info["unconditional_logprobs"], reference):
            assert [0.0 if g is None else g for g in got] == pytest.approx(want, abs=2e-3)


@pytest.mark.parametrize("kind_", ["openai_chat", "litellm"])
def test_chat_select_by_regex_matches_hf(server, hf_model, hf_tokenizer, kind_):
    choices = ["London", "Paris", "Berlin"]  # distinct first characters: the first token decides
    backend = make_backend(kind_, server.url)
    result = backend.select(CHAT, choices, 0.0)
    # Greedy under the constraint: the best token that starts some choice picks that choice.
    text = hf_tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    last = hf_logprobs(hf_model, hf_tokenizer(text, add_special_tokens=False)["input_ids"])[-1]
    pieces = hf_tokenizer.batch_decode([[i] for i in range(len(hf_tokenizer))])
    allowed = [i for i, p in enumerate(pieces) if p and any(c.startswith(p) for c in choices)]
    best = pieces[max(allowed, key=lambda i: float(last[i]))]
    assert result.choice == next(c for c in choices if c.startswith(best))
    assert result.scores == [float(c == result.choice) for c in choices]


def test_chat_select_by_json_schema(server):
    choices = ["London", "Paris", "Berlin"]
    result = make_backend("openai_chat", server.url, sglang_extensions=False).select(CHAT, choices, 0.0)
    assert result.choice in choices and result.meta_info["strategy"] == "constrained generation (json_schema)"


TOOLS = [{"type": "function", "function": {"name": "locate", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "count", "parameters": {
             "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
             "required": ["n"], "additionalProperties": False}}}]


@pytest.mark.parametrize("stream", [False, True])
def test_gen_with_tools_reads_the_calls(server, stream):
    """``gen(tools=...)`` on the OpenAI backend: the calls (forced, so the small model makes them)
    are the program's ``tool_calls``, the same the official client gets for the same request."""
    import openai

    import sglang_core as sgl

    @sgl.function
    def ask(s, choice):
        s += sgl.user(QUESTION)
        s += sgl.assistant(sgl.gen("answer", max_tokens=48, temperature=0.0, tools=TOOLS, tool_choice=choice))

    backend = make_backend("openai_chat", server.url)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    for choice, wire in (("locate", {"type": "function", "function": {"name": "locate"}}), ("required", "required")):
        state = ask.run(choice, backend=backend, stream=stream)
        if stream:
            assert "".join(state.text_iter()) == state.text()
        message = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                                 tools=TOOLS, tool_choice=wire, max_tokens=48,
                                                 temperature=0).choices[0].message
        calls = state.get_meta_info("answer")["tool_calls"]
        assert [(c["id"][:5], c["name"], c["arguments"]) for c in calls] == \
            [("call_", c.function.name, c.function.arguments) for c in message.tool_calls]
        assert state["answer"] == "" and state.get_meta_info("answer")["finish_reason"] == {"type": "tool_calls"}
        if choice == "locate":
            jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMA)
    backend.shutdown()


def test_gen_tools_errors(server):
    import sglang_core as sgl

    with pytest.raises(ValueError, match="^tools: must be a non-empty list"):
        sgl.gen("x", tools=[{"name": "locate"}])
    with pytest.raises(ValueError, match="^tool_choice: must be 'auto', 'none', 'required' or the name"):
        sgl.gen("x", tools=TOOLS, tool_choice="launch")
    with pytest.raises(ValueError, match="^tool_choice: needs tools"):
        sgl.gen("x", tool_choice="auto")

    @sgl.function
    def complete(s):
        s += "The capital of France is" + sgl.gen("x", max_tokens=4, tools=TOOLS)

    completion_model = make_backend("openai_completion", server.url)
    with pytest.raises(UnsupportedError, match="^tools: the openai backend cannot call tools"):
        complete.run(backend=completion_model)
    completion_model.shutdown()


def test_select_errors(server):
    chat, completion = make_backend("openai_chat", server.url), make_backend("openai_completion", server.url)
    with pytest.raises(UnsupportedError, match="^method: "):
        chat.select(CHAT, ["a", "b"], 0.0, "greedy_token_selection")
    with pytest.raises(ValueError, match="^choices: "):
        chat.select(CHAT, [], 0.0)
    with pytest.raises(ValueError, match="^method: "):
        completion.select(TEXT, ["a"], 0.0, "best")
    with pytest.raises(ValueError, match="^prompt: "):
        completion.select(Prompt(text=""), ["a"], 0.0)


# ---- prompts, images and bad input ---------------------------------------------------------------

def test_images_and_roles():
    prompt = Prompt(text="", messages=(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image", "image": Image(PNG, "image/png")}]},
        {"role": "assistant", "content": ""}), images=(Image(PNG, "image/png"),), open_role="assistant")
    image_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}}
    assert openai_messages("openai", prompt) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part]}]
    # A program without roles: its text (and images) as one user turn.
    assert openai_messages("openai", Prompt(text="What is this?", images=prompt.images)) == [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part]}]
    assert openai_messages("openai", Prompt(text="Hi")) == [{"role": "user", "content": "Hi"}]
    with pytest.raises(UnsupportedError, match="^image: "):
        OpenAIBackend("davinci-002", api_key="x").generate(Prompt(text="x", images=prompt.images), GenParams())
    user_open = Prompt(text="", messages=({"role": "user", "content": "Hi"},), open_role="user")
    with pytest.raises(UnsupportedError, match="^role: .*assistant"):
        openai_messages("openai", user_open)
    partial = Prompt(text="", messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well,"}),
                     open_role="assistant")
    with pytest.raises(UnsupportedError, match="^role: .*partly written"):
        openai_messages("openai", partial)


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="^model: "):
        OpenAIBackend("", api_key="x")
    with pytest.raises(ValueError, match="^base_url: "):
        OpenAIBackend(MODEL, base_url="localhost:30000")
    with pytest.raises(ValueError, match="^is_chat_model: "):
        OpenAIBackend(MODEL, api_key="x", is_chat_model="yes")
    with pytest.raises(ValueError, match="^json_schema: "):
        OpenAIBackend(MODEL, api_key="x").generate(CHAT, GenParams(json_schema="{not json"))
    with pytest.raises(ValueError, match="^client: "):
        VertexAIBackend("gemini-2.5-flash", client=object())


@pytest.mark.parametrize("module, build, extra", [
    ("openai", lambda: OpenAIBackend(MODEL, api_key="x"), "openai"),
    ("litellm", lambda: LiteLLMBackend("openai/x"), "litellm"),
    ("google.genai", lambda: VertexAIBackend("gemini-2.5-flash"), "vertexai"),
])
def test_missing_sdk(monkeypatch, module, build, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail as if not installed
    with pytest.raises(MissingExtraError, match=re.escape(f"pip install 'sglang-core[{extra}]'")):
        build()


# ---- Vertex AI: requests through the SDK's types, no network ------------------------------------------

GEMINI_REPLY = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Paris"}]}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 1, "cachedContentTokenCount": 4}}


@pytest.fixture
def vertex():
    """A Vertex backend on a real ``genai.Client`` whose HTTP transport records each request and
    answers ``vertex.reply`` (JSON, or server-sent events for streams)."""
    from google.genai import Client, types
    from google.oauth2.credentials import Credentials

    sent = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path.endswith(":streamGenerateContent"):
            return httpx.Response(200, text="".join(f"data: {json.dumps(r)}\n\n" for r in backend.stream_reply),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=GEMINI_REPLY)

    client = Client(vertexai=True, project="proj", location="us-central1", credentials=Credentials(token="t"),
                    http_options=types.HttpOptions(httpx_client=httpx.Client(transport=httpx.MockTransport(handle))))
    backend = VertexAIBackend("gemini-2.5-flash", client=client)
    backend.sent = sent
    yield backend
    backend.shutdown()


def test_vertex_request_from_sdk_types(vertex):
    from google.genai import types

    prompt = Prompt(text="", messages=(
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "image", "image": Image(PNG, "image/png")},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": ""}), open_role="assistant")
    params = GenParams(max_tokens=20, stop=("\n\n", "END"), temperature=0.3, top_p=0.8, top_k=5,
                       presence_penalty=0.5, json_schema=json.dumps(SCHEMA))
    request = vertex.build_request(prompt, params)
    assert request["model"] == "gemini-2.5-flash"
    assert [c.role for c in request["contents"]] == ["user", "model", "user"]
    assert all(isinstance(c, types.Content) for c in request["contents"])
    image, question = request["contents"][2].parts
    assert (image.inline_data.data, image.inline_data.mime_type, question.text) == (PNG, "image/png", "What is this?")
    config = request["config"]
    assert isinstance(config, types.GenerateContentConfig)
    assert config.system_instruction.parts[0].text == "Be brief."
    assert (config.max_output_tokens, config.stop_sequences, config.temperature, config.top_p, config.top_k,
            config.presence_penalty) == (20, ["\n\n", "END"], 0.3, 0.8, 5, 0.5)
    assert (config.response_mime_type, config.response_json_schema) == ("application/json", SCHEMA)
    for field, value in (("regex", "a+"), ("min_p", 0.1), ("ignore_eos", True), ("stop_token_ids", (2,))):
        with pytest.raises(UnsupportedError, match=f"^{field}: "):
            vertex.build_request(prompt, GenParams(**{field: value}))


def test_vertex_generate_through_sdk_transport(vertex):
    result = vertex.generate(CHAT, GenParams(max_tokens=5, temperature=0.0, stop=("\n",)))
    assert result.text == "Paris"
    assert result.meta_info == {"finish_reason": {"type": "stop"}, "prompt_tokens": 9, "completion_tokens": 1,
                                "cached_tokens": 4}
    (request,) = vertex.sent
    assert request.url.path.endswith("/projects/proj/locations/us-central1/publishers/google/models/"
                                     "gemini-2.5-flash:generateContent")
    body = json.loads(request.content)
    assert body["contents"] == [{"role": "user", "parts": [{"text": QUESTION}]}]
    assert body["generationConfig"] == {"maxOutputTokens": 5, "temperature": 0.0, "stopSequences": ["\n"]}


def test_vertex_stream_and_select(vertex):
    vertex.stream_reply = [{"candidates": [{"content": {"role": "model", "parts": [{"text": "Par"}]}}]},
                           {"candidates": [{"content": {"role": "model", "parts": [{"text": "is"}]},
                                            "finishReason": "MAX_TOKENS"}],
                            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 2}}]
    *pieces, final = list(vertex.generate_stream(CHAT, GenParams(max_tokens=2)))
    assert pieces == ["Par", "is"] and final.text == "Paris"
    assert final.meta_info["finish_reason"] == {"type": "length"}
    result = vertex.select(CHAT, ["London", "Paris"], 0.0)
    assert (result.choice, result.index) == ("Paris", 1)
    config = json.loads(vertex.sent[-1].content)["generationConfig"]
    assert config["responseMimeType"] == "text/x.enum"
    assert config["responseSchema"] == {"type": "STRING", "enum": ["London", "Paris"]}
