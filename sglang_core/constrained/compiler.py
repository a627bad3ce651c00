"""Compiles constraints in worker threads, once per distinct constraint, so building an index
never stalls the scheduler: a constrained request waits in the queue until its grammar is ready
while the others run. Each compile is bounded by the backend's ``CompileBudget``, and two run at
once, so a slow one does not hold up the next."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from sglang_core.constrained.grammar import Grammar, GrammarBackend
from sglang_core.constrained.limits import CompileBudget
from sglang_core.plugins import PluginManager

CACHE_SIZE = 256
WORKERS = 2


class GrammarCompiler:
    def __init__(self, backend: GrammarBackend):
        self.backend = backend
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="sglang-core-grammar")
        self._cache: OrderedDict[tuple[str, str], Future[Grammar]] = OrderedDict()

    def get(self, kind: str, spec: str) -> Future[Grammar]:
        """The compiled grammar for ``(kind, spec)``: cached, or compiling. A failure (a
        ``ValueError`` from ``result()``) is cached too: a constraint that ran out of its compile
        budget fails again at once rather than holding a worker for the whole budget each time."""
        key = (kind, spec)
        future = self._cache.get(key)
        if future is None:
            future = self._pool.submit(self.backend.compile, kind, spec)
            self._cache[key] = future
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.backend.close()  # ends a compile still running


def make_grammar_backend(plugins: PluginManager, name: str, tokenizer, vocab_size: int,
                         budget: CompileBudget = CompileBudget()) -> GrammarBackend | None:
    """The backend registered as ``name``, or None when no loaded plugin provides it (constrained
    requests are then refused by name). ``budget`` bounds each of its compiles."""
    registry = plugins.registry("grammar_backends")
    if name not in registry.names():
        return None
    eos = tokenizer.eos_token_id
    backend = registry.get(name).load()(tokenizer, vocab_size, eos if eos is not None else vocab_size - 1)
    backend.budget = budget
    return backend
