"""Fork: expand two tips in parallel branches that share the prompt, then join them."""

from __future__ import annotations

from typing import Any

import sglang_core as sgl


@sgl.function
def tip_suggestion(s):
    s += ("Here are two tips for staying healthy: "
          "1. Balanced Diet. 2. Regular Exercise.\n\n")
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Now, expand tip {i + 1} into a paragraph:\n"
        f += sgl.gen("detail", max_tokens=24, stop="\n\n")
    s += "Tip 1:" + forks[0]["detail"] + "\n"
    s += "Tip 2:" + forks[1]["detail"] + "\n"
    s += "In summary" + sgl.gen("summary", max_tokens=16)


def main(backend: Any) -> dict:
    state = tip_suggestion.run(backend=backend, temperature=0)
    return {"text": state.text(), "summary": state["summary"]}


if __name__ == "__main__":
    from _cli import run_example

    run_example(main, __doc__)
