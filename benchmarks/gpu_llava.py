"""LLaVA 1.5 7B's shape with dummy weights on one GPU, each figure beside HF transformers measured in
the same run (issue 18): a folder is made from the config, a placeholder tokenizer whose
``<t{image_token_index}>`` is the image token, and a processor of CLIP's defaults at the tower's
image size.

    python benchmarks/gpu_llava.py --config benchmarks/configs/llava-1.5-7b
    python benchmarks/gpu_llava.py --config path/to/tiny-llava-config --device cpu --dtype float32 \\
        --requests 8 --hf-batches 1,4 --encoder-batches 1,4      # a smoke run on the CPU

Runs:
- ``encoder``: vision tower + projector, images/s at each ``--encoder-batches`` size: ours
  (``embed_media``) and HF's ``get_image_features``.
- ``ttft``: one image and a 64-token question, max_new_tokens 1, prefix cache flushed: seconds.
- ``distinct``: ``--requests`` requests, each its own image, 64-token question, 128 tokens out (EOS
  ignored): output tok/s; HF ``generate`` on the same at each ``--hf-batches`` size (its best is
  the baseline). ``distinct-serial-media`` runs the same after it with the batch's images loaded on one
  thread (as before ``MEDIA_THREADS``), the baseline of the threads' gain.
- ``shared``: the same requests all with one image: cached prompt tokens and output tok/s.
Results go to ``--out`` as JSON lines and are printed.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sglang_core import media_inputs
from sglang_core.engine import Engine

QUESTION, OUTPUT = 64, 128


def make_folder(config_folder: Path, out: Path) -> Path:
    """The config, a placeholder tokenizer and a LLaVA processor of CLIP's defaults, in ``out``."""
    from transformers import AutoConfig, LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from sglang_core.tokenizer import placeholder_tokenizer

    shutil.copy(config_folder / "config.json", out / "config.json")
    config = AutoConfig.from_pretrained(out)
    text = config.text_config
    tokenizer = PreTrainedTokenizerFast.from_pretrained(placeholder_tokenizer(text.vocab_size, text.eos_token_id))
    size = config.vision_config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=config.vision_config.patch_size, image_token=f"<t{config.image_token_id}>",
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1)
    processor.save_pretrained(out)
    return out


def images(count: int, size: int, seed: int = 0):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy())
            for _ in range(count)]


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def question(vocab: int, seed: int) -> str:
    # Ids below vocab - 100: a config's image token sits at the top of its vocabulary.
    gen = torch.Generator().manual_seed(seed)
    return "".join(f"<t{int(t)}>" for t in torch.randint(3, min(vocab - 100, 30000), (QUESTION,), generator=gen))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 3) -> float:
    fn()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


def hf_model(folder: Path, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, LlavaForConditionalGeneration

    with torch.device(device):
        model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(folder)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def run(args: argparse.Namespace, folder: Path) -> list[dict]:
    from transformers import AutoProcessor

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    processor = AutoProcessor.from_pretrained(folder)
    size = processor.image_processor.crop_size["height"]
    pictures = images(max(args.requests, max(args.encoder_batches)), size)
    urls = [data_url(p) for p in pictures]
    rows = []
    engine = Engine(str(folder), load_format="dummy", device=args.device, dtype=args.dtype,
                    max_running_requests=max(args.requests, 1))
    try:
        model = engine.core.core.runner.model  # the in-thread core's model, for the encoder alone
        vocab = engine.info.vocab_size
        token = engine.image_token
        for batch in args.encoder_batches:
            pixels = processor.image_processor(pictures[:batch], return_tensors="pt")["pixel_values"].to(args.device)
            inputs = [{"pixel_values": pixels[i : i + 1]} for i in range(batch)]
            with torch.inference_mode():
                seconds = timed(lambda: model.embed_media(inputs), args.device)
            rows.append({"run": "encoder", "impl": "ours", "batch": batch, "images_per_s": batch / seconds})
        prompts = [token + question(vocab, i) for i in range(args.requests)]
        params = {"max_new_tokens": OUTPUT, "temperature": 0, "ignore_eos": True}
        engine.generate(prompts[0], {"max_new_tokens": 1}, image_data=urls[0])  # warm-up
        engine.flush_cache()
        start = time.perf_counter()
        engine.generate(prompts[0], {"max_new_tokens": 1}, image_data=urls[0])
        rows.append({"run": "ttft", "impl": "ours", "seconds": time.perf_counter() - start})
        default_threads = media_inputs.MEDIA_THREADS
        # The serial baseline second: any first-run cost falls on the threads' run, not on it.
        for run_name, chosen, threads in (("distinct", urls[: args.requests], default_threads),
                                          ("distinct-serial-media", urls[: args.requests], 1),
                                          ("shared", [urls[0]] * args.requests, default_threads)):
            media_inputs.MEDIA_THREADS = threads
            engine.flush_cache()
            start = time.perf_counter()
            results = engine.generate(prompts, params, image_data=[[u] for u in chosen])
            elapsed = time.perf_counter() - start
            rows.append({"run": run_name, "impl": "ours", "requests": args.requests, "media_threads": threads,
                         "output_tok_per_s": sum(len(r["output_ids"]) for r in results) / elapsed,
                         "cached_prompt_tokens": sum(r["meta_info"]["cached_tokens"] for r in results)})
    finally:
        engine.shutdown()
    del engine, model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    hf = hf_model(folder, dtype, args.device)
    for batch in args.encoder_batches:
        pixels = processor.image_processor(pictures[:batch], return_tensors="pt")["pixel_values"].to(args.device, dtype)
        with torch.no_grad():
            seconds = timed(lambda: hf.model.get_image_features(pixel_values=pixels), args.device)
        rows.append({"run": "encoder", "impl": "hf", "batch": batch, "images_per_s": batch / seconds})
    for batch in args.hf_batches:
        inputs = processor(text=prompts[:batch], images=pictures[:batch], return_tensors="pt").to(args.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            generate = lambda: hf.generate(**inputs, max_new_tokens=OUTPUT, min_new_tokens=OUTPUT, do_sample=False)  # noqa: E731
            seconds = timed(generate, args.device, repeat=1)
        rows.append({"run": "distinct", "impl": "hf", "batch": batch, "output_tok_per_s": batch * OUTPUT / seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("benchmarks/configs/llava-1.5-7b"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--encoder-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--hf-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--out", default="llava_bench.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as tmp:
        rows = run(args, make_folder(args.config, Path(tmp)))
    with open(args.out, "a") as out:
        for row in rows:
            out.write(json.dumps({**row, "device": args.device, "dtype": args.dtype}) + "\n")
            print(row)


if __name__ == "__main__":
    main()
