"""The xgrammar backend's compile process (``python -m``, see
``sglang_core.constrained.worker_process``): set up with the vocabulary (xgrammar's own JSON form
of a ``TokenizerInfo``), it compiles each constraint and sends the compiled grammar back in
xgrammar's JSON form, which ``CompiledGrammar.deserialize_json`` reads (no pickle)."""

from __future__ import annotations

import json

import xgrammar

from sglang_core.constrained.worker_process import serve

# Compact JSON, as the other backends write it: no optional whitespace, so a small model cannot
# pad forever, and fixed keys and punctuation are forced text.
COMPACT_SEPARATORS = (",", ":")


def setup(tokenizer_info: bytes) -> xgrammar.GrammarCompiler:
    info = xgrammar.TokenizerInfo.deserialize_json(tokenizer_info.decode("utf-8"))
    return xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)


def compile_constraint(compiler: xgrammar.GrammarCompiler, request: bytes) -> bytes:
    """``request`` is the kind, a NUL, and the constraint's text."""
    kind, _, spec = request.decode("utf-8").partition("\0")
    if kind == "regex":
        compiled = compiler.compile_regex(spec)
    elif kind == "ebnf":
        compiled = compiler.compile_grammar(spec)
    else:
        compiled = compiler.compile_json_schema(json.loads(spec), any_whitespace=False,
                                                separators=COMPACT_SEPARATORS, strict_mode=True)
    return compiled.serialize_json().encode("utf-8")


if __name__ == "__main__":
    serve(setup, compile_constraint)
