"""Built-in weight format: Hugging Face folders of ``*.safetensors`` files."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_weight_formats(register):
    # Above gguf: a folder holding both loads its safetensors.
    register("safetensors", "sglang_plugins.weights.safetensors.format:SafetensorsFormat", priority=100)
