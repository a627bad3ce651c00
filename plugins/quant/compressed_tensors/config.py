"""Reads a compressed-tensors ``quantization_config`` (what llm-compressor writes) and finds the
config group each linear layer follows.

The config: ``config_groups`` ({name: {``targets``, ``weights``, ``input_activations``,
``output_activations``, optionally its own ``format``}}), ``format`` (how the weights are stored:
``float-quantized``, ``int-quantized``, ``pack-quantized``, ``naive-quantized`` (the first two's
general name); ``mixed-precision`` when each group names its own), ``ignore``, ``kv_cache_scheme`` (KV-cache scales stored: read by no one, see
``quant.kv_scales``), ``sparsity_config``, ``transform_config``.

A module follows a group as compressed-tensors applies a config to a model: some group's target
matches it and no ``ignore`` entry does. A target is a module name, a ``re:`` pattern (matched
from the name's start) or a class name, of which only ``Linear`` names a linear layer. When the
targets of several groups match, the most specific decides: exact names, then patterns (in
sorted order), then the class; a target listed in two groups belongs to the later one. A fused
layer follows a group only if every checkpoint module it stands for follows that same group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sglang_plugins.quant.fused import all_parts_match, checkpoint_modules, name_matches

FORMATS = ("float-quantized", "int-quantized", "pack-quantized")
# What compressed-tensors' "naive-quantized" stores: each weight in its type's own dtype (int8,
# float8_e4m3fn), as the two formats it is the general name of do.
NAIVE_FORMATS = {"int": "int-quantized", "float": "float-quantized"}
LINEAR_CLASS = "Linear"


@dataclass(frozen=True)
class GroupScheme:
    """One config group's storage format and quantization arguments (dicts as in the config)."""

    format: str
    weights: dict[str, Any]
    input_activations: dict[str, Any] | None


def layer_scheme(config: dict[str, Any], prefix: str) -> GroupScheme | None:
    """The scheme of the linear layer at ``prefix``, or None when it stays unquantized."""
    groups = _groups(config)
    ignore = _string_list(config.get("ignore"), "ignore")
    if all_parts_match(prefix, lambda name: any(name_matches(entry, name) for entry in ignore), "ignore"):
        return None
    owners = {_owner(groups, name) for name in checkpoint_modules(prefix)}
    if len(owners) > 1:
        raise ValueError(f"quantization_config config_groups targets: the modules fused into {prefix} follow "
                         f"different groups ({', '.join(sorted(str(o) for o in owners))})")
    owner = owners.pop()
    if owner is None:
        return None
    group = groups[owner]
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise ValueError(f"quantization_config config_groups {owner} weights: expected quantization arguments, "
                         f"got {weights!r}")
    fmt = group.get("format") or config.get("format")
    if fmt == "naive-quantized":
        fmt = NAIVE_FORMATS.get(weights.get("type"), fmt)
    if fmt not in FORMATS:
        raise ValueError(f"quantization_config format {fmt!r} (config group {owner!r}): expected one of {FORMATS}")
    if group.get("output_activations"):
        raise ValueError(f"quantization_config config_groups {owner} output_activations: not supported")
    return GroupScheme(fmt, weights, group.get("input_activations"))


def _groups(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if config.get("transform_config"):
        raise ValueError("quantization_config transform_config: not supported")
    kv_cache = config.get("kv_cache_scheme")
    if kv_cache is not None and not isinstance(kv_cache, dict):
        raise ValueError(f"quantization_config kv_cache_scheme: expected quantization arguments, got {kv_cache!r}")
    sparsity = config.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise ValueError(f"quantization_config sparsity_config format {sparsity.get('format')!r}: only 'dense'")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
        raise ValueError(f"quantization_config config_groups: expected a mapping of groups, got {groups!r}")
    for name, group in groups.items():
        if not _string_list(group.get("targets"), f"config_groups {name} targets"):
            raise ValueError(f"quantization_config config_groups {name} targets: empty")
    return groups


def _owner(groups: dict[str, dict[str, Any]], module: str) -> str | None:
    """The group the checkpoint module ``module`` (a linear layer) follows, or None."""
    owner_of = {target: name for name, group in groups.items() for target in group["targets"]}
    by_name = sorted((t for t in owner_of if name_matches(t, module)), key=lambda t: (t.startswith("re:"), t))
    if by_name:
        return owner_of[by_name[0]]
    return owner_of.get(LINEAR_CLASS)


def _string_list(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"quantization_config {field}: expected a list of names, got {value!r}")
    return value


def int_args(field: str, args: Any, bits: tuple[int, ...]) -> dict[str, Any]:
    """Quantization arguments of an integer type of one of ``bits`` widths, with ``strategy``
    filled in as compressed-tensors infers it (``group_size`` > 0: group; -1: channel; none:
    tensor); else a ValueError naming ``field``."""
    if not isinstance(args, dict):
        raise ValueError(f"quantization_config {field}: expected quantization arguments, got {args!r}")
    if args.get("type") != "int" or args.get("num_bits") not in bits:
        raise ValueError(f"quantization_config {field} type {args.get('type')!r} num_bits {args.get('num_bits')!r}: "
                         f"expected 'int' of {' or '.join(map(str, bits))} bits")
    group_size = args.get("group_size")
    strategy = args.get("strategy") or {None: "tensor", -1: "channel"}.get(group_size, "group")
    if strategy == "group" and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0):
        raise ValueError(f"quantization_config {field} group_size {group_size!r}: strategy 'group' needs a positive "
                         "integer")
    return {**args, "strategy": strategy, "symmetric": args.get("symmetric", True) is not False}
