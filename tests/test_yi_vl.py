"""Yi-VL (``LlavaLlamaForCausalLM`` in the original LLaVA repository's layout) against a reference
written from 01-ai's public model definition (transformers has no Yi-VL class): transformers'
``LlavaForConditionalGeneration`` (float32, CPU) with Yi-VL's projector (Linear, LayerNorm, GELU,
Linear, LayerNorm), on pixels made as Yi-VL makes them (the image centred on a square of the image
processor's mean colour, then CLIP's preprocessing). The checkpoint is that model's tensors renamed
to Yi-VL's layout, with a flat config.json and the tower's config and image processor in ./vit/."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reference import byte_level_tokenizer, hf_greedy_logprobs
from test_llava import MAX_NEW, _check, _image, data_url

IMAGE_TOKEN = "<image_placeholder>"
VISION_FOLDER = "vit/clip-vit-tiny-yi-vl"
PROMPTS = {  # name -> (prompt text, image names); none of the images is square, so each is padded
    "one": ("{image}\nWhat is in the picture?", ["tall"]),
    "two": ("Compare {image} with {image}, please.", ["noise", "speck"]),
}
# Where the tokenizer holds Yi-VL's placeholder as one token it marks an image; else its unknown token does.
VARIANTS = {"placeholder": IMAGE_TOKEN, "unk": "<unk>"}
# Yi-VL's checkpoint names for transformers 5's LLaVA modules.
YI_VL_NAMES = (("model.language_model.", "model."), ("model.vision_tower.", "model.vision_tower.vision_tower."),
               ("model.multi_modal_projector.", "model.mm_projector."))


def yi_vl_name(name: str) -> str:
    return next((yi + name.removeprefix(hf) for hf, yi in YI_VL_NAMES if name.startswith(hf)), name)


def padded_square(image, mean: list[float]):
    """Yi-VL's ``expand2square``: the image centred on a square of ``mean`` (in 0-255), offsets rounded down."""
    from PIL import Image

    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = [int(m * 255) for m in mean]
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = pixels
    return Image.fromarray(canvas)


def save_tiny_yi_vl(folder, image_token: str):
    """A tiny Yi-VL checkpoint (CLIP tower of 4x4 patches of 8 pixels, Llama of 2 layers) and the
    transformers model it was made from, with its image processor and tokenizer (holding ``image_token``)."""
    from safetensors.torch import save_file
    from torch import nn
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = byte_level_tokenizer()
    if image_token == IMAGE_TOKEN:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    # Yi-VL's config.json holds the Llama fields flat, as transformers 4 wrote them (rope_theta, torch_dtype).
    text_fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                       hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    text = LlamaConfig(**text_fields, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaConfig(text_config=text, vision_config=vision,
                         image_token_index=tokenizer.convert_tokens_to_ids(image_token),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).float().eval()
    # Yi-VL's mlp2x_gelu_Norm projector (its Sequential's indices are the checkpoint's names).
    model.model.multi_modal_projector = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64),
                                                      nn.LayerNorm(64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:  # the language model's and tower's norms stay at one; the projector's are random
                p.normal_(0, 0.1)
    save_file({yi_vl_name(n): t.clone().contiguous() for n, t in model.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    flat = {**text_fields, "rope_theta": 5000000.0, "torch_dtype": "bfloat16", "use_mm_proj": True,
            "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "image_grid_pinpoints": None,
            "mm_projector_type": "mlp2x_gelu_Norm", "mm_hidden_size": 32, "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_vision_tower": f"./{VISION_FOLDER}", "image_aspect_ratio": "pad",
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False}
    (folder / "config.json").write_text(json.dumps(flat))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    vision.save_pretrained(folder / VISION_FOLDER)
    processor.save_pretrained(folder / VISION_FOLDER)
    tokenizer.save_pretrained(folder)
    return model, processor, tokenizer


def yi_vl_reference(model, processor, tokenizer, prompt: str, images: list[str]) -> tuple[list[int], list[float]]:
    """Greedy tokens and logprobs: each image token expanded to the tower's 16 patch positions."""
    pixels = processor(images=[padded_square(_image(n), processor.image_mean) for n in images],
                       return_tensors="pt")["pixel_values"]
    image_id = model.config.image_token_id
    ids = [t for i in tokenizer(prompt)["input_ids"] for t in ([i] * 16 if i == image_id else [i])]
    return hf_greedy_logprobs(model, {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids)),
                                      "pixel_values": pixels}, MAX_NEW)


@pytest.fixture(scope="module")
def yi_vl(tmp_path_factory):
    """Each variant's checkpoint folder and the reference's result for each prompt."""
    checkpoints = {}
    for variant, token in VARIANTS.items():
        folder = tmp_path_factory.mktemp(f"tiny_yi_vl_{variant}")
        model, processor, tokenizer = save_tiny_yi_vl(folder, token)
        checkpoints[variant] = folder, {
            name: yi_vl_reference(model, processor, tokenizer, text.format(image=token), images)
            for name, (text, images) in PROMPTS.items()}
    return checkpoints


@pytest.mark.parametrize("variant", VARIANTS)
def test_yi_vl_checkpoint_matches_reference(yi_vl, variant: str):
    """Both prompts in one batch, chunked so an image spans several prefill steps."""
    from sglang_core.engine import Engine

    folder, expected = yi_vl[variant]
    names = list(PROMPTS)
    with Engine(str(folder), device="cpu", dtype="float32", chunked_prefill_size=7, max_total_tokens=512) as engine:
        assert engine.image_token == VARIANTS[variant]
        prompts = [PROMPTS[n][0].format(image=engine.image_token) for n in names]
        results = engine.generate(prompts, {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
                                  image_data=[[data_url(i) for i in PROMPTS[n][1]] for n in names], return_logprob=True)
        engine.check_memory()
    for result, name in zip(results, names):
        _check(result, expected[name])


@pytest.mark.parametrize("field, value", [("mm_projector_type", "mlp2x_gelu"), ("image_aspect_ratio", "anyres"),
                                          ("mm_vision_select_feature", "cls"), ("mm_vision_tower", "./vit/missing"),
                                          ("mm_hidden_size", 64)])
def test_config_fields_not_served_are_refused(yi_vl, tmp_path, field: str, value):
    import shutil

    from sglang_plugins.models.llava.yi_vl import yi_vl_config

    folder, _ = yi_vl["placeholder"]
    copy = shutil.copytree(folder, tmp_path / "copy")
    raw = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**raw, field: value}))
    with pytest.raises(ValueError, match=f"^{field}: "):
        yi_vl_config(None, copy)
