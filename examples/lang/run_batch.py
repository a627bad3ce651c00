"""run_batch: one program over many inputs at once, results in input order."""

from __future__ import annotations

from typing import Any

import sglang_core as sgl

QUESTIONS = ["What is the capital of France?", "What is the capital of Japan?", "What is the capital of Egypt?"]


@sgl.function
def text_qa(s, question: str):
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", stop="\n", max_tokens=12)


def main(backend: Any) -> dict:
    states = text_qa.run_batch([{"question": q} for q in QUESTIONS], backend=backend, temperature=0,
                               num_threads=len(QUESTIONS))
    return {"questions": QUESTIONS, "answers": [s["answer"] for s in states], "texts": [s.text() for s in states]}


if __name__ == "__main__":
    from _cli import run_example

    run_example(main, __doc__)
