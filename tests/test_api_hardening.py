"""Issue 13's API defects: any 64-bit seed on every route (each choice of n its own), work per
request bounded in output sequences (prompts x n), the API key kept out of ``ps`` (and taken the
ways Anthropic's clients send it), and the server's keep-alive timeout as a setting. One live
server (a tiny random Llama) for the module, driven by the real ``openai`` and ``anthropic``
clients and raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest

from sglang_core.cli import build_parser, main
from sglang_core.server.context import Overloaded, ServerContext
from sglang_core.server.metrics import ServerMetrics
from sglang_core.server.settings import ServerSettings

from server_util import running_server

KEY = "hardening-test-key"
MAX_SEQUENCES = 4
KEEP_ALIVE_S = 1.0
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("key") / "api-key"
    path.write_text(KEY + "\n")
    return path


@pytest.fixture(scope="module")
def server(tiny_llama, key_file):
    with running_server("--model-path", str(tiny_llama), "--chat-template", "chatml", "--context-length", "256",
                        "--api-key-file", str(key_file), "--max-sequences-per-request", str(MAX_SEQUENCES),
                        "--timeout-keep-alive-s", str(KEEP_ALIVE_S)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
        yield http


def complete(client: openai.OpenAI, **kwargs) -> list[str]:
    resp = client.completions.create(model="m", prompt="Once upon", max_tokens=8, temperature=1.0, **kwargs)
    return [c.text for c in sorted(resp.choices, key=lambda c: c.index)]


# ---- seeds ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, INT64_MAX, INT64_MIN])
def test_any_int64_seed_serves_n_distinct_repeatable_choices(client, seed):
    first = complete(client, n=2, seed=seed)
    assert len(first) == 2 and first[0] != first[1]  # each choice is seeded apart
    assert complete(client, n=2, seed=seed) == first


def test_choice_seeds_wrap_around_the_64_bit_range(client):
    # Choice j is seeded seed + j, taken mod 2**64 as the sampler takes every seed.
    assert complete(client, n=2, seed=INT64_MAX)[1] == complete(client, seed=INT64_MIN)[0]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [INT64_MAX + 1, INT64_MIN - 1, 2**70])
def test_a_seed_past_64_bits_is_a_400_before_any_stream(client, seed, stream):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="m", prompt="a", max_tokens=2, n=2, seed=seed, stream=stream)
    assert caught.value.body["param"] == "seed"


def test_streamed_negative_seed_streams_the_same_choices(client):
    expected = complete(client, n=2, seed=-1)
    texts = ["", ""]
    stream = client.completions.create(model="m", prompt="Once upon", max_tokens=8, temperature=1.0, n=2,
                                       seed=-1, stream=True)
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == expected


def test_chat_with_the_largest_seed(client):
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=1.0,
                  n=2, seed=INT64_MAX)
    first = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    assert first[0] != first[1]
    assert [c.message.content for c in client.chat.completions.create(**kwargs).choices] == first


def test_native_n_copies_with_the_largest_seed(http):
    body = {"text": "Once upon", "sampling_params": {"max_new_tokens": 8, "n": 2, "seed": INT64_MAX}}
    first = http.post("/generate", json=body)
    assert first.status_code == 200, first.text
    texts = [item["text"] for item in first.json()]
    assert texts[0] != texts[1]
    assert [item["text"] for item in http.post("/generate", json=body).json()] == texts


# ---- sequences per request ----------------------------------------------------------------------

def test_too_many_sequences_is_a_400_naming_the_field(client, http):
    over = MAX_SEQUENCES + 1
    cases = [
        (lambda: client.completions.create(model="m", prompt=["a"] * over, max_tokens=1), "prompt"),
        (lambda: client.completions.create(model="m", prompt="a", n=over, max_tokens=1), "n"),
        (lambda: client.completions.create(model="m", prompt="a", n=over, max_tokens=1, stream=True), "n"),
        (lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}], n=over,
                                                max_tokens=1), "n"),
    ]
    for call, field in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.body["param"] == field
        assert f"{over} output sequences" in caught.value.body["message"]
    native = [({"text": ["a"] * over}, "text"), ({"input_ids": [[5, 6]] * over}, "input_ids"),
              ({"text": "a", "sampling_params": {"n": over}}, "text"),
              ({"text": "a", "sampling_params": {"n": over}, "stream": True}, "text")]
    for body, field in native:
        resp = http.post("/generate", json={**body, "sampling_params": {"max_new_tokens": 1, **body.get("sampling_params", {})}})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == field, resp.text
    # The limit itself is served, and nothing stays counted in flight.
    assert len(complete(client, n=MAX_SEQUENCES)) == MAX_SEQUENCES
    assert http.get("/get_server_info").json()["requests_in_flight"] == 0


def test_native_generate_refuses_a_huge_n_before_building_its_jobs():
    """The sequence limit is checked before one job per sequence is built: ten million copies
    (minutes of work and gigabytes before the check moved) are refused at once."""
    from sglang_plugins.frontends.native.protocol import GenerateBody, parse_generate

    ctx = context(max_sequences_per_request=8)
    body = GenerateBody.model_validate({"text": "a", "sampling_params": {"n": 10_000_000}})
    with pytest.raises(ValueError, match="^text: the request asks for 10000000 output sequences"):
        parse_generate(body, 259, ctx.check_sequences)
    many = GenerateBody.model_validate({"input_ids": [[5]] * 9})
    with pytest.raises(ValueError, match="^input_ids: the request asks for 9 output sequences"):
        parse_generate(many, 259, ctx.check_sequences)


def context(**settings) -> ServerContext:
    return ServerContext(ServerSettings(**settings), ServerMetrics())


def test_admission_counts_sequences_in_flight():
    ctx = context(max_queued_requests=6, max_sequences_per_request=4)
    with ctx.admission(4, "n"):
        with ctx.admission(2, "n"):
            assert (ctx.in_flight, ctx.sequences_in_flight) == (2, 6)
            with pytest.raises(Overloaded, match="6 sequences in flight"), ctx.admission(1):
                pass
        with pytest.raises(Overloaded), ctx.admission(3):  # 4 + 3 > 6
            pass
        with ctx.admission(2):
            assert ctx.sequences_in_flight == 6
    assert (ctx.in_flight, ctx.sequences_in_flight) == (0, 0)
    with pytest.raises(ValueError, match=r"^n: the request asks for 5 output sequences .* at most 4 per request "
                                         r"\(--max-sequences-per-request\)"):
        with ctx.admission(5, "n"):
            pass
    assert ctx.sequences_in_flight == 0


def test_a_request_larger_than_the_in_flight_limit_is_a_400_not_a_503():
    ctx = context(max_queued_requests=3, max_sequences_per_request=8)
    assert ctx.sequence_limit == 3
    with pytest.raises(ValueError, match=r"^prompt: .* at most 3 per request \(--max-queued-requests\)"), \
            ctx.admission(4):
        pass


def test_a_streamed_response_holds_its_sequences_until_it_ends():
    ctx = context(max_queued_requests=4)

    async def events():
        yield "a"
        yield "b"

    async def run() -> None:
        stream = ctx.admitted(events(), 3, "n")
        assert await anext(stream) == "" and ctx.sequences_in_flight == 3
        with pytest.raises(Overloaded):
            await anext(ctx.admitted(events(), 2, "n"))
        assert [e async for e in stream] == ["a", "b"]
        assert ctx.sequences_in_flight == 0
        closed_early = ctx.admitted(events(), 4, "n")
        await anext(closed_early)
        await closed_early.aclose()  # a client gone mid-stream
        assert ctx.sequences_in_flight == 0

    asyncio.run(run())


# ---- the API key ------------------------------------------------------------------------------

def test_api_key_file_guards_the_routes_and_stays_out_of_ps(server, http):
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY + "x"}).status_code == 401
    assert http.get("/v1/models").status_code == 200
    assert KEY not in Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode()
    for path in ("/get_server_args", "/get_server_info"):
        args = http.get(path).json()
        assert args["api_key"] == "<set>" and KEY not in json.dumps(args)
        assert args["max_sequences_per_request"] == MAX_SEQUENCES  # the server's settings, not the defaults
    assert httpx.get(server.url + "/get_server_info").status_code == 401


def test_anthropic_clients_send_the_key_and_read_a_refusal_in_anthropic_envelope(server):
    """Anthropic's clients send the key as x-api-key or as a Bearer token (the SDK, given
    ``api_key`` or ``auth_token``); a wrong key is the SDK's AuthenticationError, in Anthropic's
    envelope."""
    import anthropic

    user = [{"role": "user", "content": "hi"}]
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        wrong.messages.create(model="any", max_tokens=3, messages=user)
    assert err.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                         "message": "invalid or missing API key"}}
    for client in (anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0),
                   anthropic.Anthropic(base_url=server.url, auth_token=KEY, max_retries=0)):
        assert client.messages.count_tokens(model="any", messages=user).input_tokens > 0
    counted = httpx.post(f"{server.url}/v1/messages/count_tokens", headers={"x-api-key": KEY}, timeout=30,
                         json={"model": "any", "messages": user})
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("SGLANG_CORE_API_KEY", "from-env")
    assert ServerSettings.from_args(build_parser().parse_args(["serve"])).api_key == "from-env"


@pytest.mark.parametrize("case", ["both", "env and file", "empty", "blank", "missing", "two lines"])
def test_api_key_file_errors(case, tmp_path, monkeypatch, capsys):
    path = tmp_path / "key"
    path.write_text({"empty": "", "blank": " \n", "two lines": "abc\ndef\n"}.get(case, "secret-in-file\n"))
    flags = ["serve", "--api-key-file", str(path if case != "missing" else tmp_path / "nope")]
    if case == "both":
        flags += ["--api-key", "secret-on-flag"]
    if case == "env and file":
        monkeypatch.setenv("SGLANG_CORE_API_KEY", "secret-in-env")
    assert main(flags) == 2  # settings are checked before the server starts
    err = capsys.readouterr().err
    expected = {"both": "give the API key once", "env and file": "give the API key once", "empty": "is empty",
                "blank": "is empty", "missing": "cannot read", "two lines": "on one line"}[case]
    assert "api_key_file: " in err and expected in err
    assert "secret" not in err


# ---- keep-alive -------------------------------------------------------------------------------

def test_idle_keep_alive_connections_close_after_the_setting(server):
    url = urlparse(server.url)
    with contextlib.closing(socket.create_connection((url.hostname, url.port), timeout=30)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert sock.recv(4096) == b""  # the server closed the idle connection
        idle = time.monotonic() - start
    assert KEEP_ALIVE_S * 0.5 < idle < KEEP_ALIVE_S + 2, idle
