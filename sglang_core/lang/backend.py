"""The contract between the frontend language's interpreter and an API backend plugin.

The interpreter (``sglang_core.lang``) runs a program's Python and keeps its state: the text so
far, the chat messages so far, images, variables. Whenever the program asks the model for
something it hands the backend a :class:`Prompt` (a snapshot of that state) and one call:
``generate``, ``generate_stream`` or ``select``. A backend never sees the program itself, so one
written against this file works for every program.

Backends come from plugins: ``register_api_backends(register)`` with
``register("openai", "pkg.module:OpenAIBackend")``; ``sgl.OpenAI(...)`` and friends look the name
up in the registry and build ``cls(*args, **kwargs)``. A backend that needs an optional SDK imports
it in ``__init__`` and raises :class:`MissingExtraError` naming the extra when it is absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator


class MissingExtraError(ImportError):
    """An optional SDK a backend needs is not installed."""

    def __init__(self, backend: str, module: str, extra: str):
        super().__init__(f"the {backend} backend needs the {module!r} package: "
                         f"pip install 'sglang-core[{extra}]'")


class UnsupportedError(ValueError):
    """The program asked for something this backend cannot do (images on a text-only backend,
    a regex on an API without constrained decoding, ...)."""


@dataclass(frozen=True)
class Image:
    """An image in the program: raw bytes and their MIME type (``image/png``, ...)."""

    data: bytes
    mime_type: str


@dataclass(frozen=True)
class Video:
    """A video file in the program, for a backend whose server decodes it: its bytes, MIME type
    and how many frames to sample."""

    data: bytes
    mime_type: str
    num_frames: int


@dataclass(frozen=True)
class ChatTemplate:
    """How roles appear in the program's *text* (the form completion-style backends read).

    ``role_prefix[role]`` is written when ``with s.user():`` opens, ``role_suffix[role]`` when it
    closes. Chat-style backends read ``Prompt.messages`` instead and ignore these strings.
    """

    role_prefix: dict[str, str]
    role_suffix: dict[str, str]
    stop: tuple[str, ...] = ()  # extra stop strings for a generation inside the assistant role


@dataclass(frozen=True)
class Prompt:
    """A snapshot of the program state at a generation call.

    ``text`` is everything the program has written, roles rendered with the backend's
    :class:`ChatTemplate`. ``messages`` is the same content as chat messages
    (``{"role", "content"}``, content a string, or a list of ``{"type": "text", "text"}`` /
    ``{"type": "image", "image": Image}`` parts when the turn holds images); when the program is
    inside an open role, that turn is the last message, so a chat backend asked to generate sees
    the conversation up to ``assistant`` with the assistant's partial text (usually empty).
    ``images`` are all images so far, in order (completion-style backends that take images);
    ``videos`` all videos, for a backend with a ``video_token``.
    """

    text: str
    messages: tuple[dict[str, Any], ...] = ()
    images: tuple[Image, ...] = ()
    open_role: str | None = None  # the role whose block is open at the call, if any
    videos: tuple[Video, ...] = ()


@dataclass(frozen=True)
class GenParams:
    """One ``gen`` call's parameters; ``None`` means the backend's default."""

    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos: bool = False
    regex: str | None = None
    json_schema: str | None = None  # the schema as a JSON string
    return_logprob: bool = False
    top_logprobs_num: int | None = None
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI function tools the model may call
    tool_choice: str | None = None  # "auto", "none", "required" or a tool's name; None: the API's default
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific pass-through


@dataclass
class GenResult:
    """What a ``gen`` produced: the new text only (not the prompt), and ``meta_info``.

    ``meta_info`` keys, each optional: ``prompt_tokens``, ``completion_tokens``,
    ``cached_tokens``, ``finish_reason``, ``output_token_logprobs``, ``tool_calls`` (with
    ``tools``: ``[{"id", "name", "arguments"}]``, arguments as JSON text) and whatever else the
    backend reports; the interpreter exposes it through ``s.get_meta_info(name)``.
    """

    text: str
    meta_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelectResult:
    """What a ``select`` picked: the choice (one of the given strings), its index, one score per
    choice (higher is better; the normalised logprob where the backend has logprobs) and
    ``meta_info`` (backend-specific, e.g. per-token logprobs)."""

    choice: str
    index: int
    scores: list[float] = field(default_factory=list)
    meta_info: dict[str, Any] = field(default_factory=dict)


CHOICE_METHODS = ("token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized")


class LangBackend:
    """Base class of API backends. Override ``generate`` and, where the backend can do better than
    the defaults, ``generate_stream``, ``select`` and ``cache_prefix``."""

    name = "backend"
    supports_images = False
    supports_tools = False  # gen(tools=...): the backend sends tools and reports the calls
    # The text a completion-style backend's prompt holds where each image goes (a served vision
    # model's image token); chat-style backends place images as message parts and leave it empty.
    image_token = ""
    # Where each video goes, for a backend whose server takes video files (decoded there); without
    # it, ``sgl.video`` sends the video's frames as images.
    video_token = ""
    chat_template = ChatTemplate(role_prefix={"system": "", "user": "", "assistant": ""},
                                 role_suffix={"system": "\n", "user": "\n", "assistant": "\n"})

    def generate(self, prompt: Prompt, params: GenParams) -> GenResult:
        raise NotImplementedError

    def generate_stream(self, prompt: Prompt, params: GenParams) -> Iterator[str | GenResult]:
        """Yield the new text piece by piece, then one final :class:`GenResult` holding the whole
        new text and ``meta_info``. The default produces it all at once from ``generate``."""
        result = self.generate(prompt, params)
        if result.text:
            yield result.text
        yield result

    def select(self, prompt: Prompt, choices: list[str], temperature: float,
               method: str = "token_length_normalized") -> SelectResult:
        raise UnsupportedError(f"select: the {self.name} backend cannot score choices")

    def cache_prefix(self, prompt: Prompt) -> None:
        """Called before ``fork``: make the shared prefix cheap for the branches (a no-op where the
        backend has no cache to warm)."""

    def shutdown(self) -> None:
        """Release connections or processes the backend owns."""
