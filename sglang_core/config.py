"""Every engine setting, once: the same name is a keyword of ``Engine(...)``, a CLI flag
(``--mem-fraction-static``) and an environment variable (``SGLANG_CORE_MEM_FRACTION_STATIC``)."""

from __future__ import annotations

import argparse
import json
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CliSettings(BaseSettings):
    """Settings that are each a keyword, a ``--flag`` and a ``SGLANG_CORE_*`` environment variable."""

    model_config = SettingsConfigDict(env_prefix="SGLANG_CORE_", extra="forbid", validate_default=True)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One ``--flag`` per field (plus the other spellings in its ``json_schema_extra={"flags": [...]}``;
        ``"nargs"`` there takes a list as separate words); unset flags stay unset so env vars and
        defaults apply."""
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra or {}
            flags = ["--" + name.replace("_", "-"), *extra.get("flags", [])]
            kind = _plain_type(info.annotation)
            help_text = f"{info.description} (default: {info.default})"
            if "nargs" in extra:  # a list given as separate words: --workers URL URL
                parser.add_argument(*flags, nargs=extra["nargs"], default=argparse.SUPPRESS, help=help_text)
            elif kind is bool:
                parser.add_argument(*flags, action="store_const", const=True, default=argparse.SUPPRESS, help=help_text)
            elif get_origin(kind) is Literal:
                parser.add_argument(*flags, choices=get_args(kind), default=argparse.SUPPRESS, help=help_text)
            elif kind in (int, float):
                parser.add_argument(*flags, type=kind, default=argparse.SUPPRESS, help=help_text)
            else:
                parser.add_argument(*flags, type=str, default=argparse.SUPPRESS, help=help_text)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> "CliSettings":
        given = {k: v for k, v in vars(args).items() if k in cls.model_fields}
        given.update(overrides)
        return cls(**given)

    def public_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


class EngineSettings(CliSettings):
    # Model and weights
    model_path: str | None = Field(None, description="HF folder, .gguf file, or config folder for dummy weights; default: the embedded SmolLM2-135M-Instruct")
    tokenizer_path: str | None = Field(None, description="tokenizer folder (default: the model's)")
    load_format: str = Field("auto", description="how to read weights: auto (by the model path), dummy (random), or a registered weight format (built in: safetensors, gguf)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="compute dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs")
    context_length: int | None = Field(None, gt=0, description="max tokens per request (default: the model's)")
    random_seed: int = Field(0, description="seed for dummy weights and unseeded sampling")
    quantization: str | None = Field(None, description="quantization method name (a quant plugin's, e.g. fp8): overrides the checkpoint's quantization_config quant_method, or quantizes a 16/32-bit checkpoint at load")
    disable_mla: bool = Field(False, description="models with multi-head latent attention (DeepSeek-V2/V3) cache every head's key and value instead of one latent per token and decode without weight absorption (about 9x the KV memory per token for DeepSeek-V2); other models ignore it")

    # Memory
    mem_fraction_static: float = Field(0.85, gt=0, lt=1, description="CUDA: fraction of GPU memory for weights + KV pool")
    kv_cache_memory_gb: float | None = Field(None, gt=0, description="KV pool budget in GiB (CPU default: 2)")
    max_total_tokens: int | None = Field(None, gt=0, description="KV pool size in tokens (overrides the memory budget)")
    max_running_requests: int = Field(128, gt=0, description="most requests in the running batch")
    kv_cache_dtype: Literal["auto", "fp8_e4m3", "fp8_e5m2"] = Field(
        "auto", description="K/V element type in the pool: auto = the compute dtype; fp8_e4m3 / fp8_e5m2 store 8 "
                            "bits (half of bf16's memory and reads; values stored unscaled, attention computes in the compute dtype)")

    # Scheduling
    chunked_prefill_size: int = Field(2048, description="most prompt tokens per prefill step; <= 0 disables chunking")
    max_prefill_tokens: int = Field(16384, gt=0, description="most prompt tokens admitted in one prefill batch")
    schedule_policy: Literal["lpm", "fcfs"] = Field("lpm", description="lpm: longest cached prefix first; fcfs: arrival order")
    schedule_aging_s: float = Field(5.0, ge=0, description="a request waiting longer than this is served in arrival order ahead of the policy")
    new_token_ratio: float = Field(0.3, ge=0, le=1, description="share of max_new_tokens reserved per running request when admitting")
    disable_radix_cache: bool = Field(False, description="switch the prefix cache off")
    enable_cascade_decode: bool = Field(False, description="decode reads a cached prefix shared by several running requests once per group, not once per request (triton attention backend)")
    enable_mixed_chunk: bool = Field(False, description="running requests decode their next token in the same forward pass as a prefill step instead of waiting for it")
    max_step_tokens: int | None = Field(None, gt=0, description="most tokens in a step that carries prefill: the running requests' decodes ride along first (as with --enable-mixed-chunk) and prefill chunks fill the rest, so a prompt stalls decoding for one bounded step at a time; unset: prefill steps are bounded by --chunked-prefill-size alone")
    target_step_ms: float | None = Field(None, gt=0, description="size the token budget of steps that carry prefill so their time stays near this, from a line time = a + b * tokens fitted to recent such steps (at most --max-step-tokens, else --chunked-prefill-size); implies the decodes-first steps of --max-step-tokens")
    target_step_ratio: float | None = Field(None, gt=1, description="as --target-step-ms, with the target this many times the running batch's plain decode step (the median of the last ones measured), so a step carrying prefill stalls the decodes by a bounded factor at any load")
    max_queue_prefill_ms: float | None = Field(None, gt=0, description="with a step token budget: when the waiting prompts would take longer than this to prefill in steps of the budget (by the fitted step-cost line), the budget grows to the size that prefills them in this time, at most the running decodes plus --chunked-prefill-size: bounded steps while the queue is short, an unbounded schedule's throughput under saturation")

    # Plugins and kernels
    plugins: list[str] | None = Field(None, description="plugins to load, comma-separated (default: all installed)")
    attention_backend: str = Field("auto", description="attention backend name, or auto for the best available")
    # llguidance by measurement (docs/benchmarks.md, issue 21): the outlines backend covers as many
    # schemas, but llguidance compiles a new one in milliseconds where outlines takes seconds.
    grammar_backend: str = Field("llguidance", description="grammar backend for regex / json_schema / ebnf constraints")
    disable_jump_forward: bool = Field(False, description="decode text a constraint forces token by token instead of appending it at once")
    grammar_compile_timeout_s: float = Field(60.0, gt=0, description="a constraint not compiled in this time fails its request; a compile running this long is stopped")
    grammar_compile_memory_mb: int = Field(4096, gt=0, description="memory one grammar compile process may use (outlines backend); past it the compile fails")
    tp_size: int = Field(1, ge=1, json_schema_extra={"flags": ["--tp"]}, description="tensor-parallel size: ranks (processes, one GPU each on CUDA) each holding a shard of every layer; rank 0 runs the scheduler")
    enable_ep_moe: bool = Field(False, description="expert parallelism for MoE layers: each tensor-parallel rank holds num_experts / tp_size whole experts (instead of 1 / tp_size of every expert) and computes only the tokens routed to them; shared experts and every other layer stay tensor-parallel")
    ep_size: int | None = Field(None, ge=1, description="expert-parallel size: the tensor-parallel ranks hold the experts, so it must equal tp_size; > 1 turns on --enable-ep-moe (default: tp_size with --enable-ep-moe)")
    nnodes: int = Field(1, ge=1, description="machines the tensor-parallel ranks span, tp_size / nnodes ranks on each")
    node_rank: int = Field(0, ge=0, description="this machine's index among nnodes: node 0 runs the scheduler (and HTTP), the others only their ranks")
    dist_init_addr: str | None = Field(None, json_schema_extra={"flags": ["--nccl-init"]}, description="host:port of node 0 where every rank meets (it listens there); needed with nnodes > 1 (default: a free loopback port)")
    # Off by default until benchmarks/allreduce.py and bench-latency --tp 2 have measured it on GPUs.
    enable_custom_all_reduce: bool = Field(False, description="CUDA, tensor parallelism on one machine: all-reduces of small messages (a decode step's; the limit is ONE_SHOT_MAX_BYTES in sglang_core/layers/one_shot_all_reduce.py) run as one kernel that reads every peer's copy over NVLink from peer-mapped buffers (PyTorch symmetric memory; CUDA graphs capture it), larger ones through NCCL; off until measured against NCCL; where a rank cannot use it (no peer access, older torch) every all-reduce stays NCCL's")
    disable_cuda_graph: bool = Field(False, description="CUDA: run decode steps eagerly instead of replaying CUDA graphs")
    cuda_graph_max_bs: int = Field(256, gt=0, description="CUDA: largest decode batch captured as a graph (larger ones run eagerly)")
    disable_overlap_schedule: bool = Field(False, description="CUDA graphs: read each decode step back before launching the next")
    # Off by default until measured on a GPU (docs/benchmarks.md, issue 23): its GPU test has passed
    # for one family only, and its effect on inter-token latency is not yet measured.
    extend_graph_max_tokens: int = Field(0, ge=0, description="CUDA graphs: an extend step (a prefill chunk, decodes riding along) of at most this many new tokens replays the decode graphs as one row per token instead of running eagerly (an eager pass of a small chunk is mostly launch overhead: ~17 ms for Llama-8B on an H100); graphs are then captured for up to this many rows (within --cuda-graph-max-bs); 0: extend steps always run eagerly")
    enable_torch_compile: bool = Field(False, description="CUDA: torch.compile the decode step before capturing it, once per captured batch size (slow to start: lower --cuda-graph-max-bs to try it)")

    # Images in requests (read on the request side; see sglang_core.media_loading)
    allow_media_urls: bool = Field(False, description="fetch http(s) image URLs (public addresses only, no redirects); off: data URLs and base64 only")
    allowed_local_media_path: str | None = Field(None, description="folder whose image files requests may name by path (default: none)")
    media_max_bytes: int = Field(20 * 2**20, gt=0, description="largest image a request may send or have fetched, in bytes")
    media_max_pixels: int = Field(32 * 2**20, gt=0, description="largest image in pixels (width x height), checked before decoding")
    media_fetch_timeout_s: float = Field(10.0, gt=0, description="time limit for fetching one image URL, DNS answer to last byte")
    media_video_frames: int = Field(8, gt=0, description="frames sampled evenly from a video file (a request may ask for another number up to --media-max-video-frames)")
    media_max_video_frames: int = Field(32, gt=0, description="most frames of one video, sent as frames or sampled from a file")

    engine_in_subprocess: bool = Field(False, description="run the scheduler and model in a process of their own")
    cuda_visible_devices: str | None = Field(None, description="CUDA_VISIBLE_DEVICES of the engine process (with --engine-in-subprocess; default: inherited). --dp-size gives each replica its own GPUs this way")
    log_level: str = Field("warning", description="logging level")

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_plugins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()] or None
        return value

    @model_validator(mode="after")
    def _step_budget_needs_chunks(self) -> "EngineSettings":
        fields = [f for f in ("max_step_tokens", "target_step_ms", "target_step_ratio") if getattr(self, f) is not None]
        if fields and self.chunked_prefill_size <= 0:
            raise ValueError(f"{fields[0]}: a step token budget splits prompts into chunks; it needs "
                             f"chunked_prefill_size > 0 (got {self.chunked_prefill_size})")
        if self.max_queue_prefill_ms is not None and not fields:
            raise ValueError("max_queue_prefill_ms: it grows a step token budget; give one (max_step_tokens, "
                             "target_step_ms or target_step_ratio)")
        if self.target_step_ms is not None and self.target_step_ratio is not None:
            raise ValueError("target_step_ratio: give a step time target either in ms (target_step_ms) or as a "
                             "ratio to a decode step, not both")
        return self

    @model_validator(mode="after")
    def _check_expert_parallel(self) -> "EngineSettings":
        if self.ep_size is not None and self.expert_parallel and self.ep_size != self.tp_size:
            raise ValueError(f"ep_size: the experts are split over the tensor-parallel ranks: ep_size must equal "
                             f"tp_size={self.tp_size}, not {self.ep_size}")
        return self

    @property
    def expert_parallel(self) -> bool:
        """Whether MoE layers split their experts over the ranks (``--enable-ep-moe`` or ``--ep-size``)."""
        return self.enable_ep_moe or (self.ep_size or 1) > 1

    @model_validator(mode="after")
    def _check_nodes(self) -> "EngineSettings":
        if self.tp_size % self.nnodes:
            raise ValueError(f"tp_size: {self.tp_size} ranks do not split evenly over nnodes={self.nnodes}")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank: {self.node_rank} is not below nnodes={self.nnodes}")
        if self.nnodes > 1 and self.dist_init_addr is None:
            raise ValueError("dist_init_addr: nnodes > 1 needs node 0's host:port")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"dist_init_addr: expected host:port, got {self.dist_init_addr!r}")
        return self


def _plain_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``list[str] | None`` -> list[str]."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation
