"""The frontend language: programs that interleave Python with generation (SGLang's ``sgl.*``).

``import sglang_core as sgl`` exposes every name of ``__all__``; this package holds them:
``api`` (the expressions), ``state`` (the interpreter), ``program`` (``@function``, ``run``,
``run_batch``), ``backends`` (building API backends from the plugin registry), ``runtime``
(``Runtime``) and ``backend`` (the contract API backends implement). Nothing here imports torch.
"""

from sglang_core.lang.api import (assistant, assistant_begin, assistant_end, gen, gen_int, gen_string,
                                  greedy_token_selection, image, select, system, system_begin, system_end,
                                  token_length_normalized, unconditional_likelihood_normalized, user, user_begin,
                                  user_end, video)
from sglang_core.lang.backend import LangBackend, MissingExtraError, UnsupportedError
from sglang_core.lang.backends import (Anthropic, BackendNotFoundError, LiteLLM, OpenAI, RuntimeEndpoint, VertexAI,
                                       load_backend, set_default_backend)
from sglang_core.lang.program import SglFunction, function
from sglang_core.lang.runtime import Runtime
from sglang_core.lang.state import ForkGroup, ProgramState

__all__ = [
    "Anthropic", "BackendNotFoundError", "ForkGroup", "LangBackend", "LiteLLM", "MissingExtraError", "OpenAI",
    "ProgramState", "Runtime", "RuntimeEndpoint", "SglFunction", "UnsupportedError", "VertexAI", "assistant",
    "assistant_begin", "assistant_end", "function", "gen", "gen_int", "gen_string", "greedy_token_selection",
    "image", "load_backend", "select", "set_default_backend", "system", "system_begin", "system_end",
    "token_length_normalized", "unconditional_likelihood_normalized", "user", "user_begin", "user_end", "video",
]
