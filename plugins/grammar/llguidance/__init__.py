"""Grammar backend on llguidance (regex / JSON Schema / Lark grammars, number ranges enforced);
the default (``--grammar-backend llguidance``); llguidance is a core dependency."""

from __future__ import annotations

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_grammar_backends(register):
    register("llguidance", "sglang_plugins.grammar.llguidance.backend:LLGuidanceBackend")
