"""The method registered under ``compressed-tensors``: it picks, for each linear layer, the method
of the config group the layer follows.

Why one plugin owns the name: a compressed-tensors config may give each group of layers another
scheme (FP8 attention and int4 MLP, say), so the choice is made per layer, from the config's
groups, targets and ignore list, which only this plugin reads. The number formats are built by
the plugin that knows them: float groups by the fp8 plugin's ``Fp8LinearMethod`` from the scheme
its public ``compressed_tensors_scheme`` reads out of the group's arguments (the fp8 plugin thus
needs no knowledge of compressed-tensors' groups, and this one none of e4m3), integer groups by
this plugin's ``Int8Method`` and ``PackedIntMethod``. An MoE layer's experts follow the group of
``<prefix>`` (``model.layers.N.mlp.experts``) likewise, through each format's experts method. An
untied LM head follows its group too (``for_embedding``).
"""

from __future__ import annotations

from typing import Any

from sglang_core.layers.quant import ExpertsQuantMethod, QuantMethod
from sglang_plugins.quant.compressed_tensors.config import layer_scheme
from sglang_plugins.quant.compressed_tensors.int8 import Int8ExpertsMethod, Int8Method
from sglang_plugins.quant.compressed_tensors.packed import PackedIntExpertsMethod, PackedIntMethod
from sglang_plugins.quant.fp8.experts import Fp8ExpertsMethod
from sglang_plugins.quant.fp8.method import Fp8LinearMethod
from sglang_plugins.quant.fp8.scheme import compressed_tensors_scheme
from sglang_plugins.quant.kv_scales import is_kv_cache_scale


class CompressedTensorsMethod(QuantMethod):
    """Never built itself: ``for_layer`` returns the method of the layer's group."""

    @classmethod
    def for_layer(cls, quant_config: dict[str, Any], prefix: str) -> QuantMethod | None:
        scheme = layer_scheme(quant_config, prefix)
        if scheme is None:
            return None
        kind = scheme.weights.get("type")
        if scheme.format == "float-quantized" and kind == "float":
            return Fp8LinearMethod(compressed_tensors_scheme(scheme.weights, scheme.input_activations), prefix)
        if scheme.format == "int-quantized" and kind == "int":
            return Int8Method(scheme.weights, scheme.input_activations, prefix)
        if scheme.format == "pack-quantized" and kind == "int":
            return PackedIntMethod(scheme.weights, scheme.input_activations, prefix)
        raise ValueError(f"quantization_config format {scheme.format!r} does not store weights type {kind!r}")

    @classmethod
    def unused_checkpoint_tensor(cls, quant_config: dict[str, Any], name: str) -> bool:
        """A KV-cache scale of a checkpoint whose ``kv_cache_scheme`` says it stores them."""
        return quant_config.get("kv_cache_scheme") is not None and is_kv_cache_scale(name)

    @classmethod
    def for_embedding(cls, quant_config: dict[str, Any], prefix: str) -> QuantMethod | None:
        """The LM head is a linear layer to llm-compressor: a group targeting it (``Linear``) quantizes
        it unless ``ignore`` lists it. Input embedding tables are not linear layers and stay float."""
        return cls.for_layer(quant_config, prefix) if prefix == "lm_head" else None

    @classmethod
    def for_experts(cls, quant_config: dict[str, Any], prefix: str) -> ExpertsQuantMethod | None:
        scheme = layer_scheme(quant_config, prefix)
        if scheme is None:
            return None
        if scheme.format == "float-quantized" and scheme.weights.get("type") == "float":
            return Fp8ExpertsMethod(compressed_tensors_scheme(scheme.weights, scheme.input_activations), prefix)
        if scheme.format == "pack-quantized" and scheme.weights.get("type") == "int":
            return PackedIntExpertsMethod(PackedIntMethod(scheme.weights, scheme.input_activations, prefix))
        if scheme.format == "int-quantized" and scheme.weights.get("type") == "int":
            return Int8ExpertsMethod(Int8Method(scheme.weights, scheme.input_activations, prefix))
        raise ValueError(f"quantization_config format {scheme.format!r} does not store weights type "
                         f"{scheme.weights.get('type')!r} ({prefix})")
