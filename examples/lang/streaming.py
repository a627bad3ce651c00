"""Streaming: read the generated text piece by piece while the program runs."""

from __future__ import annotations

from typing import Any

import sglang_core as sgl


@sgl.function
def story(s, topic: str):
    s += sgl.user("Write one sentence about " + topic + ".")
    s += sgl.assistant(sgl.gen("sentence", max_tokens=24))


def main(backend: Any) -> dict:
    state = story.run(topic="the sea", backend=backend, stream=True, temperature=0)
    pieces = []
    for piece in state.text_iter("sentence"):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return {"pieces": pieces, "sentence": state["sentence"]}


if __name__ == "__main__":
    from _cli import run_example

    run_example(main, __doc__)
