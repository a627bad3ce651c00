"""Multi-head Latent Attention's two ways of attending in an extend (plugins/models/deepseek/mla.py):
absorbed (queries into latent space, attention over the pool's latents) and expanded (latents read
back from the pool, expanded per head, plain attention over them). Both must give the same
outputs and leave the same latents in the pool, over cached prefixes and prefill chunks, on every
backend that runs both; the DeepSeek contract cases stay token-exact against transformers with
either forced; and the rule that picks one must follow the multiply-add counts it claims. A layer
caching every head's key and value instead (``--disable-mla``) must give the absorbed layer's
outputs, extend and decode, on both backends."""

from __future__ import annotations

import random
from unittest import mock

import pytest
import torch
import transformers

import test_model_contract as contract
from sglang_core.engine import Engine
from sglang_core.layers.attention import AttentionSpec
from sglang_core.layers.rotary import rope_from_config
from sglang_core.mem.kv_pool import TokenKVPool
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode
from sglang_core.model_executor.model_api import ModelContext
from sglang_plugins.attention.torch_native.backend import TorchNativeBackend
from sglang_plugins.models.deepseek import mla

# (q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, heads)
HIDDEN = 48
SHAPES = [(24, 32, 16, 8, 12, 4), (None, 48, 8, 16, 24, 3)]
# Extend steps of four requests: (cached prefix, new tokens) each, the prefix being what the
# earlier steps stored (a prompt prefilled in chunks, a fresh prompt joining, one token at a time).
STEPS = [[(0, 21), (0, 6)], [(21, 16), (6, 1), (0, 9)], [(37, 3), (7, 30), (9, 1), (0, 1)]]


def _backend(name: str) -> type:
    if name == "triton":
        pytest.importorskip("triton")  # runs under TRITON_INTERPRET=1 on CPU (conftest.py)
        if torch.cuda.is_available():
            # No interpreter where there is a GPU, and these tensors are the CPU's: the compiled
            # path is covered end to end by test_model_contract's GPU DeepSeek cases.
            pytest.skip("CPU tensors need the Triton interpreter, which is off where there is a GPU")
        from sglang_plugins.attention.triton.backend import TritonBackend

        return TritonBackend
    return TorchNativeBackend


def _layer(shape: tuple, seed: int, disable_mla: bool = False) -> mla.MultiHeadLatentAttention:
    """A layer of random weights (the same for a seed, whichever way it caches)."""
    q_lora, rank, nope, rope, v, heads = shape
    config = transformers.DeepseekV2Config(
        hidden_size=HIDDEN, num_attention_heads=heads, q_lora_rank=q_lora, kv_lora_rank=rank, qk_nope_head_dim=nope,
        qk_rope_head_dim=rope, v_head_dim=v, attention_bias=True, max_position_embeddings=128)
    rotary = rope_from_config(config, rope, interleaved=True)
    layer = mla.MultiHeadLatentAttention(config, ModelContext(disable_mla=disable_mla), "model.layers.0.self_attn", 0,
                                         rotary)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return layer


def _batch(step: list[tuple[int, int]], req_to_token: torch.Tensor, next_slot: int,
           mode: ForwardMode = ForwardMode.EXTEND) -> ForwardBatch:
    """A batch of ``step``'s (prefix, new tokens) requests, request r in table row r, its new
    tokens in fresh slots from ``next_slot`` on."""
    prefix_lens = [p for p, _ in step]
    seq_lens = [p + n for p, n in step]
    new_slots = []
    for row, (p, n) in enumerate(step):
        req_to_token[row, p:p + n] = torch.arange(next_slot, next_slot + n)
        new_slots.append(req_to_token[row, p:p + n])
        next_slot += n
    return ForwardBatch(
        mode=mode, input_ids=torch.zeros(sum(n for _, n in step), dtype=torch.int64),
        positions=torch.cat([torch.arange(p, p + n) for p, n in step]), out_cache_loc=torch.cat(new_slots),
        req_pool_indices=torch.arange(len(step)), seq_lens=torch.tensor(seq_lens),
        prefix_lens=torch.tensor(prefix_lens), seq_lens_cpu=seq_lens, prefix_lens_cpu=prefix_lens,
        req_to_token=req_to_token)


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=["q_lora", "no_q_lora"])
def test_absorbed_and_expanded_agree(backend: str, shape: tuple, monkeypatch) -> None:
    """float32: each step's output both ways, and the pool each way leaves behind, match."""
    layer = _layer(shape, seed=len(backend))
    _bind(layer, backend)
    pool = layer.attn.backend.kv_pool
    given_kv_calls = []  # the expanded way must really attend over given K/V, the absorbed way not
    attend_given = layer.attn.backend.forward_extend_given_kv
    monkeypatch.setattr(layer.attn.backend, "forward_extend_given_kv",
                        lambda *args: given_kv_calls.append(mla.EXTEND_PATH) or attend_given(*args))
    req_to_token = torch.zeros(4, 64, dtype=torch.int64)
    next_slot = 1
    for step in STEPS:
        batch = _batch(step, req_to_token, next_slot)
        next_slot += sum(n for _, n in step)
        layer.attn.backend.plan(batch)
        x = torch.randn(batch.positions.shape[0], HIDDEN)
        outputs, pools = {}, {}
        for path in ("absorbed", "expanded"):
            pool.k_buffer(0)[batch.out_cache_loc] = 0  # each way must store the new latents itself
            monkeypatch.setattr(mla, "EXTEND_PATH", path)
            outputs[path] = layer(batch.positions, x, batch)
            pools[path] = pool.k_buffer(0).clone()
        torch.testing.assert_close(outputs["expanded"], outputs["absorbed"], atol=2e-5, rtol=2e-5)
        assert torch.equal(pools["expanded"], pools["absorbed"])
    assert given_kv_calls == ["expanded"] * len(STEPS)


def _bind(layer: mla.MultiHeadLatentAttention, backend: str) -> None:
    """Give the layer a backend over a pool of its own."""
    pool = TokenKVPool(200, [layer.attn.spec], torch.float32, "cpu")
    layer.attn.backend = _backend(backend)(AttentionSpec((layer.attn.spec,), torch.float32, torch.device("cpu")),
                                           pool)


def test_the_layer_stores_latents_itself_only_where_the_backend_would_store_them_alike() -> None:
    """``Attention.new_kv_rows``: the pool's latent rows and the batch's slots where the backend
    takes stored latents (Triton) and the pool keeps the compute dtype; None for a converting (FP8)
    pool or a backend storing its own way, and such a backend refuses ``k=None``."""
    layer = _layer(SHAPES[1], seed=0)
    batch = _batch([(0, 3)], torch.zeros(1, 8, dtype=torch.int64), 1)
    _bind(layer, "triton")
    buffer, slots = layer.attn.new_kv_rows(batch, torch.float32)
    assert buffer.data_ptr() == layer.attn.backend.kv_pool.k_buffer(0).data_ptr() and slots is batch.out_cache_loc
    assert buffer.shape == (201, layer.attn.spec.head_dim)
    fp8 = TokenKVPool(200, [layer.attn.spec], torch.float8_e4m3fn, "cpu")
    layer.attn.backend = type(layer.attn.backend)(layer.attn.backend.spec, fp8)
    assert layer.attn.new_kv_rows(batch, torch.float32) is None
    _bind(layer, "torch_native")
    assert layer.attn.new_kv_rows(batch, torch.float32) is None
    with pytest.raises(ValueError, match="k:"):
        layer.attn(torch.zeros(3, layer.attn.spec.num_heads * layer.attn.spec.head_dim), None, None, batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("nope", "rank", "rope", "interleaved"), [(16, 96, 8, True), (8, 32, 16, False)])
def test_the_absorbed_query_kernel_is_the_rotary_and_the_bmm(dtype: torch.dtype, nope: int, rank: int, rope: int,
                                                          interleaved: bool) -> None:
    """``absorbed_query`` (compiled on CUDA, else in Triton's interpreter) against the layer's
    PyTorch path: per head ``q_nope @ W_UK`` into the query's first ``rank`` values (96: two column
    tiles, the second ragged), the rotated q_pe after them, k_pe rotated in place; rows at strides
    as the layer passes them (views of the projections' outputs and of kv_b_proj's weight)."""
    pytest.importorskip("triton")
    from sglang_plugins.models.deepseek.absorbed_query import absorbed_query

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(nope)
    heads, tokens, v = 3, 4, 12
    config = transformers.DeepseekV2Config(qk_rope_head_dim=rope, max_position_embeddings=64)
    rotary = rope_from_config(config, rope, interleaved=interleaved).to(device)
    projected = torch.randn(tokens, heads * (nope + rope) + 5).to(device, dtype)  # a wider row: strided views
    q_nope, q_pe = projected[:, :heads * (nope + rope)].view(tokens, heads, -1).split([nope, rope], dim=-1)
    latent_rows = torch.randn(tokens, rank + rope).to(device, dtype)
    k_pe = latent_rows[:, rank:].view(tokens, 1, rope)
    w_uk, _ = (torch.randn(heads * (nope + v), rank) * 0.3).to(device, dtype).view(heads, -1, rank).split([nope, v],
                                                                                                      dim=1)
    positions = torch.tensor([0, 5, 17, 63], device=device)
    with mock.patch("sglang_core.layers.rotary.use_fused", return_value=False):
        expected_q_pe, expected_k_pe = rotary(positions, q_pe.clone(), k_pe.clone())
    expected = torch.cat([torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1), expected_q_pe], dim=-1)
    query = torch.full((tokens, heads, rank + rope), float("nan"), dtype=dtype, device=device)
    absorbed_query(q_nope, w_uk, q_pe, k_pe, query, positions, rotary.cos_cache, rotary.sin_cache, interleaved)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(query, expected, **tolerance)
    torch.testing.assert_close(k_pe, expected_k_pe, **tolerance)


# A decode step after STEPS: one token for each request over what the steps stored.
DECODE_STEP = [(40, 1), (37, 1), (10, 1), (1, 1)]


# Triton (interpreted: seconds) for one shape; the per-head path differs from the absorbed one
# after the queries, which is all the q LoRA changes.
@pytest.mark.parametrize(("backend", "shape"), [("torch_native", SHAPES[0]), ("torch_native", SHAPES[1]),
                                                ("triton", SHAPES[1])], ids=["torch_native-q_lora",
                                                                             "torch_native-no_q_lora", "triton-no_q_lora"])
def test_per_head_cache_agrees_with_absorbed(backend: str, shape: tuple, monkeypatch) -> None:
    """float32, the same weights: a layer caching every head's key and value (``--disable-mla``)
    gives the absorbed layer's outputs over the extend steps and a decode step after them."""
    latent, per_head = _layer(shape, seed=7), _layer(shape, seed=7, disable_mla=True)
    assert (per_head.attn.spec.num_kv_heads, per_head.attn.spec.v_head_dim) == (shape[-1], shape[-2])
    for layer in (latent, per_head):
        _bind(layer, backend)
    monkeypatch.setattr(mla, "EXTEND_PATH", "absorbed")
    req_to_token = torch.zeros(4, 64, dtype=torch.int64)
    next_slot = 1
    for step, mode in [(step, ForwardMode.EXTEND) for step in STEPS] + [(DECODE_STEP, ForwardMode.DECODE)]:
        batch = _batch(step, req_to_token, next_slot, mode)
        next_slot += sum(n for _, n in step)
        x = torch.randn(batch.positions.shape[0], HIDDEN)
        outputs = []
        for layer in (latent, per_head):
            layer.attn.backend.plan(batch)
            outputs.append(layer(batch.positions, x, batch))
        torch.testing.assert_close(outputs[1], outputs[0], atol=2e-5, rtol=2e-5)


def test_an_unknown_extend_path_is_refused(monkeypatch) -> None:
    layer = _layer(SHAPES[0], seed=1)
    monkeypatch.setattr(mla, "EXTEND_PATH", "expand")
    batch = _batch(STEPS[0], torch.zeros(2, 32, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="EXTEND_PATH"):
        layer(batch.positions, torch.randn(batch.positions.shape[0], HIDDEN), batch)


def _multiply_adds(prefix: int, new: int, rank: int, nope: int, rope: int, v: int) -> tuple[int, int]:
    """(absorbed, expanded) multiply-adds of one head for one request, query by query."""
    absorbed, expanded = 0, prefix * rank * (nope + v)  # expanded: kv_b_proj over the prefix's latents
    for query in range(new):
        keys = prefix + query + 1
        absorbed += rank * nope + keys * (rank + rope) + keys * rank + rank * v
        expanded += rank * (nope + v) + keys * (nope + rope) + keys * v  # its own latent expanded too
    return absorbed, expanded


@pytest.mark.parametrize("sizes", [(512, 128, 64, 128), (32, 16, 8, 12), (16, 12, 8, 20)],
                         ids=["deepseek_v2_v3", "contract", "wide_value"])
def test_the_cost_rule_follows_the_multiply_add_counts(sizes: tuple[int, int, int, int]) -> None:
    """Random batches (decode-like, chunked, fresh) against the counts written out per query."""
    rank, nope, rope, v = sizes
    rng = random.Random(rank)
    for _ in range(300):
        size = rng.randint(1, 4)
        prefix = [rng.choice([0, rng.randint(1, 3000)]) for _ in range(size)]
        new = [rng.choice([1, rng.randint(1, 400)]) for _ in range(size)]
        counts = [_multiply_adds(p, n, rank, nope, rope, v) for p, n in zip(prefix, new)]
        absorbed, expanded = sum(a for a, _ in counts), sum(e for _, e in counts)
        if absorbed != expanded:
            assert mla.expanding_is_cheaper(prefix, new, rank, nope, v) == (expanded < absorbed), (prefix, new)
    assert mla.expanding_is_cheaper([0], [1], 512, 128, 128)  # a fresh prompt
    assert not mla.expanding_is_cheaper([100_000], [1], 512, 128, 128)  # decode-like


# Every MLA option the contract suite covers: q LoRA or none, biases, YaRN, rotate-half rotary.
DENSE_CASES = ["deepseek-v2", "deepseek-v2-lite-yarn", "deepseek-v3-yarn", "deepseek-v3-rotate-half"]


@pytest.fixture(scope="module", params=[(c, p) for c in DENSE_CASES for p in ("absorbed", "expanded")],
                ids=lambda param: f"{param[0]}-{param[1]}")
def served(request, tmp_path_factory):
    name, path = request.param
    folder = tmp_path_factory.mktemp(name)
    model, prompts = contract._build(name, folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mla, "EXTEND_PATH", path)
        engine = Engine(str(folder), device="cpu", chunked_prefill_size=contract.CHUNK)
        yield model, engine, prompts
        engine.shutdown()


def test_forced_path_matches_reference(served) -> None:
    """The contract suite's checks (batched greedy tokens and logprobs, a cached prefix, prompt
    logprobs through the prefill chunks), with every extend absorbed, or every one expanded."""
    contract.test_batched_greedy_matches_reference(served)
    contract.test_cached_prefix_matches_reference(served)
    contract.test_logprobs_match_reference(served)
