"""What a model plugin's class receives and must provide.

A model is built as ``cls(config, ctx)`` with the Hugging Face config and a ``ModelContext``, and
implements ``forward(input_ids, positions, batch) -> hidden``, ``compute_logits(hidden) -> logits``
and ``load_weights(weights)`` (an iterable of ``(hf_name, tensor)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch

from sglang_core.layers.parallel import SINGLE, TPGroup
from sglang_core.layers.quant import QuantMethod
from sglang_core.model_executor.forward_batch import ForwardBatch


@dataclass
class ModelContext:
    dtype: torch.dtype = torch.float32
    tp: TPGroup = SINGLE
    # prefix of a linear layer ("model.layers.0.mlp.gate_up_proj") -> its method; None = unquantized
    quant_method_for: Callable[[str], QuantMethod | None] = field(default=lambda prefix: None)


class CausalLM(Protocol):
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def load_by_name(params: dict[str, torch.nn.Parameter], weights: Iterable[tuple[str, torch.Tensor]],
                 stacked: dict[str, tuple[str, Any]], ignore: tuple[str, ...] = ()) -> set[str]:
    """Copy checkpoint tensors into parameters through their ``weight_loader``.

    ``stacked`` maps a checkpoint name fragment to the fused parameter fragment and shard id
    (``"q_proj" -> ("qkv_proj", "q")``). Returns the names of parameters that were loaded;
    an unknown checkpoint name is an error unless it contains one of ``ignore``.
    """
    loaded: set[str] = set()
    for name, tensor in weights:
        if any(part in name for part in ignore):
            continue
        target, shard_id = name, None
        for fragment, (fused, shard) in stacked.items():
            if f".{fragment}." in name:
                target, shard_id = name.replace(f".{fragment}.", f".{fused}."), shard
                break
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no matching model parameter")
        param = params[target]
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != parameter shape {tuple(param.shape)}")
            param.data.copy_(tensor)
        else:
            loader(param, tensor.to(param.dtype), shard_id)
        loaded.add(target)
    return loaded
