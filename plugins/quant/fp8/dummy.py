"""Random FP8 weights for ``--load-format dummy`` (speed work on a config folder, no checkpoint).

The core's dummy init would fill an e4m3 weight with its float noise (std 0.02: a handful of e4m3's
subnormal codes) and the float32 scales with the same noise, negative or near zero, so it leaves
them to this module (``fp8_dummy_params``). Here, as a checkpoint's quantizer leaves them, the codes
use e4m3's range: a scale group of a few thousand
normal values has its largest about four standard deviations out, mapped to 448, so the codes are
normal with std ``CODE_STD`` = 448 / 4 (clamped to +-448: e4m3fn has no infinity, a cast past it
is NaN). Each scale (per tensor part, output row or block) is ``STD / CODE_STD * U(0.5, 1.5)``, so
the dequantized weights have about the core's float noise's std, 0.02, as a bf16 dummy model's do.
Static input scales let activations up to ``INPUT_RANGE`` through unclipped (normalized hidden
states have an RMS of one).
"""

from __future__ import annotations

import torch
from torch import nn

from sglang_plugins.quant.dummy import INPUT_RANGE, fill_positive_scales
from sglang_plugins.quant.fp8.e4m3 import FP8_MAX
from sglang_plugins.quant.fp8.scheme import Fp8Scheme

CODE_STD = FP8_MAX / 4


def fp8_dummy_params(stems: tuple[str, ...], scheme: Fp8Scheme) -> set[str]:
    """The parameters ``init_dummy_fp8`` draws for ``stems`` (``QuantMethod.own_dummy_params``)."""
    if scheme.weights == "online":
        return set()
    names = {"weight", scheme.weight_scale_name} | ({"input_scale"} if scheme.activations == "static" else set())
    return {stem + name for stem in stems for name in names}


def init_dummy_fp8(layer: nn.Module, stems: tuple[str, ...], scheme: Fp8Scheme, generator: torch.Generator) -> None:
    """Valid random e4m3 weights with positive scales in ``layer``'s ``<stem>weight`` and its scales
    (``<stem>weight_scale`` or, block-wise, ``<stem>weight_scale_inv`` or as the scheme names them;
    ``<stem>input_scale`` for static activations), for each stem (``""`` for a linear layer;
    ``"w13_"``, ``"w2_"`` for experts). Weights of a float checkpoint quantized at load (``online``)
    keep the core's float noise."""
    if scheme.weights == "online":
        return
    for stem in stems:
        weight = getattr(layer, f"{stem}weight")
        codes = torch.empty(weight.shape, device=weight.device).normal_(0.0, CODE_STD, generator=generator)
        weight.data.copy_(codes.clamp_(-FP8_MAX, FP8_MAX))
        fill_positive_scales(getattr(layer, f"{stem}{scheme.weight_scale_name}"), CODE_STD, generator)
        if scheme.activations == "static":
            getattr(layer, f"{stem}input_scale").data.fill_(INPUT_RANGE / FP8_MAX)
