"""``sgl.LiteLLM``: any provider LiteLLM reaches, through ``litellm.completion`` with chat
messages (LiteLLM speaks OpenAI's request and response shapes for every provider)."""

from __future__ import annotations

import os
from typing import Any

from sglang_core.lang.backend import MissingExtraError

from sglang_plugins.backends.api_common import ChatCompletionsBackend


class LiteLLMBackend(ChatCompletionsBackend):
    """A LiteLLM model.

    - ``model``: LiteLLM's ``provider/model`` name (``openai/SmolLM2-135M-Instruct``,
      ``anthropic/claude-...``, ``gemini/...``).
    - ``api_base``, ``api_key``: passed to ``litellm.completion`` (None: LiteLLM's defaults and
      environment variables).
    - ``sglang_extensions``: the server takes SGLang's ``regex``, ``top_k``, ``min_p``,
      ``ignore_eos`` and ``stop_token_ids`` (sent as ``extra_body``); False by default, since
      LiteLLM mostly fronts providers that do not.
    - ``completion_kwargs``: any other ``litellm.completion`` argument (``timeout``,
      ``num_retries``, ...), sent with every request.
    """

    name = "litellm"

    def __init__(self, model: str, api_base: str | None = None, api_key: str | None = None,
                 sglang_extensions: bool = False, **completion_kwargs: Any):
        # LiteLLM downloads its model price list from GitHub on import unless told to use the copy
        # it ships; the backend uses no prices, and must not stall on a network without GitHub.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        try:
            import litellm
        except ImportError:
            raise MissingExtraError("litellm", "litellm", "litellm") from None
        super().__init__(model, sglang_extensions)
        if api_base is not None and not isinstance(api_base, str):
            raise ValueError(f"api_base: must be a URL string, got {api_base!r}")
        self._litellm = litellm
        self._request = {k: v for k, v in (("api_base", api_base), ("api_key", api_key)) if v is not None}
        self._request.update(completion_kwargs)

    def _create(self, messages: list[dict[str, Any]], stream: bool, **kwargs: Any) -> Any:
        return self._litellm.completion(model=self.model, messages=messages, stream=stream, **self._request, **kwargs)
