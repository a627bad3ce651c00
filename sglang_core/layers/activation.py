"""Activations: the gated ``act(gate) * up`` layers and a lookup by Hugging Face ``hidden_act`` name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang_core.kernels import use_fused


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for a fused ``[gate | up]`` projection output."""

    # The activation's name as the kernels spell it (``kernels.fused``, ``kernels.fused_moe``).
    kernel_name = "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            from sglang_core.kernels.fused import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """``gelu(gate) * up`` for a fused ``[gate | up]`` projection output (GeGLU, as Gemma's MLP);
    ``approximate`` is ``"none"`` (erf) or ``"tanh"``, as in ``torch.nn.functional.gelu``."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate: must be 'none' or 'tanh', not {approximate!r}")
        self.approximate = approximate
        # The activation's name as the kernels spell it (``kernels.fused``, ``kernels.fused_moe``).
        self.kernel_name = "gelu_tanh" if approximate == "tanh" else "gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            from sglang_core.kernels.fused import gelu_and_mul

            return gelu_and_mul(x, self.approximate)
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up


class ActAndMul(nn.Module):
    """``act(gate) * up`` for a fused ``[gate | up]`` projection output, with any elementwise
    ``act`` (a ReLU-gated Llama, ...): the activations without a fused gated kernel."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up


class QuickGelu(nn.Module):
    """``x * sigmoid(1.702 x)`` (CLIP's and some early GPTs' GELU approximation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ReluSquared(nn.Module):
    """``relu(x) ** 2`` (Primer; Nemotron's MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(F.relu(x))


# The GELU tanh approximations Hugging Face spells three ways are one function; torch's fused
# kernel computes it in float32 with one rounding, where ``gelu_new``/``gelu_fast`` round after
# each op in the model dtype (equal in float32 up to float rounding).
_TANH_GELU_NAMES = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh")


def act_fn(hidden_act: str) -> nn.Module:
    """The elementwise activation a Hugging Face config's ``hidden_act`` names (a non-gated MLP:
    ``fc2(act(fc1(x)))`` as in GPT-J or Phi-2)."""
    if hidden_act in ("silu", "swish"):
        return nn.SiLU()
    if hidden_act in ("gelu", "gelu_python"):
        return nn.GELU()
    if hidden_act in _TANH_GELU_NAMES:
        return nn.GELU(approximate="tanh")
    if hidden_act == "quick_gelu":
        return QuickGelu()
    if hidden_act == "relu":
        return nn.ReLU()
    if hidden_act == "relu2":
        return ReluSquared()
    raise ValueError(f"hidden_act: {hidden_act!r} is not supported (supported: silu, swish, gelu, gelu_python, "
                     f"{', '.join(_TANH_GELU_NAMES)}, quick_gelu, relu, relu2)")


def gated_act_fn(hidden_act: str) -> nn.Module:
    """The gated layer ``act(gate) * up`` over a fused ``[gate | up]`` projection for a config's
    ``hidden_act`` (Llama-style MLPs): ``SiluAndMul`` or ``GeluAndMul``, fused on CUDA; any other
    activation ``act_fn`` knows as ``ActAndMul``."""
    if hidden_act in ("silu", "swish"):
        return SiluAndMul()
    if hidden_act in ("gelu", "gelu_python"):
        return GeluAndMul("none")
    if hidden_act in _TANH_GELU_NAMES:
        return GeluAndMul("tanh")
    return ActAndMul(act_fn(hidden_act))
