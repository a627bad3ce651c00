"""Grammar backend on xgrammar (regex / JSON Schema / EBNF, number ranges enforced); needs the
``xgrammar`` extra: ``pip install 'sglang-core[xgrammar]'``, then ``--grammar-backend xgrammar``."""

from __future__ import annotations

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_grammar_backends(register):
    register("xgrammar", "sglang_plugins.grammar.xgrammar.backend:XGrammarBackend")
