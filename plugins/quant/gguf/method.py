"""Linear layers, the token embedding and the LM head of a GGUF model holding their ggml blocks
(``quant_method: gguf``).

The ``gguf`` weight format yields each linear weight as ``<layer>.qweight`` (the stored rows as
``[rows, row_bytes]`` uint8, blocks running along the input features) and ``<layer>.qweight_type``
(its ggml type). A fused layer (``qkv_proj``, ``gate_up_proj``) receives its parts one by one, and
llama.cpp files mix types within a layer (a Q4_K_M file stores ``attn_v`` as Q6_K beside Q4_K
``attn_q``/``attn_k``), so each part keeps its own type: after loading, the parts' bytes sit one
after another in one uint8 buffer (each part 16-byte aligned, so F32/F16 rows can be viewed in
place). On CPU a forward dequantizes each run of same-typed parts, concatenates the rows and
multiplies (an LM head is such a layer; an embedding lookup dequantizes only the rows it gathers);
on CUDA each run of a quantized type goes through ``kernels`` (Triton kernels reading the
blocks), each run of a float type through a float matmul, and the runs' outputs are concatenated.

With ``--load-format dummy`` (a config folder whose ``quantization_config`` is ``{"quant_method":
"gguf", "blocks": "ggml", "dummy_ggml_type": "Q4_K"}``, say) every layer holds random valid blocks
of that one type (``dummy``), for timing a type's kernels on a real model's shapes.

Only this rank's whole layer is supported: GGUF layers are not split across tensor-parallel ranks.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_core.kernels import linear, use_fused
from sglang_core.layers.quant import QuantMethod, weight_param
from sglang_plugins.quant.fused import part_index
from sglang_plugins.quant.gguf.blocks import dequantize, row_bytes, type_name
from sglang_plugins.quant.gguf.dummy import dummy_type, random_blocks

ALIGN = 16  # bytes: every part starts where any element type can be viewed


class GGUFMethod(QuantMethod):
    def __init__(self, quant_config: dict[str, Any], prefix: str):
        # Only the gguf_quantized weight format yields blocks (and writes this field); a bare
        # --quantization gguf would build layers no checkpoint tensor fills.
        if quant_config.get("blocks") != "ggml":
            raise ValueError("quantization_config.blocks must be 'ggml': the gguf method keeps a GGUF file's blocks; "
                             "load the .gguf with --load-format gguf_quantized, which writes that config")
        self.prefix = prefix
        self.dummy_ggml_type = quant_config.get("dummy_ggml_type")  # read only for dummy weights
        self._parts: dict[Any, dict[str, Any]] = {}  # shard id -> {"blocks", "type"} while loading
        # After loading: (ggml type, rows, byte offset in layer.qweight, bytes per row) of each run.
        self.segments: list[tuple[int, int, int, int]] = []

    @classmethod
    def for_embedding(cls, quant_config: dict[str, Any], prefix: str) -> GGUFMethod:
        """The token embedding and the LM head keep their blocks too (``token_embd``, ``output``)."""
        return cls(quant_config, prefix)

    def create_weights(self, layer, input_size, output_sizes, params_dtype, weight_loader) -> None:
        if getattr(getattr(layer, "tp", None), "size", 1) != 1:
            raise ValueError(f"{self.prefix}: GGUF layers cannot be split across tensor-parallel ranks")
        self.input_size, self.output_sizes, self.params_dtype = input_size, output_sizes, params_dtype
        layer.qweight = weight_param(torch.empty(0, dtype=torch.uint8), self._load_blocks)
        layer.qweight_type = weight_param(torch.empty(0, dtype=torch.int32), self._load_type)

    def _load_blocks(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if loaded.dtype != torch.uint8 or loaded.dim() != 2:
            raise ValueError(f"GGUF blocks must be [rows, bytes] uint8, not {loaded.dtype} "
                             f"of shape {tuple(loaded.shape)}")
        self._parts.setdefault(shard_id, {})["blocks"] = loaded

    def _load_type(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if loaded.numel() != 1:
            raise ValueError(f"a ggml type is one number, got shape {tuple(loaded.shape)}")
        self._parts.setdefault(shard_id, {})["type"] = int(loaded.item())

    def init_dummy_weights(self, layer, generator: torch.Generator) -> None:
        """Random valid blocks of ``quantization_config.dummy_ggml_type`` for the whole layer, laid
        out by ``process_weights_after_loading`` as a checkpoint's would be."""
        ggml_type = dummy_type(self.dummy_ggml_type)
        try:
            blocks = random_blocks(ggml_type, sum(self.output_sizes), self.input_size, generator)
        except ValueError as exc:
            raise ValueError(f"{self.prefix}: quantization_config.dummy_ggml_type: {exc}") from None
        self._parts = {None: {"blocks": blocks, "type": ggml_type}}

    def process_weights_after_loading(self, layer) -> None:
        """Check every part against the layer's shape and lay the parts out in output order."""
        if set(self._parts) == {None}:  # one tensor for the whole layer (fused in the file: Phi-3's qkv)
            parts = [(None, sum(self.output_sizes))]
        else:
            parts = sorted(zip(self._parts, (self.output_sizes[part_index(s)] for s in self._parts)),
                           key=lambda part: part_index(part[0]))
            if len(parts) != len(self.output_sizes):
                raise ValueError(f"{self.prefix}: the checkpoint holds {len(parts)} of the layer's "
                                 f"{len(self.output_sizes)} fused parts")
        buffers, types, offset = [], [], 0
        for shard_id, rows in parts:
            part = self._parts[shard_id]
            if "blocks" not in part or "type" not in part:
                raise ValueError(f"{self.prefix}: part {shard_id!r} lacks its qweight or qweight_type")
            blocks, ggml_type = part["blocks"], part["type"]
            try:
                width = row_bytes(ggml_type, self.input_size)
            except ValueError as exc:
                raise ValueError(f"{self.prefix}: {exc}; --load-format gguf reads the file dequantized to "
                                 "float") from None
            if tuple(blocks.shape) != (rows, width):
                raise ValueError(f"{self.prefix}: part {shard_id!r} holds {tuple(blocks.shape)} bytes, expected "
                                 f"{rows} rows of {self.input_size} {type_name(ggml_type)} values ({width} bytes)")
            previous = self.segments[-1] if self.segments else None
            if previous is not None and previous[0] == ggml_type and previous[2] + previous[1] * width == offset:
                self.segments[-1] = (ggml_type, previous[1] + rows, previous[2], width)  # a run of one type
            else:
                self.segments.append((ggml_type, rows, offset, width))
            pad = -(offset + blocks.numel()) % ALIGN
            buffers += [blocks.reshape(-1), torch.zeros(pad, dtype=torch.uint8, device=blocks.device)]
            types.append(ggml_type)
            offset += blocks.numel() + pad
        layer.qweight.data = torch.cat(buffers).to(layer.qweight.device)
        layer.qweight_type.data = torch.tensor(types, dtype=torch.int32, device=layer.qweight.device)
        self._parts.clear()

    def _runs(self, layer):
        """Each run of same-typed parts: its ggml type and its blocks ``[rows, row_bytes]``."""
        for ggml_type, count, offset, width in self.segments:
            yield ggml_type, layer.qweight[offset:offset + count * width].view(count, width)

    def dequantized_weight(self, layer) -> torch.Tensor:
        """The layer's weight as ``[out, in]`` float32."""
        rows = [dequantize(blocks, ggml_type) for ggml_type, blocks in self._runs(layer)]
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def embed(self, layer, ids: torch.Tensor) -> torch.Tensor:
        """The table's rows at ``ids``: a row's blocks run along the hidden dim, so gathering the
        tokens' byte rows and dequantizing those alone gives exactly the rows of the whole table."""
        (ggml_type, blocks), = self._runs(layer)  # a table is one tensor: one run
        rows = dequantize(blocks[ids.reshape(-1)], ggml_type)
        return rows.view(*ids.shape, rows.shape[-1]).to(self.params_dtype)

    def apply(self, layer, x, bias):
        if use_fused(x):
            return self.kernel_product(layer, x, bias)
        return linear(x, self.dequantized_weight(layer).to(x.dtype), bias)

    def kernel_product(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``apply`` on CUDA: the Triton kernels (``kernels.matmul``) for each run of a quantized type."""
        from sglang_plugins.quant.gguf import kernels  # needs Triton: there whenever use_fused is, not on every CPU

        tokens = x.reshape(-1, x.shape[-1]).contiguous()
        outputs = [kernels.matmul(tokens, blocks, ggml_type) if ggml_type in kernels.LANES
                   else linear(tokens, dequantize(blocks, ggml_type).to(x.dtype))
                   for ggml_type, blocks in self._runs(layer)]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], y.shape[-1])
