"""A model that declares a KV layout no built-in model uses runs end to end, as a plugin.

``tests/kv_layout_models.py`` is installed as a third-party plugin (a fake distribution's entry
point). Its layers declare value heads wider than key heads, or one latent vector per token. The
engine must size its pool from those declarations, serve the model token for token like the same
network written out here in float64 (prefix-cache hits, chunked prefill, batched decode), give
back every slot, and a backend without kernels for the layout must refuse it by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from reference import byte_level_tokenizer
from sglang_core.engine import Engine

VOCAB = 259
CONFIG = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=24, v_head_dim=40, rotary_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6,
              max_position_embeddings=256, model_type="llama", tie_word_embeddings=False)
ARCHS = {"wide_value": "KVLayoutWideValueForCausalLM", "latent": "KVLayoutLatentForCausalLM"}
LATENT_V = 16  # the latent model reads its 24-wide latent's first 16 values as the value
KV_BUDGET_GB = 2e-4  # small, so the pool's token count shows what one token costs


@pytest.fixture(scope="module")
def plugin_installed(tmp_path_factory) -> None:
    """The test model as a third-party distribution: an entry point on sys.path."""
    site = tmp_path_factory.mktemp("site")
    info = site / "kv_layout_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kv-layout-models\nVersion: 0.1\n")
    # A second plugin registers FlashInfer's backend as available anywhere, first in line for
    # ``auto``: it has no kernels for these layouts and must step aside (it refuses before it
    # imports FlashInfer, so this runs without a GPU).
    (site / "kv_layout_refuser.py").write_text(
        "from sglang_core.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def register_attention_backends(register):\n"
        "    register('refuser', 'sglang_plugins.attention.flashinfer.backend:FlashInferBackend', priority=1000)\n")
    (info / "entry_points.txt").write_text(
        "[sglang_core.plugins]\nkv_layouts = kv_layout_models\nkv_layout_refuser = kv_layout_refuser\n")
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(site))
    yield
    mp.undo()


def weights_for(kind: str, seed: int) -> dict[str, torch.Tensor]:
    c = CONFIG
    g = torch.Generator().manual_seed(seed)
    hidden, heads, d = c["hidden_size"], c["num_attention_heads"], c["head_dim"]
    kv_heads = 1 if kind == "latent" else c["num_key_value_heads"]
    dv = LATENT_V if kind == "latent" else c["v_head_dim"]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    w = {"embed_tokens.weight": rand(VOCAB, hidden), "norm.weight": 1 + rand(hidden) * 0.3,
         "lm_head.weight": rand(VOCAB, hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}."
        w |= {p + "norm.weight": 1 + rand(hidden) * 0.3, p + "q_proj.weight": rand(heads * d, hidden),
              p + "k_proj.weight": rand(kv_heads * d, hidden), p + "o_proj.weight": rand(hidden, heads * dv)}
        if kind != "latent":
            w[p + "v_proj.weight"] = rand(kv_heads * dv, hidden)
    return w


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request, tmp_path_factory) -> tuple[str, Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    config = dict(CONFIG, architectures=[ARCHS[kind]])
    if kind == "latent":
        config["v_head_dim"] = LATENT_V
    (folder / "config.json").write_text(json.dumps(config))
    weights = weights_for(kind, seed=len(kind))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    byte_level_tokenizer().save_pretrained(folder)
    return kind, folder, weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + CONFIG["rms_norm_eps"])


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary (rotate-half layout) on the first rotary_dim dims of x [T, heads, dim]."""
    r = CONFIG["rotary_dim"]
    inv_freq = 1.0 / CONFIG["rope_theta"] ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    x1, x2 = x[..., :r // 2], x[..., r // 2:r]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., r:]], dim=-1)


def reference_logits(kind: str, w: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """The network in float64 over the whole sequence: causal attention, keys rotated, values
    from v_proj (or the latent's first LATENT_V values)."""
    c = CONFIG
    w = {k: v.double() for k, v in w.items()}
    n, heads, d = len(ids), c["num_attention_heads"], c["head_dim"]
    positions = torch.arange(n)
    h = w["embed_tokens.weight"][ids]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "norm.weight"])
        q = rotate((x @ w[p + "q_proj.weight"].T).view(n, heads, d), positions)
        k = rotate((x @ w[p + "k_proj.weight"].T).view(n, -1, d), positions)
        v = k[..., :LATENT_V] if kind == "latent" else (x @ w[p + "v_proj.weight"].T).view(n, k.shape[1], -1)
        group = heads // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        h = h + torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1) @ w[p + "o_proj.weight"].T
    return rms_norm(h, w["norm.weight"]) @ w["lm_head.weight"].T


def reference_greedy(kind: str, w: dict[str, torch.Tensor], prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(reference_logits(kind, w, ids)[-1].argmax()))
    return ids[len(prompt):]


def test_serves_the_layout_token_for_token(plugin_installed, model) -> None:
    pytest.importorskip("triton")  # the refusing backend's module imports it
    kind, folder, weights = model
    prompts = [[5, 17, 88, 3, 41, 9, 120, 33, 7, 64, 200, 18, 2, 99],
               [5, 17, 88, 3, 41, 9, 120, 33, 7, 64, 11, 150],  # shares 10 tokens with the first
               [250, 1, 77]]
    steps = 10
    with Engine(str(folder), device="cpu", chunked_prefill_size=8, kv_cache_memory_gb=KV_BUDGET_GB) as engine:
        assert engine.info.attention_backend == "torch_native"  # the refuser stepped aside
        first = engine.generate(input_ids=prompts[0], sampling_params={"temperature": 0, "max_new_tokens": steps,
                                                                      "ignore_eos": True})
        rest = engine.generate(input_ids=prompts[1:], sampling_params={"temperature": 0, "max_new_tokens": steps,
                                                                      "ignore_eos": True})
        outs = [first, *rest]
        assert outs[1]["meta_info"]["cached_tokens"] >= 8  # the shared prefix came from the cache
        for prompt, out in zip(prompts, outs):
            assert out["output_ids"] == reference_greedy(kind, weights, prompt, steps)
        engine.flush_cache()
        report = engine.memory_report()
        assert report["kv_free"] == report["kv_pool_size"]  # every slot given back
        # The pool is sized from what the layers declare: K and V of their widths, or one latent.
        c = CONFIG
        per_layer = c["head_dim"] if kind == "latent" else c["num_key_value_heads"] * (c["head_dim"] + c["v_head_dim"])
        assert report["kv_pool_size"] == int(KV_BUDGET_GB * 2**30) // (c["num_hidden_layers"] * per_layer * 4)


def test_backend_without_kernels_for_the_layout_refuses_it(plugin_installed, model) -> None:
    """Chosen by name, the refusing backend's reason is the engine's error."""
    _, folder, _ = model
    with pytest.raises(ValueError, match="flashinfer backend reads separate K/V|V as wide as K"):
        Engine(str(folder), attention_backend="refuser", device="cpu")


def test_pool_accessors_follow_each_layers_spec() -> None:
    """A pool of three layer kinds: each store lands in its slots, in its own widths; a latent
    layer's values are its latents' first columns; one token costs what the specs add up to."""
    from sglang_core.layers.attention_spec import AttentionLayerSpec, KVLayout
    from sglang_core.mem.kv_pool import TokenKVPool

    specs = [AttentionLayerSpec(4, 2, 8, 8, 0.1), AttentionLayerSpec(4, 2, 6, 10, 0.1),
             AttentionLayerSpec(4, 1, 12, 5, 0.1, kv_layout=KVLayout.LATENT)]
    pool = TokenKVPool(20, specs, torch.float32, "cpu")
    assert TokenKVPool.bytes_per_token(specs, torch.float32) == 4 * (2 * (8 + 8) + 2 * (6 + 10) + 12)
    assert TokenKVPool.bytes_per_token(specs, torch.bfloat16) == 2 * (2 * (8 + 8) + 2 * (6 + 10) + 12)
    slots = torch.tensor([7, 2, 19])
    expected = {}
    for layer, spec in enumerate(specs):
        k = torch.randn(3, spec.num_kv_heads, spec.head_dim)
        latent = spec.kv_layout is KVLayout.LATENT
        v = k[..., :spec.v_head_dim] if latent else torch.randn(3, spec.num_kv_heads, spec.v_head_dim)
        pool.store(layer, slots, k, None if latent else v)
        expected[layer] = (k, v)
    for layer, spec in enumerate(specs):
        k, v = expected[layer]
        assert pool.k_buffer(layer).shape == (21, spec.num_kv_heads, spec.head_dim)
        assert pool.v_buffer(layer).shape == (21, spec.num_kv_heads, spec.v_head_dim)
        assert torch.equal(pool.k_buffer(layer)[slots], k) and torch.equal(pool.v_buffer(layer)[slots], v)
        untouched = [s for s in range(21) if s not in slots.tolist()]
        assert not pool.k_buffer(layer)[untouched].any() and not pool.v_buffer(layer)[untouched].any()
    with pytest.raises(ValueError, match="latents"):
        pool.store(2, slots, torch.randn(3, 1, 12), torch.randn(3, 1, 5))
