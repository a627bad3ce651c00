"""``sgl.OpenAI``: OpenAI's API, or any server that speaks it (``base_url``, e.g. our own
``sglang-core serve`` at ``http://host:30000/v1``).

Chat models get ``Prompt.messages`` through ``chat.completions``; completion models get
``Prompt.text`` through ``completions``, where ``select`` scores each choice by the logprobs the
API echoes for ``prompt + choice`` (``echo=True, logprobs=0, max_tokens=0``).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator
from urllib.parse import urlparse

from sglang_core.choices import pick_choice
from sglang_core.lang.backend import ChatTemplate, GenParams, GenResult, MissingExtraError, Prompt, SelectResult

from sglang_plugins.backends.api_common import (
    ChatCompletionsBackend, Collector, add_openai_usage, check_choices, openai_sampling, resolve_sglang_extensions,
    unsupported,
)

# OpenAI's completion-only model families; every other name is taken to be a chat model.
_COMPLETION_MODELS = re.compile(r"^(gpt-3\.5-turbo-instruct|davinci|babbage|text-)")


def is_chat_model_name(model: str) -> bool:
    """The ``is_chat_model`` default: False for OpenAI's completion-only models
    (``gpt-3.5-turbo-instruct*``, ``davinci-*``, ``babbage-*``, ``text-*``), True otherwise."""
    return _COMPLETION_MODELS.match(model) is None


class OpenAIBackend(ChatCompletionsBackend):
    """An OpenAI-compatible API.

    - ``model``: the model name the API serves (``client.models.list()``).
    - ``base_url``: the API root, ``https://api.openai.com/v1`` when None.
    - ``api_key``: the key; when None, ``$OPENAI_API_KEY``, or a placeholder if ``base_url`` is
      given (a local server without ``--api-key`` accepts any).
    - ``is_chat_model``: chat or completion API; None guesses from the name
      (:func:`is_chat_model_name`).
    - ``sglang_extensions``: the server takes SGLang's ``regex``, ``top_k``, ``min_p``,
      ``ignore_eos`` and ``stop_token_ids``; None means "``base_url`` is given and is not
      api.openai.com".
    - ``chat_template``: how a completion model's prompt text writes the program's roles (the
      model's own markers, e.g. ChatML's); None keeps the plain default. Chat models ignore it.
    - ``client_kwargs``: passed to ``openai.OpenAI`` (``timeout``, ``max_retries``, ...).
    """

    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 is_chat_model: bool | None = None, sglang_extensions: bool | None = None,
                 chat_template: ChatTemplate | None = None, **client_kwargs: Any):
        try:
            import openai
        except ImportError:
            raise MissingExtraError("openai", "openai", "openai") from None
        if base_url is not None and (not isinstance(base_url, str)
                                     or urlparse(base_url).scheme not in ("http", "https")):
            raise ValueError(f"base_url: must be an http(s) URL, got {base_url!r}")
        if is_chat_model is not None and not isinstance(is_chat_model, bool):
            raise ValueError(f"is_chat_model: must be True, False or None, got {is_chat_model!r}")
        super().__init__(model, resolve_sglang_extensions(sglang_extensions, base_url, "api.openai.com"))
        self.is_chat_model = is_chat_model_name(model) if is_chat_model is None else is_chat_model
        self.supports_images = self.supports_tools = self.is_chat_model  # completions take text only
        if chat_template is not None:
            if not isinstance(chat_template, ChatTemplate):
                raise ValueError(f"chat_template: must be a sglang_core.lang.backend.ChatTemplate, "
                                 f"got {chat_template!r}")
            self.chat_template = chat_template
        if api_key is None and base_url is not None and not os.environ.get("OPENAI_API_KEY"):
            api_key = "none"
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, **client_kwargs)

    def _create(self, messages: list[dict[str, Any]], stream: bool, **kwargs: Any) -> Any:
        return self.client.chat.completions.create(model=self.model, messages=messages, stream=stream, **kwargs)

    # ---- completion models ----------------------------------------------------------------

    def _completion(self, prompt: Prompt, params: GenParams, stream: bool) -> Any:
        if prompt.images:
            raise unsupported(self.name, "image", f"sends only text to the completion model {self.model!r}")
        kwargs = openai_sampling(self.name, params, self.sglang_extensions, chat=False)
        if params.return_logprob:
            kwargs["logprobs"] = params.top_logprobs_num or 0
        if stream:
            kwargs["stream_options"] = {"include_usage": True}
        return self.client.completions.create(model=self.model, prompt=prompt.text, stream=stream, **kwargs)

    @staticmethod
    def _add_completion_choice(collector: Collector, choice: Any) -> str:
        lp = choice.logprobs
        return collector.add(
            choice.text, choice.finish_reason,
            lp and [(v, None, t) for t, v in zip(lp.tokens, lp.token_logprobs)],
            lp and lp.top_logprobs and [[(v, None, t) for t, v in (top or {}).items()] for top in lp.top_logprobs],
        )

    def generate(self, prompt: Prompt, params: GenParams) -> GenResult:
        if self.is_chat_model:
            return super().generate(prompt, params)
        response = self._completion(prompt, params, stream=False)
        collector = Collector()
        self._add_completion_choice(collector, response.choices[0])
        add_openai_usage(collector, response.usage)
        return collector.result()

    def generate_stream(self, prompt: Prompt, params: GenParams) -> Iterator[str | GenResult]:
        if self.is_chat_model:
            yield from super().generate_stream(prompt, params)
            return
        collector = Collector()
        for chunk in self._completion(prompt, params, stream=True):
            if chunk.choices and (text := self._add_completion_choice(collector, chunk.choices[0])):
                yield text
            add_openai_usage(collector, chunk.usage)
        yield collector.result()

    def select(self, prompt: Prompt, choices: list[str], temperature: float,
               method: str = "token_length_normalized") -> SelectResult:
        """Chat models: constrained generation (see :class:`ChatCompletionsBackend`). Completion
        models: the logprobs of each choice's tokens after the prompt, scored by
        ``sglang_core.choices.pick_choice`` (``temperature`` plays no part: nothing is sampled)."""
        if self.is_chat_model:
            return super().select(prompt, choices, temperature, method)
        check_choices(self.name, prompt, choices, method, chat=False)
        if prompt.images:
            raise unsupported(self.name, "image", f"sends only text to the completion model {self.model!r}")
        (prompt_tokens, _, _), *joint = self._echo([prompt.text] + [prompt.text + c for c in choices])
        spans = []
        for tokens, logprobs, offsets in joint:
            # The choice's tokens begin where the joint tokenization leaves the prompt's (the last
            # prompt token may merge with the choice), never at 0 (no logprob) nor past the end.
            start = next((i for i, (a, b) in enumerate(zip(prompt_tokens, tokens)) if a != b),
                         min(len(prompt_tokens), len(tokens)))
            spans.append((max(1, min(start, len(tokens) - 1)), logprobs, offsets))
        conditional = [logprobs[start:] for start, logprobs, _ in spans]
        unconditional = None
        if method == "unconditional_likelihood_normalized":
            # The same tokens scored alone: the text they cover, sent without the prompt.
            texts = [(prompt.text + c)[offsets[start]:] for c, (start, _, offsets) in zip(choices, spans)]
            unconditional = [logprobs for _, logprobs, _ in self._echo(texts)]
            for c, cond, base in zip(choices, conditional, unconditional):
                if len(cond) != len(base):
                    raise unsupported(self.name, "method", f"cannot align {c!r}'s tokens alone with its tokens "
                                                           f"after the prompt (the API tokenizes them differently)")
        decision = pick_choice(method, conditional, unconditional)
        meta: dict[str, Any] = {"token_logprobs": conditional}
        if unconditional is not None:
            meta["unconditional_logprobs"] = unconditional
        return SelectResult(choices[decision.index], decision.index, decision.scores, meta)

    def _echo(self, texts: list[str]) -> list[tuple[list[str], list[float | None], list[int]]]:
        """Each text's tokens, their logprobs (None for the first) and text offsets, in one request
        that generates nothing."""
        response = self.client.completions.create(model=self.model, prompt=texts, max_tokens=0, echo=True,
                                                  logprobs=0, temperature=0)
        by_index = sorted(response.choices, key=lambda c: c.index)
        if len(by_index) != len(texts) or any(c.logprobs is None for c in by_index):
            raise unsupported(self.name, "select", "needs echoed prompt logprobs (echo=True, logprobs=0, "
                                                   "max_tokens=0), which this API did not return")
        return [(c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.text_offset) for c in by_index]

    def shutdown(self) -> None:
        self.client.close()
