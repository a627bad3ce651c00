"""Reads a checkpoint's ``quantization_config`` into the FP8 scheme its linear layers follow.

Formats read:
- compressed-tensors (llm-compressor), ``format: "float-quantized"``: the compressed-tensors plugin
  reads the config (groups, targets, ignore) and hands each float group's quantization arguments to
  ``compressed_tensors_scheme``: ``weights`` 8-bit ``float`` (strategy ``tensor``: ``weight_scale``
  [1]; ``channel``: [out, 1]), ``input_activations`` none, static per-tensor (``input_scale`` [1])
  or dynamic per-token; or strategy ``block`` (``block_structure`` [rows, cols]: ``weight_scale``
  laid out as block-wise checkpoints' ``weight_scale_inv``) with dynamic activations per group.
- AutoFP8 (``quant_method: "fp8"``): per-tensor weight scales, ``activation_scheme`` static or
  dynamic (per-token), ``ignored_layers``, ``kv_cache_scheme: "static"`` with KV-cache scales.
  transformers' ``FineGrainedFP8Config`` writes the modules it keeps float as
  ``modules_to_not_convert`` (reading ``ignored_layers`` as the same list), matched by its rule
  (``skips_module``); either list is read, for either layout.
- Block-wise (DeepSeek-V3, Qwen3-FP8: ``quant_method: "fp8"`` with ``weight_block_size`` [rows,
  cols]): ``weight_scale_inv`` [ceil(out/rows), ceil(in/cols)], one scale per weight block;
  activations dynamic, one scale per token and ``cols``-wide group of input features.
- ``{"quant_method": "fp8"}`` alone (``--quantization fp8`` on an unquantized checkpoint): weights
  quantized per output channel at load, activations dynamically per token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from sglang_plugins.quant.fused import all_parts_match, name_matches


@dataclass(frozen=True)
class Fp8Scheme:
    weights: Literal["tensor", "channel", "block", "online"]  # online: a float checkpoint quantized at load
    activations: Literal["none", "static", "dynamic"]
    ignore: tuple[str, ...] = ()  # ignored_layers and modules_to_not_convert
    block: tuple[int, int] | None = None  # weights "block": (output rows, input columns) per scale
    kv_cache_scales: bool = False  # the checkpoint stores KV-cache scales (unused: see quant.kv_scales)
    block_scale_name: str = "weight_scale_inv"  # what the checkpoint calls block-wise scales

    @property
    def weight_scale_name(self) -> str:
        """The parameter (and checkpoint tensor) holding the weight's scales."""
        return self.block_scale_name if self.weights == "block" else "weight_scale"

    def ignores(self, prefix: str) -> bool:
        """Whether the linear layer at ``prefix`` stays unquantized: all the checkpoint modules it
        stands for are ignored (only some of them is an error)."""
        return all_parts_match(prefix, lambda name: any(skips_module(e, name) for e in self.ignore),
                               "ignored_layers / modules_to_not_convert")


def skips_module(entry: str, name: str) -> bool:
    """Whether an ignore list's ``entry`` names the module ``name``: as a name or ``re:`` pattern
    (``name_matches``), or by transformers' rule for ``modules_to_not_convert``: a regex matching
    from the start up to a module boundary (``layers.1`` covers ``layers.1.mlp``, not ``layers.11``;
    ``mlp.gate`` not ``mlp.gate_proj``), or a suffix of the name."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return name_matches(entry, name) or re.match(rf"(?:{entry}){boundary}", name) is not None or name.endswith(entry)


def _module_list(config: dict[str, Any], field: str) -> tuple[str, ...]:
    entries = config.get(field) or []
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ValueError(f"quantization_config {field}: expected a list of module names, got {entries!r}")
    for entry in entries:
        try:
            re.compile(entry.removeprefix("re:"))
        except re.error as exc:
            raise ValueError(f"quantization_config {field}: {entry!r} is not a valid pattern ({exc})") from exc
    return tuple(entries)


def parse_scheme(config: dict[str, Any]) -> Fp8Scheme:
    method = config.get("quant_method")
    if method == "fp8":
        return _auto_fp8(config) if len(config) > 1 else Fp8Scheme("online", "dynamic")
    raise ValueError(f"quantization_config quant_method {method!r}: the fp8 plugin reads fp8 (compressed-tensors "
                     "checkpoints load through the compressed-tensors plugin)")


def _auto_fp8(config: dict[str, Any]) -> Fp8Scheme:
    activations = config.get("activation_scheme")
    if activations not in ("static", "dynamic"):
        raise ValueError(f"quantization_config activation_scheme {activations!r}: expected 'static' or 'dynamic'")
    if config.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config fmt {config.get('fmt')!r}: expected 'e4m3'")
    ignore = _module_list(config, "ignored_layers") + _module_list(config, "modules_to_not_convert")
    # transformers' FineGrainedFP8Config: FP8 embedding tables, DeepSeek-V4's FP4-packed experts.
    if config.get("modules_to_convert"):
        raise ValueError(f"quantization_config modules_to_convert {config['modules_to_convert']!r}: quantized "
                         "embedding tables are not supported")
    # ue8m0 scales are powers of two stored as float8_e8m0fnu, which load into float32 exactly.
    if config.get("scale_fmt", "float") not in ("float", "ue8m0"):
        raise ValueError(f"quantization_config scale_fmt {config['scale_fmt']!r}: expected 'float' or 'ue8m0'")
    if config.get("expert_dtype", "fp8") != "fp8":
        raise ValueError(f"quantization_config expert_dtype {config['expert_dtype']!r}: only 'fp8' experts are "
                         "supported")
    kv_cache = config.get("kv_cache_scheme")
    if kv_cache not in (None, "static"):
        raise ValueError(f"quantization_config kv_cache_scheme {kv_cache!r}: expected 'static' (AutoFP8) or none")
    if config.get("weight_block_size") is None:
        return Fp8Scheme("tensor", activations, ignore, kv_cache_scales=kv_cache is not None)
    block = _block_shape(config["weight_block_size"], "weight_block_size")
    if activations != "dynamic":
        raise ValueError(f"quantization_config activation_scheme {activations!r}: block-wise weights "
                         "(weight_block_size) need 'dynamic'")
    return Fp8Scheme("block", activations, ignore, block, kv_cache is not None)


def _block_shape(block: Any, field: str) -> tuple[int, int]:
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in block)):
        raise ValueError(f"quantization_config {field} {block!r}: expected two positive integers")
    return block[0], block[1]


def compressed_tensors_scheme(weights: Any, input_activations: Any) -> Fp8Scheme:
    """The scheme of one compressed-tensors config group whose weights are float: its ``weights``
    and ``input_activations`` quantization arguments (the latter None for weight-only). Strategy
    ``block`` (llm-compressor's FP8_BLOCK) stores ``weight_scale`` per ``block_structure`` block, its
    activations quantized dynamically per token and group of the block's columns."""
    weights = _float8("weights", weights)
    if weights.get("strategy") not in ("tensor", "channel", "block") or weights.get("dynamic"):
        raise ValueError(f"quantization_config weights strategy {weights.get('strategy')!r} (dynamic="
                         f"{weights.get('dynamic')!r}): expected static 'tensor', 'channel' or 'block'")
    if weights["strategy"] != "block":
        return Fp8Scheme(weights["strategy"], _activations(input_activations))
    block = _block_shape(weights.get("block_structure"), "weights block_structure")
    args = _float8("input_activations", input_activations)
    if (args.get("strategy"), bool(args.get("dynamic")), args.get("group_size")) != ("group", True, block[1]):
        raise ValueError(f"quantization_config input_activations strategy {args.get('strategy')!r} with dynamic="
                         f"{args.get('dynamic')!r}, group_size {args.get('group_size')!r}: block-wise weights need "
                         f"dynamic 'group' of the block's {block[1]} columns")
    return Fp8Scheme("block", "dynamic", block=block, block_scale_name="weight_scale")


def _activations(args: dict[str, Any] | None) -> Literal["none", "static", "dynamic"]:
    if args is None:
        return "none"
    args = _float8("input_activations", args)
    strategy, dynamic = args.get("strategy"), bool(args.get("dynamic"))
    if (strategy, dynamic) == ("tensor", False):
        return "static"
    if (strategy, dynamic) == ("token", True):
        return "dynamic"
    raise ValueError(f"quantization_config input_activations strategy {strategy!r} with dynamic={dynamic}: "
                     "expected static 'tensor' or dynamic 'token'")


def _float8(field: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """Quantization args that are symmetric 8-bit float (e4m3), or a ValueError naming ``field``."""
    if not isinstance(args, dict):
        raise ValueError(f"quantization_config {field}: expected quantization arguments, got {args!r}")
    if args.get("type") != "float" or args.get("num_bits") != 8:
        raise ValueError(f"quantization_config {field} type {args.get('type')!r} num_bits {args.get('num_bits')!r}: "
                         "expected 8-bit 'float'")
    if args.get("symmetric") is False:
        raise ValueError(f"quantization_config {field} symmetric: asymmetric FP8 is not supported")
    return args
