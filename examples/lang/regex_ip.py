"""Constrained decoding with a regex: the output is a well-formed IPv4 address."""

from __future__ import annotations

from typing import Any

import sglang_core as sgl

OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IP_REGEX = rf"{OCTET}\.{OCTET}\.{OCTET}\.{OCTET}"


@sgl.function
def regex_gen(s):
    s += "Q: What is the IP address of the Google DNS servers?\n"
    s += "A: " + sgl.gen("answer", temperature=0, regex=IP_REGEX, max_tokens=20)


def main(backend: Any) -> dict:
    state = regex_gen.run(backend=backend)
    return {"answer": state["answer"]}


if __name__ == "__main__":
    from _cli import run_example

    run_example(main, __doc__)
