"""Built-in attention plugin: PyTorch SDPA over the paged KV pool (CPU and CUDA)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_attention_backends(register):
    # Lowest priority: picked by "auto" only when no faster backend is available.
    register("torch_native", "sglang_plugins.attention.torch_native.backend:TorchNativeBackend", priority=0)
