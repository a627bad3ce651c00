"""LLaVA 1.5 (``LlavaForConditionalGeneration``): a vision tower (transformers' own CLIP or SigLIP
module), the hidden states of ``vision_feature_layer`` (one layer, or several concatenated), the
CLS position dropped under ``vision_feature_select_strategy`` "default" (kept under "full"), a
two-layer projector into the language model's width, and the language model itself built by the
core's plugin for ``text_config.model_type`` (Llama, Mistral, Qwen2, ...)."""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from sglang_core.layers.activation import act_fn
from sglang_core.model_executor.forward_batch import ForwardBatch
from sglang_core.model_executor.model_api import ModelContext

# transformers 5's module names -> the released checkpoints' (what save_pretrained writes).
CHECKPOINT_RENAMES = (
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.(vision_tower|multi_modal_projector|image_newline|vision_resampler)"), r"\1"),
)
STRATEGIES = ("default", "full")


class MultiModalProjector(nn.Module):
    def __init__(self, in_features: int, out_features: int, act: str, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
        self.act = act_fn(act)
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def language_architecture(text_config) -> str:
    """The causal-LM architecture of a text config, by its ``model_type`` ("llama" -> LlamaForCausalLM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text_config.model_type)
    if arch is None:
        raise ValueError(f"text_config.model_type: {text_config.model_type!r} is no causal language model transformers knows")
    return arch


class LlavaForConditionalGeneration(nn.Module):
    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        from transformers import AutoModel

        if config.vision_feature_select_strategy not in STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy: expected one of {STRATEGIES}, "
                             f"got {config.vision_feature_select_strategy!r}")
        layer = config.vision_feature_layer
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        if not self.feature_layers or not all(isinstance(i, int) for i in self.feature_layers):
            raise ValueError(f"vision_feature_layer: expected an int or a list of ints, got {layer!r}")
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.vision_tower = AutoModel.from_config(config.vision_config).to(ctx.dtype)
        self.multi_modal_projector = self.build_projector(config, ctx)
        # transformers ties the head to the embeddings by the outer config's tie_word_embeddings
        # (LLaVA's config copies a text config's True up, LLaVA-NeXT's does not), never by text_config's.
        config.text_config.tie_word_embeddings = bool(config.tie_word_embeddings)
        self.language_model = ctx.model_class_for(language_architecture(config.text_config))(config.text_config, ctx)

    def build_projector(self, config, ctx: ModelContext) -> nn.Module:
        """The projector from the selected vision features into the language model's width."""
        return MultiModalProjector(
            config.vision_config.hidden_size * len(self.feature_layers), config.text_config.hidden_size,
            config.projector_hidden_act, getattr(config, "multimodal_projector_bias", True), ctx.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.language_model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def embed_media(self, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Every image through the tower at once (LLaVA 1.5's processor makes them one size)."""
        return list(self.project(torch.cat([item["pixel_values"] for item in inputs])))

    def project(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[images, 3, H, W]`` -> the projected features of each, ``[images, positions, hidden]``."""
        return self.multi_modal_projector(self.vision_features(pixels))

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[images, 3, H, W]`` -> the tower's selected features, ``[images, positions, vision hidden]``."""
        pixels = pixels.to(self.multi_modal_projector.linear_1.weight.dtype)
        hidden = self.vision_tower(pixels, output_hidden_states=True).hidden_states
        features = [hidden[i][:, 1:] if self.drop_cls else hidden[i] for i in self.feature_layers]
        return torch.cat(features, dim=-1)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        others: dict[str, torch.Tensor] = {}

        def language_weights():
            for name, tensor in weights:
                for pattern, repl in CHECKPOINT_RENAMES:
                    name = pattern.sub(repl, name)
                if name.startswith("language_model."):
                    yield name.removeprefix("language_model."), tensor
                else:
                    others[name] = tensor

        self.language_model.load_weights(language_weights())
        # The vision side: the tower, projector and any other part (NeXT-Video's pooling), and any parameter of this
        # module's own (NeXT's image_newline).
        vision = {name: module for name, module in self.named_children() if name != "language_model"}
        for part, module in vision.items():
            state = {name.removeprefix(f"{part}."): t for name, t in others.items() if name.startswith(f"{part}.")}
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"{part}: the checkpoint's weights do not fit: {exc}") from None
        own = dict(self.named_parameters(recurse=False))
        for name, tensor in others.items():
            if name in own:
                if own[name].shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(own[name].shape)}")
                own[name].data.copy_(tensor)
            elif name.partition(".")[0] not in vision:
                raise ValueError(f"checkpoint tensor {name!r} has no matching model parameter")
        missing = [name for name in own if name not in others]
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing)}")
