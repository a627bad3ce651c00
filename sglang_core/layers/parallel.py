"""Tensor-parallel building blocks: embedding, linear layers and the LM head.

Every layer takes a ``TPGroup``; with the default size-1 group the layers are plain
``nn.Linear``/``nn.Embedding`` and no collective runs. Each parameter carries a
``weight_loader(param, loaded, shard_id=None)`` that cuts this rank's piece out of the full
checkpoint tensor, so model loaders stay a few lines. The linear layers' loaders shard by the
metadata a parameter carries (``quant.weight_param``: output/input dim, packing), so a
quantization method's packed tensors and group-wise scales load per rank like plain weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from sglang_core.layers.quant import QuantMethod, UnquantizedMethod, weight_param


class SmallMessageAllReduce(Protocol):
    """An all-reduce for the messages it ``takes`` (``layers.one_shot_all_reduce``): sums ``x``
    over the ranks in place and returns it."""

    def takes(self, x: torch.Tensor) -> bool: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TPGroup:
    """A tensor-parallel process group; ``group=None`` is the single-process group.

    ``expert_parallel``: MoE layers hold whole experts, ``E / size`` of them on each rank, instead
    of ``1 / size`` of every expert (``--enable-ep-moe``; see ``layers.experts``).

    ``one_shot``: the one-shot all-reduce for small messages (``--enable-custom-all-reduce``, see
    ``layers.one_shot_all_reduce``), None where NCCL or gloo reduces every message."""

    group: Any = None
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False
    one_shot: SmallMessageAllReduce | None = None

    @classmethod
    def from_process_group(cls, group: Any) -> "TPGroup":
        import torch.distributed as dist

        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place. Every layer's reduction goes through here: a message
        the one-shot all-reduce takes (small, on CUDA) goes there, any other to the group's own
        all-reduce (NCCL on CUDA; gloo on the CPU). CUDA graphs capture both."""
        if self.size == 1:
            return x
        if self.one_shot is not None and self.one_shot.takes(x):
            return self.one_shot(x)
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def agree_min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's ``value`` (what all ranks can hold, e.g. KV pool tokens)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        x = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.group)
        return int(x.item())

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


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
    copy_checked(param.data, loaded)


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for equal shapes only (``copy_`` would broadcast a wrong-shaped tensor)."""
    if dst.shape != src.shape:
        raise ValueError(f"weight shape {tuple(src.shape)} does not match parameter shape {tuple(dst.shape)}")
    dst.copy_(src)


# -- sharding by parameter metadata (see ``quant.weight_param``); the expert helper reuses these --

def _packing(param: torch.Tensor, dim: int) -> int:
    return getattr(param, "packed_factor", 1) if getattr(param, "packed_dim", None) == dim else 1


def _in_elements(param: torch.Tensor, dim: int, features: int) -> int:
    factor = _packing(param, dim)
    if features % factor:
        raise ValueError(f"{features} features do not split into elements packing {factor} each")
    return features // factor


def _piece(loaded: torch.Tensor, dim: int, index: int, size: int) -> torch.Tensor:
    if loaded.dim() <= dim or loaded.shape[dim] < (index + 1) * size:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} has no piece {index} of {size} "
                         f"along dim {dim}")
    return loaded.narrow(dim, index * size, size)


def load_output_shard(param: torch.Tensor, dst: torch.Tensor, loaded: torch.Tensor, offset: int, size: int,
                      index: int) -> None:
    """Copy piece ``index`` (``size`` output features wide) of the checkpoint tensor ``loaded`` into
    ``dst`` at output feature ``offset``, along ``param.output_dim`` (packing divided out).

    ``dst`` is ``param.data`` or, for stacked expert weights, one expert's slice of it. A piece
    whose size is not a whole number of packed elements is accepted only as the last piece of
    ``dst`` and the whole of ``loaded``.
    """
    dim = param.output_dim
    offset = _in_elements(param, dim, offset)
    factor, rounded_up = _packing(param, dim), -(-size // _packing(param, dim))
    whole = loaded.dim() > dim and loaded.shape[dim] == rounded_up == dst.shape[dim] - offset
    if size % factor and whole:
        # A checkpoint tensor ending in a partly filled element (a block-wise scale whose last block
        # covers the remaining rows) loads whole when it is also the last piece of ``dst``.
        size = rounded_up
    else:
        size = _in_elements(param, dim, size)
    copy_checked(dst.narrow(dim, offset, size), _piece(loaded, dim, index, size))


def load_input_shard(param: torch.Tensor, dst: torch.Tensor, loaded: torch.Tensor, tp: TPGroup) -> None:
    """Copy this rank's piece along ``param.input_dim`` of ``loaded`` into ``dst``; a tensor with
    no input dim is copied whole."""
    dim = getattr(param, "input_dim", None)
    if dim is None:
        copy_checked(dst, loaded)
        return
    size = dst.shape[dim]
    if loaded.dim() != dst.dim() or loaded.shape[dim] != size * tp.size:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not split into {tp.size} pieces "
                         f"of shape {tuple(dst.shape)} along dim {dim}")
    copy_checked(dst, loaded.narrow(dim, tp.rank * size, size))


def split_fused(param: torch.Tensor, loaded: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """Cut a checkpoint tensor holding several projections one after another along the output dim
    (``[q; k; v]``, ``[gate; up]``) into the projections, whose full sizes are ``sizes`` features."""
    dim = param.output_dim
    widths = [_in_elements(param, dim, s) for s in sizes]
    if loaded.dim() <= dim or loaded.shape[dim] != sum(widths):
        raise ValueError(f"fused checkpoint tensor of shape {tuple(loaded.shape)} does not hold parts of "
                         f"{widths} elements along dim {dim}")
    return loaded.split(widths, dim)


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
            weight_param(torch.zeros(sum(output_sizes), dtype=params_dtype), self.weight_loader, output_dim=0)
            if bias
            else None
        )

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; ``gather_output`` rebuilds the full output.

    The weight loader takes either one part's checkpoint tensor with its ``shard_id`` or, with
    ``shard_id=None``, a checkpoint tensor holding every part one after another (Phi-3's
    ``qkv_proj``, GLM's ``query_key_value``), and cuts this rank's piece of each part out of it.
    """

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

    def _parts(self) -> list[tuple[Any, int]]:
        """(shard id, full size over all ranks) of each part a fused checkpoint tensor holds, in order."""
        return [(None, self.output_sizes[0] * self.tp.size)]

    def _shard_layout(self, shard_id: Any) -> tuple[int, int, int]:
        """(offset in this rank's output features, size, index of this rank's piece in the part)."""
        return 0, self.output_sizes[0], self.tp.rank

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if getattr(param, "output_dim", None) is None:  # not split across ranks
            default_weight_loader(param, loaded)
            return
        parts = self._parts()
        if shard_id is None and len(parts) > 1:  # a fused checkpoint tensor: every part at once
            for (part, _), piece in zip(parts, split_fused(param, loaded, [size for _, size in parts])):
                self.weight_loader(param, piece, part)
            return
        offset, size, index = self._shard_layout(shard_id)
        load_output_shard(param, param.data, loaded, offset, size, index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return self.tp.all_gather_last_dim(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one matmul (e.g. gate and up); shard ids are
    the projections' indices."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, tp: TPGroup = SINGLE,
                 params_dtype: torch.dtype = torch.float32, quant_method: QuantMethod | None = None):
        self._full_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, tp, params_dtype, quant_method)

    def _local_sizes(self, output_size: int) -> list[int]:
        return [self.tp.split(s, "output features") for s in self._full_sizes]

    def _parts(self) -> list[tuple[Any, int]]:
        return list(enumerate(self._full_sizes))

    def _shard_layout(self, shard_id: int) -> tuple[int, int, int]:
        return sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id], self.tp.rank


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projections (shard ids ``"q"``, ``"k"``, ``"v"``); heads are split across
    ranks, and with more ranks than kv heads each kv head is replicated on ``tp_size / kv_heads`` ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 tp: TPGroup = SINGLE, params_dtype: torch.dtype = torch.float32, quant_method: QuantMethod | None = None):
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(f"num_key_value_heads={num_kv_heads} and tp_size={tp.size}: neither divides the other")
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = tp.split(num_heads, "num_attention_heads")
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias, tp, params_dtype, quant_method)

    def _local_sizes(self, output_size: int) -> list[int]:
        return [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim]

    def _parts(self) -> list[tuple[Any, int]]:
        kv = self.total_num_kv_heads * self.head_dim
        return [("q", self.total_num_heads * self.head_dim), ("k", kv), ("v", kv)]

    def _shard_layout(self, shard_id: str) -> tuple[int, int, int]:
        index = "qkv".index(shard_id)
        rank = self.tp.rank if shard_id == "q" else self.tp.rank // self.kv_replicas
        return sum(self.output_sizes[:index]), self.output_sizes[index], rank


def ungroup_qkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder a QKV checkpoint tensor stored per kv group into ``[all q; all k; all v]`` rows, the
    fused layout ``QKVParallelLinear`` loads with ``shard_id=None``.

    Grouped layout (InternLM2's ``wqkv``): for each kv head, its ``num_heads / num_kv_heads`` q
    heads, then its k head, then its v head, each ``head_dim`` rows. Works for weights and biases
    (any trailing dims).
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    q_per_kv = num_heads // num_kv_heads
    if wqkv.shape[0] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"grouped qkv tensor of shape {tuple(wqkv.shape)} does not hold {num_heads} q and "
                         f"{num_kv_heads} kv heads of {head_dim}")
    rest = wqkv.shape[1:]
    groups = wqkv.reshape(num_kv_heads, q_per_kv + 2, head_dim, *rest)
    q = groups[:, :q_per_kv].reshape(num_heads * head_dim, *rest)
    k = groups[:, q_per_kv].reshape(num_kv_heads * head_dim, *rest)
    v = groups[:, q_per_kv + 1].reshape(num_kv_heads * head_dim, *rest)
    return torch.cat([q, k, v])


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp: TPGroup = SINGLE,
                 params_dtype: torch.dtype = torch.float32, quant_method: QuantMethod | None = None):
        self.tp = tp
        super().__init__(tp.split(input_size, "input features"), [output_size], bias, params_dtype, quant_method)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        # The bias has no input dim: copied whole, added once after the reduce.
        load_input_shard(param, param.data, loaded, self.tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, None)
        y = self.tp.all_reduce(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up its rows, then all-reduce.

    Its ``quant_method`` (a scheme's ``for_embedding``; default the float ``weight`` of
    ``UnquantizedMethod``) holds the table: it makes the parameters as for a linear layer of
    ``rows`` outputs, looks rows up (``embed``) and projects (``apply``)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE, params_dtype: torch.dtype = torch.float32,
                 quant_method: QuantMethod | None = None):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.size)  # ceil: the last rank's table is padded
        self.start = tp.rank * self.rows
        self.output_sizes = [self.rows]  # to a quantization method: a layer of one part of ``rows`` outputs
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self, hidden_size, [self.rows], params_dtype, self.weight_loader)
        self.bias: nn.Parameter | None = None  # what ``project`` adds to the logits: an LM head's (below)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        """This rank's vocabulary rows of ``loaded`` along the parameter's ``output_dim`` (where one
        element stands for several rows, a quantized table's packed zero points or block scales, the
        elements holding them); a parameter with no output dim (an activation order over the
        inputs) is copied whole. The last rank's padding rows stay as they are."""
        dim = getattr(param, "output_dim", None)
        if dim is None:
            copy_checked(param.data, loaded)
            return
        factor = param.packed_factor if param.packed_dim == dim else 1
        start, rows = self.start // factor, -(-self.rows // factor)
        piece = loaded.narrow(dim, start, max(0, min(rows, loaded.shape[dim] - start)))
        copy_checked(param.data.narrow(dim, 0, piece.shape[dim]), piece)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.quant_method.embed(self, input_ids)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = self.quant_method.embed(self, local.masked_fill(outside, 0))
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Use the table as an output projection: vocabulary logits of ``hidden``."""
        logits = self.tp.all_gather_last_dim(self.quant_method.apply(self, hidden, self.bias))
        return logits[..., : self.vocab_size]


class ParallelLMHead(VocabParallelEmbedding):
    """An untied output projection (``project``), split by vocabulary rows like the embedding;
    ``bias``: one entry per vocabulary row, split alike (Phi-2's and GPT-J's heads)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE,
                 params_dtype: torch.dtype = torch.float32, bias: bool = False, quant_method: QuantMethod | None = None):
        super().__init__(vocab_size, hidden_size, tp, params_dtype, quant_method)
        self.bias = (weight_param(torch.zeros(self.rows, dtype=params_dtype), self.weight_loader, output_dim=0)
                     if bias else None)
