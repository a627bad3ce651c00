"""Compile Triton kernels as the GPU image's Triton (3.6) would, for sm_90, without a GPU.

Triton's interpreter, which the CPU tests run kernels in, accepts code the 3.6 compiler refuses
(docs/gpu.md, "The interpreter runs what the compiler refuses"). This script compiles each listed
kernel for every constexpr combination its launch site uses on an H100/H200, so a failure costs
seconds here instead of a device run. Unzip ``pip download triton==3.6.0 --no-deps`` into a folder
and pass it (or set ``TRITON36_DIR``); without one the check is skipped, saying so.

    PYTHONPATH=$PWD/.pypath python benchmarks/compile_check.py --triton /tmp/t36 [KERNEL ...]

KERNEL names entries of ``KERNELS`` (all when none are given); ``--list`` prints them. Exit
status 1 when any combination fails to compile. Each entry's combinations mirror its launch site:
update them when a launch site changes.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

EXPECTED_VERSION = "3.6"  # the GPU image's Triton (../shared/gpu/README.md)


def grid(**choices: list[Any]) -> list[dict[str, Any]]:
    """Every combination of the constexpr ``choices``."""
    names = list(choices)
    return [dict(zip(names, values)) for values in itertools.product(*choices.values())]


@dataclass
class Kernel:
    """A ``@triton.jit`` kernel (``module:function``), the types of its non-constexpr arguments
    (pointers as ``*bf16``, floats as ``fp32``, a tuple of strides as a tuple of types; any argument
    not named is an ``i32``), and the launches to compile: each its constexpr values, launch options
    (``num_warps``, ``num_stages``) and argument types that differ from ``types``."""

    path: str
    types: dict[str, str | tuple[str, ...]]
    launches: list[dict[str, Any]]
    options: dict[str, int] = field(default_factory=lambda: {"num_warps": 4})


LAUNCH_OPTIONS = ("num_warps", "num_stages")
PDL = {"USE_PDL": [True]}  # launch_options on sm_90: programmatic dependent launch on
BF16_NORM = {name: "*bf16" for name in ("X", "Residual", "PreWeight", "Weight", "Out")}
INT_WEIGHTS = {"Q": "*i32", "S": "*bf16", "Z": "*i32"}
# The JIT compiles a stride of 1 in as a constant: AWQ's and GPTQ's words, scales and zero points run along N.
CONTIGUOUS_N = {"stride_qn": [1], "stride_sn": [1], "stride_zn": [1]}
INT_GEMV_TYPES = {"X": "*bf16", **INT_WEIGHTS, "Bias": "*bf16", "Y": "*bf16", "Partials": "*fp32", "Counters": "*i32"}
AWQ_EXPERT_STRIDES = {f"stride_{t}": ("i32", "i32", "i32") for t in "wsz"}  # [E, rows, cols] each
AWQ_EXPERT_LAUNCHES = [
    dict(c, BLOCK_M=m, PAIR_PER_BLOCK=one, **({"SortedPairs": "*i64", "BlockExpert": "*i64"} if one else
                                               {"SortedPairs": "*i32", "BlockExpert": "*i32"}))
    for m, one in ((16, True), (16, False), (64, False))
    for c in grid(PRECISION=["tf32"], UPCAST=[False], FORMAT=["int"], BITS=[4], PACKED_DIM=[1], INTERLEAVED=[True],
                  HAS_ZEROS=[True], GROUP_PER_TILE=[False, True], BLOCK_N=[64], BLOCK_K=[64], GROUP_M=[8], **PDL)]

# Triton attention (plugins/attention/triton/kernels.py) on Llama-3.1-8B's heads (32 over 8 KV
# heads of 128, bf16 pool): a KV head's 4 query heads padded to 16 rows, the tuned key blocks.
ATTENTION_DIMS = dict(HEAD_DIM_K=128, BLOCK_DK=128, BLOCK_DK_TAIL=0, HEAD_DIM_V=128, BLOCK_DV=128)
ATTENTION_TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "ReqToToken": "*i64", "ReqPoolIdx": "*i64",
                   "SeqLens": "*i64", "scale": "fp32", "logit_cap": "fp32"}
# Contiguous last dimensions: the JIT compiles their strides in as the constant 1.
UNIT_STRIDES = dict(stride_qd=1, stride_kd=1, stride_vd=1, stride_r2n=1)

KERNELS: dict[str, Kernel] = {
    # Decode's split kernel: graph decode (splits by batch size; one split writes the output), cascade's
    # prefix splits, and the rows graphs' skipping of the rows a prefill chunk's extend kernel writes (SKIP_ROWS).
    "decode_split": Kernel(
        "sglang_plugins.attention.triton.kernels:_decode_split_kernel",
        {**ATTENTION_TYPES, "KvStart": "*i64", "SkipRows": "*i64", "MidO": "*fp32", "MidLse": "*fp32", "Out": "*bf16"},
        [dict(c, NUM_SPLITS=n, PREFIX_SPLITS=p, GROUP=4, HEAD_PAD=16, HEAD_TILES=1, BLOCK_N=128, num_stages=2,
              PRECISION="tf32", **ATTENTION_DIMS, **UNIT_STRIDES, stride_mod=1, stride_mls=1, stride_od=1,
              **({"KvStart": "*i32"} if p else {}))
         for n, p in ((1, 0), (16, 0), (2, 4))
         for c in grid(WINDOW=[0, 4096], SOFT_CAP=[False, True], SKIP_ROWS=[False, True], **PDL)]),
    "decode_merge": Kernel(
        "sglang_plugins.attention.triton.kernels:_decode_merge_kernel",
        {"MidO": "*fp32", "MidLse": "*fp32", "Out": "*bf16", "SkipRows": "*i64"},
        [dict(c, HEAD_DIM_V=128, BLOCK_DV=128, NUM_SPLITS=n, SPLITS_PAD=pad, stride_mod=1, stride_mls=1, stride_od=1)
         for n, pad in ((1, 2), (16, 16), (6, 8)) for c in grid(SKIP_ROWS=[False, True], **PDL)],
        {"num_warps": 2}),
    # Extend: eager prefill and, inside the rows graphs, a step's prefill chunks (16-row query
    # blocks up to 32 rows, else 64).
    "extend": Kernel(
        "sglang_plugins.attention.triton.kernels:_extend_kernel",
        {**ATTENTION_TYPES, "Out": "*bf16", "PrefixLens": "*i64", "ExtendStart": "*i64"},
        [dict(c, GROUP=4, BLOCK_N=64, num_stages=2, PRECISION="tf32", **ATTENTION_DIMS, **UNIT_STRIDES, stride_od=1)
         for c in grid(WINDOW=[0, 4096], SOFT_CAP=[False, True], BLOCK_M=[16, 64])]),
    # Router logits in float32 (Router's default weight) or bf16; (top_k, experts) of Mixtral,
    # Qwen2-MoE, Qwen3-MoE, DeepSeek-V2-Lite (with its 2 shared experts stacked, and without),
    # GraniteMoE (1B and 3B).
    "moe_topk": Kernel(
        "sglang_core.kernels.moe_topk:_softmax_topk_kernel",
        {"Logits": "*fp32", "Weights": "*fp32", "Ids": "*i64", "scaling": "fp32"},
        [dict(c, TOP_K=k, BLOCK_E=e, SHARED=0) for k, e in ((2, 8), (4, 64), (8, 128), (6, 64), (8, 32), (8, 64))
         for c in grid(RENORMALIZE=[False, True], **PDL)]
        + [dict(TOP_K=6, BLOCK_E=64, SHARED=2, RENORMALIZE=False, USE_PDL=True)]
        + [dict(TOP_K=8, BLOCK_E=128, SHARED=0, RENORMALIZE=True, USE_PDL=True, Logits="*bf16")],
        {"num_warps": 1}),
    # One-row GEMV at GEMV_LAUNCH's tiles: 16-bit weights (bias or not), and a float32 router weight
    # against a bf16 row (float32 result).
    "gemv": Kernel(
        "sglang_core.kernels.gemv:_gemv_kernel",
        {"X": "*bf16", "W": "*bf16", "Bias": "*bf16", "Y": "*bf16"},
        [dict(HAS_BIAS=b, BLOCK_N=4, BLOCK_K=1024, USE_PDL=True) for b in (False, True)]
        + [dict(HAS_BIAS=False, BLOCK_N=4, BLOCK_K=1024, USE_PDL=True, W="*fp32", Bias="*fp32", Y="*fp32")],
        {"num_warps": 4, "num_stages": 1}),
    # q and k in one launch (_rotate_heads twice): half widths of head dims 128, 64 (MLA's rope: its
    # k_pe has one head, a constant to the JIT), 256 (Gemma), partial rotary 32 of 80 (Phi, StableLM)
    # and 80 (HALF 40, padded block). q rotated into XOut (itself, or MLA's attention query).
    "rotary": Kernel(
        "sglang_core.kernels.fused:_rope_kernel",
        {"X": "*bf16", "XOut": "*bf16", "Y": "*bf16", "Positions": "*i64", "Cos": "*fp32", "Sin": "*fp32"},
        [dict(c, HALF=h, BLOCK_HALF=b, BLOCK_H=bh) for h, b, bh in ((64, 64, 32), (32, 32, 128), (128, 128, 16),
                                                                       (16, 16, 32), (40, 64, 64))
         for c in grid(INTERLEAVED=[False, True], **PDL)]
        + [dict(HALF=32, BLOCK_HALF=32, BLOCK_H=128, INTERLEAVED=i, USE_PDL=True, y_heads=1) for i in (False, True)]),
    # MLA's absorbed decode query and both rotaries in one launch: DeepSeek-V2-Lite's 16 heads and
    # V3's 128 (W_UK 128 x 512 per head, rope 64), V2's interleaved pairs and V3's halves.
    "absorbed_query": Kernel(
        "sglang_plugins.models.deepseek.absorbed_query:_absorbed_query_kernel",
        {"QNope": "*bf16", "WUK": "*bf16", "Query": "*bf16", "QPe": "*bf16", "KPe": "*bf16", "Positions": "*i64",
         "Cos": "*fp32", "Sin": "*fp32"},
        [dict(c, NOPE=128, BLOCK_D=128, BLOCK_R=64, TILES=8, HALF=32, BLOCK_HALF=32)
         for c in grid(BLOCK_H=[16, 128], INTERLEAVED=[True, False], **PDL)]),
    # fused_moe's last launch: each token's k rows summed, with and without the shared expert's addend.
    "sum_pairs": Kernel(
        "sglang_core.kernels.fused_moe:_sum_pairs_kernel",
        {"Pairs": "*fp32", "Addend": "*bf16", "Result": "*bf16"},
        grid(TOP_K=[1, 2, 4, 6, 8], HAS_ADDEND=[False, True], BLOCK=[1024], **PDL)),
    # Rows read by stride (MLA's latent is a view); hidden 4096, 512 (kv_lora_rank), 128 (q/k norm).
    # MLA's latent norm also writes the cached row (and k_pe, 64 wide, after it) into its pool slot.
    "rms_norm": Kernel(
        "sglang_core.kernels.fused:_rms_norm_kernel",
        {**BF16_NORM, "RowsOut": "*bf16", "Rows": "*i64", "Tail": "*bf16", "pre_eps": "fp32", "eps": "fp32"},
        [dict(c, BLOCK=block, num_warps=warps, HAS_ROWS_OUT=False, BLOCK_TAIL=1)
         for block, warps in ((4096, 8), (512, 2), (128, 1))
         for c in grid(HAS_RESIDUAL=[False, True], HAS_PRE=[False, True], SCALE_IN_FP32=[False, True], **PDL)]
        # A float32 weight (RMSNorm's default params_dtype) promotes the output to float32.
        + [dict(HAS_RESIDUAL=r, HAS_PRE=False, SCALE_IN_FP32=False, BLOCK=512, num_warps=2, USE_PDL=True,
                HAS_ROWS_OUT=False, BLOCK_TAIL=1, Weight="*fp32", Out="*fp32") for r in (False, True)]
        + [dict(HAS_RESIDUAL=False, HAS_PRE=False, SCALE_IN_FP32=False, BLOCK=512, num_warps=2, USE_PDL=True,
                HAS_ROWS_OUT=True, BLOCK_TAIL=64)]),
    # The FP8 one-row GEMV: per-channel e4m3 weights, inputs rounded to e4m3 (dynamic or static) in
    # every program or once before (X_ROUNDED: float32 rows from fp8_round_row), or weight-only.
    "fp8_gemv": Kernel(
        "sglang_plugins.quant.fp8.gemv:_fp8_gemv_kernel",
        {"X": "*bf16", "W": "*i32", "WScale": "*fp32", "XScale": "*fp32", "Bias": "*bf16", "Y": "*bf16"},
        grid(ACTIVATIONS=["dynamic", "static", "none"], X_ROUNDED=[False], CONVERT=[True], HAS_BIAS=[False, True],
             BLOCK_N=[16], BLOCK_K=[512], SCALE_BLOCK=[4096], **PDL)
        + grid(ACTIVATIONS=["dynamic", "static"], X_ROUNDED=[True], CONVERT=[True], HAS_BIAS=[False], BLOCK_N=[16],
               BLOCK_K=[512], SCALE_BLOCK=[4096], X=["*fp32"], **PDL),
        {"num_warps": 4, "num_stages": 1}),
    # Its one-program rounding of the row (QUANTIZE_ONCE): hidden 4096 and 14336 (tiles up to 16384).
    "fp8_round_row": Kernel(
        "sglang_plugins.quant.fp8.gemv:_round_row_kernel",
        {"X": "*bf16", "XRounded": "*fp32", "XScale": "*fp32"},
        [dict(DYNAMIC=d, CONVERT=True, BLOCK_K=b, num_warps=w, **{k: v[0] for k, v in PDL.items()})
         for d in (True, False) for b, w in ((4096, 4), (16384, 16))]),
    # Packed along K (4 or 8 bits; zero points or symmetric) one-row GEMV: GPTQ, compressed-tensors and AWQ
    # (repacked so at load), at the default tiles and LAUNCH_TABLE's; the layout whose early return 3.6
    # refused (docs/gpu.md).
    "int_gemv": Kernel(
        "sglang_plugins.quant.int_gemv:_int_gemv_kernel", INT_GEMV_TYPES,
        [dict(c, BLOCK_N=n, BLOCK_K=k)
         for n, k in ((512, 16), (512, 32), (1024, 16))
         for c in grid(BITS=[4, 8], HAS_ZEROS=[True, False], HAS_BIAS=[False, True], EVEN_K=[True, False], SPLIT_K=[1, 4], **CONTIGUOUS_N, **PDL)],
        {"num_warps": 4, "num_stages": 1}),
    # 4-bit matmul with zero points, packed along K (AWQ as repacked at load, GPTQ): GEMV_LAUNCH and
    # GEMM_LAUNCH tiles, groups a K tile holds (g32) or spanning tiles (-1, g128).
    "int_matmul_int4": Kernel(
        "sglang_plugins.quant.int_matmul:_int_matmul_kernel",
        {"X": "*bf16", **INT_WEIGHTS, "GIdx": "*i32"},
        [dict(c, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=8, num_stages=3,
              Y="*bf16" if c["SPLIT_K"] == 1 else "*fp32")  # split K: float32 partial sums
         for m, n, k in ((16, 64, 128), (64, 128, 64))
         for c in grid(BITS=[4], HAS_ZEROS=[True], HAS_G_IDX=[False],
                       GROUP_PER_TILE=[False, True], PRECISION=["tf32"], UPCAST=[False], SPLIT_K=[1, 4], **PDL)]),
    # AWQ experts (group -1 reads one group of all K: GROUP_PER_TILE) through the fused MoE kernels:
    # default_config's tiles; one token's pairs as blocks (its int64 ids) or sorted blocks (int32).
    "fused_moe_awq_gate_up": Kernel(
        "sglang_core.kernels.fused_moe:_gate_up_kernel",
        {"X": "*bf16", "W13": "*i32", "S13": "*bf16", "Z13": "*i32", "Act": "*bf16", **AWQ_EXPERT_STRIDES},
        [dict(c, TOP_K=k, ACTIVATION="silu") for c in AWQ_EXPERT_LAUNCHES for k in (2, 8)],
        {"num_warps": 4, "num_stages": 3}),
    "fused_moe_awq_down": Kernel(
        "sglang_core.kernels.fused_moe:_down_kernel",
        {"Act": "*bf16", "W2": "*i32", "S2": "*bf16", "Z2": "*i32", "TopkWeights": "*fp32", "Out": "*fp32",
         **AWQ_EXPERT_STRIDES},
        AWQ_EXPERT_LAUNCHES, {"num_warps": 4, "num_stages": 3}),
}


def jitted(path: str) -> Any:
    """The ``@triton.jit`` object at ``module:function``."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def parameters(path: str) -> dict[str, bool]:
    """The parameters of the kernel at ``path`` in order, each True where it is a ``tl.constexpr``
    (read from the Python function, so it works under the interpreter too)."""
    function = jitted(path).fn  # JITFunction and InterpretedFunction both wrap it
    return {p.name: "constexpr" in str(p.annotation) for p in inspect.signature(function).parameters.values()}


def launch_problems(kernel: Kernel, launch: dict[str, Any]) -> list[str]:
    """What makes ``launch`` not a launch of ``kernel``: a constexpr without a value, a name that is
    neither a parameter nor a launch option, a non-constexpr given a value other than a type or 1."""
    params = parameters(kernel.path)
    problems = [f"no value for constexpr {name}" for name, constexpr in params.items()
                if constexpr and name not in launch]
    for name, value in launch.items():
        if name not in params and name not in LAUNCH_OPTIONS:
            problems.append(f"{name} is neither a parameter nor a launch option")
        elif name in params and not params[name] and not isinstance(value, str) and value != 1:
            problems.append(f"{name}={value!r}: a non-constexpr takes a type or the constant 1")
    return problems


def compile_launch(kernel: Kernel, launch: dict[str, Any]) -> None:
    """Compile one launch for sm_90; raises what the compiler raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    problems = launch_problems(kernel, launch)
    if problems:
        raise ValueError(f"{kernel.path}: {'; '.join(problems)}")
    # A launch may give an argument another type (a second dtype) or the value 1, which the JIT
    # compiles in as a constant (a stride or count of 1); the rest are constexprs or options.
    params = parameters(kernel.path)
    constants = {k for k in launch if k in params and (params[k] or not isinstance(launch[k], str))}
    types = {**kernel.types, **{k: v for k, v in launch.items() if k in params and k not in constants}}
    signature = {p: "constexpr" if p in constants else types.get(p, "i32") for p in params}
    # Pointers 16-byte aligned, as the JIT specializes torch's allocations (vectorized accesses).
    aligned = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(signature.values())
               if isinstance(ty, str) and ty.startswith("*")}
    source = ASTSource(jitted(kernel.path), signature=signature, constexprs={k: launch[k] for k in constants},
                       attrs=aligned)
    # launch_options passes launch_pdl beside USE_PDL; the launcher reads it from the compiled metadata.
    options = {"launch_pdl": bool(launch.get("USE_PDL")), **kernel.options,
               **{k: launch[k] for k in LAUNCH_OPTIONS if k in launch}}
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def describe(launch: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in launch.items() if k != "USE_PDL")


def failure(exc: BaseException) -> str:
    """The compiler's reason: the innermost error of the chain (a helper's error is the cause of its
    caller's), its last line after the source excerpt Triton prints above it."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def check(folder: str, names: list[str]) -> int:
    """Compile every launch of the ``names`` kernels with the Triton in ``folder``: 0 when all compiled."""
    import triton

    if not triton.__version__.startswith(EXPECTED_VERSION):
        print(f"{folder} holds Triton {triton.__version__} (imported from {triton.__file__}), "
              f"not {EXPECTED_VERSION}")
        return 2
    failures = 0
    for name in names:
        kernel = KERNELS[name]
        for launch in kernel.launches:
            start = time.perf_counter()
            try:
                compile_launch(kernel, launch)
                print(f"ok    {name} {describe(launch)} ({time.perf_counter() - start:.1f} s)", flush=True)
            except Exception as exc:  # the compiler's own errors have no common base class
                failures += 1
                print(f"FAIL  {name} {describe(launch)}: {failure(exc)}", flush=True)
    print(f"Triton {triton.__version__}, sm_90: {failures} launch(es) failed to compile")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels", nargs="*", help=f"entries of KERNELS (default all: {', '.join(KERNELS)})")
    parser.add_argument("--triton", default=os.environ.get("TRITON36_DIR"),
                        help="folder holding the unzipped Triton 3.6 wheel (default $TRITON36_DIR)")
    parser.add_argument("--list", action="store_true", help="print the kernels and their launch counts")
    args = parser.parse_args()
    unknown = [name for name in args.kernels if name not in KERNELS]
    if unknown:
        parser.error(f"unknown kernels {unknown}; known: {', '.join(KERNELS)}")
    if args.list:
        for name, kernel in KERNELS.items():
            print(f"{name}: {kernel.path}, {len(kernel.launches)} launches")
        return 0
    if not args.triton or not os.path.isdir(os.path.join(args.triton, "triton")):
        given = f"{args.triton} holds no triton/" if args.triton else "no Triton 3.6 folder given"
        print(f"SKIPPED: {given} (--triton DIR or TRITON36_DIR: DIR the unzipped `pip download triton==3.6.0 "
              "--no-deps` wheel); nothing was compiled")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter compiles nothing
    sys.path.insert(0, os.path.abspath(args.triton))
    # A fresh cache: a kernel compiled before (by another Triton or an older source) is compiled again.
    with tempfile.TemporaryDirectory(prefix="compile_check_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        return check(args.triton, args.kernels or list(KERNELS))


if __name__ == "__main__":
    sys.exit(main())
