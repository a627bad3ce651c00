"""sglang-core: a small-core, plugin-based LLM serving engine."""
