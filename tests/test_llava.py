"""LLaVA 1.5 against transformers' ``LlavaForConditionalGeneration`` (float32, CPU) on a tiny random
checkpoint saved with its processor: greedy tokens and logprobs for prompts of one and two images,
batched and chunked across an image, on one rank and on two tensor-parallel ranks; the prefix cache shares an image's tokens with the same image
only; an image the encoder fails on ends its own request only; every KV slot comes back."""

from __future__ import annotations

import base64
import io
import threading
from typing import Callable

import pytest
import torch

from reference import byte_level_tokenizer, hf_greedy_logprobs

IMAGE_TOKEN = "<image>"
MAX_NEW = 6
PROMPTS = {  # name -> (prompt text, image names)
    "one": (f"{IMAGE_TOKEN}\nWhat is in the picture?", ["red"]),
    "two": (f"Compare {IMAGE_TOKEN} with {IMAGE_TOKEN}, please.", ["noise", "tall"]),
}


def _image(name: str):
    from PIL import Image

    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    sizes = {"red": (40, 40), "noise": (48, 36), "tall": (30, 60), "other": (40, 40), "speck": (9, 7), "strip": (190, 40)}
    size = sizes[name]
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    if name == "red":
        pixels[..., 0] = 230
    return Image.fromarray(pixels.numpy())


def data_url(name: str) -> str:
    buffer = io.BytesIO()
    _image(name).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# LLaVA-NeXT's grids of 32-pixel tiles: 1x2, 2x1, 2x2.
PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def save_tiny_llava(folder, next_: bool = False, siglip: bool = False, text_options: dict | None = None, **overrides):
    """A tiny LLaVA (CLIP tower of 4x4 patches of 8 pixels, Llama of 2 layers) with its processor;
    ``next_``: LLaVA-NeXT, on anyres tiles of ``PINPOINTS``; ``siglip``: a SigLIP tower (no CLS);
    ``text_options``: the Llama config's, ``overrides``: the LLaVA config's."""
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig, SiglipVisionConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, **(text_options or {}))
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                 patch_size=8)
    vision = SiglipVisionConfig(**sizes) if siglip else CLIPVisionConfig(**sizes, projection_dim=32)
    options = dict(vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    options.update(overrides)
    family = "LlavaNext" if next_ else "Llava"
    if next_:
        options["image_grid_pinpoints"] = PINPOINTS
    config = getattr(transformers, f"{family}Config")(text_config=text, vision_config=vision,
                                                     image_token_index=len(tokenizer) - 1, **options)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForConditionalGeneration")(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    sizes = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    if siglip:
        image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    elif next_:
        image_processor = LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=PINPOINTS)
    else:
        image_processor = CLIPImageProcessorPil(**sizes)
    # CLIP's CLS is one more position than the patches (the count "default" drops again); SigLIP has none.
    processor = getattr(transformers, f"{family}Processor")(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, num_additional_image_tokens=int(not siglip),
        vision_feature_select_strategy=options["vision_feature_select_strategy"])
    processor.save_pretrained(folder)
    return folder


def hf_reference(folder, prompt: str, images: list[str], max_new: int = MAX_NEW) -> tuple[list[int], list[float]]:
    """transformers' greedy generate on the processor's inputs: tokens and their logprobs."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model_cls = getattr(transformers, AutoConfig.from_pretrained(folder).architectures[0])
    model = model_cls.from_pretrained(folder, dtype=torch.float32).eval()
    return hf_greedy_logprobs(model, processor(text=prompt, images=[_image(n) for n in images], return_tensors="pt"),
                              max_new)


def hf_choice_scores(folder, prompt: str, image: str, choices: list[str]) -> list[float]:
    """What transformers gives each choice after ``prompt`` (one image, its token first): the mean
    logprob of the choice's tokens, split from the prompt's where ``choice_spans`` splits them."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from sglang_core.choices import choice_spans

    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = processor(text=IMAGE_TOKEN, images=[_image(image)], return_tensors="pt")
    count = int((inputs["input_ids"] == model.config.image_token_id).sum())
    scores = []
    for span in choice_spans(lambda texts: [processor.tokenizer(t)["input_ids"] for t in texts], prompt, choices):
        assert span.ids[0] == model.config.image_token_id and span.start > 0
        ids = torch.tensor([[span.ids[0]] * count + span.ids[1:]])
        with torch.no_grad():
            table = torch.log_softmax(model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0].float(), -1)
        positions = range(span.start + count - 1, ids.shape[1])
        scores.append(sum(float(table[p - 1, ids[0, p]]) for p in positions) / len(positions))
    return scores


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    folder = save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))
    cases = {**PROMPTS, "same": PROMPTS["one"], "other": (PROMPTS["one"][0], ["other"])}
    return folder, {name: hf_reference(folder, text, images) for name, (text, images) in cases.items()}


def _generate(engine, names: list[str], cases=PROMPTS, max_new: int = MAX_NEW) -> list[dict]:
    return engine.generate([cases[n][0] for n in names], {"max_new_tokens": max_new, "temperature": 0,
                                                          "ignore_eos": True},
                           image_data=[[data_url(i) for i in cases[n][1]] for n in names], return_logprob=True)


def _check(result: dict, expected: tuple[list[int], list[float]]) -> None:
    tokens, logprobs = expected
    assert result["output_ids"] == tokens
    ours = [lp for lp, _, _ in result["meta_info"]["output_token_logprobs"]]
    assert ours == pytest.approx(logprobs, abs=1e-4)


@pytest.mark.parametrize("chunk", [2048, 5], ids=["whole", "chunked"])
def test_one_and_two_images_batched_match_hf(llava, chunk: int):
    """Both prompts in one batch; with chunks of 5 every image (16 placeholders) spans several steps."""
    from sglang_core.engine import Engine

    folder, expected = llava
    with Engine(str(folder), device="cpu", dtype="float32", chunked_prefill_size=chunk, max_total_tokens=512) as engine:
        results = _generate(engine, ["one", "two"])
        for result, name in zip(results, ["one", "two"]):
            _check(result, expected[name])
        assert engine.stats()["images_encoded"] == 3  # once per image, however many chunks it spans
        engine.check_memory()


def test_two_tensor_parallel_ranks_match_hf(llava):
    """--tp-size 2 (gloo): rank 0 encodes the images and sends their embeddings with the step;
    prompts chunked across images give transformers' tokens and logprobs (as one rank does above)."""
    from sglang_core.engine import Engine

    folder, expected = llava
    with Engine(str(folder), device="cpu", dtype="float32", chunked_prefill_size=5, max_total_tokens=512,
                tp_size=2) as engine:
        results = _generate(engine, ["one", "two"])
        assert engine.stats()["images_encoded"] == 3
        engine.check_memory()
    for result, name in zip(results, ["one", "two"]):
        _check(result, expected[name])


def test_same_image_shares_the_cached_prefix_and_another_does_not(llava):
    from sglang_core.engine import Engine

    folder, expected = llava
    cases = {"one": PROMPTS["one"], "other": (PROMPTS["one"][0], ["other"])}
    with Engine(str(folder), device="cpu", dtype="float32", max_total_tokens=512) as engine:
        first = _generate(engine, ["one"], cases)[0]
        again = _generate(engine, ["one"], cases)[0]
        encoded_before_other = engine.stats()["images_encoded"]
        other = _generate(engine, ["other"], cases)[0]
        assert engine.stats()["images_encoded"] == encoded_before_other + 1
        engine.check_memory()
    assert encoded_before_other == 1  # the cached image was not encoded again
    _check(first, expected["one"])
    _check(again, expected["same"])
    _check(other, expected["other"])
    assert first["meta_info"]["cached_tokens"] == 0
    # The prompt starts with the image's 16 placeholders: the same image reuses them and the
    # text after; another image of the same size reuses nothing.
    assert again["meta_info"]["cached_tokens"] >= 16
    assert other["meta_info"]["cached_tokens"] == 0


def test_retracted_requests_with_images_stay_exact(llava):
    """A KV pool too small for four running requests: the newest are retracted, then prefilled
    again (images encoded again), and still give transformers' tokens."""
    from sglang_core.engine import Engine

    folder, _ = llava
    cases = {"one": PROMPTS["one"], "other": (PROMPTS["one"][0], ["other"])}
    expected = {name: hf_reference(folder, text, images, 24) for name, (text, images) in cases.items()}
    names = ["one", "other", "other", "one"]
    with Engine(str(folder), device="cpu", dtype="float32", max_total_tokens=110, new_token_ratio=0.0,
                disable_radix_cache=True) as engine:
        results = _generate(engine, names, cases, max_new=24)
        assert engine.stats()["retractions"] > 0, "the tiny pool should have forced a retraction"
        engine.check_memory()
    for result, name in zip(results, names):
        _check(result, expected[name])


FAILURE_CASES = {"one": PROMPTS["one"], "other": (PROMPTS["one"][0], ["other"]), "bad": (PROMPTS["one"][0], ["tall"])}


def _plant_encoder_failure(monkeypatch, folder, image: str, error: Exception,
                           at_failure: Callable[[], object] = lambda: None) -> list:
    """Make the LLaVA plugin's encoder raise ``error`` on any batch that holds ``image`` (found by
    its processed pixels); returns a list that gets ``at_failure()`` at each failure."""
    from transformers import AutoProcessor

    from sglang_plugins.models.llava.model import LlavaForConditionalGeneration

    pixels = AutoProcessor.from_pretrained(folder).image_processor(_image(image), return_tensors="pt")["pixel_values"]
    encode = LlavaForConditionalGeneration.embed_media
    seen_at_failure: list = []

    def failing(model, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        if any(torch.equal(item["pixel_values"].cpu(), pixels) for item in inputs):
            seen_at_failure.append(at_failure())
            raise error
        return encode(model, inputs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "embed_media", failing)
    return seen_at_failure


@pytest.fixture(scope="module")
def failure_engine(llava):
    from sglang_core.engine import Engine

    folder, _ = llava
    with Engine(str(folder), device="cpu", dtype="float32", max_total_tokens=512) as engine:
        yield engine


def test_the_input_processor_loads_at_start_up_not_on_a_request(failure_engine, monkeypatch):
    """As vLLM and SGLang do, the engine loads a vision-language model's HF processor when it starts
    (the ``MediaInputs`` its constructor builds): a text-only request, or a chat rendering asking for
    the image token, both served on the server's event loop, never waits for a load there."""
    from sglang_core import media_inputs

    engine = failure_engine
    media = media_inputs.MediaInputs(engine.plugins, engine.info, engine.settings)

    def load_again(target):
        raise AssertionError("a request loaded the input processor")

    monkeypatch.setattr(media_inputs, "resolve_target", load_again)
    ids = engine.tokenizer.encode("What is in the picture?")
    assert media.image_token == IMAGE_TOKEN and media.video_token is None
    assert media.expand(ids, []) == (ids, [])


def test_an_image_the_encoder_fails_on_ends_its_own_request_only(llava, failure_engine, monkeypatch):
    """One request's image breaks the encoder: that request ends with a 400 naming the error and
    holds no KV slot; the requests encoded in the same batch and one already decoding give
    transformers' tokens, and the engine goes on serving."""
    import threading
    import time

    folder, expected = llava
    engine = failure_engine
    scheduler = engine.core.core.scheduler
    running = _plant_encoder_failure(monkeypatch, folder, "tall", ValueError("planted: the tower broke"),
                                     lambda: len(scheduler.running))
    # Prefilled in one step: the three images are one batch, which fails; each is then encoded alone.
    one, bad, other = _generate(engine, ["one", "bad", "other"], FAILURE_CASES)
    _check(one, expected["one"])
    _check(other, expected["other"])
    reason = bad["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 400
    assert "ValueError: planted: the tower broke" in reason["message"]
    assert bad["output_ids"] == []
    engine.check_memory()

    # A request decoding while another's image fails keeps decoding. Its first decode step waits
    # for the failing request to reach the engine's inbox, so the image fails while it runs.
    from sglang_core.scheduler.batch_runner import BatchRunner

    inbox, decode, arrived = engine.core._inbox, BatchRunner.decode, threading.Event()

    def decode_once_the_failing_request_arrives(runner, reqs, input_ids):
        while not arrived.is_set() and inbox.empty() and time.monotonic() < deadline:
            time.sleep(0.001)
        arrived.set()
        return decode(runner, reqs, input_ids)

    monkeypatch.setattr(BatchRunner, "decode", decode_once_the_failing_request_arrives)
    long_expected = hf_reference(folder, *PROMPTS["one"], max_new=40)
    long_result: list[dict] = []
    decoding = threading.Thread(target=lambda: long_result.extend(_generate(engine, ["one"], FAILURE_CASES, 40)))
    deadline = time.monotonic() + 30
    decoding.start()
    while not scheduler.running and decoding.is_alive():
        time.sleep(0.001)
    alone = _generate(engine, ["bad"], FAILURE_CASES)[0]
    decoding.join()
    assert alone["meta_info"]["finish_reason"]["status_code"] == 400
    assert running[-1] == 1, "the failing image should have met a running request"
    _check(long_result[0], long_expected)
    engine.check_memory()


def test_the_input_processor_serves_many_threads_at_once(failure_engine):
    """A batch's images and concurrent requests run the processor on several threads: the HF
    processor (its tokenizer included: some transformers releases raised "Already borrowed" from
    a fast tokenizer shared by threads) gives every thread what one call alone gives."""
    from concurrent.futures import ThreadPoolExecutor

    from sglang_core import media_inputs

    engine = failure_engine
    processor = media_inputs.MediaInputs(engine.plugins, engine.info, engine.settings)._processor
    images = [_image(name) for name in ("red", "noise", "tall", "other")]
    alone = [processor.process_image(image) for image in images]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: processor.process_image(images[i % 4]), range(800)))
    for i, (tensors, count) in enumerate(results):
        expected, expected_count = alone[i % 4]
        assert count == expected_count and tensors.keys() == expected.keys()
        assert all(torch.equal(tensors[k], expected[k]) for k in tensors)


def test_a_batch_with_an_unreadable_image_is_refused_naming_its_prompt(llava, failure_engine, monkeypatch):
    """A batch's images load on several threads: the first prompt in order whose image cannot be
    read names the error (``image_data.<prompt>.<image>``), even when a later prompt's fails first;
    nothing of the batch is submitted, and the next batch gives transformers' tokens."""
    from sglang_core import media_inputs

    _, expected = llava
    engine = failure_engine
    monkeypatch.setattr(media_inputs, "MEDIA_THREADS", 4)
    load, later_failed = media_inputs.load_image, threading.Event()

    def load_image(source, limits, field):
        if field == "image_data.1.0":  # the earlier bad image is read only once the later one failed
            later_failed.wait(timeout=10)
        try:
            return load(source, limits, field)
        except ValueError:
            later_failed.set()
            raise

    monkeypatch.setattr(media_inputs, "load_image", load_image)
    good, bad = data_url("red"), "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    text, before = PROMPTS["one"][0], engine.stats()
    with pytest.raises(ValueError, match=r"^image_data\.1\.0: cannot decode the image"):
        engine.generate([text] * 4, {"max_new_tokens": 2}, image_data=[[good], [bad], [good], [bad]])
    assert later_failed.is_set()
    assert engine.stats() == before  # nothing of the batch reached the engine core
    one, two = _generate(engine, ["one", "two"])
    _check(one, expected["one"])
    _check(two, expected["two"])
    engine.check_memory()


def test_an_image_failing_part_way_through_a_chunked_prompt_ends_its_request_only(llava, monkeypatch):
    """Chunks of 5: the prompt of two images has its text and first image prefilled when its
    second image fails; it ends holding no slot, and a request beside it gives transformers' tokens."""
    from sglang_core.engine import Engine

    folder, expected = llava
    with Engine(str(folder), device="cpu", dtype="float32", chunked_prefill_size=5, max_total_tokens=512) as engine:
        scheduler = engine.core.core.scheduler
        # The KV the failing request holds when its second image fails: past its first image's 16 tokens.
        held = _plant_encoder_failure(monkeypatch, folder, "tall", ValueError("planted: the tower broke"),
                                      lambda: scheduler.chunked.kv_len)
        two, one = _generate(engine, ["two", "one"])
        assert held and held[0] > 16
        assert two["meta_info"]["finish_reason"]["status_code"] == 400 and two["output_ids"] == []
        _check(one, expected["one"])
        engine.check_memory()


def test_running_out_of_memory_in_the_encoder_still_ends_every_request(llava, failure_engine, monkeypatch):
    """Out of memory is no request's fault: as any internal step error, it ends the step's
    requests (no 400), gives back their KV, and the engine serves the next requests."""
    folder, expected = llava
    engine = failure_engine
    _plant_encoder_failure(monkeypatch, folder, "tall", torch.OutOfMemoryError("planted"))
    for result in _generate(engine, ["one", "bad"], FAILURE_CASES):
        reason = result["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "status_code" not in reason
        assert reason["message"] == "internal error: OutOfMemoryError: planted"
    engine.check_memory()
    monkeypatch.undo()
    _check(_generate(engine, ["other"], FAILURE_CASES)[0], expected["other"])
    engine.check_memory()


CONFIG_VARIANTS = {  # id -> save_tiny_llava's arguments
    # vision_feature_layer as a list (hidden states concatenated) and the "full" strategy (every
    # position kept: 17 placeholders per image with CLIP's CLS, 16 with SigLIP, which has none)
    "clip-layers-full": dict(vision_feature_layer=[-3, -1], vision_feature_select_strategy="full"),
    "siglip-layers-full": dict(siglip=True, vision_feature_layer=[-3, -1], vision_feature_select_strategy="full"),
    # the head tied by the outer config alone (the checkpoint holds no lm_head)...
    "next-tied-outer": dict(next_=True, tie_word_embeddings=True),
    # ...and only the text config's tie, which LLaVA-NeXT's config does not copy up: not tied
    "next-tied-text-only": dict(next_=True, text_options={"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
def test_config_variants_match_hf(tmp_path, variant: str):
    from sglang_core.engine import Engine

    folder = save_tiny_llava(tmp_path, **CONFIG_VARIANTS[variant])
    text, images = PROMPTS["two"]
    expected = hf_reference(folder, text, images)
    with Engine(str(folder), device="cpu", dtype="float32", max_total_tokens=512) as engine:
        result = _generate(engine, ["two"])[0]
        engine.check_memory()
    _check(result, expected)



@pytest.mark.parametrize("siglip, strategy", [(False, "full"), (True, "default")], ids=["clip-full", "siglip-default"])
def test_next_select_strategy_that_breaks_the_tile_map_is_refused(tmp_path, siglip: bool, strategy: str):
    """LLaVA-NeXT lays each tile's features out as a square map: CLIP's CLS kept ("full") or a
    SigLIP patch dropped ("default") leaves no square (transformers fails on it too)."""
    from transformers import AutoConfig

    from sglang_core.model_executor.model_api import ModelContext
    from sglang_plugins.models.llama.model import LlamaForCausalLM
    from sglang_plugins.models.llava.next import LlavaNextForConditionalGeneration

    config = AutoConfig.from_pretrained(save_tiny_llava(tmp_path, next_=True, siglip=siglip))
    config.vision_feature_select_strategy = strategy
    with pytest.raises(ValueError, match="^vision_feature_select_strategy: .* leaves (17|15) positions"):
        LlavaNextForConditionalGeneration(config, ModelContext(model_class_for=lambda arch: LlamaForCausalLM))


def test_image_requests_cross_to_the_engine_process_intact():
    """A request's preprocessed images travel as msgpack (no pickle) and come back bit for bit."""
    import msgspec

    from sglang_core.messages import GenerateRequest, MediaItem
    from sglang_core.multimodal import content_digest, pack_tensor, unpack_tensor

    tensors = {"pixel_values": torch.randn(1, 3, 4, 4), "image_sizes": torch.tensor([[36, 48]])}
    item = MediaItem(offset=2, length=5, digest=content_digest(tensors),
                     tensors={name: pack_tensor(t) for name, t in tensors.items()})
    request = GenerateRequest(rid="r", input_ids=[1, 2, 9, 9, 9, 9, 9, 3], sampling_params={}, media=[item])
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(request), type=GenerateRequest)
    assert back == request
    for name, tensor in tensors.items():
        assert torch.equal(unpack_tensor(back.media[0].tensors[name]), tensor)
    assert content_digest({"pixel_values": tensors["pixel_values"] + 1e-6, "image_sizes": tensors["image_sizes"]}) \
        != item.digest

@pytest.mark.parametrize("chunk", [2048, 7], ids=["whole", "chunked"])
def test_llava_next_anyres_images_of_different_sizes_match_hf(tmp_path_factory, chunk: int):
    """Square, wide and tall images: each its own grid of tiles, unpadded, a newline per row."""
    from sglang_core.engine import Engine

    folder = tmp_path_factory.getbasetemp() / "tiny_llava_next"
    if not folder.exists():
        save_tiny_llava(folder, next_=True)
    # Besides: an image smaller than a tile and one of sides far apart (most of its grid padding).
    cases = {**PROMPTS, "odd": (f"{IMAGE_TOKEN} or {IMAGE_TOKEN}?", ["speck", "strip"])}
    names = ["one", "two", "odd"]
    with Engine(str(folder), device="cpu", dtype="float32", chunked_prefill_size=chunk, max_total_tokens=1024) as engine:
        results = _generate(engine, names, cases)
        engine.check_memory()
    for result, name in zip(results, names):
        _check(result, hf_reference(folder, *cases[name]))


# ---- the HTTP APIs ----------------------------------------------------------------------------

CHATML_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def server(llava):
    """The app served by uvicorn in a thread, the engine in a thread of this process (a spawned
    engine process costs CI tens of seconds to start; requests still pass the msgpack check)."""
    from server_util import app_in_thread
    from sglang_core.server.app import build_app
    from sglang_core.server.settings import ServerSettings

    folder, _ = llava
    app = build_app(ServerSettings(model_path=str(folder), device="cpu", dtype="float32", chat_template="chatml",
                                   max_total_tokens=512, engine_in_subprocess=False))
    with app_in_thread(app) as url:
        yield url


def test_openai_chat_image_url_parts_match_hf(llava, server):
    import openai

    folder, _ = llava
    text, images = PROMPTS["two"]
    before, middle, after = text.split(IMAGE_TOKEN)
    # The parts joined by newlines, each image as the image token: the prompt HF is given.
    expected = hf_reference(folder, CHATML_USER.format(f"{before}\n{IMAGE_TOKEN}\n{middle}\n{IMAGE_TOKEN}\n{after}"),
                            images)
    content = [{"type": "text", "text": before},
               {"type": "image_url", "image_url": {"url": data_url(images[0]), "detail": "low"}},
               {"type": "text", "text": middle},
               {"type": "image_url", "image_url": {"url": data_url(images[1])}},
               {"type": "text", "text": after}]
    client = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                           max_tokens=MAX_NEW, temperature=0, logprobs=True,
                                           extra_body={"ignore_eos": True})
    assert [t.logprob for t in reply.choices[0].logprobs.content] == pytest.approx(expected[1], abs=1e-4)
    assert reply.usage.completion_tokens == MAX_NEW
    with pytest.raises(openai.BadRequestError) as err:  # not an image: a 400 in OpenAI's error shape
        client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert err.value.body["type"] == "invalid_request_error" and "cannot decode the image" in err.value.body["message"]


def test_openai_chat_image_the_encoder_fails_on_is_a_400_and_serving_goes_on(llava, server, monkeypatch):
    import httpx
    import openai

    folder, expected = llava
    _plant_encoder_failure(monkeypatch, folder, "tall", ValueError("planted: the tower broke"))
    client = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url("tall")}}]}])
    assert "could not encode this request's media: ValueError: planted: the tower broke" in err.value.body["message"]
    text, images = PROMPTS["one"]
    body = {"text": text, "image_data": data_url(images[0]), "return_logprob": True,
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}
    meta = httpx.post(server + "/generate", json=body, timeout=60).json()["meta_info"]
    assert [tid for _, tid, _ in meta["output_token_logprobs"]] == expected["one"][0]


# Checkpoints' own chat templates read Hugging Face's content parts: llava-hf's writes a message's
# images first, then its texts (and nothing for string content); a Qwen2-VL-like one writes the
# parts in order and string content as it is.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
PARTS_IN_ORDER_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<image>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_checkpoint_template_reading_content_parts_matches_hf(llava, tmp_path):
    """A template that reads content parts gets them (images as ``{"type": "image"}``) on OpenAI
    and Anthropic chat: transformers' prompt from the same parts, its tokens and logprobs."""
    import anthropic
    import openai
    from server_util import app_in_thread
    from sglang_core.server.app import build_app
    from sglang_core.server.settings import ServerSettings
    from transformers import AutoProcessor

    folder, _ = llava
    (tmp_path / "template.jinja").write_text(LLAVA_HF_TEMPLATE)
    _, images = PROMPTS["two"]
    texts = ["Compare", "with", "please."]
    parts = [{"type": "text", "text": texts[0]}, {"type": "image"}, {"type": "text", "text": texts[1]},
             {"type": "image"}, {"type": "text", "text": texts[2]}]
    prompt = AutoProcessor.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": parts}], chat_template=LLAVA_HF_TEMPLATE, add_generation_prompt=True)
    tokens, logprobs = hf_reference(folder, prompt, images)
    urls = iter(data_url(name) for name in images)
    openai_parts = [{"type": "image_url", "image_url": {"url": next(urls)}} if p["type"] == "image" else p
                    for p in parts]
    anthropic_parts = [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                    "data": data_url(name).partition(",")[2]}} for name in images]
    anthropic_parts = [anthropic_parts.pop(0) if p["type"] == "image" else p for p in parts]
    app = build_app(ServerSettings(model_path=str(folder), device="cpu", dtype="float32", max_total_tokens=512,
                                   chat_template=str(tmp_path / "template.jinja"), engine_in_subprocess=False))
    with app_in_thread(app) as url:
        reply = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": openai_parts}], max_tokens=MAX_NEW, temperature=0,
            logprobs=True, extra_body={"ignore_eos": True})
        message = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0).messages.create(
            model="m", max_tokens=MAX_NEW, messages=[{"role": "user", "content": anthropic_parts}],
            extra_body={"ignore_eos": True, "temperature": 0})
    assert [t.logprob for t in reply.choices[0].logprobs.content] == pytest.approx(logprobs, abs=1e-4)
    tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    assert message.content[0].text == tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("template", [PARTS_IN_ORDER_TEMPLATE, LLAVA_HF_TEMPLATE], ids=["in-order", "llava-hf"])
def test_chat_messages_render_as_transformers_renders_their_parts(llava, template: str):
    """The frontends' messages (pieces joined by newlines, each image as its token), with images
    or text only, rendered by a template that reads parts: transformers' prompt of the parts
    themselves (text pieces that begin or end with newlines keep them); by one that reads
    strings (chatml): the strings."""
    from transformers import AutoTokenizer

    from sglang_core.server.chat_templates import resolve_chat_template
    from sglang_core.server.generation import chat_prompt_ids
    from sglang_plugins.frontends.media_messages import media_chat_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(llava[0])
    chatml = resolve_chat_template("chatml")
    for pieces in (["Look\n", IMAGE_TOKEN, IMAGE_TOKEN, "\nat both.", IMAGE_TOKEN], ["Only text."]):
        joined = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "\n".join(pieces)}]
        parts = [{"type": "image"} if p == IMAGE_TOKEN else {"type": "text", "text": p} for p in pieces]
        hf_messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                       {"role": "user", "content": parts}]
        expected = tokenizer.apply_chat_template(hf_messages, chat_template=template, add_generation_prompt=True,
                                                 tokenize=False)
        assert media_chat_prompt_ids(tokenizer, joined, template, [IMAGE_TOKEN]) == \
            tokenizer(expected, add_special_tokens=False)["input_ids"]
        assert media_chat_prompt_ids(tokenizer, joined, chatml, [IMAGE_TOKEN]) == \
            chat_prompt_ids(tokenizer, joined, chatml)


def test_native_generate_image_data_matches_hf(llava, server):
    import httpx

    _, expected = llava
    text, images = PROMPTS["one"]
    body = {"text": text, "image_data": data_url(images[0]), "return_logprob": True, "logprob_start_len": -1,
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}
    meta = httpx.post(server + "/generate", json=body, timeout=60).json()["meta_info"]
    assert [tid for _, tid, _ in meta["output_token_logprobs"]] == expected["one"][0]
    # Raw base64 (SGLang's form) of the same image: its prefix is cached now.
    body["image_data"] = data_url(images[0]).partition(",")[2]
    meta = httpx.post(server + "/generate", json=body, timeout=60).json()["meta_info"]
    assert [tid for _, tid, _ in meta["output_token_logprobs"]] == expected["one"][0]
    assert meta["cached_tokens"] >= 16
    # A video for a model that takes none is refused as such (not as a prompt short of image tokens).
    for bad, why in [("/etc/passwd.png", "not allowed"), ("http://127.0.0.1/x.png", "not fetched"),
                     ("%%%", "valid base64"), ({"video": [data_url(images[0])]}, "takes no videos")]:
        response = httpx.post(server + "/generate", json={**body, "image_data": bad}, timeout=60)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "image_data.0" and why in error["message"], error
    # More images than image tokens: refused before any is read (this URL would be refused when read).
    response = httpx.post(server + "/generate", json={**body, "image_data": ["http://127.0.0.1/a.png"] * 2},
                          timeout=60)
    assert response.status_code == 400 and "2 image(s) given" in response.json()["error"]["message"], response.text
    # The image token with no image: refused, as transformers refuses it (not run on the token's own embedding).
    response = httpx.post(server + "/generate", json={**body, "image_data": None}, timeout=60)
    assert response.status_code == 400 and "0 image(s) given" in response.json()["error"]["message"], response.text


def test_anthropic_image_blocks_match_hf(llava, server):
    import anthropic
    from transformers import AutoTokenizer

    folder, _ = llava
    question = "What is in the picture?"
    tokens, _ = hf_reference(folder, CHATML_USER.format(f"{IMAGE_TOKEN}\n{question}"), ["noise"])
    media_type, _, data = data_url("noise").removeprefix("data:").partition(";base64,")
    client = anthropic.Anthropic(base_url=server, api_key="x", max_retries=0)
    image = {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    # The SDK's API version has no sampling parameters: temperature travels in the body.
    reply = client.messages.create(model="m", max_tokens=MAX_NEW, extra_body={"ignore_eos": True, "temperature": 0},
                                   messages=[{"role": "user", "content": [image, {"type": "text", "text": question}]}])
    assert reply.content[0].text == AutoTokenizer.from_pretrained(folder).decode(tokens, skip_special_tokens=True)
    assert reply.usage.input_tokens == len(CHATML_USER.format(question).encode()) + 1 + 16  # "\n" + image


def test_frontend_language_image_through_runtime_endpoint(llava, server):
    """``sgl.image`` on ``RuntimeEndpoint``: the image token where the image goes, the image sent
    as ``image_data``; generation and select both see it."""
    import sglang_core as sgl
    from transformers import AutoTokenizer

    folder, expected = llava
    buffer = io.BytesIO()
    _image("red").save(buffer, format="PNG")

    choices = [" red", " blue", " a cat"]

    @sgl.function
    def look(s, image):
        s += sgl.image(image) + PROMPTS["one"][0].removeprefix(IMAGE_TOKEN)
        s += sgl.gen("answer", max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
        s += "\nIt is"
        s += sgl.select("pick", choices=choices)

    backend = sgl.RuntimeEndpoint(server)
    assert backend.supports_images
    state = look.run(buffer.getvalue(), backend=backend)
    tokens = expected["one"][0]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert state["answer"] == tokenizer.decode(tokens, skip_special_tokens=True)
    prompt = PROMPTS["one"][0] + tokenizer.decode(tokens, skip_special_tokens=True) + "\nIt is"
    assert state.get_meta_info("pick")["scores"] == pytest.approx(hf_choice_scores(folder, prompt, "red", choices),
                                                                   abs=1e-4)
