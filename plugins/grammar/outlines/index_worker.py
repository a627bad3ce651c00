"""The outlines backend's compile process (``python -m``, see
``sglang_core.constrained.worker_process``): set up with the vocabulary, it turns each regex into
an ``Index`` and sends it back in outlines-core's own binary form, which ``Index.from_binary``
reads (bincode into Rust structures: no pickle)."""

from __future__ import annotations

from outlines_core import Index, Vocabulary

from sglang_core.constrained.worker_process import serve


def binary_form(value: Index | Vocabulary) -> bytes:
    """The bytes ``type(value).from_binary`` reads back: outlines-core offers them only through
    its pickle support (``__reduce__``), which is all this uses of it."""
    rebuild, (data,) = value.__reduce__()
    if rebuild != type(value).from_binary or not isinstance(data, bytes):
        raise RuntimeError(f"outlines-core's {type(value).__name__} has no binary form here")
    return data


def build_index(vocabulary: Vocabulary, regex: bytes) -> bytes:
    return binary_form(Index(regex.decode("utf-8"), vocabulary))


if __name__ == "__main__":
    serve(Vocabulary.from_binary, build_index)
