"""Roles three ways: sgl.user(...), `with s.user():` blocks, and user_begin()/user_end()."""

from __future__ import annotations

from typing import Any

import sglang_core as sgl


@sgl.function
def roles(s, question: str):
    s += sgl.system("You answer in a few words.")
    with s.user():
        s += question
    s += sgl.assistant_begin()
    s += sgl.gen("answer", max_tokens=16)
    s += sgl.assistant_end()
    s += sgl.user_begin() + "Thank you!" + sgl.user_end()


def main(backend: Any) -> dict:
    state = roles.run(question="What colour is the sky on a clear day?", backend=backend, temperature=0)
    return {"answer": state["answer"], "messages": state.messages(), "text": state.text()}


if __name__ == "__main__":
    from _cli import run_example

    run_example(main, __doc__)
