"""Every program of examples/lang/ runs on every backend factory below, against a real server of
the default model, and produces what it promises (checked independently: re, json/jsonschema).

To run the examples on another backend, add a factory to ``BACKEND_FACTORIES``: it takes the
server's base URL (``http://127.0.0.1:PORT``; the OpenAI-compatible API is under ``/v1``) and
returns a backend.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Callable

import httpx
import jsonschema
import pytest

import sglang_core as sgl

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples" / "lang"

SERVED_MODEL = "SmolLM2-135M-Instruct"  # the default model's name on /v1

# name -> factory(server_url) -> backend
BACKEND_FACTORIES: dict[str, Callable[[str], Any]] = {
    "runtime_endpoint": lambda url: sgl.RuntimeEndpoint(url),
    # Our Anthropic Messages frontend (/v1/messages); the server needs no key, the SDK wants one. A
    # base_url that is not Anthropic's turns on SGLang's extensions (regex, json_schema, select).
    "anthropic": lambda url: sgl.Anthropic("default", base_url=url, api_key="unused", max_retries=0),
    # Our OpenAI-compatible /v1: chat.completions, and completions (a completion model, its roles
    # written in the model's own markers, select by echoed logprobs); LiteLLM through its openai/ route.
    "openai_chat": lambda url: sgl.OpenAI(SERVED_MODEL, base_url=url + "/v1", max_retries=0),
    "openai_completion": lambda url: _openai_completion(url),
    "litellm": lambda url: sgl.LiteLLM("openai/" + SERVED_MODEL, api_base=url + "/v1", api_key="unused",
                                       sglang_extensions=True),
}


def _openai_completion(url: str) -> Any:
    from sglang_core.lang.backend import ChatTemplate

    markers = httpx.get(url + "/get_model_info").json()["chat_template"]
    return sgl.OpenAI(SERVED_MODEL, base_url=url + "/v1", is_chat_model=False, max_retries=0,
                      chat_template=ChatTemplate(markers["role_prefix"], markers["role_suffix"], tuple(markers["stop"])))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"lang_example_{name}", EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_multi_turn_chat(module, out: dict) -> None:
    assert out["answer_1"].strip() and out["answer_2"].strip()
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert out["messages"][2]["content"] == out["answer_1"] and out["messages"][4]["content"] == out["answer_2"]
    assert "Paris" in out["answer_1"]


def check_tool_use(module, out: dict) -> None:
    assert out["tool"] in module.TOOLS
    assert len(out["scores"]) == len(module.TOOLS)
    assert out["scores"][module.TOOLS.index(out["tool"])] == max(out["scores"])
    assert out["detail"].strip()


def check_tips_fork(module, out: dict) -> None:
    text = out["text"]
    assert text.index("Tip 1:") < text.index("Tip 2:") < text.index("In summary")
    tip1 = text[text.index("Tip 1:") + 6: text.index("Tip 2:")].strip()
    tip2 = text[text.index("Tip 2:") + 6: text.index("In summary")].strip()
    assert tip1 and tip2 and tip1 != tip2  # two branches, two different prompts
    assert text.endswith(out["summary"])


def check_regex_ip(module, out: dict) -> None:
    assert re.fullmatch(module.IP_REGEX, out["answer"]), out["answer"]


def check_json_character(module, out: dict) -> None:
    character = json.loads(out["json_output"])
    jsonschema.validate(character, module.CHARACTER_SCHEMA)
    assert character == out["character"]


def check_run_batch(module, out: dict) -> None:
    assert len(out["answers"]) == len(module.QUESTIONS) and all(a.strip() for a in out["answers"])
    for question, answer, text in zip(module.QUESTIONS, out["answers"], out["texts"]):  # order kept
        assert text.startswith("Q: " + question + "\n") and text.endswith(answer)


def check_streaming(module, out: dict) -> None:
    assert len(out["pieces"]) >= 2
    assert "".join(out["pieces"]) == out["sentence"] and out["sentence"].strip()


def check_roles(module, out: dict) -> None:
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "user"]
    assert out["messages"][1]["content"] == "What colour is the sky on a clear day?"
    assert out["messages"][2]["content"] == out["answer"] and out["messages"][3]["content"] == "Thank you!"
    assert out["text"].index("What colour") < out["text"].index(out["answer"]) < out["text"].index("Thank you!")


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def test_every_example_has_a_check():
    examples = {p.stem for p in EXAMPLES_DIR.glob("*.py") if not p.stem.startswith("_")}
    assert examples == set(CHECKS)


@pytest.mark.parametrize("backend_name", list(BACKEND_FACTORIES))
@pytest.mark.parametrize("example", sorted(CHECKS))
def test_example(lang_server, example, backend_name):
    module = _load(example)
    backend = BACKEND_FACTORIES[backend_name](lang_server.url)
    try:
        out = module.main(backend)
    finally:
        backend.shutdown()
    CHECKS[example](module, out)
