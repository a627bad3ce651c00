"""Find a model's config folder and the weight format that reads its weights; read its config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from sglang_core.plugins import Registration, Registry, resolve_target
from sglang_core.weights.format import WeightFormat

if TYPE_CHECKING:
    from transformers import PretrainedConfig


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# --load-format values besides the registered weight formats' names.
BUILT_IN_LOAD_FORMATS = ("auto", "dummy")


@dataclass(frozen=True)
class ModelSource:
    folder: Path  # holds config.json (and the tokenizer unless dummy)
    load_format: str  # the weight format's registered name, or "dummy"
    origin: str  # what the user named (or the embedded default)
    weights: Path | None = None  # what the format reads weights from (None: dummy)
    reader: WeightFormat | None = None

    def read_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's ``(Hugging Face name, tensor)`` pairs, one tensor at a time."""
        if self.reader is None or self.weights is None:
            raise ValueError("load_format dummy has no weights to read")
        return self.reader.iter_weights(self.weights)


def resolve_model_source(model_path: str | None, load_format: str, formats: Registry) -> ModelSource:
    """Turn ``--model-path``/``--load-format`` into the config folder and the weight format
    (``formats``: the ``weight_formats`` registry) that reads the weights.

    ``auto`` (and ``dummy``, for the config) takes the highest-priority registered format that
    claims the path; a format's name takes that format.
    """
    if model_path is None:
        from sglang_core.weights.default_model import find_default_gguf

        path, origin = find_default_gguf(), DEFAULT_MODEL_NAME
    else:
        path, origin = Path(model_path).expanduser(), model_path
        if not path.exists():
            raise ValueError(f"model_path {model_path!r} does not exist (expected a Hugging Face folder or a .gguf "
                             "file; no model hub is reached)")
    if load_format in BUILT_IN_LOAD_FORMATS:
        entry = _claiming_format(path, formats)
        if entry is None:
            if load_format == "dummy" and path.is_dir() and (path / "config.json").is_file():
                return ModelSource(path, "dummy", origin)
            raise ValueError(_unreadable(origin, path, formats))
    elif load_format in formats:
        entry = formats.get(load_format)
    else:
        raise ValueError(f"load_format: {load_format!r} is not one of {', '.join(load_format_choices(formats))}")
    reader = entry.load()()
    folder = reader.config_folder(path)
    if load_format == "dummy":
        return ModelSource(folder, "dummy", origin)
    return ModelSource(folder, entry.name, origin, path, reader)


def load_format_choices(formats: Registry) -> list[str]:
    """What ``--load-format`` accepts: ``auto``, ``dummy`` and every registered weight format."""
    return [*BUILT_IN_LOAD_FORMATS, *formats.names()]


def _claiming_format(path: Path, formats: Registry) -> Registration | None:
    by_priority = sorted(formats, key=lambda entry: entry.metadata.get("priority", 0), reverse=True)
    return next((entry for entry in by_priority if entry.load()().claims(path)), None)


def _unreadable(origin: str, path: Path, formats: Registry) -> str:
    # No format at all: a --plugins selection without one, or entry points older than the code.
    registered = ", ".join(formats.names()) or ("none; name one in --plugins (safetensors, gguf), or reinstall "
                                                 "sglang-core if its entry points predate them")
    if path.is_file():
        return f"model_path {origin!r} is a file no registered weight format reads (registered: {registered})"
    if not (path / "config.json").is_file():
        return (f"model_path {origin!r} has no config.json (is it a Hugging Face model folder?) and no weights "
                f"a registered format reads (registered: {registered})")
    return (f"model_path {origin!r} has no weights a registered format reads (registered: {registered}); "
            "use --load-format dummy for random weights")


def load_config(folder: Path) -> PretrainedConfig:
    """The model's config from ``folder/config.json``, never running code the folder ships.

    A ``model_type`` transformers knows loads into its own config class (an ``auto_map`` naming
    custom code is ignored: ``trust_remote_code`` is never set). Any other (a custom-code
    architecture such as InternLM2) loads as a plain ``PretrainedConfig`` holding the JSON's
    fields, with nested ``*_config`` objects (``text_config``) as configs too.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
        if not isinstance(raw, dict):
            raise ValueError("config.json does not hold a JSON object")
        if raw.get("model_type") in CONFIG_MAPPING:
            return AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        return _plain_config(raw)
    except Exception as exc:
        raise ValueError(f"cannot read the model config in {folder}: {exc}") from exc


def load_model_config(folder: Path, models: Registry) -> PretrainedConfig:
    """``load_config``, then rewritten by the ``config_adapter`` its architecture's plugin registered
    (a checkpoint whose config.json is not laid out as the class it loads through expects)."""
    config = load_config(folder)
    arch = next((a for a in getattr(config, "architectures", None) or [] if a in models), None)
    adapter = models.get(arch).metadata.get("config_adapter") if arch is not None else None
    return resolve_target(adapter)(config, Path(folder)) if adapter else config


def _plain_config(raw: dict[str, Any]) -> PretrainedConfig:
    from transformers import PretrainedConfig

    nested = {key: _plain_config(value) for key, value in raw.items()
              if key.endswith("_config") and key != "quantization_config" and isinstance(value, dict)}
    return PretrainedConfig.from_dict({**raw, **nested})


def language_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config: a vision-language config's ``text_config``, else the config
    itself. Read vocabulary size, context length, layer and head counts from this."""
    return config.get_text_config(decoder=True)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of the right shapes, for speed work: small normal noise, norms at one; then
    each layer's quantization method makes its own parameters valid (``QuantMethod.init_dummy_weights``),
    drawing those it names (``QuantMethod.own_dummy_params``) alone: each parameter is drawn once."""
    generators: dict[torch.device, torch.Generator] = {}

    def generator(device: torch.device) -> torch.Generator:
        # Generate on the parameter's device: an 8B model's noise made on the host is slow to move.
        return generators.setdefault(device, torch.Generator(device=device).manual_seed(seed))

    quantized = _layers_with_methods(model)
    left_to_methods = {id(getattr(module, name)) for module, method in quantized
                       for name in method.own_dummy_params(module)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if id(param) in left_to_methods:
                continue
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
                continue
            gen = generator(param.device)
            if not param.dtype.is_floating_point:  # packed codes (AWQ, GPTQ): any bit pattern is valid
                param.random_(torch.iinfo(param.dtype).min, torch.iinfo(param.dtype).max, generator=gen)
            elif param.element_size() == 1:  # float8 has no random kernels: draw in float32
                param.copy_(torch.empty_like(param, dtype=torch.float32).normal_(0.0, 0.02, generator=gen))
            else:
                param.normal_(0.0, 0.02, generator=gen)
        for module, method in quantized:
            method.init_dummy_weights(module, generator(next(module.parameters(recurse=False)).device))


def _layers_with_methods(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """Each module with a quantization method and parameters of its own, and the method."""
    return [(module, module.quant_method) for module in model.modules()
            if getattr(module, "quant_method", None) is not None
            and next(module.parameters(recurse=False), None) is not None]
