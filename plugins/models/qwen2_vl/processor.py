"""Qwen2-VL's and Qwen2.5-VL's images and videos on the request side.

Images: the checkpoint's image processor resizes each image to a multiple of ``patch_size *
merge_size`` within its pixel bounds and gives its patches and grid (``image_grid_thw``); the
image takes ``t * h * w / merge_size**2`` placeholders, as transformers' Qwen2-VL processor expands
``<|image_pad|>``.

Videos: transformers' video processor resizes every frame alike, pads the frames to a multiple of
``temporal_patch_size`` with copies of the last, and cuts patches spanning ``temporal_patch_size``
frames (``pixel_values_videos``, ``video_grid_thw``); ``<|video_pad|>`` takes ``t * h * w /
merge_size**2`` placeholders. That processor needs torchvision, which does not install beside a
CPU torch, so the same steps run here on Pillow: each frame through the image processor built
from the checkpoint's video settings (``video_frames.py``), its patches regrouped in time. Frames
are the ones the core samples; transformers' own frame sampling (``do_sample_frames``) is not used.

Positions (M-RoPE): text tokens count up in all three components; the placeholders of an image or
video starting at position ``p`` take (p + temporal, p + row, p + column) of their merged patch,
the text after them continuing from ``p + max(rows, columns)``, as transformers' (5.x)
``get_rope_index`` does. A video's temporal index ``i`` is ``i`` (Qwen2-VL) or ``floor(i *
tokens_per_second * second_per_grid_ts)`` (Qwen2.5-VL: ``second_per_grid_ts`` is
``temporal_patch_size`` over the rate the frames sample the video at), so a video's temporal
positions may pass the text's after it. A decoded token at sequence index ``i`` has position ``i +
delta`` in every component, ``delta`` the prompt's last position + 1 - its length: transformers'
``generate`` counts on from the prompt's last position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sglang_core.messages import MediaItem
from sglang_core.multimodal import InputProcessor, unpack_tensor

from sglang_plugins.models.qwen2_vl.video_frames import VideoFrameProcessor


class Qwen2VLInputProcessor(InputProcessor):
    def __init__(self, model_folder: Path, config: Any):
        from transformers import AutoImageProcessor, AutoTokenizer

        try:
            self.image_processor = AutoImageProcessor.from_pretrained(str(model_folder), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(model_folder), local_files_only=True)
        except Exception as exc:
            raise ValueError(f"image_data: cannot load the model's image processor from {model_folder}: {exc}") from exc
        self.merge_size = self.image_processor.merge_size
        if self.merge_size != config.vision_config.spatial_merge_size:
            raise ValueError(f"merge_size: the image processor merges {self.merge_size} patches a side, the "
                             f"vision tower's spatial_merge_size is {config.vision_config.spatial_merge_size}")
        self.frame_processor = VideoFrameProcessor(model_folder, config.vision_config)
        # Qwen2.5-VL spaces a video's temporal positions by time; Qwen2-VL's config has no such rate.
        self.tokens_per_second = getattr(config.vision_config, "tokens_per_second", None)
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id
        # An image or a video as Qwen's chat template writes it: the placeholder between the start and end tokens.
        start, image, video, end = tokenizer.convert_ids_to_tokens(
            [config.vision_start_token_id, config.image_token_id, config.video_token_id, config.vision_end_token_id])
        self.image_token = f"{start}{image}{end}"
        self.video_token = f"{start}{video}{end}"

    def process_image(self, image) -> tuple[dict[str, torch.Tensor], int]:
        out = self.image_processor(images=[image], return_tensors="pt")
        grid = out["image_grid_thw"]
        return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, int(grid.prod()) // self.merge_size**2

    def process_video(self, frames) -> tuple[dict[str, torch.Tensor], int]:
        pixels, grid = self.frame_processor(frames)
        tensors = {"pixel_values_videos": pixels, "video_grid_thw": grid}
        if self.tokens_per_second is not None:
            # As transformers' Qwen2.5-VL processor: seconds per temporal patch, float32.
            tensors["second_per_grid_ts"] = torch.tensor([self.frame_processor.seconds_per_grid(frames)])
        return tensors, int(grid.prod()) // self.merge_size**2

    def media_positions(self, ids: list[int], media: list[MediaItem]) -> tuple[torch.Tensor, int]:
        pieces: list[torch.Tensor] = []
        position, cursor = 0, 0  # the next text position; the next token not yet placed
        for item in media:
            pieces.append(torch.arange(position, position + item.offset - cursor).expand(3, -1))
            position += item.offset - cursor
            video = "video_grid_thw" in item.tensors
            t, h, w = unpack_tensor(item.tensors["video_grid_thw" if video else "image_grid_thw"]).view(-1).tolist()
            rows, columns = h // self.merge_size, w // self.merge_size
            temporal = torch.arange(t)
            if video and self.tokens_per_second is not None:
                # float32 throughout, truncated, as transformers computes it.
                interval = self.tokens_per_second * unpack_tensor(item.tensors["second_per_grid_ts"])[0]
                temporal = (temporal * interval).long()
            grid = torch.stack(torch.meshgrid(temporal, torch.arange(rows), torch.arange(columns), indexing="ij"))
            grid = grid.flatten(1) + position
            if grid.shape[1] != item.length:
                raise ValueError(f"{'video' if video else 'image'}_grid_thw: a grid of {t}x{h}x{w} patches is not "
                                 f"the item's {item.length} placeholders")
            pieces.append(grid)
            position += max(rows, columns)
            cursor = item.offset + item.length
        pieces.append(torch.arange(position, position + len(ids) - cursor).expand(3, -1))
        table = torch.cat(pieces, dim=1)
        return table, int(table[:, -1].max()) + 1 - len(ids)
