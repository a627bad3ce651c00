"""Every extension point of sglang-core, in one place.

A plugin is a module with a few ``@hookimpl`` functions, found through the entry-point group
``sglang_core.plugins`` (see ``docs/plugins.md``). All hooks run at setup time, never per token:
a ``register_*`` hook hands the core a name and a *target*, and the core later builds and calls
that object directly. A target is either the object itself or a lazy ``"module:attr"`` string,
so listing plugins imports no model code and touches no GPU.

Each ``register`` callback takes ``register(name, target, **metadata)``. Registering a name that
another plugin already registered is an error naming both plugins.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "sglang_core"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def register_models(register: Register) -> None:
    """Register model classes by Hugging Face architecture name.

    ``register("LlamaForCausalLM", "pkg.llama:LlamaForCausalLM")``. The class is built as
    ``cls(config, model_context)`` (see ``sglang_core.model_executor.model_api``) and must provide
    ``forward(input_ids, positions, forward_batch) -> hidden_states``, ``compute_logits(hidden)``
    and ``load_weights(iterable of (hf_name, tensor))``.

    A model that takes images registers with ``input_processor="pkg.mod:Processor"`` (a
    ``sglang_core.multimodal.InputProcessor``, run on the request side) and provides
    ``embed_media(inputs) -> list of [placeholders, hidden] tensors``.

    A checkpoint whose config.json is laid out otherwise than the class expects registers with
    ``config_adapter="pkg.mod:adapt"``: ``adapt(config, model_folder) -> config``, applied wherever
    the core loads the model's config (``weights.loader.load_model_config``).
    """


@hookspec
def register_attention_backends(register: Register) -> None:
    """Register attention backends (subclasses of ``sglang_core.layers.attention.AttentionBackend``).

    ``register("triton", "pkg.triton_backend:TritonBackend", priority=50,
    is_available="pkg.triton_backend:is_available")``. ``--attention-backend auto`` picks the
    available backend with the highest priority; ``is_available(device) -> bool`` is optional.
    """


@hookspec
def register_quant_methods(register: Register) -> None:
    """Register quantization methods (subclasses of ``sglang_core.layers.quant.QuantMethod``),
    keyed by the ``quant_method`` name found in a checkpoint's ``quantization_config`` (or given as
    ``--quantization``)."""


@hookspec
def register_weight_formats(register: Register) -> None:
    """Register checkpoint formats the engine reads weights from, by the name ``--load-format`` takes.

    ``register("myformat", "pkg.fmt:MyFormat", priority=20)``: a subclass of
    ``sglang_core.weights.format.WeightFormat``, built as ``cls()``, with
    - ``claims(path) -> bool``: whether ``--load-format auto`` should read ``path`` (what
      ``--model-path`` names, a file or a folder) with this format; a cheap look at names only.
      Of the formats that claim a path, the one with the highest ``priority`` wins (built in:
      ``safetensors`` 100, ``gguf`` 50, ``gguf_quantized`` 40);
    - ``config_folder(path) -> Path``: the folder holding ``config.json`` and the tokenizer (by
      default ``path`` itself; a format whose files carry their own config writes such a folder
      once, as ``gguf`` does);
    - ``iter_weights(path)``: yields ``(hugging_face_name, tensor)`` one tensor at a time; the
      model's ``load_weights`` consumes them as they come, so a checkpoint is never in memory whole.
    Raise ``ValueError`` naming the file for anything unreadable. Never unpickle file contents.
    ``--load-format myformat`` picks the format by name; ``auto`` and ``dummy`` are reserved.
    """


@hookspec
def register_grammar_backends(register: Register) -> None:
    """Register grammar backends for constrained decoding (regex / JSON Schema / EBNF), by name as
    chosen with ``--grammar-backend`` (default ``llguidance``; built in too: ``outlines``, ``xgrammar``).

    ``register("mygrammar", "pkg.grammar:MyBackend")``: a subclass of
    ``sglang_core.constrained.grammar.GrammarBackend``, built as
    ``cls(tokenizer, vocab_size, eos_token_id)``. ``validate(kind, spec)`` runs on the request
    side (cheap; a ``ValueError`` naming the field becomes HTTP 400); ``compile(kind, spec)``
    runs in a worker thread and returns a ``Grammar`` whose ``new_state()`` walks one request:
    ``fill_bitmask``, ``advance``, ``is_finished``.
    """


@hookspec
def register_logits_processors(register: Register) -> None:
    """Register batched logits processors (subclasses of
    ``sglang_core.sampling.logits_processor.LogitsProcessor``).

    Every registered processor is built once per engine; each step the sampler calls, in
    registration order, those whose ``wants(params)`` is true for some request of the batch.
    The core's own penalties, logit bias and min_new_tokens run through this hook.
    """


@hookspec
def register_api_backends(register: Register) -> None:
    """Register API backends for the frontend language, by the name the language resolves them
    with: ``runtime_endpoint``, ``openai``, ``anthropic``, ``litellm``, ``vertexai`` (``sgl.OpenAI(...)``
    looks up ``openai`` and builds ``cls(*args, **kwargs)``).

    ``register("openai", "pkg.backend:OpenAIBackend")``: a subclass of
    ``sglang_core.lang.backend.LangBackend`` (``generate``; optionally ``generate_stream``,
    ``select``, ``cache_prefix``), which receives ``Prompt`` snapshots of the program state. A
    backend whose SDK is missing raises ``MissingExtraError`` from ``__init__``.
    """


@hookspec
def register_frontends(register: Register) -> None:
    """Register serving frontends: HTTP APIs that ``sglang-core serve`` mounts on its FastAPI app.

    ``register(name, "pkg.module:mount")`` where ``mount(app: FastAPI, ctx: ServerContext) -> None``
    adds routes. ``ctx`` (``sglang_core.server.context``) gives the engine and the helpers every
    API needs: admission control, abort on client disconnect, latency metrics, error bodies.
    ``--frontends a,b`` mounts only those. Built in: ``native`` (SGLang's ``/generate``),
    ``openai`` (``/v1/chat/completions``, ...) and ``anthropic`` (``/v1/messages``)."""


@hookspec
def register_tool_parsers(register: Register) -> None:
    """Register tool-call parsers for the OpenAI and Anthropic frontends, by the name
    ``--tool-call-parser`` takes (default: the parser whose ``template_markers`` the model's chat
    template contains, else ``generic``).

    ``register("hermes", "pkg.parsers:HermesParser")``: a subclass of
    ``sglang_core.server.tool_parser.ToolParser``, built per generated message as ``cls(tools)``;
    ``feed(text)`` takes the model's output in increments and ``finish()`` ends it, each returning
    the content that can no longer be part of a call and the calls completed (name, arguments as
    JSON text). Text that might still become a call (a tag cut by a chunk boundary) is held back.
    """


@hookspec
def register_router_policies(register: Register) -> None:
    """Register data-parallel routing policies, by the name ``--router-policy`` takes.

    ``register("mypolicy", "pkg.policy:MyPolicy")``: a subclass of
    ``sglang_core.router.policies.RoutingPolicy``, built as ``cls(replicas, options)`` (options:
    ``sglang_core.router.options.RouterOptions``) once per router, whose
    ``choose(key, loads, live) -> replica`` picks one of the ``live`` replicas for a request whose
    prompt is ``key`` (token ids under ``--dp-size``, characters in ``sglang-core router``), given
    each replica's ``ReplicaLoad`` (requests and tokens in flight); ``forget(replica)`` is called
    when a replica's cache is flushed or it dies. Built in: ``round_robin``, ``shortest_queue``,
    ``cache_aware``."""


@hookspec
def on_engine_start(engine: Any) -> None:
    """Called once when an engine has loaded its model and is ready to take requests."""


@hookspec
def on_engine_shutdown(engine: Any) -> None:
    """Called once when an engine shuts down, before its memory is released."""
