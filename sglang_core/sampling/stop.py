"""Incremental detokenization and stop conditions (stop tokens, stop strings, length)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sglang_core.sampling.params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# What a byte-level tokenizer decodes an incomplete UTF-8 sequence to.
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Each step decodes only a window: the tokens of the previous delta (as context, so that
    merges and leading-space rules come out as in a full decode) plus the new tokens, and emits
    the part past the context. While the window's text ends in U+FFFD a multi-byte character is
    still incomplete, so nothing is emitted and the window grows until it completes.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: context tokens, already emitted
        self._read_offset = 0  # tokens before this are emitted
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    def push(self, new_ids: list[int]) -> str:
        """Append tokens; return the newly completed text (possibly "")."""
        self._ids.extend(new_ids)
        return self._advance(force=False)

    def flush(self) -> str:
        """Emit whatever is held back, even an incomplete character (call once generation ended)."""
        return self._advance(force=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def _advance(self, force: bool) -> str:
        context = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        if len(window) <= len(context) or (window.endswith(REPLACEMENT_CHAR) and not force):
            return ""
        delta = window[len(context) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._text += delta
        return delta


class StopChecker:
    """Decides, token by token, whether a request has finished, with SGLang's finish reasons.

    Stop tokens (EOS unless ``ignore_eos``, and ``stop_token_ids``) and stop strings only count
    once ``min_new_tokens`` tokens have been generated: a stop token must not be among the first
    ``min_new_tokens`` tokens, and a stop string must end in text decoded after them. Stop
    strings are matched in the decoded text, so across token boundaries; the detokenizer never
    emits part of a character, so a half-formed character never matches. A matched stop token is
    the last output id; the caller drops it before decoding (as SGLang does).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: SamplingParams, eos_token_ids: set[int]):
        self.params = params
        self._stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            self._stop_ids |= set(eos_token_ids)
        self._stops: list[str] = list(params.stop or ())
        self._max_stop_len = max(map(len, self._stops), default=0)
        # Text is decoded only when some stop string needs it.
        self._detokenizer = (
            IncrementalDetokenizer(tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens)
            if self._stops
            else None
        )
        self._num_checked = 0
        self._cut: int | None = None  # where the returned text ends once a stop string matched
        self.finished_reason: dict[str, Any] | None = None

    def check(self, output_ids: list[int]) -> dict[str, Any] | None:
        """Call after appending tokens to ``output_ids``; return the finish reason or None."""
        while self.finished_reason is None and self._num_checked < len(output_ids):
            index = self._num_checked
            self._num_checked += 1
            self.finished_reason = self._check_token(output_ids[index], counts=index >= self.params.min_new_tokens)
        if self.finished_reason is None and len(output_ids) >= self.params.max_new_tokens:
            self.finished_reason = {"type": "length", "length": self.params.max_new_tokens}
        return self.finished_reason

    def _check_token(self, token: int, counts: bool) -> dict[str, Any] | None:
        if counts and token in self._stop_ids:
            return {"type": "stop", "matched": token}
        if self._detokenizer is None:
            return None
        scanned = len(self._detokenizer.text)
        self._detokenizer.push([token])
        if not counts:
            return None
        text = self._detokenizer.text
        # A new match must end in the new text, so only its last len(stop) - 1 predecessors matter.
        found = [(text.find(s, max(0, scanned - len(s) + 1)), s) for s in self._stops]
        found = [(start, s) for start, s in found if start >= 0]
        if not found:
            return None
        self._cut, matched = min(found, key=lambda m: m[0])
        return {"type": "stop", "matched": matched}

    def visible_text(self, text: str) -> str:
        """The output text to return: ``text`` cut just before the matched stop string, if any.

        ``text`` is the output decoded with this request's ``skip_special_tokens`` settings.
        """
        return text if self._cut is None else text[: self._cut]

    def safe_prefix_len(self, text: str) -> int:
        """How much of ``text`` a stream may show now: it holds back a suffix that could still grow
        into a stop string, and everything from a matched one on."""
        if self._cut is not None:
            return min(self._cut, len(text))
        for size in range(min(self._max_stop_len - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(len(s) > size and s.startswith(tail) for s in self._stops):
                return len(text) - size
        return len(text)
