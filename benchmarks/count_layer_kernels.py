"""Kernels one MoE layer of DeepSeek-V2-Lite's structure launches in a batch-1 decode step, counted
on the CPU: the aten ops that run (``TorchDispatchMode``; views and allocations launch nothing)
and the Triton launches (the interpreter runs them), with every layer's fused path forced on as
on CUDA (tp 1, the Triton attention backend). A tiny config of the released one's structure (no
q LoRA, 2 shared experts beside greedy top-k routing, a float32 router, no biases, bfloat16).

    python benchmarks/count_layer_kernels.py          # the count and the kernels in order

cuBLAS may add a split-K reduce to a ``bmm`` / ``mm`` on the GPU, which this does not see
(docs/gpu.md, "DeepSeek-V2-Lite decode: kernels per layer").
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: its kernels run on the CPU

import contextlib  # noqa: E402
import sys  # noqa: E402
from typing import Iterator  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import sglang_core.kernels  # noqa: E402
from sglang_core.layers.attention import AttentionBackend  # noqa: E402
from sglang_core.layers.attention_spec import AttentionSpec  # noqa: E402
from sglang_core.mem.kv_pool import TokenKVPool  # noqa: E402
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from sglang_core.model_executor.model_api import ModelContext  # noqa: E402
from sglang_plugins.attention.triton.backend import TritonBackend  # noqa: E402
from sglang_plugins.models.deepseek.model import DeepseekV2ForCausalLM  # noqa: E402

# Ops that launch nothing: allocations and metadata.
NO_LAUNCH = ("promote_types", "empty", "new_empty", "empty_like", "empty_strided", "lift_fresh", "detach", "alias", "_unsafe_view")
CONTEXT = 8  # tokens already cached; the step decodes the next one


def lite_like_config() -> transformers.DeepseekV2Config:
    return transformers.DeepseekV2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=2,
        first_k_dense_replace=1, topk_method="greedy", routed_scaling_factor=1.0, mlp_bias=False,
        attention_bias=False, max_position_embeddings=64)


@contextlib.contextmanager
def fused_paths_forced() -> Iterator[None]:
    """Every loaded sglang module's ``use_fused`` answering yes, as on CUDA."""
    original = sglang_core.kernels.use_fused
    patched = [m for name, m in list(sys.modules.items())
               if name.startswith(("sglang_core", "sglang_plugins")) and getattr(m, "use_fused", None) is original]
    for module in patched:
        module.use_fused = lambda x: True
    try:
        yield
    finally:
        for module in patched:
            module.use_fused = original


class LaunchLog(TorchDispatchMode):
    """The kernels run, in order: aten ops outside Triton launchers, and Triton launches."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[str] = []
        self.in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_triton and not func.is_view and name not in NO_LAUNCH:
            self.kernels.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def logging_triton(log: LaunchLog) -> Iterator[None]:
    run = InterpretedFunction.run

    def logged(self, *args, **kwargs):
        log.kernels.append(f"triton.{self.fn.__name__}")
        log.in_triton += 1  # the interpreter's own tensor work is not a launch
        try:
            return run(self, *args, **kwargs)
        finally:
            log.in_triton -= 1

    InterpretedFunction.run = logged
    try:
        yield
    finally:
        InterpretedFunction.run = run


def moe_layer_decode(fused: bool = True, backend: type[AttentionBackend] = TritonBackend,
                     dtype: torch.dtype = torch.bfloat16) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The kernels of layer 1 (an MoE layer) in one batch-1 decode step, the row of the pool the
    step cached (its new latent) and its attention's output. ``fused=False``: the layers' PyTorch
    paths, as on the CPU. (The interpreter's bfloat16 ``tl.dot`` is not CUDA's: compare outputs in
    float32.)"""
    config = lite_like_config()
    model = DeepseekV2ForCausalLM(config, ModelContext(dtype=dtype))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32).to(p.dtype) * 0.1)
    layer = model.model.layers[1]
    attn = layer.self_attn.attn
    pool = TokenKVPool(64, [a.self_attn.attn.spec for a in model.model.layers], dtype, "cpu")
    specs = tuple(a.self_attn.attn.spec for a in model.model.layers)
    attn.backend = backend(AttentionSpec(specs, dtype, torch.device("cpu")), pool)
    req_to_token = torch.zeros(1, 32, dtype=torch.int64)
    req_to_token[0, :CONTEXT + 1] = torch.arange(1, CONTEXT + 2)
    batch = ForwardBatch(
        mode=ForwardMode.DECODE, input_ids=torch.zeros(1, dtype=torch.int64), positions=torch.tensor([CONTEXT]),
        out_cache_loc=torch.tensor([CONTEXT + 1]), req_pool_indices=torch.tensor([0]),
        seq_lens=torch.tensor([CONTEXT + 1]), prefix_lens=torch.tensor([CONTEXT]), seq_lens_cpu=[CONTEXT + 1],
        prefix_lens_cpu=[CONTEXT], req_to_token=req_to_token)
    x = torch.randn(1, config.hidden_size).to(dtype)
    residual = torch.randn(1, config.hidden_size).to(dtype)
    log = LaunchLog()
    attended = []
    layer.self_attn.register_forward_hook(lambda module, args, output: attended.append(output))
    with fused_paths_forced() if fused else contextlib.nullcontext(), torch.no_grad():
        attn.backend.plan(batch)  # outside the graph: once per step, not per layer
        with logging_triton(log), log:
            layer(batch.positions, x, residual, batch)
    return log.kernels, pool.k_buffer(1)[CONTEXT + 1].clone(), attended[0].clone()


def main() -> None:
    kernels, _, _ = moe_layer_decode()
    for i, kernel in enumerate(kernels, 1):
        print(f"{i:3d}  {kernel}")
    print(f"{len(kernels)} kernels per MoE layer")


if __name__ == "__main__":
    main()
