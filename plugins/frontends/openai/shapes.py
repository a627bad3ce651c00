"""How chat and completions differ in their responses: the choice objects (whole and streamed)
and the logprobs format. Everything else about a response is shared (see ``routes``)."""

from __future__ import annotations

from typing import Any

from sglang_plugins.frontends.openai.generation import Choice, TokenLogprob


class CompletionShape:
    object = "text_completion"
    chunk_object = "text_completion"

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        """A streamed choice's first chunk, before any text (completions have none)."""
        return None

    def choice(self, choice: Choice) -> dict[str, Any]:
        return {"index": choice.index, "text": choice.text,
                "logprobs": self.logprobs(choice.token_logprobs) if choice.logprobs else None,
                "finish_reason": choice.finish_reason}

    def delta(self, choice: Choice, text: str | None, logprobs: list[TokenLogprob],
              finish_reason: str | None = None) -> dict[str, Any]:
        """A streamed piece: new text and its tokens' logprobs, or (text None) the finish."""
        return {"index": choice.index, "text": text or "", "logprobs": self.logprobs(logprobs) if logprobs else None,
                "finish_reason": finish_reason}

    @staticmethod
    def logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
        # As OpenAI does, a token's alternatives always include the token itself.
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else {**dict(e.top), e.token: e.logprob} for e in entries],
            "text_offset": [e.offset for e in entries],
        }


class ChatShape:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        return {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def choice(self, choice: Choice) -> dict[str, Any]:
        return {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                "logprobs": self.logprobs(choice.token_logprobs) if choice.logprobs else None,
                "finish_reason": choice.finish_reason}

    def delta(self, choice: Choice, text: str | None, logprobs: list[TokenLogprob],
              finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": choice.index, "delta": {} if text is None else {"content": text},
                "logprobs": self.logprobs(logprobs) if logprobs else None,
                "finish_reason": finish_reason}

    @staticmethod
    def logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
        def token(text: str, logprob: float) -> dict[str, Any]:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**token(e.token, e.logprob), "top_logprobs": [token(t, lp) for t, lp in e.top or ()]}
                            for e in entries]}
