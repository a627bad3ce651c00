"""LLaVA-NeXT-Video against transformers' ``LlavaNextVideoForConditionalGeneration`` (float32, CPU)
on a tiny random checkpoint: greedy tokens and logprobs for a video of a few frames, and for an image
and a video in one prompt; the same video twice shares the cached prefix; a planted wrong pooling is
caught; video refusals.

transformers' video processor needs torchvision, which has no CPU build installable here, so the
reference's frames go through CLIP's image processor on the checkpoint's video settings (the video
processor's steps) and the video token is expanded by transformers' own
``LlavaNextVideoProcessor.replace_video_token``."""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import pytest
import torch

from reference import byte_level_tokenizer, hf_greedy_logprobs, save_tiny_model
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
    save_tiny_model(folder, config, LlavaNextVideoForConditionalGeneration)  # its tokenizer replaced below
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
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def hf_reference(folder, prompt: str, images: list[str], videos: list[list]) -> tuple[list[int], list[float]]:
    """transformers' greedy generate: the video token expanded by transformers' processor code,
    the images by ``LlavaNextProcessor``."""
    from transformers import LlavaNextProcessor, LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    frame_processor = CLIPImageProcessorPil(**{k: v for k, v in VIDEO_SETTINGS.items() if k != "video_processor_type"})
    pixels = [frame_processor(video, return_tensors="pt")["pixel_values"] for video in videos]
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
    return hf_greedy_logprobs(model, inputs, MAX_NEW)


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
    return folder, {name: hf_reference(folder, text, images, [frames(v) for v in videos])
                    for name, (text, images, videos) in CASES.items()}



def openai_video_logprobs(client, clip: bytes, question: str, max_tokens: int) -> list[float]:
    """The logprobs of a greedy OpenAI chat reply to a question about a video sent as a data URL."""
    video = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    reply = client.chat.completions.create(
        model="m", max_tokens=max_tokens, temperature=0, logprobs=True, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                               {"type": "text", "text": question}]}])
    return [t.logprob for t in reply.choices[0].logprobs.content]

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


def test_learned_conv_pooling_loads_and_matches_hf(tmp_path):
    """``spatial_pool_mode`` "conv": the pooling's own weights come from the checkpoint."""
    from sglang_core.engine import Engine

    folder = save_tiny_llava_next_video(tmp_path, spatial_pool_mode="conv", spatial_pool_out_channels=32)
    text, _, videos = CASES["video"]
    expected = hf_reference(folder, text, [], [frames(v) for v in videos])
    with Engine(str(folder), device="cpu", dtype="float32", max_total_tokens=512) as engine:
        result = _generate(engine, ["video"])[0]
        engine.check_memory()
    _check(result, expected)


def test_bad_pooling_settings_name_the_field():
    from sglang_plugins.models.llava.video import SpatialPool

    with pytest.raises(ValueError, match="^spatial_pool_mode: "):
        SpatialPool("bilinear", 2, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="^spatial_pool_stride: "):
        SpatialPool("average", 0, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="^vision_feature_select_strategy: .* the tower gives 17"):  # CLS kept
        SpatialPool("average", 2, 8, 8, torch.float32)(torch.zeros(1, 17, 8))


def video_file(count: int = 10, width: int = 40, height: int = 36) -> bytes:
    """An MPEG-4 clip of ``count`` random frames, made with PyAV."""
    import av
    import numpy as np

    rng = np.random.default_rng(count)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(count):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def decoded_frames(data: bytes, indices: list[int]) -> list:
    """The clip's frames at ``indices``, decoded by PyAV in full (the reference for sampling)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        every = [frame.to_image() for frame in container.decode(video=0)]
    return [every[i] for i in indices]


def test_video_files_are_sampled_evenly_and_every_limit_is_refused(tmp_path):
    from sglang_core.media_loading import MediaLimits, load_video

    clip = video_file(10)
    limits = MediaLimits(max_bytes=100_000, max_pixels=2_000, local_dir=tmp_path, video_frames=3, max_video_frames=4)
    (tmp_path / "clip.mp4").write_bytes(clip)
    for source in (clip, str(tmp_path / "clip.mp4"), "data:video/mp4;base64," + base64.b64encode(clip).decode()):
        got = load_video(source, limits, "v")
        assert [f.tobytes() for f in got] == [f.tobytes() for f in decoded_frames(clip, [0, 4, 9])]
    assert [f.tobytes() for f in load_video(clip, limits, "v", num_frames=4)] == \
        [f.tobytes() for f in decoded_frames(clip, [0, 3, 6, 9])]
    assert len(load_video(video_file(2), limits, "v", num_frames=4)) == 2  # a shorter clip: every frame
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (60, 40)).save(buffer, format="PNG")
    big_frame = buffer.getvalue()
    refusals = [
        (dict(source=frame_urls("clip", 5)), "5 frames, more than the limit of 4"),
        (dict(source=[]), "at least one frame"),
        (dict(source=clip, num_frames=5), "num_frames must be an int from 1 to 4"),
        (dict(source=clip, num_frames=0), "num_frames must be an int from 1 to 4"),
        (dict(source=video_file(2, 64, 48)), "64x48 pixels, more than the limit of 2000"),
        (dict(source=video_file(1, 1000, 2)), "1000x2 pixels, its sides more than 200 times apart"),
        (dict(source=[frame_urls("clip", 1)[0], big_frame]), "image_data.1.1: the image has 60x40 pixels"),
        (dict(source=b"x" * 100_001), "larger than 100000 bytes"),
        (dict(source=b"not a video at all"), "cannot decode the video"),
        (dict(source="/etc/clip.mp4"), "outside the allowed media folder"),
        (dict(source="http://127.0.0.1/clip.mp4"), "not fetched"),
    ]
    for kwargs, why in refusals:
        with pytest.raises(ValueError, match="^image_data.1[:.]") as err:
            load_video(kwargs.pop("source"), limits, "image_data.1", **kwargs)
        assert why in str(err.value)


# ---- the HTTP APIs ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(next_video, tmp_path_factory):
    """The app served by uvicorn in a thread (engine in this process), reading files under ``media``."""
    from server_util import app_in_thread
    from sglang_core.server.app import build_app
    from sglang_core.server.settings import ServerSettings

    folder, _ = next_video
    media = tmp_path_factory.mktemp("media")
    (media / "clip.mp4").write_bytes(video_file(10))
    app = build_app(ServerSettings(model_path=str(folder), device="cpu", dtype="float32", chat_template="chatml",
                                   max_total_tokens=1024, engine_in_subprocess=False, allowed_local_media_path=str(media),
                                   media_video_frames=3, media_max_video_frames=4))
    with app_in_thread(app) as url:
        yield url, media / "clip.mp4"


def test_native_generate_videos_as_frames_and_files_match_hf(next_video, server):
    import httpx

    folder, expected = next_video
    url, clip = server
    text = CASES["video"][0]
    body = {"text": text, "image_data": [frame_urls("clip")], "modalities": ["video"], "return_logprob": True,
            "logprob_start_len": -1,
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}
    for _ in range(2):  # the second time from the cache
        meta = httpx.post(url + "/generate", json=body, timeout=60).json()["meta_info"]
        assert [tid for _, tid, _ in meta["output_token_logprobs"]] == expected["video"][0]
    assert meta["cached_tokens"] >= 12
    # A video file by path, its 3 frames sampled by the server (--media-video-frames).
    file_tokens, _ = hf_reference(folder, text, [], [decoded_frames(clip.read_bytes(), [0, 4, 9])])
    body.update(image_data=None, modalities=None, video_data=str(clip))
    meta = httpx.post(url + "/generate", json=body, timeout=60).json()["meta_info"]
    assert [tid for _, tid, _ in meta["output_token_logprobs"]] == file_tokens
    assert httpx.get(url + "/get_model_info", timeout=60).json()["video_token"] == VIDEO_TOKEN
    for change, field, why in [
        (dict(video_data=[frame_urls("clip", 5)]), "image_data.0", "5 frames, more than the limit of 4"),
        (dict(video_data={"video": str(clip), "num_frames": 9}), "image_data.0", "num_frames must be an int from 1 to 4"),
        (dict(video_data="/etc/clip.mp4"), "image_data.0", "outside the allowed media folder"),
        (dict(video_data=None, image_data=[frame_urls("clip")], modalities=["video", "image"]), "modalities",
         "2 given for 1 image_data entries"),
        (dict(video_data=[str(clip), str(clip)]), "image_data", "2 video(s) given but the prompt holds the video token"),
    ]:
        response = httpx.post(url + "/generate", json={**body, **change}, timeout=60)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == field and why in error["message"], error


def test_openai_chat_video_url_matches_hf(next_video, server):
    import openai

    from test_llava import CHATML_USER

    folder, _ = next_video
    url, clip = server
    question = "What happens in the video?"
    expected = hf_reference(folder, CHATML_USER.format(f"{VIDEO_TOKEN}\n{question}"), [],
                            [decoded_frames(clip.read_bytes(), [0, 4, 9])])
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    assert openai_video_logprobs(client, clip.read_bytes(), question, MAX_NEW) == pytest.approx(expected[1], abs=1e-4)
    with pytest.raises(openai.BadRequestError) as err:  # not a video: a 400 in OpenAI's error shape
        client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}])
    assert "cannot decode the video" in err.value.body["message"]


def test_frontend_language_video_through_runtime_endpoint(next_video, server):
    """``sgl.video(path, num_frames)`` on ``RuntimeEndpoint``: the video token where the video goes,
    the file sent as ``video_data`` with its frame count; the server samples the frames."""
    import sglang_core as sgl
    from transformers import AutoTokenizer

    folder, _ = next_video
    url, clip = server
    question = "\nWhat happens in the video?"

    @sgl.function
    def watch(s, path):
        s += sgl.video(path, num_frames=2) + question
        s += sgl.gen("answer", max_tokens=MAX_NEW, temperature=0, ignore_eos=True)

    backend = sgl.RuntimeEndpoint(url)
    assert backend.video_token == VIDEO_TOKEN
    state = watch.run(str(clip), backend=backend)
    tokens, _ = hf_reference(folder, VIDEO_TOKEN + question, [], [decoded_frames(clip.read_bytes(), [0, 9])])
    assert state["answer"] == AutoTokenizer.from_pretrained(folder).decode(tokens, skip_special_tokens=True)


def test_frontend_language_video_as_frames_for_a_backend_without_a_video_token(tmp_path):
    """On a backend that takes images but no video files (the chat APIs), ``sgl.video`` sends
    ``num_frames`` frames spread from the first to the last, decoded with PyAV."""
    import sglang_core as sgl
    from PIL import Image

    from test_lang import ImageRecorder

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(video_file(10))

    @sgl.function
    def watch(s):
        s += sgl.user(sgl.video(str(clip), num_frames=3) + "What happens?")
        s += sgl.assistant(sgl.gen("answer"))

    recorder = ImageRecorder()
    watch.run(backend=recorder)
    (prompt,) = recorder.prompts
    sent = [Image.open(io.BytesIO(image.data)).tobytes() for image in prompt.images]
    assert sent == [frame.tobytes() for frame in decoded_frames(clip.read_bytes(), [0, 4, 9])]
