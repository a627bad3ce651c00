"""Qwen2-VL and Qwen2.5-VL against transformers (float32, CPU) on tiny random checkpoints saved with
their image processor: greedy tokens and logprobs vs ``generate`` on the processor's inputs for one
image, two images of different sizes (each its own grid, so its own count of placeholders and its
own M-RoPE positions) and a text-only prompt, batched and prefilled in chunks that cut through the
images; the same image reused from the prefix cache under a different question; requests
retracted and prefilled again; two tensor-parallel ranks (gloo), their prefill steps' M-RoPE
positions sent by rank 0; an OpenAI ``image_url`` request through the live server."""

from __future__ import annotations

import base64
import functools
import io

import pytest
import torch

from reference import byte_level_tokenizer, hf_greedy_logprobs

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one image, as Qwen's chat template writes it
SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
MAX_NEW = 6
CHUNK = 7  # prefill chunks that cut through every image (8 to 12 placeholders each)
PROMPTS = {  # name -> (prompt text, image names)
    "one": (f"{IMAGE}What is in the picture?", ["square"]),
    "two": (f"Compare {IMAGE} with {IMAGE}, please.", ["wide", "tall"]),
    "text": ("Only words here, no picture at all.", []),
    "again": (f"{IMAGE}Describe it.", ["square"]),  # the same image as "one" under another question
}
SIZES = {"square": (52, 44), "wide": (96, 34), "tall": (30, 62)}  # (width, height)


def _image(name: str):
    from PIL import Image

    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    width, height = SIZES[name]
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy())


def data_url(name: str) -> str:
    buffer = io.BytesIO()
    _image(name).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def save_tiny_qwen_vl(folder, version: str):
    """A tiny Qwen2-VL or Qwen2.5-VL: a 2-block tower of 8-pixel patches merged 2x2 (Qwen2.5's
    windows 2 merged patches a side, its second block full attention), a 2-layer Qwen2 with
    M-RoPE bands [2, 3, 3] of its 8 frequencies; the image processor resizes images to 256-4096
    pixels, so each test image is a small grid of its own shape (3x3, 2x6 and 4x2 placeholders)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    start, end, image, video = tokenizer.convert_tokens_to_ids(SPECIALS)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    common = dict(patch_size=8, spatial_merge_size=2, temporal_patch_size=2, num_heads=2, depth=2)
    if version == "2.5":
        vision = dict(common, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=32,
                      fullatt_block_indexes=[1])
        family = "Qwen2_5_VL"
    else:
        vision = dict(common, embed_dim=32, hidden_size=64, mlp_ratio=2)
        family = "Qwen2VL"
    config = getattr(transformers, f"{family}Config")(
        text_config=text, vision_config=vision, vision_start_token_id=start, vision_end_token_id=end,
        image_token_id=image, video_token_id=video, tie_word_embeddings=version == "2.5")
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForConditionalGeneration")(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "ln_q" not in name:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=256,
                             max_pixels=4096).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hf_processor(folder):
    """transformers' Qwen2-VL processor on the checkpoint's image processor and tokenizer. Its own
    constructor also demands a video processor, which needs torchvision; images never reach it."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyProcessor(AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))


@functools.cache
def hf_model(folder):
    import transformers
    from transformers import AutoConfig

    model_cls = getattr(transformers, AutoConfig.from_pretrained(folder).architectures[0])
    return model_cls.from_pretrained(folder, dtype=torch.float32).eval()


def hf_reference(folder, prompt: str, images: list[str], max_new: int = MAX_NEW) -> tuple[list[int], list[float]]:
    """transformers' greedy generate on the processor's inputs: tokens and their logprobs."""
    inputs = hf_processor(folder)(text=prompt, images=[_image(n) for n in images] or None, return_tensors="pt")
    return hf_greedy_logprobs(hf_model(folder), inputs, max_new)


def _generate(engine, names: list[str], max_new: int = MAX_NEW) -> list[dict]:
    return engine.generate([PROMPTS[n][0] for n in names], {"max_new_tokens": max_new, "temperature": 0,
                                                            "ignore_eos": True},
                           image_data=[[data_url(i) for i in PROMPTS[n][1]] or None for n in names],
                           return_logprob=True)


def _check(result: dict, expected: tuple[list[int], list[float]]) -> None:
    tokens, logprobs = expected
    assert result["output_ids"] == tokens
    ours = [lp for lp, _, _ in result["meta_info"]["output_token_logprobs"]]
    assert ours == pytest.approx(logprobs, abs=1e-4)


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2_vl", "qwen2_5_vl"])
def qwen_vl(request, tmp_path_factory):
    """The checkpoint, transformers' results for every prompt, and the app served by uvicorn in a
    thread with its engine in this process (prefill chunks of ``CHUNK``); yields (folder,
    expected, engine, url)."""
    from server_util import app_in_thread
    from sglang_core.server.app import build_app
    from sglang_core.server.settings import ServerSettings

    folder = save_tiny_qwen_vl(tmp_path_factory.mktemp(f"tiny_qwen{request.param}_vl"), request.param)
    expected = {name: hf_reference(folder, text, images) for name, (text, images) in PROMPTS.items()}
    app = build_app(ServerSettings(model_path=str(folder), device="cpu", dtype="float32", chat_template="chatml",
                                   max_total_tokens=512, chunked_prefill_size=CHUNK, engine_in_subprocess=False))
    with app_in_thread(app) as url:
        yield folder, expected, app.state.ctx.engine, url


def test_placeholder_counts_are_the_processors(qwen_vl):
    """Each image takes as many placeholders as transformers' processor expands it to, and the
    three test images have three different grids."""
    folder, _, engine, _ = qwen_vl
    processor = hf_processor(folder)
    counts = []
    for name in SIZES:
        ids = processor(text=IMAGE, images=[_image(name)], return_tensors="pt")["input_ids"][0]
        counts.append(int((ids == processor.image_token_id).sum()))
        result = engine.generate(IMAGE, {"max_new_tokens": 1}, image_data=data_url(name))
        assert result["meta_info"]["prompt_tokens"] == len(ids)
    assert len(set(counts)) == 3 and min(counts) > CHUNK


def test_images_of_different_sizes_and_text_batched_in_chunks_match_hf(qwen_vl):
    """One image, two images of different sizes and a text-only prompt in one batch, prefilled in
    chunks of 7 that cut through every image."""
    _, expected, engine, _ = qwen_vl
    names = ["one", "two", "text"]
    engine.flush_cache()
    encoded = engine.stats()["images_encoded"]
    for result, name in zip(_generate(engine, names), names):
        _check(result, expected[name])
    assert engine.stats()["images_encoded"] == encoded + 3  # once per image, however many chunks it spans
    engine.check_memory()


def test_same_image_reuses_the_cached_prefix_and_matches_hf(qwen_vl):
    """A prompt whose image is cached by an earlier one under another question: the image's tokens
    come from the cache (not encoded again) and the new question's positions follow them; the
    first prompt again: all but its last token from the cache."""
    _, expected, engine, _ = qwen_vl
    engine.flush_cache()
    first = _generate(engine, ["one"])[0]
    encoded = engine.stats()["images_encoded"]
    again, same = _generate(engine, ["again"])[0], _generate(engine, ["one"])[0]
    for result, name in ((first, "one"), (again, "again"), (same, "one")):
        _check(result, expected[name])
    assert engine.stats()["images_encoded"] == encoded
    assert first["meta_info"]["cached_tokens"] == 0
    assert again["meta_info"]["cached_tokens"] >= 1 + 9 + 1  # the image's start, its 3x3 placeholders, its end
    assert same["meta_info"]["cached_tokens"] == first["meta_info"]["prompt_tokens"] - 1
    engine.check_memory()


def test_two_tensor_parallel_ranks_match_hf_and_one_rank(qwen_vl):
    """--tp-size 2 (gloo): rank 0 derives the M-RoPE positions and sends each prefill step's
    [3, tokens] of them to the other rank. One image, two images of different grids and text
    batched in chunks through the images, then the first image reused from the prefix cache under
    another question (the chunk's positions from the middle of the prompt's table): transformers'
    tokens and logprobs, and the one-rank engine's tokens."""
    from sglang_core.engine import Engine

    folder, expected, single, _ = qwen_vl
    names = ["one", "two", "text", "again"]
    single.flush_cache()
    alone = _generate(single, names[:3]) + _generate(single, names[3:])
    with Engine(str(folder), device="cpu", dtype="float32", chunked_prefill_size=CHUNK, max_total_tokens=512,
                tp_size=2) as engine:
        results = _generate(engine, names[:3]) + _generate(engine, names[3:])
        engine.check_memory()
    assert results[3]["meta_info"]["cached_tokens"] >= 1 + 9 + 1  # the image's start, its placeholders, its end
    for result, one_rank, name in zip(results, alone, names):
        _check(result, expected[name])
        assert result["output_ids"] == one_rank["output_ids"], name


def test_openai_chat_image_url_matches_hf(qwen_vl):
    import openai

    folder, _, _, url = qwen_vl
    question = "What is in the picture?"
    # The chat template writes the image part as the image (its start, placeholder and end tokens).
    expected = hf_reference(folder, f"<|im_start|>user\n{IMAGE}\n{question}<|im_end|>\n<|im_start|>assistant\n",
                            ["wide"])
    content = [{"type": "image_url", "image_url": {"url": data_url("wide")}}, {"type": "text", "text": question}]
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                           max_tokens=MAX_NEW, temperature=0, logprobs=True,
                                           extra_body={"ignore_eos": True})
    assert [t.logprob for t in reply.choices[0].logprobs.content] == pytest.approx(expected[1], abs=1e-4)


def test_retracted_requests_with_images_stay_exact(tmp_path):
    """A KV pool too small for four running requests: the newest are retracted and prefilled again,
    their output tokens too (positions past the prompt: index + the request's delta)."""
    from sglang_core.engine import Engine

    folder = save_tiny_qwen_vl(tmp_path, "2")
    names = ["one", "two", "two", "one"]
    expected = {name: hf_reference(folder, *PROMPTS[name], 24) for name in set(names)}
    with Engine(str(folder), device="cpu", dtype="float32", max_total_tokens=120, new_token_ratio=0.0,
                disable_radix_cache=True) as engine:
        results = _generate(engine, names, max_new=24)
        assert engine.stats()["retractions"] > 0, "the tiny pool should have forced a retraction"
        engine.check_memory()
    for result, name in zip(results, names):
        _check(result, expected[name])


def test_mrope_sections_must_cover_the_rotary_frequencies():
    from transformers import Qwen2VLTextConfig

    from sglang_core.layers.rotary import rope_from_config

    config = Qwen2VLTextConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [2, 3, 2]})
    with pytest.raises(ValueError, match="mrope_section"):
        rope_from_config(config, 16)


def test_media_positions_cross_to_the_engine_process_intact():
    """A request's positions travel as msgpack (no pickle) and come back bit for bit."""
    import msgspec

    from sglang_core.messages import GenerateRequest, MediaPositions
    from sglang_core.multimodal import pack_tensor, unpack_tensor

    table = torch.tensor([[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]])
    request = GenerateRequest(rid="r", input_ids=[5, 9, 9, 9, 9, 6], sampling_params={},
                              positions=MediaPositions(pack_tensor(table), -2))
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(request), type=GenerateRequest)
    assert back == request and torch.equal(unpack_tensor(back.positions.table), table)
