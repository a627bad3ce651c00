"""Random ggml blocks for ``--load-format dummy`` (speed work on a config folder, no checkpoint).

The quants and the 6-bit / int8 sub-block scales are random bytes, all of them valid; the f16
fields (``d``, and ``dmin`` / ``m``) are written, since random bits there are inf or NaN one time in
32 and otherwise span 6e-8 to 65504 in size. Each block's ``d`` is ``STD / spread * U(0.5, 1.5)``, where
``spread`` is the standard deviation of a value over ``d`` when the bytes are uniform, so values
come out with about the standard deviation of the core's float noise (0.02). The offsets (Q4_1's
``m``, K-quants' ``dmin``) are the quants' mean times ``d``, centring a block of middling sub-scales
on zero, as a quantizer's minimum does.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from sglang_plugins.quant.gguf.blocks import BLOCKS, row_bytes, type_name

STD = 0.02  # the core's float dummy noise (sglang_core.weights.loader.init_dummy_weights)

# ggml type -> (byte offset of d, byte offset of the offset field or None, the offset over d, spread).
# Spreads, with q, sc, m uniform over their ranges: Q4_0 std(q - 8); Q4_1 std(q); Q8_0 std(int8);
# Q4_K / Q5_K std(sc * q - mean(q) * m) for 6-bit sc, m and 4- / 5-bit q; Q6_K std(sc * (q - 32))
# for an int8 sc and a 6-bit q.
F16_FIELDS: dict[int, tuple[int, int | None, float, float]] = {
    T.Q4_0: (0, None, 0.0, 4.64),
    T.Q4_1: (0, 2, -7.5, 4.61),
    T.Q8_0: (0, None, 0.0, 73.9),
    T.Q4_K: (0, 2, 7.5, 258.0),
    T.Q5_K: (0, 2, 15.5, 527.0),
    T.Q6_K: (208, None, 0.0, 1366.0),
}
DUMMY_TYPES = tuple(type_name(t) for t in F16_FIELDS)


def dummy_type(name: object) -> int:
    """The ggml type ``quantization_config.dummy_ggml_type`` names; ValueError naming the field."""
    types = {type_name(t): t for t in F16_FIELDS}
    if name not in types:
        raise ValueError(f"quantization_config.dummy_ggml_type: {name!r} is not one of {', '.join(DUMMY_TYPES)} "
                         "(dummy GGUF weights need the block type to fill the linear layers with)")
    return int(types[name])


def random_blocks(ggml_type: int, rows: int, features: int, generator: torch.Generator) -> torch.Tensor:
    """``[rows, row_bytes]`` uint8 of valid random ``ggml_type`` blocks, on ``generator``'s device."""
    width = row_bytes(ggml_type, features)
    values, nbytes, _ = BLOCKS[ggml_type]
    device = generator.device
    blocks = torch.randint(0, 256, (rows * width // nbytes, nbytes), dtype=torch.uint8, device=device,
                           generator=generator)
    d_at, offset_at, offset_per_d, spread = F16_FIELDS[ggml_type]
    d = torch.empty(len(blocks), 1, device=device).uniform_(0.5, 1.5, generator=generator) * (STD / spread)
    fields = [(d_at, d)] + ([] if offset_at is None else [(offset_at, d * offset_per_d)])
    for at, value in fields:
        blocks[:, at:at + 2] = value.half().view(torch.uint8)
    return blocks.view(rows, width)
