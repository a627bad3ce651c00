"""Built-in weight formats for GGUF files (llama.cpp's format): ``gguf`` dequantizes every tensor to
float32 as it is read (what ``--load-format auto`` picks for a ``.gguf``); ``gguf_quantized`` keeps
the linear layers' ggml blocks for the ``gguf`` quant method (``plugins/quant/gguf``), which
dequantizes one layer per forward: far less memory, slower on CPU (see the README's GGUF paragraph)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_weight_formats(register):
    register("gguf", "sglang_plugins.weights.gguf.format:GGUFFormat", priority=50)
    register("gguf_quantized", "sglang_plugins.weights.gguf.format:GGUFQuantizedFormat", priority=40)
