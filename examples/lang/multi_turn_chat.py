"""A multi-turn chat: each assistant turn is generated, then the conversation goes on."""

from __future__ import annotations

from typing import Any

import sglang_core as sgl


@sgl.function
def multi_turn_question(s, question_1: str, question_2: str):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1", max_tokens=24))
    s += sgl.user(question_2)
    s += sgl.assistant(sgl.gen("answer_2", max_tokens=24))


def main(backend: Any) -> dict:
    state = multi_turn_question.run(question_1="What is the capital of France?",
                                    question_2="And what is the capital of Italy?", backend=backend, temperature=0)
    return {"answer_1": state["answer_1"], "answer_2": state["answer_2"], "messages": state.messages()}


if __name__ == "__main__":
    from _cli import run_example

    run_example(main, __doc__)
