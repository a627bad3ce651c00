"""``sgl.VertexAI``: Gemini models on Google Vertex AI, through Google's ``google-genai`` SDK.

Requests are built by :meth:`VertexAIBackend.build_request` from the SDK's own types
(``Content`` / ``Part`` / ``GenerateContentConfig``) and sent by the ``genai.Client`` given as
``client`` (or built from ``project`` / ``location``), so the request can be checked, and the
transport replaced, without reaching Google.
"""

from __future__ import annotations

from typing import Any, Iterator

from sglang_core.lang.backend import GenParams, GenResult, LangBackend, MissingExtraError, Prompt, SelectResult

from sglang_plugins.backends.api_common import (
    CHAT_SELECT_METHOD, Collector, chat_turns, check_choices, parse_schema, picked, unsupported,
)

_ROLES = {"user": "user", "assistant": "model"}  # Gemini's name for the assistant is "model"
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length"}  # others (SAFETY, ...) keep Gemini's name, lowercased


class VertexAIBackend(LangBackend):
    """Gemini on Vertex AI.

    - ``model``: the Gemini model id (``gemini-2.5-flash``, ...).
    - ``project``, ``location``: the Google Cloud project and region (None: the SDK's
      environment variables, ``GOOGLE_CLOUD_PROJECT`` / ``GOOGLE_CLOUD_LOCATION``).
    - ``client``: a ready ``google.genai.Client`` to send through (its own credentials, HTTP
      options and transport); when given, ``project``, ``location`` and ``client_kwargs`` are
      not used.
    - ``client_kwargs``: passed to ``genai.Client(vertexai=True, ...)`` (``credentials``,
      ``http_options``, ...).
    """

    name = "vertexai"
    supports_images = True

    def __init__(self, model: str, project: str | None = None, location: str | None = None, client: Any = None,
                 **client_kwargs: Any):
        try:
            import google.genai as genai  # (not "from google import genai": that skips sys.modules)
            from google.genai import types
        except ImportError:
            raise MissingExtraError("vertexai", "google-genai", "vertexai") from None
        if not isinstance(model, str) or not model:
            raise ValueError(f"model: must be a non-empty string, got {model!r}")
        if client is not None and not isinstance(client, genai.Client):
            raise ValueError(f"client: must be a google.genai.Client, got {type(client).__name__}")
        self.model = model
        self._types = types
        self.client = client or genai.Client(vertexai=True, project=project, location=location, **client_kwargs)

    def build_request(self, prompt: Prompt, params: GenParams) -> dict[str, Any]:
        """The keyword arguments of ``client.models.generate_content``: ``model``, ``contents``
        (one ``Content`` per user/model turn, images as inline-data parts) and ``config``
        (system turns become its ``system_instruction``)."""
        types = self._types
        for field_name, value in (("regex", params.regex), ("min_p", params.min_p),
                                  ("ignore_eos", params.ignore_eos or None),
                                  ("stop_token_ids", params.stop_token_ids or None)):
            if value is not None:
                raise unsupported(self.name, field_name, "has no such control on Gemini")
        system, contents = [], []
        for message in chat_turns(self.name, prompt):
            parts = [types.Part.from_text(text=message["content"])] if isinstance(message["content"], str) else [
                types.Part.from_text(text=p["text"]) if p["type"] == "text" else
                types.Part.from_bytes(data=p["image"].data, mime_type=p["image"].mime_type)
                for p in message["content"]]
            if message["role"] == "system":
                system += parts
            elif message["role"] in _ROLES:
                contents.append(types.Content(role=_ROLES[message["role"]], parts=parts))
            else:
                raise ValueError(f"messages: role {message['role']!r} is not one of system, user, assistant")
        schema = parse_schema(params)
        config = types.GenerateContentConfig(
            system_instruction=types.Content(parts=system) if system else None,
            max_output_tokens=params.max_tokens, stop_sequences=list(params.stop) or None,
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
            response_mime_type="application/json" if schema is not None else None, response_json_schema=schema,
            response_logprobs=params.return_logprob or None,
            logprobs=params.top_logprobs_num if params.return_logprob and params.top_logprobs_num else None,
            **params.extra,
        )
        return {"model": self.model, "contents": contents, "config": config}

    @staticmethod
    def _add_response(collector: Collector, response: Any) -> str:
        """One response (or streamed chunk) into ``collector``; returns its new text."""
        text = ""
        if response.candidates:
            candidate = response.candidates[0]
            text = "".join(p.text for p in (candidate.content and candidate.content.parts or ()) if p.text)
            reason = candidate.finish_reason
            logprobs = candidate.logprobs_result
            collector.add(
                text, None if reason is None else _FINISH.get(reason.name, reason.name.lower()),
                logprobs and [(c.log_probability, None, c.token) for c in logprobs.chosen_candidates or ()],
                logprobs and logprobs.top_candidates and [
                    [(c.log_probability, None, c.token) for c in top.candidates or ()]
                    for top in logprobs.top_candidates],
            )
        usage = response.usage_metadata
        if usage is not None:
            collector.usage(usage.prompt_token_count, usage.candidates_token_count, usage.cached_content_token_count)
        return text

    def generate(self, prompt: Prompt, params: GenParams) -> GenResult:
        collector = Collector()
        self._add_response(collector, self.client.models.generate_content(**self.build_request(prompt, params)))
        return collector.result()

    def generate_stream(self, prompt: Prompt, params: GenParams) -> Iterator[str | GenResult]:
        collector = Collector()
        for chunk in self.client.models.generate_content_stream(**self.build_request(prompt, params)):
            if text := self._add_response(collector, chunk):
                yield text
        yield collector.result()

    def build_select_request(self, prompt: Prompt, choices: list[str], temperature: float) -> dict[str, Any]:
        """A request whose answer is constrained to one of ``choices`` (Gemini's ``text/x.enum``
        response type)."""
        request = self.build_request(prompt, GenParams(temperature=temperature))
        request["config"] = request["config"].model_copy(update={
            "response_mime_type": "text/x.enum", "response_schema": {"type": "STRING", "enum": list(choices)}})
        return request

    def select(self, prompt: Prompt, choices: list[str], temperature: float,
               method: str = CHAT_SELECT_METHOD) -> SelectResult:
        """Constrained generation through Gemini's enum response type (no logprob scoring)."""
        check_choices(self.name, prompt, choices, method, chat=True)
        collector = Collector()
        self._add_response(collector, self.client.models.generate_content(
            **self.build_select_request(prompt, choices, temperature)))
        return picked(self.name, choices, collector.text.strip(), "text/x.enum")

    def shutdown(self) -> None:
        self.client.close()
