"""The request side's images and videos: which belong to which prompt, and the model plugin's
input processor (built at start-up) that turns them into ``MediaItem``s. In ``image_data`` a
video is ``{"video": source or list of frames, "num_frames": n (optional)}``."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sglang_core.config import EngineSettings
from sglang_core.engine_core import ModelInfo
from sglang_core.media_loading import MediaLimits, load_image, load_video
from sglang_core.messages import MediaItem, MediaPositions
from sglang_core.multimodal import InputProcessor, expand_prompt, media_slots, pack_tensor
from sglang_core.plugins import PluginManager, resolve_target
from sglang_core.weights.loader import load_model_config


def images_per_prompt(image_data: Any, count: int, single: bool, field: str = "image_data") -> list[list[Any]]:
    """``image_data`` (or another per-prompt list, ``field``) as a list of images per prompt: one
    image or a list for a single prompt; a list with one entry (null, an image or a list) per prompt
    for several."""
    if image_data is None:
        return [[] for _ in range(count)]
    if single:
        return [image_data if isinstance(image_data, list) else [image_data]]
    if not isinstance(image_data, list) or len(image_data) != count:
        raise ValueError(f"{field}: give a list with one entry per prompt ({count})")
    return [[] if item is None else item if isinstance(item, list) else [item] for item in image_data]


# Threads that load and preprocess one batch's images: decoding (PIL), resizing and normalizing
# (PIL, numpy, torch) and the content hash (hashlib) release the GIL for most of their time, so a
# batch's images take about 1/threads of the serial time (each ~10 ms on a server core).
MEDIA_THREADS = min(8, os.cpu_count() or 1)


class MediaInputs:
    def __init__(self, plugins: PluginManager, info: ModelInfo, settings: EngineSettings):
        models = plugins.registry("models")
        entry = models.get(info.architecture) if info.architecture in models else None
        target = entry.metadata.get("input_processor") if entry is not None else None
        self._architecture = info.architecture
        local = settings.allowed_local_media_path
        self.limits = MediaLimits(settings.media_max_bytes, settings.media_max_pixels,
                                  Path(local) if local else None, settings.allow_media_urls,
                                  settings.media_fetch_timeout_s, settings.media_video_frames,
                                  settings.media_max_video_frames)
        # Loaded now, as vLLM and SGLang load a vision-language model's processor: every text-only
        # request and chat rendering asks for it, on the server's event loop, which a load there
        # (the HF processor and its tokenizer, from disk) would block; and a broken one fails the start.
        self._processor: InputProcessor | None = None
        self._pool: ThreadPoolExecutor | None = None  # started by the first batch with media
        if target is not None:
            folder = Path(info.model_folder)
            self._processor = resolve_target(target)(folder, load_model_config(folder, models))

    @property
    def takes_media(self) -> bool:
        """Whether the model has an input processor (takes images, and maybe videos)."""
        return self._processor is not None

    @property
    def image_token(self) -> str | None:
        return self._processor.image_token if self._processor is not None else None

    @property
    def video_token(self) -> str | None:
        return self._processor.video_token if self._processor is not None else None

    def expand(self, ids: list[int], sources: list[Any], field: str = "image_data") -> tuple[list[int], list[MediaItem]]:
        """Load each image and video (``<field>.<i>`` names it in errors) and expand the prompt's
        image and video tokens."""
        processor = self._processor
        if processor is None:
            raise ValueError(f"{field}: the model ({self._architecture}) takes no images")
        videos_at = [i for i, source in enumerate(sources) if isinstance(source, dict)]
        if videos_at and processor.video_token is None:
            raise ValueError(f"{field}.{videos_at[0]}: the model ({self._architecture}) takes no videos")
        # The counts checked before any is loaded: each may be a fetch.
        media_slots(processor, ids, [s for s in sources if not isinstance(s, dict)],
                    [s for s in sources if isinstance(s, dict)], field)
        images, videos = [], []
        for i, source in enumerate(sources):
            if isinstance(source, dict):
                videos.append(self._video(source, f"{field}.{i}"))
            else:
                images.append(load_image(source, self.limits, f"{field}.{i}"))
        return expand_prompt(processor, ids, images, field, videos)

    def expand_all(self, id_lists: list[list[int]], sources: list[list[Any]],
                   fields: list[str]) -> list[tuple[list[int], list[MediaItem]]]:
        """``expand`` of each prompt with its media, ``fields`` naming each in errors (a prompt
        without media unchanged, unless the model takes media and checks its tokens); prompts with
        media load on threads. The first prompt in order that fails raises its error."""
        loading = [i for i, found in enumerate(sources) if found]
        futures = {}
        if len(loading) > 1 and MEDIA_THREADS > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(MEDIA_THREADS, thread_name_prefix="media")
            futures = {i: self._pool.submit(self.expand, id_lists[i], sources[i], fields[i]) for i in loading}
        results = []
        try:
            for i, ids in enumerate(id_lists):
                if i in futures:
                    results.append(futures[i].result())
                elif sources[i] or self.takes_media:
                    results.append(self.expand(ids, sources[i], fields[i]))
                else:
                    results.append((ids, []))
        finally:
            for future in futures.values():
                future.cancel()  # after a failure: the batch is refused, the rest need not load
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _video(self, entry: dict, field: str) -> list[Any]:
        if "video" not in entry or not set(entry) <= {"video", "num_frames"}:
            raise ValueError(f"{field}: a video is {{\"video\": source or list of frames, \"num_frames\": n}}")
        return load_video(entry["video"], self.limits, field, entry.get("num_frames"))

    def positions(self, ids: list[int], media: list[MediaItem]) -> MediaPositions | None:
        """The expanded prompt's positions if the model derives them from its media."""
        found = self._processor.media_positions(ids, media)
        if found is None:
            return None
        table, delta = found
        if table.dim() != 2 or table.shape[1] != len(ids):
            raise ValueError(f"the model's media positions have shape {tuple(table.shape)}, "
                             f"expected [components, {len(ids)}]")
        return MediaPositions(pack_tensor(table.to(torch.int64)), delta)
