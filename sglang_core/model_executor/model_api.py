"""What a model plugin's class receives and must provide.

A model is built as ``cls(config, ctx)`` with the Hugging Face config and a ``ModelContext``, and
implements ``forward(input_ids, positions, batch) -> hidden``, ``compute_logits(hidden) -> logits``
and ``load_weights(weights)`` (an iterable of ``(hf_name, tensor)``). A model that takes images also
implements ``embed_media(inputs) -> embeddings``: for each image's encoder inputs (a dict of
tensors on the model's device, as its ``InputProcessor`` made them) one ``[placeholders, hidden]``
tensor, computed as one batch; the runner splices them over the placeholders through
``ForwardBatch.input_embeds``. An image it raises on (any error but running out of memory) ends
only the requests whose images raise it when encoded alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from sglang_core.layers.experts import EXPERT_PARTS, PART_STEMS
from sglang_core.layers.parallel import SINGLE, TPGroup
from sglang_core.layers.quant import ExpertsQuantMethod, QuantMethod
from sglang_core.model_executor.forward_batch import ForwardBatch


@dataclass
class ModelContext:
    dtype: torch.dtype = torch.float32
    tp: TPGroup = SINGLE
    # prefix of a linear layer ("model.layers.0.mlp.gate_up_proj") -> its method; None = unquantized
    quant_method_for: Callable[[str], QuantMethod | None] = field(default=lambda prefix: None)
    # prefix of an MoE layer's routed experts ("model.layers.0.mlp.experts") -> their method; None = float
    experts_method_for: Callable[[str], ExpertsQuantMethod | None] = field(default=lambda prefix: None)
    # prefix of a vocabulary table ("model.embed_tokens", "lm_head") -> its method; None = float
    embedding_method_for: Callable[[str], QuantMethod | None] = field(default=lambda prefix: None)
    # The longest sequence the engine serves (its context length): what length-dependent rope
    # scalings are built for (``rope_from_config(..., max_position=ctx.max_position)``).
    max_position: int | None = None
    # ``--disable-mla``: a model with multi-head latent attention declares ordinary per-head K/V
    # layers instead of a latent cache; models without it ignore this.
    disable_mla: bool = False
    # An architecture name ("LlamaForCausalLM") -> the model class a plugin registered for it, so
    # a model can build another as its part (a vision-language model's language model).
    model_class_for: Callable[[str], type] = field(default=lambda arch: _no_registry(arch))


def _no_registry(arch: str) -> type:
    raise ValueError(f"no model registry to build {arch!r} from")


class CausalLM(Protocol):
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...


@dataclass(frozen=True)
class ExpertMapping:
    """Routes checkpoint tensors of MoE experts to a stacked parameter (``layers.experts.ExpertWeights``).

    ``pattern`` is a regular expression the whole checkpoint name must match; its group ``expert``,
    if it has one, is the expert id, and ``target`` (a ``re`` replacement template) builds the
    parameter name from the match. Without an ``expert`` group the tensor holds every expert,
    stacked ``[E, ...]`` or flattened ``[E * rows, cols]`` (DBRX). ``part`` is the projection
    (``"gate"``, ``"up"``, ``"down"``, fused ``"gate_up"``, or their ``w1``/``w3``/``w2``/``w13``
    spellings); ``transposed``: each expert's matrix is stored ``[in, out]`` (DBRX's ``w2``).
    """

    pattern: str
    target: str
    part: str
    transposed: bool = False


def expert_mappings(parts: dict[str, str]) -> list[ExpertMapping]:
    """Mappings for per-expert checkpoint names ``<...>.experts.<e>.<name>.<suffix>`` to
    ``<...>.experts.w13_<suffix>`` (gate, up) or ``<...>.experts.w2_<suffix>`` (down).

    ``parts`` names each projection as the checkpoint spells it: Mixtral
    ``{"w1": "gate", "w3": "up", "w2": "down"}``, Qwen-MoE / DeepSeek
    ``{"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}``. The suffix carries over, so a
    quantized checkpoint's ``qweight`` / ``scales`` land in ``w13_qweight`` / ``w13_scales``.
    """
    mappings = []
    for name, part in parts.items():
        stem = PART_STEMS[EXPERT_PARTS[part]]
        mappings.append(ExpertMapping(rf"(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.{re.escape(name)}\.(?P<suffix>\w+)",
                                      rf"\g<prefix>.{stem}_\g<suffix>", part))
    return mappings


# transformers 5 holds each MoE block's experts stacked, as ``<...>.experts.gate_up_proj``
# [E, 2I, H] (gate rows, then up rows) and ``<...>.experts.down_proj`` [E, H, I]: the names of its
# models' state dicts (save_pretrained writes the per-expert names back).
STACKED_EXPERTS = (
    ExpertMapping(r"(?P<prefix>.+\.experts)\.gate_up_proj", r"\g<prefix>.w13_weight", "gate_up"),
    ExpertMapping(r"(?P<prefix>.+\.experts)\.down_proj", r"\g<prefix>.w2_weight", "down"),
)


def load_by_name(params: dict[str, torch.nn.Parameter], weights: Iterable[tuple[str, torch.Tensor]],
                 stacked: dict[str, tuple[str, Any]], ignore: tuple[str, ...] = (),
                 experts: Sequence[ExpertMapping] = ()) -> set[str]:
    """Copy checkpoint tensors into parameters through their ``weight_loader``.

    ``stacked`` maps a checkpoint name fragment to the fused parameter fragment and shard id
    (``"q_proj" -> ("qkv_proj", "q")``); a checkpoint tensor already fused under the parameter's
    own name (``qkv_proj``) loads with shard id ``None``. ``experts`` routes MoE expert tensors
    (see ``ExpertMapping``) with shard id ``(expert_id, part)``. Returns the names of parameters
    that were loaded; an unknown checkpoint name is an error unless it contains one of ``ignore`` or
    its tensor is empty.
    """
    compiled = [(re.compile(m.pattern), m) for m in experts]
    loaded: set[str] = set()
    for name, tensor in weights:
        if any(part in name for part in ignore):
            continue
        target, shard_id, expert_rule = name, None, None
        for regex, rule in compiled:
            if match := regex.fullmatch(name):
                expert = match.groupdict().get("expert")
                shard_id = (None if expert is None else int(expert), rule.part)
                target, expert_rule = match.expand(rule.target), rule
                break
        else:
            for fragment, (fused, shard) in stacked.items():
                if f".{fragment}." in name:
                    target, shard_id = name.replace(f".{fragment}.", f".{fused}."), shard
                    break
        if target not in params:
            if tensor.numel() == 0:  # of a zero-wide module (a shared expert of width 0), which is not built
                continue
            raise ValueError(f"checkpoint tensor {name!r} has no matching model parameter")
        param = params[target]
        if expert_rule is not None:
            tensor = _expert_layout(tensor, param, shard_id[0] is None, expert_rule.transposed)
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != parameter shape {tuple(param.shape)}")
            param.data.copy_(tensor)
        else:
            try:
                loader(param, tensor.to(param.dtype), shard_id)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from exc
        loaded.add(target)
    return loaded


def _expert_layout(tensor: torch.Tensor, param: torch.nn.Parameter, all_experts: bool, transposed: bool) -> torch.Tensor:
    """One expert's matrix, or every expert's stacked ``[E, ...]``, oriented like the parameter's slices."""
    if all_experts and tensor.dim() == param.dim() - 1:  # flattened: [E * rows, cols]
        tensor = tensor.unflatten(0, (param.total_experts, -1))
    return tensor.transpose(-1, -2) if transposed else tensor
