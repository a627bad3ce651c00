"""GGUF (llama.cpp) linear layers kept quantized: each layer holds its tensors' ggml blocks and
dequantizes them per forward (``blocks`` for the block layouts, ``method`` for the layers)."""
