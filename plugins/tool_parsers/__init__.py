"""Built-in tool-call parsers: the formats of the common open model families, and a generic JSON
fallback. The parser module is imported only when a frontend builds one."""

from sglang_core.hookspecs import hookimpl

FORMATS = "sglang_plugins.tool_parsers.formats"


@hookimpl
def register_tool_parsers(register):
    register("llama3", f"{FORMATS}:Llama3Parser")
    register("hermes", f"{FORMATS}:HermesParser")
    register("mistral", f"{FORMATS}:MistralParser")
    register("deepseek_v3", f"{FORMATS}:DeepSeekV3Parser")
    register("generic", f"{FORMATS}:GenericJsonParser")
