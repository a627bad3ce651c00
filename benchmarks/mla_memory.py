"""Tokens the KV pool holds with Multi-head Latent Attention's layout (one latent of
``kv_lora_rank + qk_rope_head_dim`` values per token and layer) against a per-head K/V layout of
the same model (every head's key of ``qk_nope_head_dim + qk_rope_head_dim`` and value of
``v_head_dim``, as transformers' cache keeps them).

The model plugin is built on the meta device (no weights in memory), its attention layers' specs
are read as the runner reads them, and the pool's own sizing (``TokenKVPool.bytes_per_token``)
prices both layouts, so the figure is what the engine would allocate in ``--budget-gb``.

    python benchmarks/mla_memory.py --config benchmarks/configs/deepseek-v2-lite --budget-gb 80
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from sglang_core.layers.attention import Attention, KVLayout
from sglang_core.layers.attention_spec import AttentionLayerSpec
from sglang_core.mem.kv_pool import TokenKVPool
from sglang_core.model_executor.model_api import ModelContext
from sglang_core.plugins import PluginManager
from sglang_core.weights.loader import load_config


def per_head_spec(spec: AttentionLayerSpec, config) -> AttentionLayerSpec:
    """The layer's K/V as transformers caches them: every head's rotary+non-rotary key and value."""
    return dataclasses.replace(spec, num_kv_heads=spec.num_heads, kv_layout=KVLayout.SEPARATE,
                               head_dim=config.qk_nope_head_dim + config.qk_rope_head_dim,
                               v_head_dim=config.v_head_dim)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "deepseek-v2-lite"))
    parser.add_argument("--budget-gb", type=float, default=80.0, help="KV pool budget, GiB")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args()
    config = load_config(Path(args.config))
    dtype = getattr(torch, args.dtype)
    models = PluginManager(None).registry("models")
    cls = models.get(config.architectures[0]).load()
    with torch.device("meta"):
        model = cls(config, ModelContext(dtype=dtype))
    latent = [m.spec for m in model.modules() if isinstance(m, Attention)]
    if not any(spec.kv_layout is KVLayout.LATENT for spec in latent):
        raise SystemExit(f"{args.config}: no attention layer of this model keeps latents")
    per_head = [per_head_spec(spec, config) if spec.kv_layout is KVLayout.LATENT else spec for spec in latent]
    budget = args.budget_gb * 2**30
    print(f"{Path(args.config).name}: {len(latent)} layers, {args.dtype}, budget {args.budget_gb:g} GiB")
    for name, specs in (("latent (MLA)", latent), ("per-head K/V", per_head)):
        per_token = TokenKVPool.bytes_per_token(specs, dtype)
        print(f"  {name:13s} {specs[0].kv_values_per_token:6d} values/token/layer, {per_token / 1024:8.1f} KiB/token, "
              f"{int(budget // per_token):>12,d} tokens")
    ratio = TokenKVPool.bytes_per_token(per_head, dtype) / TokenKVPool.bytes_per_token(latent, dtype)
    print(f"  the latent layout holds {ratio:.2f}x the tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
