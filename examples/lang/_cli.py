"""Shared command line of the examples: ``python examples/lang/<name>.py [--url URL]``.

Without ``--url`` an ``sgl.Runtime()`` (the default model) is started for the run."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

import sglang_core as sgl


def run_example(main: Callable[[Any], dict], description: str | None) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", help="a running `sglang-core serve` (default: start one)")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    if args.url:
        print(json.dumps(main(sgl.RuntimeEndpoint(args.url, api_key=args.api_key)), indent=2, default=str))
        return
    with sgl.Runtime() as runtime:
        print(json.dumps(main(runtime.endpoint), indent=2, default=str))
