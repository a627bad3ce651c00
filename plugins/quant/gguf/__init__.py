"""GGUF (llama.cpp) linear layers, embeddings and LM heads kept quantized: each holds its tensors'
ggml blocks and dequantizes them per forward (``blocks`` for the block layouts, ``method`` for the
layers)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_quant_methods(register):
    register("gguf", "sglang_plugins.quant.gguf.method:GGUFMethod")
