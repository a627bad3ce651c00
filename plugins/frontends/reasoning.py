"""Reasoning output (``--reasoning-parser``): models that think before they answer write the
thinking between ``<think>`` and ``</think>``; the frontends return it apart from the answer
(OpenAI's ``reasoning_content``, Anthropic's ``thinking`` blocks).

Fed the output in increments, the parser holds back a trailing part that may still become a
tag, so the streamed reasoning and content equal those of the whole output however it is cut."""

from __future__ import annotations

from dataclasses import dataclass

from sglang_core.server.tool_parser import partial_tag_length

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    # The chat template opens the thinking in the prompt (DeepSeek-R1), so the output begins
    # inside it; otherwise the output begins with ``<think>`` when the model thinks (Qwen3).
    opened_by_template: bool

    def output_reasons(self, prompt: str) -> bool:
        """Whether an output after ``prompt`` begins with reasoning (where a constraint must wait
        for its end): always when the template opens it; otherwise unless the prompt itself
        closed the thinking (Qwen3's ``enable_thinking=False`` renders an empty think block)."""
        return self.opened_by_template or not prompt.rstrip().endswith(END)


FORMATS = {f.name: f for f in (ReasoningFormat("deepseek-r1", True), ReasoningFormat("qwen3", False))}


def reasoning_format(name: str | None) -> ReasoningFormat | None:
    """``--reasoning-parser``: a name of ``FORMATS`` -> its format; None -> None."""
    if name is None:
        return None
    if name not in FORMATS:
        raise ValueError(f"reasoning_parser: unknown parser {name!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


class ReasoningParser:
    """Splits one output into reasoning and the rest (``feed`` / ``finish`` -> (reasoning, rest))."""

    def __init__(self, fmt: ReasoningFormat):
        self._held = ""
        self._state = "start"  # start: a <think> may still open the output; then reasoning, then answer
        self._opened = fmt.opened_by_template

    def feed(self, text: str) -> tuple[str, str]:
        self._held += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning = answer = ""
        if self._state == "start":
            head = self._held.lstrip()
            if head.startswith(START):
                self._held, self._state = head[len(START):], "reasoning"
            elif START.startswith(head) and not final:
                return "", ""  # may still be the opening tag
            else:
                self._state = "reasoning" if self._opened else "answer"
        if self._state == "reasoning":
            i = self._held.find(END)
            if i < 0:
                keep = 0 if final else partial_tag_length(self._held, (END,))
                reasoning, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
                return reasoning, ""
            reasoning, self._held, self._state = self._held[:i], self._held[i + len(END):], "after"
        if self._state == "after":  # the whitespace between the thinking and the answer is layout
            self._held = self._held.lstrip()
            if not self._held and not final:
                return reasoning, ""
            self._state = "answer"
        answer, self._held = self._held, ""
        return reasoning, answer

