"""``--dp-size N``: N engine replicas, each an ``Engine`` whose core runs in a process of its own,
behind the asynchronous ``Engine`` API that the HTTP server uses.

The request side tokenizes once, asks the router for a replica (the token ids are the routing
key) and hands the request to that replica's ``Engine``, which detokenizes its outputs as usual.
Results carry ``meta_info["replica"]``. A replica whose process dies ends its own requests with
an error (its ``Engine`` does that); the router then never picks it again, and ``alive`` is
False, so ``/health`` answers 503 while the other replicas go on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

import torch

from sglang_core.config import EngineSettings
from sglang_core.engine import Engine, check_rid, split_prompts
from sglang_core.engine_core import ModelInfo
from sglang_core.media_inputs import images_per_prompt
from sglang_core.plugins import PluginManager
from sglang_core.router.options import RouterOptions
from sglang_core.router.router import Router


def replica_devices(replicas: int, tp_size: int, device: str) -> list[dict[str, str]]:
    """On CUDA, each replica's own ``tp_size`` GPUs (of those visible) as its engine process's
    ``cuda_visible_devices`` setting; nothing on the CPU."""
    if device == "cpu" or not torch.cuda.is_available():
        return [{} for _ in range(replicas)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(ids) < replicas * tp_size:
        raise ValueError(f"dp_size: {replicas} replicas of tp_size {tp_size} need {replicas * tp_size} GPUs; "
                         f"{len(ids)} visible")
    return [{"cuda_visible_devices": ",".join(ids[i * tp_size:(i + 1) * tp_size])} for i in range(replicas)]


class _RoutedStream:
    """A replica's output stream that tags each chunk with the replica and releases the route
    when it ends or is closed (even if it was never iterated)."""

    def __init__(self, inner: AsyncIterator[dict], replica: int, release: Callable[[], None]):
        self._inner = inner
        self._replica = replica
        self._release = release

    def __aiter__(self) -> "_RoutedStream":
        return self

    async def __anext__(self) -> dict:
        try:
            chunk = await self._inner.__anext__()
        except BaseException:
            self._release()
            raise
        chunk["meta_info"]["replica"] = self._replica
        return chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()  # aborts the request on its replica if it is unfinished
        finally:
            self._release()


class DataParallelEngine:
    """``replicas`` engines started from the same settings, requests spread by a ``Router``.

    Offers the asynchronous API (``async_generate``, ``abort``, ``flush_cache``,
    ``memory_report``, ``check_memory``, ``stats``, ``shutdown``); the blocking ``generate`` and
    ``select`` of a single ``Engine`` are not offered."""

    def __init__(self, engine_settings: dict[str, Any], replicas: int, options: RouterOptions):
        plugins = PluginManager(EngineSettings(**engine_settings).plugins)  # env vars apply, as in each Engine
        self.router = Router(replicas, options, plugins)
        settings = {**engine_settings, "engine_in_subprocess": True}
        devices = replica_devices(replicas, settings.get("tp_size", 1), settings.get("device", "auto"))
        # transformers' lazy imports are not thread-safe: import what the replicas' tokenizers
        # need here, before they load them at the same time.
        from transformers import AutoTokenizer  # noqa: F401
        with ThreadPoolExecutor(replicas) as pool:  # the replicas load their models at the same time
            futures = [pool.submit(Engine, **settings, **devices[i]) for i in range(replicas)]
        started = [f.result() for f in futures if f.exception() is None]
        failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:
            for engine in started:
                engine.shutdown()
            raise failed[0]
        self.replicas: list[Engine] = started
        first = started[0]
        self.info: ModelInfo = first.info
        self.tokenizer = first.tokenizer
        self._owners: dict[str, int] = {}  # rid in flight -> its replica
        self._lock = threading.Lock()

    @property
    def model_path(self) -> str:
        return self.info.model_path

    @property
    def image_token(self) -> str | None:
        """The text that stands for one image in a prompt (every replica serves the same model)."""
        return self.replicas[0].image_token

    @property
    def video_token(self) -> str | None:
        return self.replicas[0].video_token

    @property
    def alive(self) -> bool:
        """False once any replica has died (the others still serve)."""
        return all(r.alive for r in self.replicas)

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict | list[dict] | None = None,
                             input_ids: list[int] | list[list[int]] | None = None, stream: bool = False,
                             rid: str | None = None, **options: Any) -> dict | list[dict] | AsyncIterator[dict]:
        """``Engine.async_generate`` on a replica the router picks for each prompt (the ``options``
        are its other keywords: logprobs, ``return_text_in_logprobs``)."""
        field, items, single = split_prompts(prompt, input_ids)
        id_lists = [self.tokenizer(p)["input_ids"] for p in items] if field == "prompt" else items
        images = images_per_prompt(options.pop("image_data", None), len(id_lists), single)
        if rid is not None:
            check_rid(rid)
        if stream:
            if not single:
                raise ValueError("stream: streaming takes a single prompt with n=1")
            return await self._stream(id_lists[0], sampling_params, rid or uuid.uuid4().hex,
                                      {**options, "image_data": images[0] or None})
        if single:
            return await self._complete(id_lists[0], sampling_params, rid or uuid.uuid4().hex,
                                        {**options, "image_data": images[0] or None})
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(id_lists)
        if len(params) != len(id_lists):
            raise ValueError("sampling_params: a list must have one entry per prompt")
        base = rid or uuid.uuid4().hex
        tasks = [asyncio.ensure_future(self._complete(ids, p, f"{base}-{i}",
                                                      {**options, "image_data": images[i] or None}))
                 for i, (ids, p) in enumerate(zip(id_lists, params))]
        try:
            results = await asyncio.gather(*tasks)
        finally:  # one prompt refused (or the caller gone): end the others too
            for task in tasks:
                task.cancel()
        return [item for result in results for item in (result if isinstance(result, list) else [result])]

    def abort(self, rid: str) -> None:
        """End ``rid`` (and its ``rid-<n>`` copies) on the replica that has it."""
        check_rid(rid)
        with self._lock:
            owners = {r for key, r in self._owners.items() if key == rid or key.startswith(f"{rid}-")}
        for replica in owners:
            self.replicas[replica].abort(rid)

    def flush_cache(self) -> bool:
        """Flush every live replica's prefix cache; False if any had requests in flight."""
        flushed = True
        for index, replica in self._live():
            if replica.flush_cache():
                self.router.forget_cache(index)
            else:
                flushed = False
        return flushed

    def memory_report(self) -> dict[str, int]:
        """The live replicas' reports, summed."""
        total: dict[str, int] = {}
        for report in self.memory_reports():
            for key, value in (report or {}).items():
                total[key] = total.get(key, 0) + value
        return total

    def memory_reports(self) -> list[dict[str, int] | None]:
        """Each replica's report (None for a dead one)."""
        return [replica.memory_report() if replica.alive else None for replica in self.replicas]

    def check_memory(self) -> None:
        for _, replica in self._live():
            replica.check_memory()

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for _, replica in self._live():
            for key, value in replica.stats().items():
                total[key] = total.get(key, 0) + value
        return total

    def shutdown(self) -> None:
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(Engine.shutdown, self.replicas))

    def __enter__(self) -> "DataParallelEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- routing -------------------------------------------------------------------------

    def _live(self) -> list[tuple[int, Engine]]:
        return [(i, r) for i, r in enumerate(self.replicas) if r.alive]

    def _claim(self, ids: list[int], rid: str) -> tuple[int, Callable[[], None]]:
        """Route a request and own its rid; returns the replica and the release callback."""
        for index, replica in enumerate(self.replicas):
            if not replica.alive and self.router.live[index]:
                self.router.mark_dead(index)
        with self._lock:
            if rid in self._owners:
                raise ValueError(f"rid: {rid!r} is already in use by a request in flight")
            stack = contextlib.ExitStack()
            replica = stack.enter_context(self.router.routed(ids))
            self._owners[rid] = replica

        def release() -> None:
            with self._lock:
                if self._owners.get(rid) == replica:
                    del self._owners[rid]
            stack.close()

        return replica, release

    async def _complete(self, ids: list[int], sampling_params: Any, rid: str, options: dict) -> dict | list[dict]:
        replica, release = self._claim(ids, rid)
        try:
            result = await self.replicas[replica].async_generate(input_ids=ids, sampling_params=sampling_params,
                                                                 rid=rid, **options)
        finally:
            release()
        for item in result if isinstance(result, list) else [result]:
            item["meta_info"]["replica"] = replica
        return result

    async def _stream(self, ids: list[int], sampling_params: Any, rid: str, options: dict) -> _RoutedStream:
        replica, release = self._claim(ids, rid)
        try:
            inner = await self.replicas[replica].async_generate(input_ids=ids, sampling_params=sampling_params,
                                                                rid=rid, stream=True, **options)
        except BaseException:
            release()
            raise
        return _RoutedStream(inner, replica, release)
