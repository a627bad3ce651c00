"""Built-in grammar backend: outlines-core (regex -> token index; JSON Schema -> regex)."""

from __future__ import annotations

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_grammar_backends(register):
    register("outlines", "sglang_plugins.grammar.outlines.backend:OutlinesBackend")
