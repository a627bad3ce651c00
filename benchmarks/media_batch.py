"""CPU time to load and preprocess one batch's images (the request side's work before a batch of
image prompts reaches the engine core), one thread against the engine's thread count, in one run.

    python benchmarks/media_batch.py [--config benchmarks/configs/llava-1.5-7b] [--images 256]

The images are random 336x336 PNGs as data URLs (incompressible: the slowest PNGs of that size),
processed by a LLaVA-1.5 processor of CLIP's defaults, as benchmarks/gpu_llava.py sends them.
The floor is the one-thread time over the threads that can run at once (min(threads, cores)).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_llava import data_url, images, make_folder  # noqa: E402

from sglang_core import media_inputs  # noqa: E402
from sglang_core.config import EngineSettings  # noqa: E402
from sglang_core.plugins import PluginManager  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path(__file__).parent / "configs" / "llava-1.5-7b")
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    folder = make_folder(args.config, Path(tempfile.mkdtemp()))
    info = types.SimpleNamespace(architecture="LlavaForConditionalGeneration", model_folder=str(folder))
    media = media_inputs.MediaInputs(PluginManager(), info, EngineSettings())
    token = media._processor.image_token_id
    urls = [data_url(p) for p in images(args.images, 336)]
    id_lists, sources, fields = [[1, token, 5]] * len(urls), [[u] for u in urls], ["image_data"] * len(urls)
    default = media_inputs.MEDIA_THREADS
    timings = {}
    for threads in (1, default):
        media_inputs.MEDIA_THREADS = threads
        media.expand_all(id_lists[:4], sources[:4], fields[:4])  # warm-up (and the pool started)
        start = time.perf_counter()
        media.expand_all(id_lists, sources, fields)
        timings[threads] = (time.perf_counter() - start) * 1e3 / len(urls)
    media.close()
    cores = len(os.sched_getaffinity(0))
    floor = timings[1] / min(default, cores)
    print(f"{len(urls)} images of 336x336, {cores} cores: 1 thread {timings[1]:.2f} ms/image; "
          f"{default} threads {timings[default]:.2f} ms/image ({timings[1] / timings[default]:.2f}x); "
          f"floor {floor:.2f} ms/image ({timings[default] / floor:.2f}x of it)")


if __name__ == "__main__":
    main()
