"""Built-in model plugin: LLaVA 1.5 (``LlavaForConditionalGeneration``: a CLIP or SigLIP vision
tower, a projector, and a language model the core's other model plugins build), LLaVA-NeXT
(``LlavaNextForConditionalGeneration``: the same, on anyres tiles of each image) and
LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``: LLaVA-NeXT, and videos as pooled frames); and
Yi-VL (``LlavaLlamaForCausalLM``: LLaVA 1.5 in the original LLaVA repository's layout, see ``yi_vl``)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("LlavaForConditionalGeneration", "sglang_plugins.models.llava.model:LlavaForConditionalGeneration",
             input_processor="sglang_plugins.models.llava.processor:LlavaInputProcessor")
    register("LlavaNextForConditionalGeneration", "sglang_plugins.models.llava.next:LlavaNextForConditionalGeneration",
             input_processor="sglang_plugins.models.llava.processor:LlavaInputProcessor")
    register("LlavaNextVideoForConditionalGeneration",
             "sglang_plugins.models.llava.video:LlavaNextVideoForConditionalGeneration",
             input_processor="sglang_plugins.models.llava.processor:LlavaNextVideoInputProcessor")
    register("LlavaLlamaForCausalLM", "sglang_plugins.models.llava.yi_vl:YiVLForCausalLM",
             input_processor="sglang_plugins.models.llava.yi_vl:YiVLInputProcessor",
             config_adapter="sglang_plugins.models.llava.yi_vl:yi_vl_config")
