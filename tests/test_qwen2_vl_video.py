"""Qwen2-VL and Qwen2.5-VL videos against transformers (float32, CPU), on the tiny checkpoints of
``test_qwen2_vl`` with video settings of their own: greedy tokens and logprobs vs ``generate`` on
transformers' processor's inputs for a video of an odd number of frames given as images, and for
an image and a video in one prompt (prefilled in chunks that cut through both); a video file sent
as ``/generate``'s ``video_data`` to the live server, its frames sampled by the server and placed
in time by the file's frame rate (Qwen2.5-VL's ``second_per_grid_ts``).

transformers' video processor needs torchvision, which does not import beside a CPU torch here, so
the reference's video processor (``PillowVideoProcessor``) does its steps with transformers' own
pieces that need none: the video module's ``smart_resize`` for the frame size, the Pillow image
backend's resize, rescale and normalize for each frame (where transformers resizes with
torchvision), and ``Qwen2VLVideoProcessor.patchify`` for the patches. transformers' own processor
(``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``) around it expands the video token, marks the
token types and derives ``second_per_grid_ts`` from the frames' metadata."""

from __future__ import annotations

import functools
import importlib
import json
import sys
import types

import pytest
import torch

from reference import hf_greedy_logprobs
from test_llava_video import decoded_frames, frame_urls, frames, openai_video_logprobs, video_file
from test_qwen2_vl import IMAGE, _check, _image, data_url, hf_model, save_tiny_qwen_vl

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"  # one video, as Qwen's chat template writes it
MAX_NEW = 6
CHUNK = 7
FRAMES = 5  # odd: the last frame is repeated to fill the last temporal patch
# Pixel bounds of the video's own (not the image processor's 256-4096): 40x36 frames grow to 64x64.
VIDEO_SETTINGS = {"video_processor_type": "Qwen2VLVideoProcessor", "min_pixels": 3000, "max_pixels": 8192,
                  "patch_size": 8, "temporal_patch_size": 2, "merge_size": 2}
TOKENS_PER_SECOND = 25  # Qwen2.5-VL: temporal positions 25 a second (frames at 24/s: 2.08 a patch of 2)
CASES = {  # name -> (prompt, image names, whether the video is there)
    "video": (f"{VIDEO}What happens in the video?", []),
    "both": (f"Is {IMAGE} a frame of {VIDEO}?", ["square"]),
}
FILE_FRAMES = [0, 3, 6, 9]  # 4 frames sampled evenly from the 10-frame clip (4 frames a second)


def save_tiny_qwen_vl_video(folder, version: str):
    save_tiny_qwen_vl(folder, version)
    (folder / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_SETTINGS))
    if version == "2.5":
        config = json.loads((folder / "config.json").read_text())
        config["vision_config"]["tokens_per_second"] = TOKENS_PER_SECOND
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@functools.cache
def video_processor_module():
    """transformers' Qwen2-VL video processor module, imported past its torchvision import (the
    functions used here need none)."""
    import transformers  # noqa: F401  (before the stand-in: transformers probes for torchvision once)

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional")
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    try:  # the module itself: the package's lazy attribute would refuse it without torchvision
        return importlib.import_module("transformers.models.qwen2_vl.video_processing_qwen2_vl")
    finally:
        for name in names:
            del sys.modules[name]


class PillowVideoProcessor:
    """transformers' ``Qwen2VLVideoProcessor`` on ``VIDEO_SETTINGS`` with Pillow for torchvision;
    each video a list of frames, with its ``VideoMetadata`` (None: frames without a rate)."""

    merge_size = VIDEO_SETTINGS["merge_size"]
    temporal_patch_size = VIDEO_SETTINGS["temporal_patch_size"]

    def __init__(self, metadata: list):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.metadata = metadata
        self.frame_ops = Qwen2VLImageProcessorPil()  # only its Pillow resize, rescale and normalize

    def __call__(self, videos, **kwargs):
        import numpy as np
        from transformers import BatchFeature
        from transformers.image_processing_backends import PilBackend
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SizeDict
        from transformers.video_utils import VideoMetadata

        module = video_processor_module()
        patch = VIDEO_SETTINGS["patch_size"]
        pixels, grids = [], []
        for video in videos:
            arrays = [self.frame_ops.process_image(frame, do_convert_rgb=True) for frame in video]
            height, width = module.smart_resize(*arrays[0].shape[1:], factor=patch * self.merge_size,
                                                min_pixels=VIDEO_SETTINGS["min_pixels"],
                                                max_pixels=VIDEO_SETTINGS["max_pixels"])
            arrays = [self.frame_ops.normalize(self.frame_ops.rescale(
                PilBackend.resize(self.frame_ops, a, SizeDict(height=height, width=width), resample=3), 1 / 255),
                OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) for a in arrays]
            patches, *grid = module.Qwen2VLVideoProcessor.patchify(
                None, torch.from_numpy(np.stack(arrays))[None], patch, self.merge_size, self.temporal_patch_size)
            pixels.append(patches[0])
            grids.append(grid)
        metadata = [m or VideoMetadata(total_num_frames=len(v)) for m, v in zip(self.metadata, videos)]
        return BatchFeature({"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids),
                             "video_metadata": metadata})


def hf_inputs(folder, version: str, prompt: str, images: list, videos: list, metadata: list):
    """transformers' processor for ``version`` (its own token expansion, token types and
    ``second_per_grid_ts``) on the checkpoint's image processor and the Pillow video processor."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    class Processor(getattr(transformers, "Qwen2_5_VLProcessor" if version == "2.5" else "Qwen2VLProcessor")):
        def __init__(self, image_processor, tokenizer):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer)

    processor = Processor(AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))
    processor.video_processor = PillowVideoProcessor(metadata)  # after: ProcessorMixin would check its class
    return processor(text=prompt, images=images or None, videos=videos, return_tensors="pt")


def hf_reference(folder, version: str, prompt: str, images: list, videos: list, metadata: list):
    return hf_greedy_logprobs(hf_model(folder), hf_inputs(folder, version, prompt, images, videos, metadata), MAX_NEW)


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2_vl", "qwen2_5_vl"])
def qwen_vl_video(request, tmp_path_factory):
    """The checkpoint, transformers' results for ``CASES`` (the clip's frames given as images), and
    the app served by uvicorn in a thread with its engine in this process, reading the clip's file
    from its media folder; yields (folder, version, expected, engine, url, clip path)."""
    from server_util import app_in_thread
    from sglang_core.server.app import build_app
    from sglang_core.server.settings import ServerSettings

    version = request.param
    folder = save_tiny_qwen_vl_video(tmp_path_factory.mktemp(f"tiny_qwen{version}_vl_video"), version)
    expected = {name: hf_reference(folder, version, text, [_image(n) for n in images], [frames("clip", FRAMES)], [None])
                for name, (text, images) in CASES.items()}
    media = tmp_path_factory.mktemp("media")
    (media / "clip.mp4").write_bytes(video_file(10))
    app = build_app(ServerSettings(model_path=str(folder), device="cpu", dtype="float32", chat_template="chatml",
                                   max_total_tokens=1024,
                                   chunked_prefill_size=CHUNK, engine_in_subprocess=False,
                                   allowed_local_media_path=str(media), media_video_frames=len(FILE_FRAMES)))
    with app_in_thread(app) as url:
        yield folder, version, expected, app.state.ctx.engine, url, media / "clip.mp4"


def test_video_and_image_with_video_match_hf(qwen_vl_video):
    """A video of 5 frames (3 temporal patches of 4x4 merged positions) alone and after an image,
    batched and prefilled in chunks of 7; each prompt as long as transformers expands it."""
    folder, version, expected, engine, _, _ = qwen_vl_video
    names = list(CASES)
    results = engine.generate([CASES[n][0] for n in names], {"max_new_tokens": MAX_NEW, "temperature": 0,
                                                             "ignore_eos": True},
                              image_data=[[data_url(i) for i in CASES[n][1]] + [{"video": frame_urls("clip", FRAMES)}]
                                          for n in names], return_logprob=True)
    for result, name in zip(results, names):
        _check(result, expected[name])
        text, images = CASES[name]
        inputs = hf_inputs(folder, version, text, [_image(n) for n in images], [frames("clip", FRAMES)], [None])
        assert result["meta_info"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert inputs["video_grid_thw"].tolist() == [[3, 8, 8]]  # 5 frames padded to 6, each grown to 64x64
    engine.check_memory()


def file_reference(folder, version: str, prompt: str, clip) -> tuple[list[int], list[float]]:
    """transformers on the frames the server samples from the clip file, with their rate."""
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=10, fps=4.0, frames_indices=FILE_FRAMES)
    return hf_reference(folder, version, prompt, [], [decoded_frames(clip.read_bytes(), FILE_FRAMES)], [metadata])


def test_generate_video_data_file_matches_hf(qwen_vl_video):
    """A video file by path on ``/generate``: the server samples 4 of its 10 frames, 1.6 a second
    of its 4, so Qwen2.5-VL's temporal patches lie 1.25 s apart (31 positions at 25 a second), past
    the positions of the text after the video; sent twice, the second from the prefix cache."""
    import httpx

    folder, version, _, _, url, clip = qwen_vl_video
    text = CASES["video"][0]
    expected = file_reference(folder, version, text, clip)
    body = {"text": text, "video_data": str(clip), "return_logprob": True, "logprob_start_len": -1,
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}
    for _ in range(2):  # the second time the video's tokens come from the prefix cache
        response = httpx.post(url + "/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        meta = response.json()["meta_info"]
        assert [tid for _, tid, _ in meta["output_token_logprobs"]] == expected[0]
        assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(expected[1], abs=1e-4)
    assert meta["cached_tokens"] >= 1 + 2 * 16 + 1  # the video's start, 2 temporal patches of 4x4, its end


def test_openai_chat_video_url_matches_hf(qwen_vl_video):
    """The clip as a data URL in an OpenAI ``video_url`` part: the chat template writes the video
    (its start, placeholder and end tokens) where the part is."""
    import openai

    folder, version, _, _, url, clip = qwen_vl_video
    question = "What happens in the video?"
    prompt = f"<|im_start|>user\n{VIDEO}\n{question}<|im_end|>\n<|im_start|>assistant\n"
    expected = file_reference(folder, version, prompt, clip)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    assert openai_video_logprobs(client, clip.read_bytes(), question, MAX_NEW) == pytest.approx(expected[1], abs=1e-4)


def test_pixel_cap_sizes_frames_as_transformers_and_bad_settings_are_refused(tmp_path):
    """``cap_pixels_per_frame``: the video's pixel budget (``max_video_tokens``) shared out over its
    frames, so more frames are smaller; each frame count's size as transformers' own
    ``Qwen2VLVideoProcessor.resize`` picks it (the torchvision resize behind it replaced by a
    record of the size asked for)."""
    from types import SimpleNamespace
    from unittest import mock

    from PIL import Image
    from transformers.image_utils import SizeDict

    from sglang_plugins.models.qwen2_vl.video_frames import VideoFrameProcessor

    settings = dict(VIDEO_SETTINGS, min_pixels=256, cap_pixels_per_frame=True, max_video_tokens=20)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(settings))
    ours = VideoFrameProcessor(tmp_path, SimpleNamespace(patch_size=8, temporal_patch_size=2, spatial_merge_size=2))
    module = video_processor_module()
    hf = object.__new__(module.Qwen2VLVideoProcessor)  # only its resize runs: it needs no set-up
    size_asked = mock.patch.object(module.BaseVideoProcessor, "resize", create=True,
                                   new=lambda self, image, size, resample: (size.height, size.width))
    sizes = set()
    for count in (2, 3, 6, 12):
        _, grid = ours([Image.new("RGB", (64, 48))] * count)
        with size_asked:
            expected = module.Qwen2VLVideoProcessor.resize(
                hf, torch.zeros(1, count, 3, 48, 64), SizeDict(shortest_edge=256, longest_edge=8192), None, factor=16,
                temporal_factor=2, cap_pixels_per_frame=True, max_video_tokens=20)
        assert (grid[0, 1] * 8, grid[0, 2] * 8) == expected
        sizes.add(expected)
    assert len(sizes) == 3  # 48x64 under the budget of 2 and 3 frames, then 32x32, 16x32
    with pytest.raises(ValueError, match="^video_processor.temporal_patch_size: "):
        VideoFrameProcessor(tmp_path, SimpleNamespace(patch_size=8, temporal_patch_size=1, spatial_merge_size=2))
    with pytest.raises(ValueError, match="^video_processor.merge_size: .* spatial_merge_size is 1"):
        VideoFrameProcessor(tmp_path, SimpleNamespace(patch_size=8, temporal_patch_size=2, spatial_merge_size=1))
    with pytest.raises(ValueError, match="^video: its frames differ in size"):
        ours([Image.new("RGB", (64, 48)), Image.new("RGB", (48, 64))])
