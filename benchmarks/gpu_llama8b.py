"""A model config's shape (default Llama-3.1-8B), dummy bf16 weights, one GPU: the figures of
docs/benchmarks.md's GPU tables, each beside its baseline measured in the same run.

    python benchmarks/gpu_llama8b.py                                   # everything
    python benchmarks/gpu_llama8b.py --runs decode1,batch64 --backends triton,torch_native
    python benchmarks/gpu_llama8b.py --config benchmarks/configs/qwen2-7b --runs floor,decode1,batch64,hf1,hf32
    python benchmarks/gpu_llama8b.py --config benchmarks/configs/llama-3.1-8b-gguf-q4k --runs floor,decode1

A config's ``quantization_config`` quantizes the dummy weights: ``llama-3.1-8b-awq`` random AWQ
codes, ``llama-3.1-8b-gguf-q4k`` random Q4_K blocks in every linear layer, the embedding and the
LM head (``dummy_ggml_type``: any type the gguf plugin has kernels for); the FP8 checkpoints'
configs random e4m3 codes with positive scales (the fp8 plugin's dummy init): ``llama-3.1-8b-fp8``
(compressed-tensors per-channel, dynamic per-token activations), ``qwen3-8b-fp8-block`` (128 x 128
``weight_scale_inv`` blocks; bf16 baseline ``qwen3-8b``), ``mixtral-8x7b-fp8`` (AutoFP8 per-tensor,
static activations; bf16 ``mixtral-8x7b`` needs ~94 GB: H200 only).

Runs (``--runs``):
- ``decode1``: batch 1, input 128, decode ms/step (also with ``--disable-cuda-graph``);
  ``decode1_kernels`` with graphs, the decode GEMV kernel and programmatic dependent launch
  each on and off (off: cuBLAS for every matmul; plain launches).
- ``batch64``: static batch 64, input 512, output 256, decode ms/step; ``batch64_pdl`` with
  programmatic dependent launch off and on.
- ``offline``: 500 random prompts, input uniform in [1, 4096], output in [1, 2048], EOS ignored
  (the row records the KV pool's size in tokens);
  ``offline_mixed`` the same with ``--enable-mixed-chunk`` (decodes ride along with prefill steps),
  ``offline_fp8kv`` with ``--kv-cache-dtype fp8_e4m3`` (half the bytes per cached token).
- ``decode1_compile``: ``decode1`` with graphs, ``--enable-torch-compile`` off and on.
- ``prefill_long``: prefill latency of one 8k- and one 32k-token prompt (chunked prefill).
- ``batch256``: static batch 256, input 512, output 256, decode ms/step.
- ``hf256``: batch 256 x (512 in, 256 out), ours against HF transformers ``generate`` on the same
  config and dtype (random weights; greedy; EOS ignored).
- ``hf1``: HF ``generate`` at batch 1, input 128: decode ms/step, to set beside ``decode1``.
- ``hf32``: batch 32 x (512 in, 65 out), output tok/s, ours and HF ``generate``.
- ``floor``: the batch-1 decode floor, the bytes of weights a step reads (every matrix once, as the
  engine stores it: bf16, or a GGUF / AWQ / FP8 config's packed bytes with their scales; the embedding
  table only where it is also the LM head; of the routed experts only the top-k) over the device
  copy bandwidth measured now. ``all_weight_bytes``: every weight (a large batch's read).
- ``shared_prefix``: 64 groups x 16 requests, 2048-token shared system prompt, 128-token
  question, 256 output; with the radix cache and with ``--disable-radix-cache``;
  ``shared_prefix_cascade`` the radix-cache run with ``--enable-cascade-decode``.
Each figure is end to end through the engine (scheduler, sampling, detokenization included).
``--engine KEY=VALUE`` (repeatable) adds an engine setting to every run, for experiments:
``--runs decode1 --engine enable_torch_compile=true``, or DeepSeek's MLA served from per-head K/V,
``--config benchmarks/configs/deepseek-v2-lite --runs offline --engine disable_mla=true``; rows
record it, and the table's variant column shows it.
Results go to ``--out`` as JSON lines; a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from sglang_core.bench import measure_latency, measure_offline, offline_workload, random_prompts
from sglang_core.engine import Engine

CONFIG = Path(__file__).parent / "configs" / "llama-3.1-8b"
EXTRA_SETTINGS: dict[str, str] = {}  # --engine KEY=VALUE, validated by EngineSettings


def with_engine(backend: str, measure: Callable[[Engine], dict], **settings) -> dict:
    """Build an engine, measure, and free its GPU memory before the next one is built."""
    engine = Engine(model_path=str(CONFIG), load_format="dummy", dtype="bfloat16", device="cuda",
                    attention_backend=backend, **{**settings, **EXTRA_SETTINGS})
    try:
        return measure(engine)
    finally:
        engine.shutdown()
        del engine
        release()


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def run_decode1(backend: str) -> list[dict]:
    return [{"run": "decode1", "backend": backend, "cuda_graph": graphs,
             **with_engine(backend, lambda e: measure_latency(e, 1, 128, 256), disable_cuda_graph=not graphs)}
            for graphs in ((True, False) if backend != "torch_native" else (False,))]  # torch_native: no graphs


@contextlib.contextmanager
def kernel_switches(use_gemv: bool, use_pdl: bool) -> Iterator[None]:
    """The decode GEMV kernel (off: cuBLAS for every matmul) and programmatic dependent launch
    (off: plain launches) switched for the engines built inside."""
    from sglang_core.kernels import gemv, pdl

    saved = gemv.ENABLED, pdl.ENABLED
    gemv.ENABLED, pdl.ENABLED = use_gemv, use_pdl
    try:
        yield
    finally:
        gemv.ENABLED, pdl.ENABLED = saved


def switched_latency(backend: str, run: str, batch: int, input_len: int,
                     switches: list[tuple[bool, bool]]) -> list[dict]:
    rows = []
    for use_gemv, use_pdl in switches:
        with kernel_switches(use_gemv, use_pdl):
            rows.append({"run": run, "backend": backend, "cuda_graph": True, "gemv": use_gemv, "pdl": use_pdl,
                         **with_engine(backend, lambda e: measure_latency(e, batch, input_len, 256))})
    return rows


BOTH_SWITCHES = [(False, False), (True, False), (False, True), (True, True)]


def run_decode1_kernels(backend: str) -> list[dict]:
    return switched_latency(backend, "decode1", 1, 128, BOTH_SWITCHES)


def run_batch64_pdl(backend: str) -> list[dict]:
    return switched_latency(backend, "batch64", 64, 512, [(True, False), (True, True)])


def run_batch64(backend: str) -> list[dict]:
    return [{"run": "batch64", "backend": backend, **with_engine(backend, lambda e: measure_latency(e, 64, 512, 256))}]


def run_offline(backend: str, **variant) -> list[dict]:
    def measure(e: Engine) -> dict:
        prompts, output_lens = offline_workload(e.info.vocab_size, 500, (1, 4096), (1, 2048), seed=0)
        # the pool's tokens beside the figure: what a KV layout (--kv-cache-dtype, --disable-mla) buys
        return {**measure_offline(e, prompts, output_lens), "kv_pool_tokens": e.memory_report()["kv_pool_size"]}

    return [{"run": "offline", "backend": backend, **variant,
             **with_engine(backend, measure, max_running_requests=256, **variant)}]


def run_offline_mixed(backend: str) -> list[dict]:
    return run_offline(backend, enable_mixed_chunk=True)


def run_offline_fp8kv(backend: str) -> list[dict]:
    return run_offline(backend, kv_cache_dtype="fp8_e4m3")


def shared_prefix_workload(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = []
    for group in range(64):
        system = random_prompts(vocab, [2048], seed * 1000 + group)[0]
        prompts += [system + [rng.randrange(vocab) for _ in range(128)] for _ in range(16)]
    rng.shuffle(prompts)  # arrival order mixes the groups; the scheduler's policy has to find them
    return prompts, [256] * len(prompts)


def run_shared_prefix(backend: str) -> list[dict]:
    def measure(e: Engine) -> dict:
        return measure_offline(e, *shared_prefix_workload(e.info.vocab_size))

    return [{"run": "shared_prefix", "backend": backend, "radix_cache": radix,
             **with_engine(backend, measure, max_running_requests=256, disable_radix_cache=not radix)}
            for radix in (True, False)]


def run_shared_prefix_cascade(backend: str) -> list[dict]:
    """The radix-cache half of ``shared_prefix`` with ``--enable-cascade-decode`` (triton)."""
    def measure(e: Engine) -> dict:
        return measure_offline(e, *shared_prefix_workload(e.info.vocab_size))

    return [{"run": "shared_prefix", "backend": backend, "radix_cache": True, "cascade": True,
             **with_engine(backend, measure, max_running_requests=256, enable_cascade_decode=True)}]


def run_hf256(backend: str) -> list[dict]:
    ours = with_engine(backend, lambda e: measure_latency(e, 256, 512, 256), max_running_requests=256)
    return [{"run": "hf256", "backend": backend, **ours}, {"run": "hf256", **hf_generate(256, 512, 256)}]


def hf_generate(batch_size: int, input_len: int, output_len: int) -> dict:
    """HF transformers ``generate`` on the config, bf16 random weights, greedy, EOS ignored:
    total time, output tok/s, and decode ms/step as ``measure_latency`` counts it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(CONFIG))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    prompts = torch.tensor(random_prompts(config.vocab_size, [input_len] * batch_size, seed=0), device="cuda")

    def generate(new_tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] == input_len + new_tokens
        return time.perf_counter() - start

    generate(4)  # warm-up
    prefill, total = generate(1), generate(output_len)
    del model
    release()
    return {"backend": "hf-transformers generate", "batch_size": batch_size, "input_len": input_len,
            "output_len": output_len, "prefill_s": prefill, "total_s": total,
            "decode_ms_per_step": (total - prefill) / (output_len - 1) * 1000,
            "output_tok_per_s": batch_size * output_len / total}


def run_hf1(backend: str) -> list[dict]:
    return [{"run": "hf1", **hf_generate(1, 128, 256)}]


def run_hf32(backend: str) -> list[dict]:
    ours = with_engine(backend, lambda e: measure_latency(e, 32, 512, 65))
    return [{"run": "hf32", "backend": backend, **ours}, {"run": "hf32", **hf_generate(32, 512, 65)}]


def stored_bytes(config) -> dict[str, Callable[[torch.Size], float]]:
    """Bytes of a weight of shape ``[..., out, in]`` as the engine stores the config's model, for
    ``linear`` (the decoder layers' matmuls), ``experts`` (routed experts) and ``tables`` (embedding,
    LM head): bf16 unless the ``quantization_config``'s method keeps that kind quantized. GGUF (dummy
    blocks of ``dummy_ggml_type``): a block's bytes over its values, linear layers and tables (the
    gguf method has no experts); AWQ: the packed codes plus a 16-bit scale and a packed zero per
    group, linear layers and experts; FP8 (``fp8``, compressed-tensors ``float-quantized``): a byte
    a value plus float32 scales, linear layers and experts (``fp8_bytes``)."""
    quant = getattr(config, "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method, bf16 = quant.get("quant_method"), per_value(2.0)
    sizes = {"linear": bf16, "experts": bf16, "tables": bf16}
    if method == "gguf":
        from sglang_plugins.quant.gguf.blocks import BLOCKS
        from sglang_plugins.quant.gguf.dummy import dummy_type

        values, nbytes, _ = BLOCKS[dummy_type(quant.get("dummy_ggml_type"))]
        return {**sizes, "linear": per_value(nbytes / values), "tables": per_value(nbytes / values)}
    if method == "awq":
        awq = per_value(quant["bits"] / 8 + (2 + quant["bits"] / 8) / quant["group_size"])
        return {**sizes, "linear": awq, "experts": awq}
    if method in ("fp8", "compressed-tensors"):
        if method == "compressed-tensors":
            check_float_quantized(quant)
        fp8 = fp8_bytes(quant.get("weight_block_size"))
        return {**sizes, "linear": fp8, "experts": fp8}
    if method is not None:
        raise ValueError(f"quantization_config.quant_method: the floor has no byte count for {method!r}")
    return sizes


def per_value(rate: float) -> Callable[[torch.Size], float]:
    return lambda shape: shape.numel() * rate


def fp8_bytes(block: list[int] | None) -> Callable[[torch.Size], float]:
    """e4m3 weights with their float32 scales as the fp8 plugin keeps them: one per ``block``
    (``weight_block_size``, edge blocks partial) or else one per output row (per-tensor scales are
    expanded to rows after loading). A static input scale (one float a layer) is left out."""
    def size(shape: torch.Size) -> float:
        *stack, rows, cols = shape
        scales = -(-rows // block[0]) * -(-cols // block[1]) if block else rows
        return math.prod(stack) * (rows * cols + 4 * scales)

    return size


def check_float_quantized(quant: dict) -> None:
    """A compressed-tensors config the floor counts: every group's weights float, per tensor or
    channel (row scales), and the LM head ignored (left bf16); else a ValueError naming the field."""
    groups = quant.get("config_groups") or {}
    if quant.get("format") != "float-quantized" or not groups or any(
            (g.get("weights") or {}).get("type") != "float" or g["weights"].get("strategy") not in ("tensor", "channel")
            for g in groups.values()):
        raise ValueError("quantization_config.config_groups: the floor counts only float-quantized FP8 weights per "
                         "tensor or channel")
    if "lm_head" not in (quant.get("ignore") or []):
        raise ValueError("quantization_config.ignore: the floor counts the LM head as bf16, so it must ignore lm_head")


def weight_bytes(config) -> tuple[float, float]:
    """(bytes of weights a batch-1 decode step reads, bytes of every weight) of the config's model
    as the engine stores it: every matrix once; the embedding table only where it is also the LM
    head; of the routed experts only the top-k. Norms and biases are bf16."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    sizes = stored_bytes(config)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tables = {id(embedding), id(head)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} - tables
    # Routed experts: a batch-1 step reads only the top-k of each layer's (shared experts are not under ".experts.").
    experts = next((getattr(config, k) for k in ("n_routed_experts", "num_local_experts", "num_experts")
                    if getattr(config, k, None)), None)
    active = getattr(config, "num_experts_per_tok", 1) / experts if experts else 1.0
    # named_parameters() lists a tied table once; an untied embedding is read only at its looked-up rows.
    all_bytes = step_bytes = -(0.0 if head is embedding else sizes["tables"](embedding.shape))
    for name, p in model.named_parameters():
        kind = ("experts" if ".experts." in name else "tables" if id(p) in tables
                else "linear" if id(p) in linear else None)
        size = sizes[kind](p.shape) if kind else p.numel() * 2.0
        all_bytes += size
        step_bytes += size * (active if kind == "experts" else 1.0)
    return step_bytes, all_bytes


def copy_bandwidth() -> float:
    """The device's memory bandwidth as a 2 GiB copy measures it: bytes read + written per second."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1000)


def run_floor(backend: str) -> list[dict]:
    """Weight bytes read per batch-1 decode step over the device copy bandwidth measured now."""
    from transformers import AutoConfig

    weight_bytes_read, all_bytes = weight_bytes(AutoConfig.from_pretrained(str(CONFIG)))
    bandwidth = copy_bandwidth()
    release()
    return [{"run": "floor", "weight_bytes": weight_bytes_read, "all_weight_bytes": all_bytes,
             "copy_bytes_per_s": bandwidth, "decode_ms_per_step": weight_bytes_read / bandwidth * 1000,
             "output_tok_per_s": 0.0, "total_s": 0.0}]


def run_decode1_compile(backend: str) -> list[dict]:
    """Batch 1 with graphs, ``--enable-torch-compile`` off and on (one captured size, so the
    compile takes under a minute)."""
    return [{"run": "decode1", "backend": backend, "cuda_graph": True, "torch_compile": compiled,
             **with_engine(backend, lambda e: measure_latency(e, 1, 128, 256), cuda_graph_max_bs=1,
                           enable_torch_compile=compiled)}
            for compiled in (False, True)]


def run_prefill_long(backend: str) -> list[dict]:
    """One long prompt (8k and 32k tokens), prefilled in ``chunked_prefill_size`` chunks: each
    chunk attends over the chunks before it (the extend kernels' long-context case)."""
    rows = with_engine(backend, lambda e: [measure_latency(e, 1, n, 2) for n in (8192, 32768)])
    return [{"run": "prefill_long", "backend": backend, **row} for row in rows]


def run_batch256(backend: str) -> list[dict]:
    return [{"run": "batch256", "backend": backend,
             **with_engine(backend, lambda e: measure_latency(e, 256, 512, 256), max_running_requests=256)}]


RUNS = {"decode1": run_decode1, "decode1_compile": run_decode1_compile, "prefill_long": run_prefill_long,
        "batch256": run_batch256, "decode1_kernels": run_decode1_kernels, "batch64": run_batch64,
        "batch64_pdl": run_batch64_pdl, "offline": run_offline, "offline_mixed": run_offline_mixed,
        "offline_fp8kv": run_offline_fp8kv,
        "hf256": run_hf256, "shared_prefix": run_shared_prefix, "shared_prefix_cascade": run_shared_prefix_cascade,
        "hf1": run_hf1, "hf32": run_hf32, "floor": run_floor}
HF_ONLY = ("hf256", "hf1", "floor")  # runs whose baseline does not depend on our backend: once per call


def main() -> int:
    global CONFIG
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="a model config folder (dummy weights)")
    parser.add_argument("--runs", default=",".join(r for r in RUNS if r not in ("hf1", "hf32", "floor")))
    parser.add_argument("--backends", default="triton")
    parser.add_argument("--out", default="bench_results/gpu_llama8b.jsonl")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra engine setting for every run (repeatable)")
    args = parser.parse_args()
    CONFIG = Path(args.config)
    for item in args.engine:
        key, _, value = item.partition("=")
        if not value:
            parser.error(f"--engine {item!r}: expected KEY=VALUE")
        EXTRA_SETTINGS[key] = value
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name()
    print("card:", card, "torch", torch.__version__, flush=True)
    rows = []
    for name in args.runs.split(","):
        for backend in args.backends.split(","):
            if name in HF_ONLY and backend != args.backends.split(",")[0]:
                continue
            for row in RUNS[name](backend):
                row["card"], row["config"] = card, CONFIG.name
                row.update({f"engine.{k}": v for k, v in EXTRA_SETTINGS.items()})
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    print("\n| run | backend | variant | input | prefill s | decode ms/step | output tok/s | total s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        named = [f"{k}={r[k]}" for k in ("cuda_graph", "gemv", "pdl", "radix_cache", "enable_mixed_chunk", "cascade",
                                          "kv_cache_dtype", "torch_compile") if k in r]
        extra = [f"{k.removeprefix('engine.')}={v}" for k, v in r.items() if k.startswith("engine.")]  # --engine
        variant = ", ".join(named + extra)
        step = f"{r['decode_ms_per_step']:.2f}" if "decode_ms_per_step" in r else "-"
        prefill = f"{r['prefill_s']:.3f}" if "prefill_s" in r else "-"
        print(f"| {r['run']} | {r.get('backend', '-')} | {variant} | {r.get('input_len', '-')} | {prefill} | {step} "
              f"| {r['output_tok_per_s']:.0f} | {r['total_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
