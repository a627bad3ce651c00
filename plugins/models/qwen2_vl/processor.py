"""Qwen2-VL's and Qwen2.5-VL's images on the request side: the checkpoint's image processor resizes
each image to a multiple of ``patch_size * merge_size`` within its pixel bounds and gives its
patches and grid (``image_grid_thw``); the image takes ``t * h * w / merge_size**2`` placeholders,
as transformers' Qwen2-VL processor expands ``<|image_pad|>``. Only the image processor is
loaded: the full processor also needs a video processor (torchvision), images do not.

Positions (M-RoPE): text tokens count up in all three components; an image's placeholders take
(temporal, row, column) of their merged patch, each plus the position the image starts at; the
text after an image continues from the image's largest position + 1. A decoded token at sequence
index ``i`` has position ``i + delta`` in every component (``delta``: the prompt's largest position
+ 1 - its length), as in transformers' ``get_rope_index``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sglang_core.messages import MediaItem
from sglang_core.multimodal import InputProcessor, unpack_tensor


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
        self.image_token_id = config.image_token_id
        # One image as Qwen's chat template writes it: the placeholder between its start and end tokens.
        start, pad, end = tokenizer.convert_ids_to_tokens(
            [config.vision_start_token_id, config.image_token_id, config.vision_end_token_id])
        self.image_token = f"{start}{pad}{end}"

    def process_image(self, image) -> tuple[dict[str, torch.Tensor], int]:
        out = self.image_processor(images=[image], return_tensors="pt")
        grid = out["image_grid_thw"]
        return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, int(grid.prod()) // self.merge_size**2

    def media_positions(self, ids: list[int], media: list[MediaItem]) -> tuple[torch.Tensor, int]:
        pieces: list[torch.Tensor] = []
        position, cursor = 0, 0  # the next text position; the next token not yet placed
        for item in media:
            pieces.append(torch.arange(position, position + item.offset - cursor).expand(3, -1))
            position += item.offset - cursor
            t, h, w = unpack_tensor(item.tensors["image_grid_thw"]).view(-1).tolist()
            axes = torch.arange(t), torch.arange(h // self.merge_size), torch.arange(w // self.merge_size)
            grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1) + position
            if grid.shape[1] != item.length:
                raise ValueError(f"image_grid_thw: a grid of {t}x{h}x{w} patches is not the image's {item.length} "
                                 "placeholders")
            pieces.append(grid)
            position = int(grid.max()) + 1
            cursor = item.offset + item.length
        pieces.append(torch.arange(position, position + len(ids) - cursor).expand(3, -1))
        table = torch.cat(pieces, dim=1)
        return table, int(table.max()) + 1 - len(ids)
