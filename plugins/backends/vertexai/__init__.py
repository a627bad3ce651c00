"""Built-in API backend plugin: ``sgl.VertexAI`` (Gemini on Google Vertex AI, through the
``google-genai`` SDK, imported only when a program builds one)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_api_backends(register):
    register("vertexai", "sglang_plugins.backends.vertexai.backend:VertexAIBackend")
