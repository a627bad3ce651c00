"""Attention on FlashInfer's kernels over our token-granular KV pool, which FlashInfer sees as a
paged cache with pages of one token.

``plan`` builds the batch's index arrays once (prefix sums on the host, the slot list gathered on
the device) and plans the FlashInfer wrapper each kind of layer needs; layers then only run.
A wrapper is planned per kind of layer (its ``AttentionLayerSpec``: heads, widths, scale, sliding
window, soft-cap), learnt the first time a layer of it runs and planned eagerly from then on.

- Decode: a paged decode wrapper per batch size, on fixed buffers so that its kernels can be
  captured in a CUDA graph; FlashInfer's plan reads sequence lengths on the host, so the graph
  runner calls ``plan`` before each replay (``plan_before_replay``).
- Extend with no cached prefix: ragged prefill over the new K/V directly (no gather).
- Extend over cached prefixes: paged prefill over the pool, after the new K/V are written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_core.layers.attention import (
    Attention,
    AttentionBackend,
    AttentionLayerSpec,
    AttentionSpec,
    KVLayout,
    UnsupportedSpecError,
)
from sglang_core.mem.kv_pool import TokenKVPool
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode

from .kv_indices import gather_kv_indices

# What FlashInfer's kernels are built for.
HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.bfloat16, torch.float16)
# FlashInfer's recommended float work space, enough for WORKSPACE_ROWS decode rows of a layer of
# WORKSPACE_WIDTH query values a token (32 heads x 128). Its split-KV partials grow with both: a
# 512-row batch of that layer asked 160 MiB at start-up (H100, 2026-12-07).
WORKSPACE_BYTES = 128 << 20
WORKSPACE_ROWS = 256
WORKSPACE_WIDTH = 32 * 128
# Query heads per KV head from which the tensor-core (prefill) kernel beats the CUDA-core decode
# kernel: the group's rows fill an MMA tile.
TENSOR_CORE_MIN_GROUP = 4

Variant = AttentionLayerSpec  # layers of one spec share a planned wrapper


@dataclass
class _BatchIndex:
    """Host and device index arrays of the batch being planned."""

    mode: ForwardMode
    batch_size: int
    kv_indptr: torch.Tensor  # [B + 1] int32, host: running sum of sequence lengths
    qo_indptr: torch.Tensor | None  # [B + 1] int32, host: running sum of new tokens (extend)
    kv_indices: torch.Tensor | None  # [kv_indptr[-1]] int32, device: every request's slots in order
    ragged: bool  # extend with no cached prefix: attend over the new K/V, not the pool


class FlashInferBackend(AttentionBackend):
    cuda_graph_decode = True
    plan_before_replay = True

    def __init__(self, spec: AttentionSpec, kv_pool: TokenKVPool):
        super().__init__(spec, kv_pool)
        for layer in spec.distinct():
            if layer.head_dim not in HEAD_DIMS or layer.v_head_dim != layer.head_dim or spec.dtype not in DTYPES:
                raise UnsupportedSpecError(f"FlashInfer runs head sizes {HEAD_DIMS} (V as wide as K) in "
                                           f"bfloat16/float16, not K {layer.head_dim}, V {layer.v_head_dim} in {spec.dtype}")
            if layer.kv_layout is not KVLayout.SEPARATE:
                raise UnsupportedSpecError(f"the flashinfer backend reads separate K/V, not a {layer.kv_layout.value} layout")
        if spec.kv_dtype not in (None, spec.dtype):  # its FP8 paths are not wired up here
            raise UnsupportedSpecError(f"the flashinfer backend reads a {spec.dtype} KV cache, not {spec.kv_dtype}")
        try:
            import flashinfer
        except ImportError as exc:
            raise ImportError("the flashinfer attention backend needs FlashInfer: "
                              "pip install 'sglang-core[flashinfer]'") from exc
        self._fi = flashinfer
        width = max(layer.num_heads * max(layer.head_dim, layer.v_head_dim) for layer in spec.distinct())
        scale = max(1.0, spec.max_batch_size / WORKSPACE_ROWS * width / WORKSPACE_WIDTH)
        self._workspace = torch.zeros(int(WORKSPACE_BYTES * scale), dtype=torch.uint8, device=spec.device)
        # Fixed decode buffers (CUDA graphs keep their addresses); slices serve every batch size.
        self._decode_indptr = torch.zeros(spec.max_batch_size + 1, dtype=torch.int32, device=spec.device)
        self._decode_last_page_len = torch.ones(spec.max_batch_size, dtype=torch.int32, device=spec.device)
        self._decode_indices: torch.Tensor | None = None  # sized by the request table at first decode
        self._decode: dict[tuple[int, Variant], object] = {}
        self._ragged: dict[Variant, object] = {}
        self._paged: dict[Variant, object] = {}
        self._variants: list[Variant] = []
        self._planned: dict[Variant, object] = {}
        self._index: _BatchIndex | None = None
        self._tensor_cores = {layer: layer.num_heads // layer.num_kv_heads >= TENSOR_CORE_MIN_GROUP
                              for layer in spec.distinct()}

    # ---- planning ----------------------------------------------------------------------------

    def plan(self, batch: ForwardBatch) -> None:
        bs = batch.batch_size
        kv_indptr = _running_sum(batch.seq_lens_cpu)
        qo_indptr = None if batch.mode is ForwardMode.DECODE else _running_sum(batch.extend_lens_cpu)
        ragged = batch.mode is ForwardMode.EXTEND and not any(batch.prefix_lens_cpu)
        kv_indices = None
        if not ragged:
            kv_indices = torch.empty(int(kv_indptr[-1]), dtype=torch.int32, device=self.spec.device)
            gather_kv_indices(batch.req_to_token, batch.req_pool_indices,
                              kv_indptr.to(self.spec.device, non_blocking=True), batch.seq_lens, kv_indices)
            if batch.mode is ForwardMode.DECODE and self._decode_indices is None:
                # The most slots a batch can name: each of its rows a full request row (rows may
                # repeat a request: shared prefixes, an extend step's tokens as decode rows).
                self._decode_indices = torch.empty(self.spec.max_batch_size * batch.req_to_token.shape[1],
                                                   dtype=torch.int32, device=self.spec.device)
        self._index = _BatchIndex(batch.mode, bs, kv_indptr, qo_indptr, kv_indices, ragged)
        self._planned = {}
        for variant in self._variants:
            self._plan_variant(variant)

    def _plan_variant(self, variant: Variant) -> None:
        index, s = self._index, self.spec
        window = variant.sliding_window
        common = dict(window_left=-1 if window is None else window - 1, sm_scale=variant.scaling,
                      logits_soft_cap=variant.logit_cap or 0.0, q_data_type=s.dtype, kv_data_type=s.dtype)
        heads = (variant.num_heads, variant.num_kv_heads, variant.head_dim)
        ones = torch.ones(index.batch_size, dtype=torch.int32, device="cpu")  # last page length: one token
        if index.mode is ForwardMode.DECODE:
            wrapper = self._decode_wrapper(index.batch_size, variant)
            wrapper.plan(index.kv_indptr, index.kv_indices, ones, *heads, 1, **common)
        elif index.ragged:
            wrapper = self._ragged.get(variant) or self._ragged.setdefault(
                variant, self._fi.BatchPrefillWithRaggedKVCacheWrapper(self._workspace, "NHD"))
            wrapper.plan(index.qo_indptr, index.qo_indptr, *heads, causal=True, **common)
        else:
            wrapper = self._paged.get(variant) or self._paged.setdefault(
                variant, self._fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD"))
            wrapper.plan(index.qo_indptr, index.kv_indptr, index.kv_indices, ones, *heads, 1, causal=True, **common)
        self._planned[variant] = wrapper

    def _decode_wrapper(self, bs: int, variant: Variant):
        key = (bs, variant)
        if key not in self._decode:
            self._decode[key] = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self._tensor_cores[variant],
                paged_kv_indptr_buffer=self._decode_indptr[:bs + 1],
                paged_kv_indices_buffer=self._decode_indices,
                paged_kv_last_page_len_buffer=self._decode_last_page_len[:bs])
        return self._decode[key]

    def _wrapper(self, layer: Attention):
        variant = layer.spec
        if variant not in self._planned:  # a kind of layer not met before: plan it now
            if variant not in self._variants:
                self._variants.append(variant)
            self._plan_variant(variant)
        return self._planned[variant]

    # ---- running -----------------------------------------------------------------------------

    def _paged_cache(self, layer: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.kv_pool  # [slots, kv_heads, dim] is NHD with pages of one token
        return pool.k_buffer(layer.layer_id).unsqueeze(1), pool.v_buffer(layer.layer_id).unsqueeze(1)

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: Attention,
                       batch: ForwardBatch) -> torch.Tensor:
        self.store_kv(k, v, layer, batch)
        q3 = q.view(q.shape[0], layer.spec.num_heads, layer.spec.head_dim)
        return self._wrapper(layer).run(q3, self._paged_cache(layer)).view(q.shape[0], -1)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: Attention,
                       batch: ForwardBatch) -> torch.Tensor:
        k3, v3 = self.store_kv(k, v, layer, batch)
        q3 = q.view(q.shape[0], layer.spec.num_heads, layer.spec.head_dim)
        wrapper = self._wrapper(layer)
        out = wrapper.run(q3, k3, v3) if self._index.ragged else wrapper.run(q3, self._paged_cache(layer))
        return out.view(q.shape[0], -1)


def _running_sum(lengths: list[int]) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] as int32 in pinned host memory (FlashInfer plans from the host copy;
    pinned, so its copies to the device do not wait for the GPU)."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32, device="cpu", pin_memory=True)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int32, device="cpu"), 0, out=out[1:])
    return out
