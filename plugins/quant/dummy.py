"""What ``--load-format dummy`` (random weights of a quantized config, for speed work) needs of every
quantization format: scales that give the dequantized weights about the std of the core's float
noise, static input scales that let normalized activations through, and valid group indices.

The core's dummy init leaves integer codes as random bits (uniform over the format's range: valid
codes) and every float, scales included, as normal noise of std ``STD``: scales negative or near
zero, so a weight of codes times scale is ``|code|`` times too large, and a ``g_idx`` of random
bits points past the groups. A method's ``init_dummy_weights`` fixes them with these helpers.
"""

from __future__ import annotations

import math

import torch

STD = 0.02  # the core's float dummy noise (sglang_core.weights.loader.init_dummy_weights)
INPUT_RANGE = 8.0  # static input scales pass activations up to this (normalized hidden states have RMS one)


def uniform_code_std(bits: int, random_zero_point: bool) -> float:
    """The std of ``q - z`` for codes ``q`` uniform over ``2^bits`` values (random bits) and a zero
    point ``z`` that is uniform too (``random_zero_point``) or a constant."""
    variance = ((1 << bits) ** 2 - 1) / 12
    return math.sqrt(2 * variance if random_zero_point else variance)


def fill_positive_scales(scale: torch.Tensor, code_std: float, generator: torch.Generator) -> None:
    """Each scale ``STD / code_std * U(0.5, 1.5)``: weights of codes of std ``code_std`` come out
    with about ``STD``, varying somewhat from scale group to scale group as a quantizer's do."""
    factors = torch.empty(scale.shape, device=scale.device).uniform_(0.5, 1.5, generator=generator)
    scale.data.copy_(factors * (STD / code_std))


def fill_group_index(g_idx: torch.Tensor, groups: int, group_size: int | None, act_order: bool,
                     generator: torch.Generator) -> None:
    """Each input feature's group along ``g_idx``'s last dim (leading dims: experts, parts): in order
    (``k // group_size``; one group when None), or with ``act_order`` the ``groups`` groups spread
    evenly over the features in a random order, as activation-order quantization assigns them."""
    inputs = g_idx.shape[-1]
    features = torch.arange(inputs, device=g_idx.device)
    if not act_order:
        in_order = features // group_size if group_size is not None else torch.zeros_like(features)
        g_idx.data.copy_(in_order.expand(g_idx.shape))
        return
    spread = features * groups // inputs
    for row in g_idx.data.reshape(-1, inputs):
        order = torch.randperm(inputs, device=g_idx.device, generator=generator)
        row.copy_(spread[order])
