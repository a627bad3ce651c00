"""Each token id's bytes, as a grammar engine needs them, read from a local tokenizer (no hub)."""

from __future__ import annotations

import json
import re
from functools import lru_cache

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character each byte is written as, reversed."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    return "ByteLevel" in kinds


def _special_token_ids(tokenizer) -> set[int]:
    """The ids of special tokens: the named ones (EOS, BOS, ...) and every added token marked
    special. Detokenizing skips them, so a grammar must never take them for text."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
    """The bytes each token id stands for; None for special tokens and ids the tokenizer lacks."""
    special = _special_token_ids(tokenizer)
    byte_level = _is_byte_level(tokenizer)
    decoder = _byte_level_decoder()
    out: list[bytes | None] = []
    for token_id in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
        if token is None or token_id in special:
            out.append(None)
        elif byte_level:
            out.append(bytes(decoder[c] for c in token) if all(c in decoder for c in token) else token.encode())
        elif (match := _BYTE_TOKEN.fullmatch(token)) is not None:  # sentencepiece byte fallback
            out.append(bytes([int(match.group(1), 16)]))
        else:
            out.append(token.replace("\u2581", " ").encode())  # sentencepiece's word-start marker
    return out
