"""The frontend language (``import sglang_core as sgl``) on ``RuntimeEndpoint`` against a real server
of the default model. Outputs are checked independently: the chat template by transformers'
own rendering, logprobs by HF transformers, constrained outputs by ``re`` / ``jsonschema``, fork
concurrency by the server's own count of requests in flight."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest

import sglang_core as sgl
from reference import expected_choice, hf_choice_logprobs
from sglang_core.choices import CHOICE_METHODS
from sglang_core.lang.api import INT_REGEX
from sglang_core.lang.backend import GenResult, Image
from sglang_core.lang.media import load_image, load_video_frames
from sglang_core.tokenizer import load_tokenizer

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


@pytest.fixture(scope="module")
def backend(lang_server):
    backend = sgl.RuntimeEndpoint(lang_server.url)
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def tokenizer(default_model_folder):
    return load_tokenizer(default_model_folder)


@sgl.function
def chat(s, question, max_tokens=12):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens))


# ---- backends come from the registry ----------------------------------------------------------

def test_runtime_endpoint_comes_from_the_plugin_registry(backend):
    from sglang_core.plugins import PluginManager

    registration = PluginManager().registry("api_backends").get("runtime_endpoint")
    assert isinstance(backend, registration.load())
    assert registration.plugin == "runtime_endpoint"
    lang = Path(sgl.__file__).parent / "lang"
    assert not [p for p in lang.rglob("*.py") if "sglang_plugins" in p.read_text()], "the language imports a plugin"


def test_unknown_backend_name_is_a_clear_error():
    with pytest.raises(sgl.BackendNotFoundError, match=r"^backend: no API backend named 'nope'.*runtime_endpoint"):
        sgl.load_backend("nope")


def test_unreachable_server_is_a_clear_error():
    from server_util import free_port

    with pytest.raises(ConnectionError, match="no sglang-core server answers"):
        sgl.RuntimeEndpoint(f"http://127.0.0.1:{free_port()}")


# ---- text, roles, messages ----------------------------------------------------------------------

def test_roles_render_the_models_chat_template(backend, tokenizer):
    state = chat.run("What is the capital of France?", backend=backend, temperature=0)
    answer = state["answer"]
    assert answer.strip()
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": answer}]
    assert state.messages() == messages
    # The text is what transformers renders for the same conversation.
    assert state.text() == tokenizer.apply_chat_template(messages, tokenize=False)
    meta = state.get_meta_info("answer")
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert meta["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
    assert meta["completion_tokens"] >= 1 and meta["finish_reason"] is not None


def test_with_role_blocks_and_begin_end_match_role_expressions(backend):
    @sgl.function
    def blocks(s):
        with s.system():
            s += "Be brief."
        s += sgl.user_begin() + "Hi" + sgl.user_end()
        with s.assistant():
            s += "Hello"

    @sgl.function
    def expressions(s):
        s += sgl.system("Be brief.") + sgl.user("Hi") + sgl.assistant("Hello")

    a, b = blocks.run(backend=backend), expressions.run(backend=backend)
    template = backend.chat_template
    assert a.text() == b.text() == (template.role_prefix["system"] + "Be brief." + template.role_suffix["system"]
                                    + template.role_prefix["user"] + "Hi" + template.role_suffix["user"]
                                    + template.role_prefix["assistant"] + "Hello"
                                    + template.role_suffix["assistant"])
    assert [m["role"] for m in a.messages()] == ["system", "user", "assistant"]


def test_nested_roles_are_an_error(backend):
    @sgl.function
    def nested(s):
        s += sgl.user_begin() + sgl.assistant("x")

    with pytest.raises(ValueError, match="^role: cannot begin 'assistant' inside the open 'user' turn"):
        nested.run(backend=backend)


# ---- constrained generation ---------------------------------------------------------------------

def test_regex_int_and_json_schema(backend):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    ip = r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])"

    @sgl.function
    def constrained(s):
        s += "Google's DNS server is at " + sgl.gen("ip", regex=ip, max_tokens=16) + ".\n"
        s += "A week has this many days: " + sgl.gen("days", dtype=int, max_tokens=3) + "\n"
        s += "A person as JSON: " + sgl.gen("person", json_schema=schema, max_tokens=40)

    state = constrained.run(backend=backend, temperature=0)
    assert re.fullmatch(ip, state["ip"])
    assert isinstance(state["days"], int)
    assert re.fullmatch(INT_REGEX, str(state["days"]))
    jsonschema.validate(json.loads(state["person"]), schema)


def test_gen_int_and_gen_string(backend):
    """The typed shorthands: an int, and a double-quoted string without newlines, each kept in
    the text as generated."""

    @sgl.function
    def typed(s):
        s += "The number of legs of a spider: " + sgl.gen_int("legs", max_tokens=4) + "\n"
        s += "The capital of France, quoted: " + sgl.gen_string("city", max_tokens=12)

    state = typed.run(backend=backend, temperature=0)
    assert isinstance(state["legs"], int) and f"spider: {state['legs']}\n" in state.text()
    assert re.fullmatch(r'"[^"\n]*"', state["city"]) and state.text().endswith(state["city"])


# ---- select: the same scores as HF transformers -------------------------------------------------

@pytest.fixture(scope="module")
def hf(hf_model):
    return hf_model


@pytest.mark.parametrize("method", CHOICE_METHODS)
def test_select_matches_hf(backend, hf, tokenizer, method):
    prompt, choices = "My favourite colour is", [" blue", " green", " the colour of the sky at noon", " red"]

    @sgl.function
    def pick(s):
        s += prompt + sgl.select("colour", choices, choices_method=method)

    state = pick.run(backend=backend)
    expected = [hf_choice_logprobs(hf, tokenizer, prompt, c) for c in choices]
    conditional, unconditional = [e[0] for e in expected], [e[1] for e in expected]
    best = expected_choice(method, conditional, unconditional)
    assert state["colour"] == choices[best] and state.text() == prompt + choices[best]
    meta = state.get_meta_info("colour")
    assert meta["index"] == best
    for got, want in zip(meta["token_logprobs"], conditional):
        assert got == pytest.approx(want, abs=2e-3)
    if method == "unconditional_likelihood_normalized":
        for got, want in zip(meta["unconditional_logprobs"], unconditional):
            assert [0.0 if g is None else g for g in got] == pytest.approx(want, abs=2e-3)


def test_gen_with_choices_is_a_select(backend):
    @sgl.function
    def pick(s):
        s += "The capital of France is" + sgl.gen("city", choices=[" Paris", " London"])

    state = pick.run(backend=backend)
    assert state["city"] == " Paris" and len(state.get_meta_info("city")["scores"]) == 2


# ---- fork: concurrent at the server, prefix cached ----------------------------------------------

def test_fork_branches_run_concurrently_at_the_server_and_reuse_the_cached_prefix(backend, lang_server):
    prefix = "A shared beginning about healthy habits, sleep, food and exercise, kept by the radix cache. " * 3
    captured = {}

    @sgl.function
    def branches(s):
        s += prefix
        forks = s.fork(4)
        for i, f in enumerate(forks):
            f += f"Tip {i + 1}:"
            f += sgl.gen("tip", max_tokens=12, ignore_eos=True)
        captured["forks"] = s.join(forks)
        s += forks[0]["tip"]

    httpx.post(f"{lang_server.url}/reset_peak_requests_in_flight").raise_for_status()
    state = branches.run(backend=backend, temperature=0)
    # Counted by the server: requests in flight at the same time, not a timing.
    assert httpx.get(f"{lang_server.url}/get_server_info").json()["peak_requests_in_flight"] >= 2
    forks = captured["forks"]
    assert len(forks) == 4
    for i, f in enumerate(forks):
        assert f.text() == prefix + f"Tip {i + 1}:" + f["tip"]
        assert f.get_meta_info("tip")["completion_tokens"] == 12
        assert f.get_meta_info("tip")["cached_tokens"] > 0  # cache_prefix put the prefix in the radix cache
    assert state.text() == prefix + forks[0]["tip"]
    with pytest.raises(ValueError, match="^n:"):
        state.fork(0)


# ---- streaming ------------------------------------------------------------------------------------

def test_stream_yields_text_before_the_program_finishes(backend):
    state = chat.run("Tell me a story.", max_tokens=16, backend=backend, stream=True, temperature=0)
    seen = [(piece, state.finished) for piece in state.text_iter()]
    assert state.finished
    assert sum(1 for _, finished in seen if not finished) >= 2, "no text arrived while the program was running"
    assert "".join(piece for piece, _ in seen) == state.text()


def test_stream_of_one_variable_and_async(backend):
    state = chat.run("Name three fruits.", max_tokens=16, backend=backend, stream=True, temperature=0)
    pieces = list(state.text_iter("answer"))
    assert len(pieces) >= 2 and "".join(pieces) == state["answer"]

    async def collect():
        streaming = chat.run("Name three fruits.", max_tokens=16, backend=backend, stream=True, temperature=0)
        out = []
        async for piece in streaming.text_async_iter("answer"):
            out.append((piece, streaming.finished))
        return streaming, out

    streaming, out = asyncio.run(collect())
    assert sum(1 for _, finished in out if not finished) >= 2
    assert "".join(p for p, _ in out) == streaming["answer"] == state["answer"]  # greedy: the same text


# ---- run_batch ------------------------------------------------------------------------------------

def test_run_batch_keeps_order_and_reports_errors_per_item(backend):
    @sgl.function
    def qa(s, question):
        if question is None:
            raise KeyError("no question")
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=6, stop="\n")

    questions = ["What is 1 + 1?", None, "Name a colour.", "Name an animal."]
    states = qa.run_batch([{"question": q} for q in questions], backend=backend, num_threads=4, temperature=0)
    assert len(states) == 4
    assert isinstance(states[1].error, KeyError)
    with pytest.raises(KeyError, match="no question"):
        states[1]["answer"]
    for question, state in zip(questions, states):
        if question is not None:
            assert state.error is None
            assert state.text() == "Q: " + question + "\nA:" + state["answer"]
    bad_args = qa.run_batch([{"question": "x"}, {"wrong": 1}], backend=backend, max_new_tokens=2)
    assert bad_args[0].error is None and isinstance(bad_args[1].error, ValueError)


def test_default_backend(backend):
    sgl.set_default_backend(backend)
    assert chat.run("Hi", max_tokens=2)["answer"]


# ---- images and video -----------------------------------------------------------------------------

@pytest.mark.parametrize("expr", [lambda: sgl.image(PNG), lambda: sgl.video("clip.mp4", num_frames=2)])
def test_images_on_a_text_only_backend_are_unsupported(backend, expr):
    assert backend.supports_images is False

    @sgl.function
    def look(s):
        s += sgl.user(expr() + "What is this?")

    with pytest.raises(sgl.UnsupportedError, match="runtime_endpoint backend does not take images"):
        look.run(backend=backend)


class ImageRecorder(sgl.LangBackend):
    """A backend that takes images and records what the interpreter hands it."""

    name = "recorder"
    supports_images = True

    def __init__(self):
        self.prompts = []

    def generate(self, prompt, params):
        self.prompts.append(prompt)
        return GenResult("a cat")


def test_images_reach_a_backend_that_takes_them(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)

    @sgl.function
    def look(s):
        s += sgl.user(sgl.image(str(path)) + "What is this?")
        s += sgl.assistant(sgl.gen("answer"))

    recorder = ImageRecorder()
    state = look.run(backend=recorder)
    assert state["answer"] == "a cat"
    (prompt,) = recorder.prompts
    assert prompt.images == (Image(PNG, "image/png"),) and prompt.open_role == "assistant"
    assert prompt.messages == ({"role": "user", "content": [{"type": "image", "image": Image(PNG, "image/png")},
                                                           {"type": "text", "text": "What is this?"}]},
                               {"role": "assistant", "content": ""})
    with pytest.raises(ValueError, match="^image: not a PNG, JPEG, GIF or WebP image"):
        load_image(b"plain text")


def test_video_without_a_decoder_is_a_clear_error(monkeypatch, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(ValueError, match=r"needs PyAV \(pip install 'sglang-core\[video\]'\)"):
        load_video_frames(str(tmp_path / "clip.mp4"), 2)


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, field", [
    (lambda: sgl.gen("x", max_tokens=0), "max_tokens"),
    (lambda: sgl.gen("x", temperature=-1), "temperature"),
    (lambda: sgl.gen("x", top_p=0), "top_p"),
    (lambda: sgl.gen("x", dtype=float), "dtype"),
    (lambda: sgl.gen("x", regex="a", json_schema={"type": "object"}), "regex"),
    (lambda: sgl.gen("x", json_schema="[1]"), "json_schema"),
    (lambda: sgl.gen("x", stop=[""]), "stop"),
    (lambda: sgl.gen(name=""), "name"),
    (lambda: sgl.select("x", []), "choices"),
    (lambda: sgl.select("x", ["a"], choices_method="best"), "choices_method"),
    (lambda: sgl.image(123), "image"),
    (lambda: sgl.video("a.mp4", 0), "num_frames"),
    (lambda: chat.run_batch([{"question": "q"}], num_threads=0), "num_threads"),
])
def test_bad_input_names_the_field(backend, make, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make()


def test_no_backend_is_an_error(monkeypatch):
    import sglang_core.lang.backends

    monkeypatch.setattr(sglang_core.lang.backends, "_default", None)
    with pytest.raises(ValueError, match="^backend: none given and no default set"):
        chat.run("q")


def test_bad_run_keyword_names_the_field(backend):
    with pytest.raises(ValueError, match="^temperature:"):
        chat.run("q", backend=backend, temperature=-0.5)
    with pytest.raises(ValueError, match="^arguments:"):
        chat.run(backend=backend, nope=1)


def test_unknown_variable(backend):
    state = chat.run("Hi", max_tokens=2, backend=backend)
    with pytest.raises(KeyError, match="no variable 'nope'"):
        state["nope"]


# ---- Runtime ----------------------------------------------------------------------------------------

def test_runtime_starts_serves_and_stops():
    # In-process engine (a False flag, passed as an env var): one interpreter fewer to start.
    with sgl.Runtime(max_total_tokens=4096, engine_in_subprocess=False) as runtime:
        assert httpx.get(f"{runtime.url}/get_server_info").json()["engine_in_subprocess"] is False
        assert httpx.get(f"{runtime.url}/health").status_code == 200
        state = chat.run("Hi", max_tokens=3, backend=runtime.endpoint, temperature=0)
        assert state.get_meta_info("answer")["completion_tokens"] >= 1
        process = runtime.process
    assert process.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{runtime.url}/health", timeout=2)
