"""Grammar backend on llguidance (regex / JSON Schema, number ranges enforced); needs the
``llguidance`` extra: ``pip install 'sglang-core[llguidance]'``, then ``--grammar-backend llguidance``."""

from __future__ import annotations

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_grammar_backends(register):
    register("llguidance", "sglang_plugins.grammar.llguidance.backend:LLGuidanceBackend")
