"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT for images, and videos
as frames. Every frame goes through the same tower (its selected features, as for an image), its
square map of positions is pooled by ``spatial_pool_stride`` ("average", "max" or a learned "conv"
pooling, ``spatial_pool_mode``), and the projector maps each pooled position into the language
model: a video's embeddings are its frames', one after another, with no newline."""

from __future__ import annotations

import math

import torch
from torch import nn

from sglang_core.model_executor.model_api import ModelContext

from sglang_plugins.models.llava.next import LlavaNextForConditionalGeneration

POOL_MODES = ("average", "max", "conv")


class SpatialPool(nn.Module):
    """Pools a ``[frames, side * side, channels]`` feature map by ``stride`` in both directions."""

    def __init__(self, mode: str, stride: int, channels: int, out_channels: int, dtype: torch.dtype):
        super().__init__()
        if mode not in POOL_MODES:
            raise ValueError(f"spatial_pool_mode: expected one of {POOL_MODES}, got {mode!r}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"spatial_pool_stride: expected a positive int, got {stride!r}")
        if mode == "average":
            self.pool = nn.AvgPool2d(stride, stride)
        elif mode == "max":
            self.pool = nn.MaxPool2d(stride, stride)
        else:
            self.pool = nn.Conv2d(channels, out_channels, stride, stride, dtype=dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        frames, positions, channels = features.shape
        side = self.side(positions)
        grid = features.view(frames, side, side, channels).permute(0, 3, 1, 2)
        return self.pool(grid).flatten(2).transpose(1, 2)

    @staticmethod
    def side(positions: int) -> int:
        side = math.isqrt(positions)
        if side * side != positions:  # e.g. CLIP's CLS kept under the "full" strategy
            raise ValueError(f"vision_feature_select_strategy: video pooling needs a square map of positions, "
                             f"the tower gives {positions}")
        return side


class LlavaNextVideoForConditionalGeneration(LlavaNextForConditionalGeneration):
    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        vision_hidden = config.vision_config.hidden_size
        self.vision_resampler = SpatialPool(config.spatial_pool_mode, config.spatial_pool_stride, vision_hidden,
                                            getattr(config, "spatial_pool_out_channels", vision_hidden), ctx.dtype)

    def embed_media(self, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The images through LLaVA-NeXT's path, every frame of every video through the tower at once."""
        images = [item for item in inputs if "pixel_values_videos" not in item]
        videos = [item["pixel_values_videos"][0] for item in inputs if "pixel_values_videos" in item]
        image_embeds = iter(super().embed_media(images) if images else [])
        video_embeds = iter(self.embed_videos(videos) if videos else [])
        return [next(video_embeds) if "pixel_values_videos" in item else next(image_embeds) for item in inputs]

    def embed_videos(self, videos: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each video's ``[frames, 3, H, W]`` -> its ``[frames * pooled positions, hidden]`` embeddings."""
        pooled = self.vision_resampler(self.vision_features(torch.cat(videos)))
        embeds = self.multi_modal_projector(pooled)
        return [frames.flatten(0, 1) for frames in embeds.split([v.shape[0] for v in videos])]
