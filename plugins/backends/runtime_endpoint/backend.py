"""``RuntimeEndpoint``: the frontend language on our own server, through its native API.

Completion-style: the program's text (roles written with the server's own chat template, from
``/get_model_info``) is the prompt. ``select`` scores the choices in one ``/generate`` batch of
prefill-only requests, exactly as ``Engine.select`` does (``sglang_core.choices``).
"""

from __future__ import annotations

import base64

import json
from typing import Any, Iterator

import httpx

from sglang_core.choices import check_select_args, choice_spans, pick_choice
from sglang_core.lang.backend import (ChatTemplate, GenParams, GenResult, LangBackend, Prompt, SelectResult,
                                      UnsupportedError)

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "regex",
                    "json_schema")


class ServerError(RuntimeError):
    """The server failed a request (5xx, or an answer that is not what the native API sends)."""


class RuntimeEndpoint(LangBackend):
    """A running ``sglang-core serve`` at ``url`` (``api_key`` if it was started with one)."""

    name = "runtime_endpoint"

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url: expected an http(s):// URL of a running server, got {url!r}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        # One pooled client, shared by every thread (fork branches, run_batch items).
        self._client = httpx.Client(base_url=self.url, headers=headers,
                                    timeout=httpx.Timeout(timeout_s, connect=10.0),
                                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        try:
            self.model_info = self._request("GET", "/get_model_info")
        except httpx.HTTPError as exc:
            self._client.close()
            raise ConnectionError(f"url: no sglang-core server answers at {self.url} ({exc})") from None
        # A served vision model names its image token; a text-only one takes no images.
        self.image_token = self.model_info.get("image_token") or ""
        self.supports_images = bool(self.image_token)
        self.video_token = self.model_info.get("video_token") or ""
        template = self.model_info.get("chat_template")
        if template:
            self.chat_template = ChatTemplate(template["role_prefix"], template["role_suffix"],
                                              tuple(template.get("stop", ())))

    # ---- the contract ------------------------------------------------------------------------

    def generate(self, prompt: Prompt, params: GenParams) -> GenResult:
        item = self._request("POST", "/generate", json=self._body(prompt, params))
        return GenResult(item["text"], item["meta_info"])

    def generate_stream(self, prompt: Prompt, params: GenParams) -> Iterator[str | GenResult]:
        """Native streaming: each event carries the whole text so far; yield what is new."""
        sent, last = "", None
        with self._client.stream("POST", "/generate", json={**self._body(prompt, params), "stream": True}) as response:
            if response.status_code != 200:
                response.read()
                self._raise_for(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise ServerError(f"the server failed the generation: {event['error'].get('message')}")
                if len(event["text"]) > len(sent):
                    yield event["text"][len(sent):]
                    sent = event["text"]
                last = event
        if last is None or last["meta_info"].get("finish_reason") is None:
            raise ServerError("the server's stream ended before the generation finished")
        yield GenResult(sent, last["meta_info"])

    def select(self, prompt: Prompt, choices: list[str], temperature: float,
               method: str = "token_length_normalized") -> SelectResult:
        """Score every choice in one request: prefill-only, with the prompt logprobs of the
        choice's tokens (and, for ``unconditional_likelihood_normalized``, of the choice alone).

        Token ids are sent rather than text so the server scores exactly the tokens the shared
        split (``choice_spans``) chose, from the server's own ``/tokenize``."""
        check_select_args(prompt.text, choices, method)
        if temperature > 0:
            raise UnsupportedError("temperature: select on runtime_endpoint picks the best choice; use 0")
        spans = choice_spans(lambda texts: self._request("POST", "/tokenize", json={"text": texts})["input_ids"],
                             prompt.text, choices)
        ids, starts = [s.ids for s in spans], [s.start for s in spans]
        if method == "unconditional_likelihood_normalized":
            ids += [s.choice_ids for s in spans]
            starts += [0] * len(spans)
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                "logprob_start_len": starts}
        for field, media in _media(prompt).items():  # the prompt's media with it; a choice scored alone has none
            body[field] = [media if i < len(spans) else None for i in range(len(ids))]
        items = self._request("POST", "/generate", json=body)
        logprobs = [[lp for lp, _, _ in item["meta_info"]["input_token_logprobs"]] for item in items]
        conditional, unconditional = logprobs[:len(spans)], logprobs[len(spans):] or None
        decision = pick_choice(method, conditional, unconditional)
        meta: dict[str, Any] = {"token_logprobs": conditional,
                                "cached_tokens": [item["meta_info"]["cached_tokens"] for item in items[:len(spans)]]}
        if unconditional is not None:
            meta["unconditional_logprobs"] = unconditional
        return SelectResult(choices[decision.index], decision.index, decision.scores, meta)

    def cache_prefix(self, prompt: Prompt) -> None:
        """A prefill-only request of the prefix: the radix cache keeps it for the branches."""
        if prompt.text:
            body = {"text": prompt.text, "sampling_params": {"max_new_tokens": 0}, **_media(prompt)}
            self._request("POST", "/generate", json=body)

    def shutdown(self) -> None:
        self._client.close()

    # ---- helpers -----------------------------------------------------------------------------

    def _body(self, prompt: Prompt, params: GenParams) -> dict[str, Any]:
        sampling: dict[str, Any] = {name: getattr(params, name) for name in _SAMPLING_FIELDS
                                    if getattr(params, name) is not None}
        if params.max_tokens is not None:
            sampling["max_new_tokens"] = params.max_tokens
        if params.stop:
            sampling["stop"] = list(params.stop)
        if params.stop_token_ids:
            sampling["stop_token_ids"] = list(params.stop_token_ids)
        if params.ignore_eos:
            sampling["ignore_eos"] = True
        sampling.update(params.extra)
        body: dict[str, Any] = {"text": prompt.text, "sampling_params": sampling, **_media(prompt)}
        if params.return_logprob:
            # -1: logprobs of the output only; asking for the prompt's would bypass the prefix cache.
            body.update(return_logprob=True, logprob_start_len=-1, top_logprobs_num=params.top_logprobs_num or 0)
        return body

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._client.request(method, path, **kwargs)
        if response.status_code != 200:
            self._raise_for(response)
        return response.json()

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        if 400 <= response.status_code < 500:
            raise ValueError(message)  # the server's messages start with the field at fault
        raise ServerError(f"the server answered {response.status_code}: {message}")


def _media(prompt: Prompt) -> dict[str, list]:
    """The prompt's images and videos as the native API's ``image_data`` and ``video_data`` (data
    URLs, in order), the fields it has."""
    media: dict[str, list] = {}
    if prompt.images:
        media["image_data"] = [_data_url(image.data, image.mime_type) for image in prompt.images]
    if prompt.videos:
        media["video_data"] = [{"video": _data_url(video.data, video.mime_type), "num_frames": video.num_frames}
                               for video in prompt.videos]
    return media


def _data_url(data: bytes, mime_type: str) -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode()}"
