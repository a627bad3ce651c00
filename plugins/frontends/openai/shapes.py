"""How chat and completions differ in their responses: the choice objects (whole and streamed)
and the logprobs format. Everything else about a response is shared (see ``routes``)."""

from __future__ import annotations

from typing import Any

from sglang_plugins.frontends.openai.generation import Choice, Delta, TokenLogprob


class _Shape:
    def deltas(self, choice: Choice, delta: Delta) -> list[dict[str, Any]]:
        """The streamed choice objects one engine chunk gives: new text, then the finish."""
        out = [self.delta(choice, delta.text, delta.logprobs)] if delta.text or delta.logprobs else []
        if delta.finish_reason is not None:
            out.append(self.delta(choice, None, [], delta.finish_reason))
        return out


class CompletionShape(_Shape):
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


class ChatShape(_Shape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        return {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def choice(self, choice: Choice) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        if choice.message is not None:  # as OpenAI: no content but calls is a null content
            message["content"] = choice.content or (None if choice.tool_calls else "")
            if choice.reasoning:
                message["reasoning_content"] = choice.reasoning
            if choice.tool_calls:
                message["tool_calls"] = [{"id": id_, "type": "function",
                                          "function": {"name": call.name, "arguments": call.arguments}}
                                         for id_, call in choice.tool_calls]
        return {"index": choice.index, "message": message,
                "logprobs": self.logprobs(choice.token_logprobs) if choice.logprobs else None,
                "finish_reason": choice.finish_reason}

    def deltas(self, choice: Choice, delta: Delta) -> list[dict[str, Any]]:
        """A parsed message streams its reasoning, content and calls as OpenAI does: a call's first
        delta has its index, id, type, name and empty arguments, the next ones its arguments as
        they are written."""
        if delta.piece is None:
            return super().deltas(choice, delta)
        bodies: list[dict[str, Any]] = []
        if delta.piece.reasoning:
            bodies.append({"reasoning_content": delta.piece.reasoning})
        if delta.piece.content:
            bodies.append({"content": delta.piece.content})
        for part in delta.piece.deltas:
            if part.name is not None:
                bodies.append({"tool_calls": [{"index": part.index, "id": choice.call_ids[part.index],
                                               "type": "function", "function": {"name": part.name, "arguments": ""}}]})
            if part.arguments:
                bodies.append({"tool_calls": [{"index": part.index, "function": {"arguments": part.arguments}}]})
        if not bodies and delta.logprobs:  # tokens still held back by the parser
            bodies.append({"content": ""})
        out = [{"index": choice.index, "delta": body, "logprobs": self.logprobs(delta.logprobs)
                if delta.logprobs and i == 0 else None, "finish_reason": None} for i, body in enumerate(bodies)]
        if delta.finish_reason is not None:
            out.append(self.delta(choice, None, [], delta.finish_reason))
        return out

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
