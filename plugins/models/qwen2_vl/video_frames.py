"""Qwen2-VL's video processing without torchvision: transformers' ``Qwen2VLVideoProcessor`` steps
on Pillow. Every frame is resized alike (``smart_resize`` within the video's pixel bounds, those
bounds shared out over the frames under ``cap_pixels_per_frame``), rescaled and normalized by the
checkpoint's Qwen2-VL image processor built from its video settings; the frames, padded to a
multiple of ``temporal_patch_size`` with copies of the last, are cut into patches spanning
``temporal_patch_size`` frames each, laid out as transformers lays out ``pixel_values_videos``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

# transformers' Qwen2VLVideoProcessor's pixel bounds when the checkpoint names none.
DEFAULT_SIZE = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
DEFAULT_MAX_VIDEO_TOKENS = 128000
# transformers' frame rate for frames that come without the video's (VideoMetadata.sampled_fps).
UNKNOWN_FPS = 24
# The video settings the image processor takes as they are.
FRAME_SETTINGS = ("do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                  "do_convert_rgb", "patch_size", "temporal_patch_size", "merge_size")


def video_settings(model_folder: Path) -> dict[str, Any]:
    """The checkpoint's video processor settings, found where transformers looks: the processor's
    ``video_processor``, then ``video_preprocessor_config.json``, then ``preprocessor_config.json``."""
    processor = model_folder / "processor_config.json"
    if processor.is_file() and "video_processor" in (nested := json.loads(processor.read_text())):
        return nested["video_processor"]
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (model_folder / name).is_file():
            return json.loads((model_folder / name).read_text())
    return {}


class VideoFrameProcessor:
    def __init__(self, model_folder: Path, vision_config: Any):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        settings = video_settings(model_folder)
        size = dict(settings.get("size") or DEFAULT_SIZE)
        self.min_pixels = settings.get("min_pixels", size.get("shortest_edge"))
        self.max_pixels = settings.get("max_pixels", size.get("longest_edge"))
        if not self.min_pixels or not self.max_pixels:
            raise ValueError(f"video_processor.size: expected shortest_edge and longest_edge (pixel bounds), "
                             f"got {size}")
        self.cap_pixels = bool(settings.get("cap_pixels_per_frame"))
        self.max_video_tokens = settings.get("max_video_tokens", DEFAULT_MAX_VIDEO_TOKENS)
        self.frames = Qwen2VLImageProcessorPil(
            size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            **{name: settings[name] for name in FRAME_SETTINGS if name in settings})
        self.patch_size, self.temporal = self.frames.patch_size, self.frames.temporal_patch_size
        for name, tower_name in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                                 ("merge_size", "spatial_merge_size")):
            ours, tower = getattr(self.frames, name), getattr(vision_config, tower_name)
            if ours != tower:
                raise ValueError(f"video_processor.{name}: the video processor's is {ours}, the vision tower's "
                                 f"{tower_name} is {tower}")

    def __call__(self, frames: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """A video's frames -> its ``pixel_values_videos`` [t * h * w, channels * temporal * patch**2]
        and ``video_grid_thw`` [[t, h, w]]."""
        if len({frame.size for frame in frames}) != 1:
            raise ValueError("video: its frames differ in size")
        count = len(frames)
        padded = list(frames) + [frames[-1]] * (-count % self.temporal)
        bounds = {"shortest_edge": self.min_pixels, "longest_edge": self.pixel_bound(count)}
        out = self.frames(images=padded, size=bounds, return_tensors="pt")
        _, h, w = out["image_grid_thw"][0].tolist()
        groups = len(padded) // self.temporal
        # The image processor repeats a still frame over the temporal axis: keep one copy of each
        # frame, then put ``temporal`` consecutive frames in each patch.
        patches = out["pixel_values"].view(len(padded), h * w, -1, self.temporal, self.patch_size**2)[:, :, :, 0]
        patches = patches.view(groups, self.temporal, h * w, -1, self.patch_size**2).permute(0, 2, 3, 1, 4)
        return patches.reshape(groups * h * w, -1), torch.tensor([[groups, h, w]])

    def pixel_bound(self, count: int) -> int:
        """The most pixels a frame of a ``count``-frame video keeps."""
        if not self.cap_pixels:
            return self.max_pixels
        factor = self.patch_size * self.frames.merge_size
        budget = int(self.max_video_tokens * factor * factor * 0.9) * self.temporal // count
        return max(min(self.max_pixels, budget), int(self.min_pixels * 1.05))

    def seconds_per_grid(self, frames: Sequence[Any]) -> float:
        """Seconds one temporal patch spans: ``temporal_patch_size`` frames at the rate the frames
        sample the video at (``frames.fps``, where the video file gave it)."""
        return self.temporal / (getattr(frames, "fps", None) or UNKNOWN_FPS)
