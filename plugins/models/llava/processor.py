"""LLaVA's and LLaVA-NeXT's images on the request side, through the checkpoint's own Hugging Face processor: its
image processor makes the pixels, and its expansion of the image token gives the count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sglang_core.multimodal import InputProcessor


class LlavaInputProcessor(InputProcessor):
    def __init__(self, model_folder: Path, config: Any):
        from transformers import AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(str(model_folder), local_files_only=True,
                                                           trust_remote_code=False)
        except Exception as exc:
            raise ValueError(f"image_data: cannot load the model's image processor from {model_folder}: {exc}") from exc
        self.image_token = self.processor.image_token
        self.image_token_id = config.image_token_id
        if self.processor.image_token_id != self.image_token_id:
            raise ValueError(f"image_token_id: the processor's image token {self.image_token!r} is id "
                             f"{self.processor.image_token_id}, the model's config says {self.image_token_id}")

    def process_image(self, image) -> tuple[dict[str, torch.Tensor], int]:
        # The processor on a prompt of one image token expands it as it would in any prompt.
        out = self.processor(text=self.image_token, images=[image], return_tensors="pt")
        count = int((out["input_ids"] == self.image_token_id).sum())
        # The image's tensors: pixel_values, and LLaVA-NeXT's image_sizes.
        return {name: value for name, value in out.items() if name not in ("input_ids", "attention_mask")}, count
