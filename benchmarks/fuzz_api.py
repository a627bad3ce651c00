"""Fuzz a server's API from its own OpenAPI document, longer than the test suite does
(``tests/test_api_fuzz.py``): request bodies drawn from the documented schemas, every answer
checked against them, then one normal request and the KV memory checked whole.

    python benchmarks/fuzz_api.py --cases 20000                      # starts a server of the default model
    python benchmarks/fuzz_api.py --cases 5000 --url http://127.0.0.1:30000 --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from api_fuzz import GENERATED_TOKENS, fuzz, wait_until_memory_whole  # noqa: E402
from server_util import running_server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=5000, help="requests to draw, over all routes")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (another seed, other cases)")
    parser.add_argument("--url", help="a running server (default: start one of the default model)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(running_server()).url
        start = time.monotonic()
        report = fuzz(url, args.cases, args.seed)
        elapsed = time.monotonic() - start
        for (operation, status), count in sorted(report.cases.items()):
            print(f"{count:7d}  {status}  {report.seconds[operation, status]:6.1f} s  {operation}")
        print(f"{report.total} cases in {elapsed:.1f} s; {len(report.failures)} failures")
        for failure in report.failures:
            print("FAIL", failure)
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": GENERATED_TOKENS},
                            timeout=60)
        print("a normal request afterwards:", answer.status_code)
        print("memory:", wait_until_memory_whole(url))
        return 1 if report.failures or answer.status_code != 200 else 0


if __name__ == "__main__":
    sys.exit(main())
