"""Built-in weight format: a GGUF file (llama.cpp's format), its tensors dequantized as they are read."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_weight_formats(register):
    register("gguf", "sglang_plugins.weights.gguf.format:GGUFFormat", priority=50)
