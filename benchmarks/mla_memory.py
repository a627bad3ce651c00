"""Tokens the KV pool holds with Multi-head Latent Attention's layout (one latent of
``kv_lora_rank + qk_rope_head_dim`` values per token and layer) against the per-head K/V layout
the same model serves with ``--disable-mla`` (every head's key of ``qk_nope_head_dim +
qk_rope_head_dim`` and value of ``v_head_dim``, as transformers caches them).

The model plugin is built both ways on the meta device (no weights in memory), each build's
attention layers' specs are read as the runner reads them, and the pool's own sizing
(``TokenKVPool.bytes_per_token``) prices them, so each figure is what the engine would allocate
in ``--budget-gb`` served that way.

    python benchmarks/mla_memory.py --config benchmarks/configs/deepseek-v2-lite --budget-gb 80
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sglang_core.layers.attention import Attention, KVLayout
from sglang_core.layers.attention_spec import AttentionLayerSpec
from sglang_core.mem.kv_pool import TokenKVPool
from sglang_core.model_executor.model_api import ModelContext
from sglang_core.plugins import PluginManager
from sglang_core.weights.loader import load_config


def layer_specs(cls: type, config, dtype: torch.dtype, disable_mla: bool) -> list[AttentionLayerSpec]:
    """The attention layers' specs of the model built on the meta device, with or without ``--disable-mla``."""
    with torch.device("meta"):
        model = cls(config, ModelContext(dtype=dtype, disable_mla=disable_mla))
    return [m.spec for m in model.modules() if isinstance(m, Attention)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "deepseek-v2-lite"))
    parser.add_argument("--budget-gb", type=float, default=80.0, help="KV pool budget, GiB")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args()
    config = load_config(Path(args.config))
    dtype = getattr(torch, args.dtype)
    cls = PluginManager(None).registry("models").get(config.architectures[0]).load()
    latent, per_head = (layer_specs(cls, config, dtype, disable_mla) for disable_mla in (False, True))
    if not any(spec.kv_layout is KVLayout.LATENT for spec in latent):
        raise SystemExit(f"{args.config}: no attention layer of this model keeps latents")
    budget = args.budget_gb * 2**30
    print(f"{Path(args.config).name}: {len(latent)} layers, {args.dtype}, budget {args.budget_gb:g} GiB")
    for name, specs in (("latent (MLA)", latent), ("per-head K/V (--disable-mla)", per_head)):
        per_token = TokenKVPool.bytes_per_token(specs, dtype)
        print(f"  {name:28s} {specs[0].kv_values_per_token:6d} values/token/layer, {per_token / 1024:8.1f} KiB/token, "
              f"{int(budget // per_token):>12,d} tokens")
    ratio = TokenKVPool.bytes_per_token(per_head, dtype) / TokenKVPool.bytes_per_token(latent, dtype)
    print(f"  the latent layout holds {ratio:.2f}x the tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
