"""What an attention layer declares about itself, and what a backend is built for.

A model never tells the engine its KV cache's shape through config fields: each of its
``Attention`` layers carries an ``AttentionLayerSpec``, the runner collects them from the built
model, sizes the KV pool from them and hands them to the attention backend, which accepts the
model or refuses it with ``UnsupportedSpecError``. This module imports nothing from the core, so
the pool, the layers and every backend can share it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class KVLayout(enum.Enum):
    """How a layer's keys and values are kept per token."""

    # A key [num_kv_heads, head_dim] and a value [num_kv_heads, v_head_dim], stored apart.
    SEPARATE = "separate"
    # One vector [head_dim] per token (num_kv_heads is 1): the key is all of it and the value its
    # first v_head_dim entries. Multi-head Latent Attention keeps its compressed latent this way.
    LATENT = "latent"


class UnsupportedSpecError(ValueError):
    """Raised by a backend's ``__init__`` for shapes, layouts or dtypes it has no kernels for;
    ``auto`` then takes the next backend by priority, an explicit choice reports it."""


@dataclass(frozen=True)
class AttentionLayerSpec:
    """One attention layer as this rank runs it. Hashable: layers with equal specs can share a
    backend's per-batch plan."""

    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (1 for LATENT)
    head_dim: int  # width of each query and key head
    v_head_dim: int  # width of each value head, and so of each output head
    scaling: float  # softmax scale applied to q.k
    sliding_window: int | None = None  # a query at position p sees keys at positions > p - window
    logit_cap: float | None = None  # soft-capping: logits become cap * tanh(logits / cap)
    kv_layout: KVLayout = KVLayout.SEPARATE

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim", "v_head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads: {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window: must be positive or None, got {self.sliding_window}")
        if self.logit_cap is not None and not self.logit_cap > 0:
            raise ValueError(f"logit_cap: must be positive or None, got {self.logit_cap}")
        if self.kv_layout is KVLayout.LATENT and (self.num_kv_heads != 1 or self.v_head_dim > self.head_dim):
            raise ValueError("kv_layout: a latent layout has one KV head and a value no wider than its key, got "
                             f"{self.num_kv_heads} heads, key {self.head_dim}, value {self.v_head_dim}")

    @property
    def kv_values_per_token(self) -> int:
        """Numbers stored in the KV pool per token for this layer."""
        if self.kv_layout is KVLayout.LATENT:
            return self.head_dim
        return self.num_kv_heads * (self.head_dim + self.v_head_dim)


def _largest(field: str) -> property:
    """A property: ``field``'s largest value over the spec's layers."""
    return property(lambda spec: max(getattr(layer, field) for layer in spec.layers))


@dataclass(frozen=True)
class AttentionSpec:
    """What an attention backend is built for: every layer's spec (index = layer id) and the
    model-wide settings."""

    layers: tuple[AttentionLayerSpec, ...]
    dtype: torch.dtype  # compute dtype of q, k, v and the output
    device: torch.device
    max_batch_size: int = 256  # most requests in one batch (sizes per-batch work space once)
    cascade_decode: bool = False  # decode reads each ForwardBatch.shared_prefixes group's prefix once
    kv_dtype: torch.dtype | None = None  # the pool's K/V element type (FP8 may be narrower); None: ``dtype``

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("layers: a model needs at least one attention layer")

    # The largest of each width over the layers: what a backend sizes its work space for.
    num_heads = _largest("num_heads")
    num_kv_heads = _largest("num_kv_heads")
    head_dim = _largest("head_dim")
    v_head_dim = _largest("v_head_dim")

    def distinct(self) -> set[AttentionLayerSpec]:
        """The kinds of layer in the model (a backend checks each kind once)."""
        return set(self.layers)


@dataclass(frozen=True)
class HeadShape:
    """A transformer's attention heads as its Hugging Face config states them (all ranks): the
    one place that reads them, so a missing field means the same thing in every model."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "HeadShape":
        """``num_attention_heads``; ``num_key_value_heads`` (absent: one per query head, i.e. no
        GQA); ``head_dim`` (absent or null: ``hidden_size // num_attention_heads``)."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None)
        if head_dim is None:
            if config.hidden_size % heads:
                raise ValueError(f"head_dim: the config has none and hidden_size {config.hidden_size} is not a "
                                 f"multiple of num_attention_heads {heads}")
            head_dim = config.hidden_size // heads
        if heads % kv_heads:
            raise ValueError(f"num_key_value_heads: {kv_heads} does not divide num_attention_heads {heads}")
        return cls(heads, kv_heads, head_dim)
