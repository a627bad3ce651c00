"""Tool use: the model picks a tool among fixed choices, and the program branches on it."""

from __future__ import annotations

from typing import Any

import sglang_core as sgl

TOOLS = ["calculator", "search engine"]


@sgl.function
def tool_use(s, question: str):
    s += "To answer this question: " + question + ", "
    s += "I need to use a " + sgl.gen("tool", choices=TOOLS) + ". "
    if s["tool"] == "calculator":
        s += "The math expression is " + sgl.gen("expression", max_tokens=12, stop="\n")
    else:
        s += "The key word to search is " + sgl.gen("word", max_tokens=8, stop="\n")


def main(backend: Any) -> dict:
    state = tool_use.run(question="What is 17 times 23?", backend=backend, temperature=0)
    detail = state["expression"] if state["tool"] == "calculator" else state["word"]
    return {"tool": state["tool"], "detail": detail, "scores": state.get_meta_info("tool")["scores"]}


if __name__ == "__main__":
    from _cli import run_example

    run_example(main, __doc__)
