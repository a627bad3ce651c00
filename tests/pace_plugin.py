"""A test plugin (installed only for the tests' servers, see conftest's ``tiny_server``): a
request with ``custom_params={"pace_s": s}`` makes each step that samples it last at least
``s`` seconds, so a test knows the engine's cadence."""

from __future__ import annotations

import time

from sglang_core.hookspecs import hookimpl
from sglang_core.sampling.logits_processor import LogitsProcessor


class Pace(LogitsProcessor):
    def wants(self, params) -> bool:
        return bool(params.custom_params and "pace_s" in params.custom_params)

    def __call__(self, logits, batch, rows) -> None:
        time.sleep(max(batch.reqs[row].sampling_params.custom_params["pace_s"] for row in batch.host_rows(self)))


@hookimpl
def register_logits_processors(register) -> None:
    register("pace", Pace)
