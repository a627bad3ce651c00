"""What quantization methods need to know about the fused linear layers DecoderLM builds (q/k/v as
``qkv_proj``, gate/up as ``gate_up_proj``): the checkpoint modules each stands for, matching a
checkpoint's module lists (ignore lists, targets) against those names, and loading a scalar that
each part carries on its own (a per-tensor scale)."""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_modules(prefix: str) -> list[str]:
    """The checkpoint's module names the linear layer at ``prefix`` stands for: its parts' when
    it is fused, else its own."""
    head, dot, leaf = prefix.rpartition(".")
    return [f"{head}{dot}{part}" for part in FUSED_PARTS.get(leaf, (leaf,))]


def all_parts_match(prefix: str, matches: Callable[[str], bool], field: str) -> bool:
    """Whether ``matches`` holds for every checkpoint module of the layer at ``prefix``; a layer
    whose parts disagree cannot be computed as one matmul, so that is a ValueError naming the
    config's ``field``."""
    names = checkpoint_modules(prefix)
    hits = [matches(name) for name in names]
    if any(hits) and not all(hits):
        raise ValueError(f"quantization_config {field}: matches only some of the modules fused into {prefix} "
                         f"({', '.join(n for n, hit in zip(names, hits) if hit)})")
    return all(hits)


def name_matches(entry: str, name: str) -> bool:
    """compressed-tensors' (and AutoFP8's) rule for a module list entry: ``re:<pattern>`` matches
    from the start of the name (``re.match``), anything else names the module exactly."""
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return entry == name


def part_index(shard_id: Any) -> int:
    """Position of a fused layer's part: merged layers number their parts, QKV names them."""
    return shard_id if isinstance(shard_id, int) else "qkv".index(shard_id)


def load_part_scalar(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """Weight loader of a ``[parts]`` parameter holding one scalar per checkpoint tensor; a tensor
    holding every part (``shard_id`` None) gives all parts its value."""
    if loaded.numel() != 1:
        raise ValueError(f"a per-tensor scale has one element, got shape {tuple(loaded.shape)}")
    if shard_id is None:
        param.data.fill_(loaded.item())
    else:
        param.data[part_index(shard_id)] = loaded.reshape(())
