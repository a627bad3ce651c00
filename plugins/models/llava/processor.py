"""LLaVA's, LLaVA-NeXT's and LLaVA-NeXT-Video's images and videos on the request side, through the
checkpoint's own Hugging Face processor: its image processor makes the pixels, and its expansion of
the image token gives the count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sglang_core.multimodal import InputProcessor

# What a checkpoint's video processor settings may say, as CLIP's image processor takes them.
FRAME_SETTINGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                  "do_normalize", "image_mean", "image_std", "do_convert_rgb")


class LlavaInputProcessor(InputProcessor):
    def __init__(self, model_folder: Path, config: Any):
        try:
            self.processor = self.load_processor(model_folder)
        except Exception as exc:
            raise ValueError(f"image_data: cannot load the model's image processor from {model_folder}: {exc}") from exc
        self.image_token = self.processor.image_token
        self.image_token_id = config.image_token_id
        if self.processor.image_token_id != self.image_token_id:
            raise ValueError(f"image_token_id: the processor's image token {self.image_token!r} is id "
                             f"{self.processor.image_token_id}, the model's config says {self.image_token_id}")

    def load_processor(self, model_folder: Path):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(model_folder), local_files_only=True, trust_remote_code=False)

    def process_image(self, image) -> tuple[dict[str, torch.Tensor], int]:
        # The processor on a prompt of one image token expands it as it would in any prompt.
        out = self.processor(text=self.image_token, images=[image], return_tensors="pt")
        count = int((out["input_ids"] == self.image_token_id).sum())
        # The image's tensors: pixel_values, and LLaVA-NeXT's image_sizes.
        return {name: value for name, value in out.items() if name not in ("input_ids", "attention_mask")}, count


class LlavaNextVideoInputProcessor(LlavaInputProcessor):
    """transformers' ``LlavaNextVideoProcessor`` is LLaVA-NeXT's processor for images and a video
    processor for videos that needs torchvision (not installable beside a CPU torch). So images go
    through ``LlavaNextProcessor`` and each frame through CLIP's image processor, on the video
    processor's settings (resize the short side, center crop, rescale, normalize: the video
    processor's steps, on Pillow rather than torchvision)."""

    def __init__(self, model_folder: Path, config: Any):
        super().__init__(model_folder, config)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        settings = json.loads((model_folder / "processor_config.json").read_text())
        video = settings.get("video_processor")
        if video is None and (model_folder / "video_preprocessor_config.json").is_file():
            video = json.loads((model_folder / "video_preprocessor_config.json").read_text())
        # Without settings, CLIP's defaults: the video processor's own (224-pixel crops, CLIP's mean and std).
        self.frame_processor = CLIPImageProcessorPil(**{k: v for k, v in (video or {}).items() if k in FRAME_SETTINGS})
        self.video_token_id = config.video_token_id
        self.video_token = self.processor.tokenizer.convert_ids_to_tokens(self.video_token_id)
        if self.video_token != settings.get("video_token", self.video_token):
            raise ValueError(f"video_token_id: the processor's video token is {settings['video_token']!r}, the model's "
                             f"config names id {self.video_token_id} ({self.video_token!r})")
        self.positions_side = config.vision_config.patch_size * config.spatial_pool_stride  # pixels per pooled position

    def load_processor(self, model_folder: Path):
        from transformers import LlavaNextProcessor

        return LlavaNextProcessor.from_pretrained(str(model_folder), local_files_only=True)

    def process_video(self, frames) -> tuple[dict[str, torch.Tensor], int]:
        pixels = self.frame_processor(frames, return_tensors="pt")["pixel_values"]  # [frames, 3, H, W]
        height, width = pixels.shape[-2:]
        # What the model's pooling leaves of each frame (transformers' processor: a quarter of the
        # patches, its pooling's stride of 2).
        count = len(frames) * (height // self.positions_side) * (width // self.positions_side)
        return {"pixel_values_videos": pixels[None]}, count
