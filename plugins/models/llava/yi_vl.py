"""Yi-VL (01-ai/Yi-VL-6B, -34B): LLaVA 1.5 in the original LLaVA repository's layout, served through
this plugin's ``LlavaForConditionalGeneration``. Its config.json is a flat Llama config with ``mm_*``
fields (architecture ``LlavaLlamaForCausalLM``, ``model_type`` "llava"), the CLIP tower's config and
image processor live in a folder of the checkpoint (``mm_vision_tower``: "./vit/..."), the projector
``mlp2x_gelu_Norm`` is Linear, LayerNorm, GELU, Linear, LayerNorm, and each image is padded to a
square of the processor's mean colour before CLIP's preprocessing (``image_aspect_ratio`` "pad")."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from sglang_core.model_executor.model_api import ModelContext
from sglang_core.multimodal import InputProcessor

from sglang_plugins.models.llava.model import LlavaForConditionalGeneration

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PretrainedConfig

IMAGE_TOKEN = "<image_placeholder>"  # what Yi-VL's prompts hold for an image
PROJECTOR_TYPE = "mlp2x_gelu_Norm"
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> LLaVA's strategy
ASPECT_RATIOS = ("pad", "square")
# The Yi-VL checkpoint's tensor names -> this plugin's (the projector's Sequential indices skip the GELU).
CHECKPOINT_RENAMES = (
    (re.compile(r"^model\.mm_projector\.0\."), "multi_modal_projector.linear_1."),
    (re.compile(r"^model\.mm_projector\.1\."), "multi_modal_projector.norm_1."),
    (re.compile(r"^model\.mm_projector\.3\."), "multi_modal_projector.linear_2."),
    (re.compile(r"^model\.mm_projector\.4\."), "multi_modal_projector.norm_2."),
    (re.compile(r"^model\.vision_tower\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
)


def vision_folder(model_folder: Path, raw: dict[str, Any]) -> Path:
    """The checkpoint's folder of the CLIP tower's config and image processor (``mm_vision_tower``)."""
    tower = raw.get("mm_vision_tower")
    folder = model_folder / tower.removeprefix("./") if isinstance(tower, str) else None
    if folder is None or not (folder / "config.json").is_file():
        raise ValueError(f"mm_vision_tower: {tower!r} names no folder with a config.json in {model_folder}")
    return folder


def yi_vl_config(config: PretrainedConfig, model_folder: Path) -> PretrainedConfig:
    """Yi-VL's flat config.json as the ``LlavaConfig`` the LLaVA model takes (registered as the
    architecture's ``config_adapter``); the Yi-VL fields the request side needs ride along."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    raw = json.loads((model_folder / "config.json").read_text())
    if raw.get("mm_projector_type") != PROJECTOR_TYPE:
        raise ValueError(f"mm_projector_type: only Yi-VL's {PROJECTOR_TYPE!r} is served, "
                         f"got {raw.get('mm_projector_type')!r}")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURES:
        raise ValueError(f"mm_vision_select_feature: expected one of {tuple(SELECT_FEATURES)}, got {feature!r}")
    aspect = raw.get("image_aspect_ratio") or "square"
    if aspect not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio: expected one of {ASPECT_RATIOS}, got {aspect!r}")
    if raw.get("mm_use_im_start_end"):
        raise ValueError("mm_use_im_start_end: image start/end tokens are not served")
    tower = vision_folder(model_folder, raw)
    vision = CLIPVisionConfig.from_pretrained(str(tower), local_files_only=True)
    if raw.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ValueError(f"mm_hidden_size: {raw['mm_hidden_size']} != the tower's hidden_size {vision.hidden_size}")
    text = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in ("architectures", "model_type")}
    return LlavaConfig(text_config=LlamaConfig(**text), vision_config=vision, architectures=config.architectures,
                       vision_feature_layer=raw.get("mm_vision_select_layer", -2),
                       vision_feature_select_strategy=SELECT_FEATURES[feature], projector_hidden_act="gelu",
                       tie_word_embeddings=raw.get("tie_word_embeddings", False), image_aspect_ratio=aspect,
                       vision_tower_folder=str(tower))


class NormProjector(nn.Module):
    """``mlp2x_gelu_Norm``: each linear layer followed by a LayerNorm."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features, dtype=dtype)
        self.norm_1 = nn.LayerNorm(out_features, dtype=dtype)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_features, out_features, dtype=dtype)
        self.norm_2 = nn.LayerNorm(out_features, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_2(self.linear_2(self.act(self.norm_1(self.linear_1(x)))))


class YiVLForCausalLM(LlavaForConditionalGeneration):
    """LLaVA with Yi-VL's projector and tensor names."""

    def build_projector(self, config, ctx: ModelContext) -> nn.Module:
        return NormProjector(config.vision_config.hidden_size * len(self.feature_layers),
                             config.text_config.hidden_size, ctx.dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def renamed():
            for name, tensor in weights:
                yield next((pattern.sub(repl, name) for pattern, repl in CHECKPOINT_RENAMES if pattern.match(name)),
                           name), tensor

        super().load_weights(renamed())


def pad_to_square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """The image centred on a square of ``colour``, its side the longer of the image's."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def single_token(tokenizer: Any, text: str | None) -> tuple[str, int] | None:
    """``(text, its id)`` where the tokenizer encodes ``text`` as exactly one token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return (text, ids[0]) if len(ids) == 1 else None


class YiVLInputProcessor(InputProcessor):
    """Pixels by the CLIP image processor in the tower's folder (after the pad to a square); one
    placeholder per position the tower's selected features keep.

    Yi-VL's own code splices an image in where its prompt said ``<image_placeholder>`` (an id
    outside the vocabulary), so any token stands for an image as well as another: that text where
    the tokenizer holds it as one token, else the tokenizer's unknown token (text falls back to
    bytes in Yi's tokenizer, never to it)."""

    def __init__(self, model_folder: Path, config: Any):
        from transformers import AutoTokenizer
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        self.processor = CLIPImageProcessorPil.from_pretrained(config.vision_tower_folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(model_folder), local_files_only=True)
        self.image_token, self.image_token_id = single_token(tokenizer, IMAGE_TOKEN) or single_token(
            tokenizer, tokenizer.unk_token) or (None, None)
        if self.image_token is None:
            raise ValueError(f"image_token: the tokenizer holds neither {IMAGE_TOKEN!r} nor an unknown token "
                             "as one token")
        self.pad = config.image_aspect_ratio == "pad"
        self.patch = config.vision_config.patch_size
        self.cls = int(config.vision_feature_select_strategy == "full")

    def process_image(self, image: Image.Image) -> tuple[dict[str, torch.Tensor], int]:
        image = image.convert("RGB")
        if self.pad:
            image = pad_to_square(image, tuple(int(m * 255) for m in self.processor.image_mean))
        pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"]
        height, width = pixels.shape[-2:]
        return {"pixel_values": pixels}, (height // self.patch) * (width // self.patch) + self.cls
