"""The engine core: model runner + scheduler behind a message interface.

It takes ``GenerateRequest`` messages and gives back ``TokenOutput`` messages, so the same core
runs in a thread of the caller's process (``Engine``) or in a process of its own (the server).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from sglang_core.config import EngineSettings
from sglang_core.messages import GenerateRequest, TokenOutput
from sglang_core.model_executor.runner import ModelRunner
from sglang_core.model_executor.tp_ranks import TPRanks
from sglang_core.multimodal import unpack_tensor
from sglang_core.plugins import PluginManager
from sglang_core.request import Req
from sglang_core.sampling.params import SamplingParams
from sglang_core.sampling.sampler import Sampler, make_generator
from sglang_core.scheduler.scheduler import Scheduler
from sglang_core.constrained.compiler import GrammarCompiler, make_grammar_backend
from sglang_core.constrained.limits import CompileBudget
from sglang_core.tokenizer import eos_token_ids, has_tokenizer, load_tokenizer, placeholder_tokenizer
from sglang_core.weights.loader import ModelSource, resolve_model_source

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the request side needs to know to validate and detokenize."""

    model_path: str
    tokenizer_path: str
    model_folder: str  # holds config.json (and an image processor's files)
    architecture: str  # the registered architecture the model was built as
    vocab_size: int
    context_len: int
    max_total_tokens: int
    eos_token_ids: tuple[int, ...]
    attention_backend: str
    device: str
    dtype: str


class EngineCore:
    def __init__(self, settings: EngineSettings, plugins: PluginManager):
        self.plugins = plugins
        source = resolve_model_source(settings.model_path, settings.load_format, plugins.registry("weight_formats"))
        # Tensor parallelism: this is rank 0; the other ranks run in processes of their own.
        self.tp_ranks = TPRanks(settings, plugins.loaded_names()) if settings.tp_size > 1 else None
        if self.tp_ranks is None:
            self.runner = ModelRunner(settings, source, plugins)
        else:
            self.runner = self.tp_ranks.build_runner(settings, source, plugins)
        try:
            self._start_scheduler(settings, plugins, source)
        except BaseException:
            if self.tp_ranks is not None:
                self.tp_ranks.stop()
            raise
        self._sent: dict[str, int] = {}  # rid -> output tokens already reported

    def _start_scheduler(self, settings: EngineSettings, plugins: PluginManager, source: ModelSource) -> None:
        """The tokenizer, grammar compiler and scheduler around the built runner."""
        tokenizer_path = settings.tokenizer_path or str(source.folder)
        if settings.tokenizer_path is None and source.load_format == "dummy" and not has_tokenizer(source.folder):
            cfg = self.runner.config
            eos = getattr(cfg, "eos_token_id", None)
            tokenizer_path = str(placeholder_tokenizer(self.runner.vocab_size, eos[0] if isinstance(eos, list) else eos))
        tokenizer = load_tokenizer(tokenizer_path)
        eos = eos_token_ids(tokenizer, source.folder)
        processors = [entry.load()(vocab_size=self.runner.vocab_size, device=self.runner.device)
                      for entry in plugins.registry("logits_processors")]
        budget = CompileBudget(settings.grammar_compile_timeout_s, settings.grammar_compile_memory_mb)
        backend = make_grammar_backend(plugins, settings.grammar_backend, tokenizer, self.runner.vocab_size, budget)
        self.grammars = GrammarCompiler(backend) if backend is not None else None
        self.scheduler = Scheduler(self.runner, settings, Sampler(processors), tokenizer, eos, self.grammars)
        self.info = ModelInfo(
            model_path=source.origin,
            tokenizer_path=tokenizer_path,
            model_folder=str(source.folder),
            architecture=self.runner.architecture,
            vocab_size=self.runner.vocab_size,
            context_len=self.runner.context_len,
            max_total_tokens=self.runner.max_total_tokens,
            eos_token_ids=tuple(sorted(eos)),
            attention_backend=self.runner.attention_backend_name,
            device=str(self.runner.device),
            dtype=str(self.runner.dtype).removeprefix("torch."),
        )
        self.tokenizer = tokenizer

    def add(self, msg: GenerateRequest) -> None:
        params = SamplingParams(**msg.sampling_params)
        self._sent[msg.rid] = 0
        self.scheduler.add_request(Req(
            rid=msg.rid,
            origin_input_ids=list(msg.input_ids),
            sampling_params=params,
            return_logprob=msg.return_logprob,
            logprob_start_len=msg.logprob_start_len,
            top_logprobs_num=msg.top_logprobs_num,
            media=list(msg.media),
            position_table=None if msg.positions is None else unpack_tensor(msg.positions.table),
            position_delta=0 if msg.positions is None else msg.positions.decode_delta,
            generator=make_generator(params.seed, self.runner.device),
        ))

    def abort(self, rid: str) -> list[TokenOutput]:
        """Abort ``rid`` and any request whose id is ``rid-<n>`` (the copies of an n > 1 request)."""
        rids = [r for r in self._sent if r == rid or r.startswith(f"{rid}-")]
        return [self._output(req) for req in map(self.scheduler.abort, rids) if req is not None]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def broken(self) -> bool:
        """True once the tensor-parallel group has stopped after a failure: no step can run again."""
        return self.tp_ranks is not None and self.tp_ranks.failure is not None

    def step(self) -> list[TokenOutput]:
        """One scheduler step; an internal error fails the affected requests, not the core."""
        try:
            reqs = self.scheduler.step()
        except Exception as exc:
            logger.exception("engine step failed")
            reqs = self.scheduler.fail_all(f"internal error: {type(exc).__name__}: {exc}")
            # Requests the step finished before it failed are reported too, or their callers would wait forever.
            failed = {id(r) for r in reqs}
            reqs += [r for r in self.scheduler.finished_in_step if id(r) not in failed]
        return [self._output(req) for req in reqs]

    def close(self) -> None:
        """Stop the grammar compiler's workers and the other tensor-parallel ranks (the engine is
        shutting down)."""
        if self.grammars is not None:
            self.grammars.shutdown()
        if self.tp_ranks is not None:
            self.tp_ranks.stop()

    def fail_all(self, message: str) -> list[TokenOutput]:
        return [self._output(req) for req in self.scheduler.fail_all(message)]

    def call(self, name: str) -> Any:
        """Named queries and maintenance, for the request side."""
        calls = {
            "flush_cache": self.scheduler.flush_cache,
            "memory_report": self.scheduler.memory_report,
            "check_memory": self.scheduler.check_memory,
            "stats": lambda: {"forward_steps": self.scheduler.forward_steps,
                              "retractions": self.scheduler.retractions,
                              "mixed_decode_tokens": self.scheduler.mixed_decode_tokens,
                              "cascade_decode_rows": self.scheduler.cascade_decode_rows,
                              "overlapped_steps": self.scheduler.overlapped_steps,
                              "images_encoded": self.scheduler.images_encoded},
        }
        if name not in calls:
            raise ValueError(f"unknown engine call {name!r}")
        return calls[name]()

    def _output(self, req: Req) -> TokenOutput:
        start = self._sent[req.rid]
        end = len(req.output_ids)
        out = TokenOutput(
            rid=req.rid,
            new_ids=req.output_ids[start:end],
            finished_reason=req.finished_reason,
            cached_tokens=req.cached_tokens,
            forced_tokens=req.forced_tokens,
            produced_at=time.time(),
        )
        if req.return_logprob:
            out.output_logprobs = req.output_token_logprobs[start:end]
            out.output_top_logprobs = req.output_top_logprobs[start:end]
            if start == 0 and req.logprob_start_len >= 0:
                out.input_logprobs = list(req.input_token_logprobs)
                out.input_top_logprobs = list(req.input_top_logprobs)
        if req.finished:
            del self._sent[req.rid]
        else:
            self._sent[req.rid] = end
        return out
