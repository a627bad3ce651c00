"""Tensor-parallel building blocks: embedding, linear layers and the LM head.

Every layer takes a ``TPGroup``; with the default size-1 group the layers are plain
``nn.Linear``/``nn.Embedding`` and no collective runs. Each parameter carries a
``weight_loader(param, loaded, shard_id=None)`` that cuts this rank's piece out of the full
checkpoint tensor, so model loaders stay a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sglang_core.kernels import linear
from sglang_core.layers.quant import QuantMethod, UnquantizedMethod


@dataclass(frozen=True)
class TPGroup:
    """A tensor-parallel process group; ``group=None`` is the single-process group."""

    group: Any = None
    rank: int = 0
    size: int = 1

    @classmethod
    def from_process_group(cls, group: Any) -> "TPGroup":
        import torch.distributed as dist

        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def split(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tp_size={self.size}")
        return n // self.size


SINGLE = TPGroup()


def _set_loader(param: nn.Parameter, loader: Any) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not match parameter shape {tuple(param.shape)}")
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    """``y = x W^T + b`` through a quantization method; ``output_sizes`` are this rank's pieces."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        params_dtype: torch.dtype,
        quant_method: QuantMethod | None,
    ):
        super().__init__()
        self.input_size = input_size
        self.output_sizes = output_sizes
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self, input_size, output_sizes, params_dtype, self.weight_loader)
        self.bias = (
            _set_loader(nn.Parameter(torch.zeros(sum(output_sizes), dtype=params_dtype), requires_grad=False), self.weight_loader)
            if bias
            else None
        )

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; ``gather_output`` rebuilds the full output."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp: TPGroup = SINGLE,
        params_dtype: torch.dtype = torch.float32,
        quant_method: QuantMethod | None = None,
        gather_output: bool = False,
    ):
        self.tp = tp
        self.gather_output = gather_output
        super().__init__(input_size, self._local_sizes(output_size), bias, params_dtype, quant_method)

    def _local_sizes(self, output_size: int) -> list[int]:
        return [self.tp.split(output_size, "output features")]

    def _shard_offsets(self, shard_id: Any) -> tuple[int, int]:
        """(offset, size) of a checkpoint shard inside this rank's output rows."""
        return 0, self.output_sizes[0]

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        offset, size = self._shard_offsets(shard_id)
        piece = loaded.narrow(0, self.tp.rank * size, size)
        param.data.narrow(0, offset, size).copy_(piece)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return self.tp.all_gather_last_dim(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one matmul (e.g. gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, tp: TPGroup = SINGLE,
                 params_dtype: torch.dtype = torch.float32, quant_method: QuantMethod | None = None):
        self._full_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, tp, params_dtype, quant_method)

    def _local_sizes(self, output_size: int) -> list[int]:
        return [self.tp.split(s, "output features") for s in self._full_sizes]

    def _shard_offsets(self, shard_id: int) -> tuple[int, int]:
        return sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id]


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projections; heads are split across ranks (kv heads replicated if fewer)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 tp: TPGroup = SINGLE, params_dtype: torch.dtype = torch.float32, quant_method: QuantMethod | None = None):
        self.head_dim = head_dim
        self.num_heads = tp.split(num_heads, "num_attention_heads")
        # With more ranks than kv heads each rank keeps one kv head (replicated).
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias, tp, params_dtype, quant_method)

    def _local_sizes(self, output_size: int) -> list[int]:
        return [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim]

    def _shard_offsets(self, shard_id: str) -> tuple[int, int]:
        index = "qkv".index(shard_id)
        return sum(self.output_sizes[:index]), self.output_sizes[index]

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        offset, size = self._shard_offsets(shard_id)
        rank = self.tp.rank if shard_id == "q" else self.tp.rank // self.kv_replicas
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp: TPGroup = SINGLE,
                 params_dtype: torch.dtype = torch.float32, quant_method: QuantMethod | None = None):
        self.tp = tp
        super().__init__(tp.split(input_size, "input features"), [output_size], bias, params_dtype, quant_method)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if param.dim() == 1:  # bias: added once, after the reduce
            param.data.copy_(loaded)
            return
        size = self.input_size
        param.data.copy_(loaded.narrow(1, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, None)
        y = self.tp.all_reduce(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up its rows, then all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.size)  # ceil: the last rank's table is padded
        self.start = tp.rank * self.rows
        self.weight = _set_loader(
            nn.Parameter(torch.zeros(self.rows, hidden_size, dtype=params_dtype), requires_grad=False), self.weight_loader
        )

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        piece = loaded[self.start : self.start + self.rows]
        param.data[: piece.shape[0]].copy_(piece)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Use the table as an output projection: vocabulary logits of ``hidden``."""
        logits = self.tp.all_gather_last_dim(linear(hidden, self.weight))
        return logits[..., : self.vocab_size]


class ParallelLMHead(VocabParallelEmbedding):
    """An untied output projection (``project``), split by vocabulary rows like the embedding."""
