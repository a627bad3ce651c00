"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, LLaVA 1.6): the image processor cuts each
image into a base tile (the whole image, resized) and a grid of tiles at the ``image_grid_pinpoints``
resolution that fits it best ("anyres"). Every tile goes through LLaVA's tower and projector; the
grid's features are laid out as one map, the padding the resize added is cropped off again
("unpadding"), and ``image_newline`` ends each row of it. An image's embeddings: the base tile's,
then the map's, row by row."""

from __future__ import annotations

import torch
from torch import nn

from sglang_core.model_executor.model_api import ModelContext

from sglang_plugins.models.llava.model import LlavaForConditionalGeneration


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        pinpoints = config.image_grid_pinpoints
        if not pinpoints or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pinpoints):
            raise ValueError(f"image_grid_pinpoints: expected a list of (height, width) pairs, got {pinpoints!r}")
        self.pinpoints = [tuple(p) for p in pinpoints]
        self.tile = config.vision_config.image_size
        self.side = config.vision_config.image_size // config.vision_config.patch_size  # positions per tile side
        # The tiles' features are laid out as square maps: the strategy must leave exactly the patches
        # (CLIP's CLS kept under "full", or a SigLIP patch dropped under "default", breaks it, in transformers too).
        positions = self.vision_tower.embeddings.num_positions - int(self.drop_cls)
        if positions != self.side**2:
            raise ValueError(f"vision_feature_select_strategy: {config.vision_feature_select_strategy!r} leaves "
                             f"{positions} positions of the tower's a tile, the tile's map has {self.side}x{self.side}")
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size, dtype=ctx.dtype))

    def embed_media(self, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Every tile of every image through the tower at once."""
        tiles = [item["pixel_values"][0] for item in inputs]  # [tiles, 3, H, W] per image
        features = self.project(torch.cat(tiles)).split([t.shape[0] for t in tiles])
        return [self.pack(f, item["image_sizes"][0].tolist()) for f, item in zip(features, inputs)]

    def pack(self, features: torch.Tensor, size: list[int]) -> torch.Tensor:
        """One image's ``[tiles, positions, hidden]`` features -> its embeddings (``size``: its (height, width))."""
        newline = self.image_newline.to(features.dtype)
        if features.shape[0] == 1:  # no grid: the base tile, then one newline
            return torch.cat([features[0], newline[None]])
        from transformers.image_processing_utils import select_best_resolution

        height, width = select_best_resolution(size, self.pinpoints)
        rows, cols = height // self.tile, width // self.tile
        hidden = features.shape[-1]
        grid = features[1:].view(rows, cols, self.side, self.side, hidden)
        grid = grid.permute(4, 0, 2, 1, 3).reshape(hidden, rows * self.side, cols * self.side)
        grid = unpad(grid, size)
        grid = torch.cat([grid, newline[:, None, None].expand(-1, grid.shape[1], 1)], dim=2)
        return torch.cat([features[0], grid.flatten(1).T])


def unpad(grid: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Crop a ``[hidden, H, W]`` feature map to the image's aspect ratio: the processor resized the
    image into the grid's resolution and padded the short side equally on both ends."""
    height, width = size
    current_height, current_width = grid.shape[1:]
    if width / height > current_width / current_height:  # wider than the grid: padded above and below
        kept = int(round(height * (current_width / width), 7))
        pad = (current_height - kept) // 2
        return grid[:, pad : current_height - pad]
    kept = int(round(width * (current_height / height), 7))
    pad = (current_width - kept) // 2
    return grid[:, :, pad : current_width - pad]
