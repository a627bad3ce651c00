"""Built-in model plugin: Qwen2-VL (``Qwen2VLForConditionalGeneration``) and Qwen2.5-VL
(``Qwen2_5_VLForConditionalGeneration``): images at their own resolution and videos, M-RoPE positions."""

from sglang_core.hookspecs import hookimpl

PROCESSOR = "sglang_plugins.models.qwen2_vl.processor:Qwen2VLInputProcessor"


@hookimpl
def register_models(register):
    register("Qwen2VLForConditionalGeneration", "sglang_plugins.models.qwen2_vl.model:Qwen2VLForConditionalGeneration",
             input_processor=PROCESSOR)
    register("Qwen2_5_VLForConditionalGeneration",
             "sglang_plugins.models.qwen2_vl.model:Qwen2_5_VLForConditionalGeneration", input_processor=PROCESSOR)
