"""An ``Engine`` from the engine flags of a ``sglang-core`` command, for the commands that run
one in-process (``generate`` in ``cli``, ``bench-latency`` and ``bench-offline`` in ``bench``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from sglang_core.config import EngineSettings

if TYPE_CHECKING:
    from sglang_core.engine import Engine


def engine_from_args(args: argparse.Namespace, **overrides: Any) -> Engine:
    """Flags (and, for those not given, env vars and defaults) -> a started ``Engine``."""
    from sglang_core.engine import Engine  # torch: only for the commands that build one

    return Engine(**EngineSettings.from_args(args, **overrides).model_dump(exclude_unset=True))
