"""LLaVA-NeXT-Video against transformers' ``LlavaNextVideoForConditionalGeneration`` (float32, CPU)
on a tiny random checkpoint: greedy tokens and logprobs for a video of a few frames, and for an image
and a video in one prompt; the same video twice shares the cached prefix; a planted wrong pooling is
caught; video refusals.

transformers' video processor needs torchvision, which has no CPU build installable here, so the
reference's frames go through CLIP's image processor on the checkpoint's video settings (the video
processor's steps) and the video token is expanded by transformers' own
``LlavaNextVideoProcessor.replace_video_token``."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch

from reference import byte_level_tokenizer
from test_llava import PINPOINTS, _check, _image, data_url

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
MAX_NEW = 6
VIDEO_SETTINGS = {"video_processor_type": "LlavaNextVideoVideoProcessor", "size": {"shortest_edge": 32},
                  "crop_size": {"height": 32, "width": 32}, "do_resize": True, "do_center_crop": True,
                  "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                  "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                  "resample": 3, "do_convert_rgb": True}


def save_tiny_llava_next_video(folder, **overrides):
    """CLIP tower of 4x4 patches of 8 pixels (pooled 2x2: 4 positions a frame), Llama of 2 layers."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextProcessor, LlavaNextVideoConfig,
                              LlavaNextVideoForConditionalGeneration)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    options = dict(vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                   image_grid_pinpoints=PINPOINTS, spatial_pool_mode="average", spatial_pool_stride=2)
    options.update(overrides)
    config = LlavaNextVideoConfig(text_config=text, vision_config=vision, image_token_index=len(tokenizer) - 2,
                                  video_token_index=len(tokenizer) - 1, **options)
    torch.manual_seed(0)
    model = LlavaNextVideoForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=PINPOINTS)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                       num_additional_image_tokens=1, vision_feature_select_strategy="default").save_pretrained(folder)
    # What transformers' LlavaNextVideoProcessor saves: the image processor, the video processor, the tokens.
    settings = json.loads((folder / "processor_config.json").read_text())
    settings.update(processor_class="LlavaNextVideoProcessor", video_processor=VIDEO_SETTINGS, video_token=VIDEO_TOKEN)
    (folder / "processor_config.json").write_text(json.dumps(settings))
    return folder


def frames(name: str, count: int = 3) -> list:
    """A clip of ``count`` distinct frames of 40x36 pixels."""
    from PIL import Image

    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    return [Image.fromarray(torch.randint(0, 256, (36, 40, 3), generator=gen, dtype=torch.uint8).numpy())
            for _ in range(count)]


def frame_urls(name: str, count: int = 3) -> list[str]:
    urls = []
    for frame in frames(name, count):
        buffer = io.BytesIO()
        frame.save(buffer, format="PNG")
        urls.append("data:image/png;base64," + __import__("base64").b64encode(buffer.getvalue()).decode())
    return urls


def hf_reference(folder, prompt: str, images: list[str], videos: list[str]) -> tuple[list[int], list[float]]:
    """transformers' greedy generate: the video token expanded by transformers' processor code,
    the images by ``LlavaNextProcessor``."""
    from transformers import LlavaNextProcessor, LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    frame_processor = CLIPImageProcessorPil(**{k: v for k, v in VIDEO_SETTINGS.items() if k != "video_processor_type"})
    pixels = [frame_processor(frames(v), return_tensors="pt")["pixel_values"] for v in videos]
    expander = SimpleNamespace(patch_size=8, video_token=VIDEO_TOKEN)
    pieces = prompt.split(VIDEO_TOKEN)
    text = pieces[0] + "".join(
        LlavaNextVideoProcessor.replace_video_token(expander, {"pixel_values_videos": [p]}, 0) + piece
        for p, piece in zip(pixels, pieces[1:]))
    processor = LlavaNextProcessor.from_pretrained(folder)  # for the images
    inputs = processor(text=text, images=[_image(n) for n in images] or None, return_tensors="pt")
    if pixels:
        inputs["pixel_values_videos"] = torch.stack(pixels)
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


CASES = {  # name -> (prompt, images, videos)
    "video": (f"{VIDEO_TOKEN}\nWhat happens in the video?", [], ["clip"]),
    "both": (f"Is {IMAGE_TOKEN} a frame of {VIDEO_TOKEN}?", ["noise"], ["clip"]),
}


def _media(name: str) -> list:
    _, images, videos = CASES[name]
    return [data_url(i) for i in images] + [{"video": frame_urls(v)} for v in videos]


def _generate(engine, names: list[str]) -> list[dict]:
    return engine.generate([CASES[n][0] for n in names], {"max_new_tokens": MAX_NEW, "temperature": 0,
                                                          "ignore_eos": True},
                           image_data=[_media(n) for n in names], return_logprob=True)


@pytest.fixture(scope="module")
def next_video(tmp_path_factory):
    folder = save_tiny_llava_next_video(tmp_path_factory.mktemp("tiny_llava_next_video"))
    return folder, {name: hf_reference(folder, *case) for name, case in CASES.items()}


def test_video_and_image_with_video_match_hf_and_the_video_prefix_is_shared(next_video):
    from sglang_core.engine import Engine

    folder, expected = next_video
    with Engine(str(folder), device="cpu", dtype="float32", chunked_prefill_size=7, max_total_tokens=1024) as engine:
        results = _generate(engine, ["video", "both"])  # chunks of 7: the video's 12 placeholders span steps
        again = _generate(engine, ["video"])[0]
        engine.check_memory()
    for result, name in zip(results, ["video", "both"]):
        _check(result, expected[name])
    _check(again, expected["video"])
    assert again["meta_info"]["cached_tokens"] >= 12  # 3 frames of 4 pooled positions, then the text
