"""Builds the model, its KV pools and attention backend, and runs one forward pass per step."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from sglang_core.config import EngineSettings
from sglang_core.layers.attention import AttentionBackend, AttentionSpec, UnsupportedSpecError, attention_layers
from sglang_core.layers.parallel import SINGLE, TPGroup
from sglang_core.mem.kv_pool import ReqToTokenPool, TokenKVPool
from sglang_core.messages import MediaItem
from sglang_core.model_executor.cuda_graph import CUDA_GRAPHS, CudaGraphRunner, GraphPrimitives, decode_rows, row_chunks
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode
from sglang_core.model_executor.model_api import ModelContext
from sglang_core.multimodal import unpack_tensor
from sglang_core.plugins import PluginError, PluginManager
from sglang_core.weights.loader import ModelSource, init_dummy_weights, language_config, load_model_config

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
CPU_KV_BUDGET_GB = 2.0


@dataclass
class StepInput:
    """One step's batch as the scheduler planned it (host lists; the runner makes tensors)."""

    mode: ForwardMode
    input_ids: list[int] | torch.Tensor  # a tensor: already on the device (overlapped decode)
    positions: list[int] | torch.Tensor  # [T], or [components, T] from a model's media (M-RoPE)
    out_cache_loc: torch.Tensor
    req_pool_indices: list[int]
    seq_lens: list[int]
    prefix_lens: list[int]
    fill_lens: list[int]  # ForwardBatch.fill_lens
    logit_index: list[int]  # which new tokens' hidden states become logits
    shared_prefixes: tuple = ()  # decode with cascade: ForwardBatch.shared_prefixes
    # (rows of input_ids, their embeddings): ForwardBatch.input_embed_rows / input_embeds
    input_embeds: tuple[list[int], torch.Tensor] | None = None


def as_decode_rows(step: StepInput) -> StepInput:
    """An extend step as a decode step of one row per new token (``cuda_graph.decode_rows``): the
    same logits for every token, so ``logit_index`` still picks the step's rows."""
    rows, seq_lens, fill_lens = decode_rows(step.req_pool_indices, step.prefix_lens, step.seq_lens, step.fill_lens)
    return replace(step, mode=ForwardMode.DECODE, req_pool_indices=rows, seq_lens=seq_lens,
                   prefix_lens=[n - 1 for n in seq_lens], fill_lens=fill_lens, shared_prefixes=())


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def pick_dtype(name: str, config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    return torch.float32 if device.type == "cpu" else torch.bfloat16


class ModelRunner:
    """One rank's model, KV pools and attention backend. ``tp``: this rank's tensor-parallel group
    (``tp_ranks`` makes it); every rank builds the same runner over its own shards."""

    # Test hook: the graph calls with which a device other than CUDA captures and replays decode
    # graphs (tests/graph_emulation.py emulates them on the CPU, so CI runs the graph paths); None:
    # graphs on CUDA only. A class attribute rather than a setting: it is no user's choice.
    _off_cuda_graphs: GraphPrimitives | None = None

    def __init__(self, settings: EngineSettings, source: ModelSource, plugins: PluginManager, tp: TPGroup = SINGLE):
        self.settings = settings
        self.tp = tp
        self.device = pick_device(settings.device)
        self.config = load_model_config(source.folder, plugins.registry("models"))
        self.text_config = language_config(self.config)  # a vision-language config's text_config
        self.dtype = pick_dtype(settings.dtype, self.config, self.device)
        if settings.tp_size != tp.size:
            raise ValueError(f"tp_size={settings.tp_size}: the runner was given a group of {tp.size} ranks")
        # Rank 0 of a group of several: ``(step, forward_local)`` sends the step to the other
        # ranks, then runs it here (``tp_ranks.TPRanks.run``).
        self.run_on_all_ranks: Callable[[StepInput, Callable[[StepInput], torch.Tensor]], torch.Tensor] | None = None
        self.vocab_size = self.text_config.vocab_size
        model_len = getattr(self.text_config, "max_position_embeddings", None) or 2048
        self.context_len = settings.context_length or model_len
        if self.context_len > model_len:
            raise ValueError(f"context_length {self.context_len} exceeds the model's max_position_embeddings {model_len}")
        self.model = self._build_model(plugins, source)
        self.attention_layers = attention_layers(self.model)
        self.layer_specs = tuple(layer.spec for layer in self.attention_layers)
        self._init_pools()
        self.attn_backend = self._build_attention_backend(plugins)
        for layer in self.attention_layers:
            layer.backend = self.attn_backend
        self.cuda_graphs = self._capture_cuda_graphs()

    def _build_model(self, plugins: PluginManager, source: ModelSource) -> torch.nn.Module:
        archs = getattr(self.config, "architectures", None) or []
        models = plugins.registry("models")
        arch = next((a for a in archs if a in models), None)
        if arch is None:
            raise ValueError(f"no model plugin supports architectures {archs}; registered: {', '.join(models.names())}")
        cls = models.get(arch).load()
        self.architecture = arch
        tp = replace(self.tp, expert_parallel=self.settings.expert_parallel)  # MoE layers read it
        factories, unused_tensor = self._quant_method_factories(plugins)
        ctx = ModelContext(dtype=self.dtype, tp=tp, max_position=self.context_len,
                           disable_mla=self.settings.disable_mla,
                           model_class_for=functools.partial(_model_class, models), **factories)
        with torch.device(self.device):
            model = cls(self.config, ctx)
        if source.load_format == "dummy":
            init_dummy_weights(model, self.settings.random_seed)
        else:
            model.load_weights((name, tensor) for name, tensor in source.read_weights() if not unused_tensor(name))
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
        for module in list(model.modules()):  # a module's own last step, on the processed weights
            finish = getattr(module, "finish_loading", None)
            if finish is not None:
                finish()
        return model.eval()

    def _quant_method_factories(
            self, plugins: PluginManager) -> tuple[dict[str, Callable[[str], Any]], Callable[[str], bool]]:
        """``ModelContext``'s choosers of each linear layer's, each MoE layer's experts' and each
        vocabulary table's method, by ``--quantization`` if given, else the checkpoint's
        ``quantization_config`` (none of either: the context's defaults, all unquantized); a
        checkpoint without a config hands the method ``{"quant_method": name}``. And which
        checkpoint tensors the loader drops, by name."""
        quant = getattr(self.config, "quantization_config", None)
        if not quant and not self.settings.quantization:
            return {}, lambda name: False
        if quant and not isinstance(quant, dict):
            quant = quant.to_dict()
        name = self.settings.quantization or quant.get("quant_method")
        quant = quant or {"quant_method": name}
        try:
            cls = plugins.registry("quant_methods").get(str(name)).load()
        except PluginError as exc:
            raise ValueError(f"quantization {name!r} is provided by no loaded plugin: {exc}") from exc
        return ({"quant_method_for": functools.partial(cls.for_layer, quant),
                 "experts_method_for": functools.partial(cls.for_experts, quant),
                 "embedding_method_for": functools.partial(cls.for_embedding, quant)},
                functools.partial(cls.unused_checkpoint_tensor, quant))

    def _init_pools(self) -> None:
        """Size the KV pool from what the model's attention layers declare (not from config fields)."""
        s = self.settings
        self.kv_dtype = KV_DTYPES.get(s.kv_cache_dtype, self.dtype)
        per_token = TokenKVPool.bytes_per_token(self.layer_specs, self.kv_dtype)
        if s.max_total_tokens:
            tokens = s.max_total_tokens
        else:
            tokens = int(self._kv_budget_bytes() // per_token)
        tokens = min(tokens, s.max_running_requests * self.context_len)
        tokens = self.tp.agree_min(tokens, self.device)  # every rank's pool has the same slots
        if tokens < 16:
            raise ValueError(f"the KV cache budget holds only {tokens} tokens; raise kv_cache_memory_gb or mem_fraction_static")
        self.max_total_tokens = tokens
        self.req_pool = ReqToTokenPool(s.max_running_requests, self.context_len + 1, self.device)
        self.kv_pool = TokenKVPool(tokens, self.layer_specs, self.kv_dtype, self.device)
        logger.info("KV pool: %d tokens of %s (%.2f GiB)", tokens, self.kv_dtype, tokens * per_token / 2**30)

    def _kv_budget_bytes(self) -> float:
        s = self.settings
        if s.kv_cache_memory_gb is not None:
            return s.kv_cache_memory_gb * 2**30
        if self.device.type != "cuda":
            return CPU_KV_BUDGET_GB * 2**30
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        return max(total * s.mem_fraction_static - used, 0)

    def _build_attention_backend(self, plugins: PluginManager) -> AttentionBackend:
        registry = plugins.registry("attention_backends")
        name = self.settings.attention_backend
        spec = AttentionSpec(self.layer_specs, self.dtype, self.device, self._max_decode_rows(),
                             self.settings.enable_cascade_decode, self.kv_dtype)
        if name != "auto":
            entry = registry.get(name)
            if not _available(entry, self.device):
                raise ValueError(f"attention backend {name!r} is not available on {self.device}")
            return self._attention_backend(entry, spec)
        usable = sorted((r for r in registry if _available(r, self.device)),
                        key=lambda r: r.metadata.get("priority", 0), reverse=True)
        refusals = []
        for entry in usable:  # best first; a backend refuses shapes or dtypes it has no kernels for
            try:
                return self._attention_backend(entry, spec)
            except UnsupportedSpecError as exc:
                logger.info("attention backend %s skipped: %s", entry.name, exc)
                refusals.append(f"{entry.name}: {exc}")
        raise ValueError(f"no attention backend is available on {self.device} for this model; registered: "
                         f"{registry.names()}" + "".join(f"; {r}" for r in refusals))

    def _attention_backend(self, entry, spec: AttentionSpec) -> AttentionBackend:
        backend = entry.load()(spec, self.kv_pool)
        logger.info("attention backend: %s (plugin %s)", entry.name, entry.plugin)
        self.attention_backend_name = entry.name
        return backend

    def _graph_primitives(self) -> GraphPrimitives | None:
        """The graph calls of this device's decode graphs; None: decode runs eagerly."""
        if self.settings.disable_cuda_graph:
            return None
        return CUDA_GRAPHS if self.device.type == "cuda" else self._off_cuda_graphs

    def _capture_cuda_graphs(self) -> CudaGraphRunner | None:
        s = self.settings
        primitives = self._graph_primitives()
        if primitives is None:
            return None
        if not self.attn_backend.cuda_graph_decode:
            logger.info("attention backend %s cannot be captured; decode runs eagerly", self.attention_backend_name)
            return None
        decode = self._decode_logits
        if s.enable_torch_compile:
            # Only the captured decode step, one compiled graph per captured batch size and one
            # more per size captured with row chunks (hence the cache limit); prefill shapes
            # change every step and stay eager.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 128)
            decode = torch.compile(decode, dynamic=False)
        with torch.inference_mode():
            return CudaGraphRunner(decode, self._make_batch, self.attn_backend,
                                   min(s.cuda_graph_max_bs, self._max_decode_rows()), self.device, primitives,
                                   chunk_max_bs=min(s.extend_graph_max_tokens, s.cuda_graph_max_bs))

    def _max_decode_rows(self) -> int:
        """The most rows a decode batch may have: the running requests, or with graphs the tokens of
        an extend step replayed as decode rows (``as_decode_rows``)."""
        s = self.settings
        graphs = self._graph_primitives() is not None
        return max(s.max_running_requests, min(s.extend_graph_max_tokens, s.cuda_graph_max_bs) if graphs else 0)

    def _make_batch(self, **fields) -> ForwardBatch:
        return ForwardBatch(req_to_token=self.req_pool.req_to_token, **fields)

    def _decode_logits(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits of every token of a decode batch (what a captured graph computes)."""
        return self.model.compute_logits(self.model(batch.input_ids, batch.positions, batch))

    def forward(self, step: StepInput) -> torch.Tensor:
        """Run the model on one batch; return float32 logits of the tokens in ``logit_index``.
        Call under ``torch.inference_mode()`` (the scheduler's step is)."""
        if self.run_on_all_ranks is not None:
            return self.run_on_all_ranks(step, self.forward_local)
        return self.forward_local(step)

    def forward_local(self, step: StepInput) -> torch.Tensor:
        """``forward`` on this rank alone (each tensor-parallel rank runs it on the step it was sent)."""
        graphs = self.cuda_graphs
        dev = self.device
        if step.mode is ForwardMode.DECODE and graphs is not None and len(step.input_ids) <= graphs.max_bs:
            return graphs.replay(step.input_ids, step.positions, step.out_cache_loc, step.req_pool_indices,
                                 step.seq_lens, step.fill_lens, step.shared_prefixes)
        if graphs is not None and self._extend_in_graph(step):
            rows = as_decode_rows(step)
            logits = graphs.replay(rows.input_ids, rows.positions, rows.out_cache_loc, rows.req_pool_indices,
                                   rows.seq_lens, rows.fill_lens,
                                   chunks=row_chunks(step.req_pool_indices, step.prefix_lens, step.seq_lens,
                                                     graphs.chunk_limit))
            return logits[torch.tensor(step.logit_index, dtype=torch.int64, device=dev)]
        batch = self._make_batch(
            mode=step.mode,
            input_ids=torch.as_tensor(step.input_ids, dtype=torch.int64, device=dev),
            positions=torch.as_tensor(step.positions, dtype=torch.int64, device=dev),
            out_cache_loc=step.out_cache_loc.to(dev),
            req_pool_indices=torch.tensor(step.req_pool_indices, dtype=torch.int64, device=dev),
            seq_lens=torch.tensor(step.seq_lens, dtype=torch.int64, device=dev),
            prefix_lens=torch.tensor(step.prefix_lens, dtype=torch.int64, device=dev),
            fill_lens=torch.tensor(step.fill_lens, dtype=torch.int64, device=dev),
            seq_lens_cpu=step.seq_lens,
            prefix_lens_cpu=step.prefix_lens,
            shared_prefixes=step.shared_prefixes,
        )
        if step.input_embeds is not None:
            rows, embeds = step.input_embeds
            batch.input_embed_rows = torch.tensor(rows, dtype=torch.int64, device=dev)
            batch.input_embeds = embeds.to(dev)
        self.attn_backend.plan(batch)
        hidden = self.model(batch.input_ids, batch.positions, batch)
        index = torch.tensor(step.logit_index, dtype=torch.int64, device=dev)
        return self.model.compute_logits(hidden[index])

    def _extend_in_graph(self, step: StepInput) -> bool:
        """Whether an extend step replays the decode graphs as one row per new token: plain
        positions and token embeddings (media and M-RoPE tables take the eager pass), and few
        enough tokens and key reads (``CudaGraphRunner.takes_extend``)."""
        return (step.mode is ForwardMode.EXTEND and step.input_embeds is None
                and not isinstance(step.positions, torch.Tensor)
                and self.cuda_graphs.takes_extend(step.prefix_lens, step.seq_lens, self.settings.extend_graph_max_tokens))

    def embed_media(self, items: list[MediaItem]) -> list[torch.Tensor]:
        """The model's embeddings of each image (``[item.length, hidden]``), encoded as one batch."""
        embed = getattr(self.model, "embed_media", None)
        if embed is None:
            raise ValueError(f"{self.architecture} takes no images")
        inputs = [{name: unpack_tensor(t, self.device) for name, t in item.tensors.items()} for item in items]
        outputs = embed(inputs)
        for item, out in zip(items, outputs, strict=True):
            if out.shape[0] != item.length:
                raise ValueError(f"the model embedded an image as {out.shape[0]} tokens, its prompt holds {item.length}")
        return outputs


def _model_class(models, arch: str) -> type:
    if arch not in models:
        raise ValueError(f"no model plugin supports the architecture {arch!r}; registered: {', '.join(models.names())}")
    return models.get(arch).load()


def _available(entry, device: torch.device) -> bool:
    check = entry.metadata.get("is_available")
    if check is None:
        return True
    from sglang_core.plugins import resolve_target

    try:
        return bool(resolve_target(check)(device))
    except Exception as exc:  # a backend whose probe breaks is simply not available
        logger.warning("attention backend %r availability check failed: %s", entry.name, exc)
        return False
