"""Qwen2-VL (``Qwen2VLForConditionalGeneration``) and Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

The vision tower is transformers' own module (Qwen2-VL's ViT; Qwen2.5-VL's, with windowed
attention on all blocks but ``fullatt_block_indexes``): it takes an image's patches at the image's
own resolution with its grid (``image_grid_thw``), a video's patches of ``temporal_patch_size`` frames
with theirs (``video_grid_thw``), and merges each ``spatial_merge_size`` square of
patches into one embedding of the language model's width. The language model is the core's
Qwen2 on ``text_config``; its rotary is M-RoPE (``mrope_section``), turned by the positions the
input processor derives from the images (``processor.Qwen2VLInputProcessor.media_positions``).
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Iterator

import torch
from torch import nn

from sglang_core.model_executor.forward_batch import ForwardBatch
from sglang_core.model_executor.model_api import ModelContext

# transformers 5's module names -> the released checkpoints' (what save_pretrained writes).
CHECKPOINT_RENAMES = (
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^model\.visual\."), "visual."),
)
# transformers' M-RoPE bands when a Qwen2-VL config names none.
DEFAULT_MROPE_SECTION = [16, 24, 24]


class Qwen2VLForConditionalGeneration(nn.Module):
    @staticmethod
    def vision_tower_class() -> type[nn.Module]:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        return Qwen2VisionTransformerPretrainedModel

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        text = config.text_config
        rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
        text.rope_parameters = {"mrope_section": DEFAULT_MROPE_SECTION, **rope}
        # transformers 5 keeps the tie on the outer config (older saves put it in text_config).
        text.tie_word_embeddings = bool(config.tie_word_embeddings or getattr(text, "tie_word_embeddings", False))
        self.merge_size = config.vision_config.spatial_merge_size
        self.visual = self.vision_tower_class()(config.vision_config)
        # Weights in the serving dtype; the rotary's frequency buffer stays float32, as transformers keeps it.
        for param in self.visual.parameters():
            param.data = param.data.to(ctx.dtype)
        self.language_model = ctx.model_class_for("Qwen2ForCausalLM")(text, ctx)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.language_model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def embed_media(self, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Every image and video through the tower at once: their patches concatenated, each image
        and each of a video's temporal patches attending within itself (the tower splits them by
        their grids)."""
        dtype = next(self.visual.parameters()).dtype
        pixels, grids = zip(*(vision_input(item) for item in inputs))
        grids = torch.cat(grids)
        merged = self.visual(torch.cat(pixels).to(dtype), grid_thw=grids).pooler_output
        return list(merged.split((grids.prod(-1) // self.merge_size**2).tolist()))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        vision: dict[str, torch.Tensor] = {}
        self.language_model.load_weights(split_off_tower(weights, vision))
        try:
            self.visual.load_state_dict(vision, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"visual: the checkpoint's weights do not fit: {exc}") from None


def vision_input(item: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """An image's or a video's patches and grid."""
    if "pixel_values_videos" in item:
        return item["pixel_values_videos"], item["video_grid_thw"]
    return item["pixel_values"], item["image_grid_thw"]


def split_off_tower(weights: Iterable[tuple[str, torch.Tensor]],
                    vision: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The language model's tensors, under the released names; the tower's go into ``vision``
    (without their ``visual.`` prefix) as they pass."""
    for name, tensor in weights:
        released = functools.reduce(lambda n, rule: rule[0].sub(rule[1], n), CHECKPOINT_RENAMES, name)
        if released.startswith("visual."):
            vision[released.removeprefix("visual.")] = tensor
        else:
            yield released, tensor


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: the same arrangement with Qwen2.5's tower (RMSNorm, gated MLP, windowed attention)."""

    @staticmethod
    def vision_tower_class() -> type[nn.Module]:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        return Qwen2_5_VisionTransformerPretrainedModel
