"""The calibrated FP8 KV-cache scales a quantized checkpoint may carry (``kv_cache_scheme``), which
the engine does not read: the KV cache keeps the dtype ``--kv-cache-dtype`` gives it (by default
the model's), whose keys and values are at least as exact as the checkpoint's scaled e4m3 ones.

Names as the writers store them: llm-compressor ``<attention>.k_scale`` / ``.v_scale``; AutoFP8 and
older compressed-tensors the output scales of the k and v projections, ``k_proj.output_scale``;
older AutoFP8 one ``kv_scale``."""

from __future__ import annotations

import re

KV_CACHE_SCALE = re.compile(r".*\.(?:k_scale|v_scale|kv_scale|[kv]_proj\.output_scale)")


def is_kv_cache_scale(name: str) -> bool:
    return KV_CACHE_SCALE.fullmatch(name) is not None
