"""Attention backends against plain per-request attention written out in float64.

Batches are large enough that torch_native splits decode into several length groups and Triton
uses from one to sixteen key splits; slots are scattered over the pool (request rows with holes),
some layers use a sliding window, GQA ratios vary. The Triton kernels run on CPU under
``TRITON_INTERPRET=1`` (set by conftest.py when there is no GPU); FlashInfer runs on a GPU only,
in bfloat16, its slot-list gather kernel (Triton) on CPU too.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from sglang_core.layers.attention import Attention, AttentionLayerSpec, AttentionSpec, KVLayout
from sglang_core.mem.kv_pool import TokenKVPool
from sglang_core.model_executor.cuda_graph import chunk_inputs, chunk_tables, decode_rows, row_chunks
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode
from sglang_plugins.attention.torch_native.backend import TorchNativeBackend


def triton_backend():
    pytest.importorskip("triton")  # in the test extra; absent only outside CI
    from sglang_plugins.attention.triton.backend import TritonBackend

    return TritonBackend


def flashinfer_backend():
    if not torch.cuda.is_available():
        pytest.skip("FlashInfer runs on CUDA GPUs only")
    pytest.importorskip("flashinfer")  # an optional extra
    from sglang_plugins.attention.flashinfer.backend import FlashInferBackend

    return FlashInferBackend


@dataclass(frozen=True)
class Case:
    factory: Callable[[], type]
    dtype: torch.dtype = torch.float32
    shapes: tuple = ((6, 2, 8), (4, 4, 64), (12, 4, 80))  # (heads, kv_heads, head_dim): GQA 3, MHA, odd dim
    tolerance: float = 1e-5


BACKENDS = {
    "torch_native": Case(lambda: TorchNativeBackend),
    "triton": Case(triton_backend),
    # FlashInfer computes in 16 bits and compiles head sizes 64, 128 and 256 only; one head size
    # keeps its just-in-time compiles (a minute each on a fresh machine) to a few.
    "flashinfer": Case(flashinfer_backend, torch.bfloat16, ((8, 2, 128), (4, 4, 128), (12, 4, 128)), 2e-2),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: list[int],
              window: int | None, scale: float, cap: float | None = None) -> torch.Tensor:
    """q: [n, heads, d] at ``positions``; keys: [seq, kv_heads, d] and values [seq, kv_heads, dv]
    of the whole sequence -> [n, heads, dv]. ``cap``: logits become cap * tanh(logits / cap)."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    group = heads // kv_heads
    out = torch.empty(q.shape[0], heads, values.shape[-1], dtype=torch.float64, device=q.device)
    for i, pos in enumerate(positions):
        lo = 0 if window is None else max(0, pos - window + 1)
        for h in range(heads):
            k = keys[lo:pos + 1, h // group].double()
            logits = k @ q[i, h].double() * scale
            if cap is not None:
                logits = cap * torch.tanh(logits / cap)
            out[i, h] = torch.softmax(logits, dim=0) @ values[lo:pos + 1, h // group].double()
    return out


def _scatter(rng: random.Random, seq_lens: list[int]) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    """Each request's tokens scattered over a pool of sum(seq_lens) + 50 slots, its row of the
    request table picked at random among spare ones: (req_to_token, rows, each request's slots)."""
    slots = list(range(1, sum(seq_lens) + 51))
    rng.shuffle(slots)
    req_to_token = torch.zeros(len(seq_lens) + 3, max(seq_lens) + 5, dtype=torch.int64)
    rows = rng.sample(range(req_to_token.shape[0]), len(seq_lens))
    owns = []
    for row, n in zip(rows, seq_lens):
        owns.append(torch.tensor(slots[:n]))
        del slots[:n]
        req_to_token[row, :n] = owns[-1]
    return req_to_token, rows, owns


def _batch(mode: ForwardMode, prefix_lens: list[int], seq_lens: list[int], req_to_token: torch.Tensor,
           rows: list[int], owns: list[torch.Tensor], shared: tuple = ()) -> ForwardBatch:
    """The batch of the requests ``_scatter`` placed, their new tokens after their prefixes."""
    return ForwardBatch(
        mode=mode, input_ids=torch.zeros(sum(seq_lens) - sum(prefix_lens), dtype=torch.int64),
        positions=torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seq_lens)]),
        out_cache_loc=torch.cat([own[p:] for own, p in zip(owns, prefix_lens)]), req_pool_indices=torch.tensor(rows),
        seq_lens=torch.tensor(seq_lens), prefix_lens=torch.tensor(prefix_lens),
        seq_lens_cpu=seq_lens, prefix_lens_cpu=prefix_lens, req_to_token=req_to_token,
        shared_prefixes=tuple((length, tuple(members)) for length, members in shared))


def _rows_batch(prefix_lens: list[int], seq_lens: list[int], req_to_token: torch.Tensor, rows: list[int],
                owns: list[torch.Tensor], chunk_limit: int) -> ForwardBatch:
    """The extend batch of ``_batch`` as decode rows, one per new token (``decode_rows``), its first
    ``chunk_limit`` multi-token requests named as row chunks (``row_chunks``), as a rows graph gets them."""
    row_table, lens, _ = decode_rows(rows, prefix_lens, seq_lens, seq_lens)
    chunks = row_chunks(rows, prefix_lens, seq_lens, chunk_limit)
    return ForwardBatch(
        mode=ForwardMode.DECODE, input_ids=torch.zeros(len(lens), dtype=torch.int64),
        positions=torch.tensor(lens) - 1, out_cache_loc=torch.cat([own[p:] for own, p in zip(owns, prefix_lens)]),
        req_pool_indices=torch.tensor(row_table), seq_lens=torch.tensor(lens), prefix_lens=torch.tensor(lens) - 1,
        seq_lens_cpu=lens, prefix_lens_cpu=[n - 1 for n in lens], req_to_token=req_to_token,
        row_chunks=chunk_tables(chunk_inputs(chunks, len(lens)).to(DEVICE), len(lens)))


def run(backend_name: str, prefix_lens: list[int], extend_lens: list[int], window: int | None, seed: int,
        shape: tuple[int, ...] | None = None, shared: tuple = (), kv_dtype: torch.dtype | None = None,
        cap: float | None = None, layout: KVLayout = KVLayout.SEPARATE, chunk_limit: int | None = None) -> None:
    """``shape``: (heads, kv_heads, head_dim[, v_head_dim]). ``shared``: ``(length, batch rows)``
    groups whose first ``length`` KV slots are one copy (cascade decode); the first row of a group
    owns them. ``kv_dtype``: the pool's element type when narrower than the compute dtype (FP8).
    ``cap``: logit soft-cap. ``layout``: LATENT stores one vector per token, its first v_head_dim
    values read as the value. ``chunk_limit``: the extend step runs as decode rows with that many
    row chunks at most (``_rows_batch``)."""
    with torch.device(DEVICE):  # every tensor below, on the GPU when there is one
        _run(backend_name, prefix_lens, extend_lens, window, seed, shape, shared, kv_dtype, cap, layout, chunk_limit)


def _run(backend_name: str, prefix_lens: list[int], extend_lens: list[int], window: int | None, seed: int,
         shape: tuple[int, ...] | None, shared: tuple, kv_dtype: torch.dtype | None, cap: float | None,
         layout: KVLayout, chunk_limit: int | None) -> None:
    case = BACKENDS[backend_name]
    HEADS, KV_HEADS, HEAD_DIM, *rest = shape or case.shapes[0]
    V_DIM = rest[0] if rest else HEAD_DIM
    latent = layout is KVLayout.LATENT
    backend_cls = case.factory()
    dtype = case.dtype
    rng = random.Random(seed)
    torch.manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    total = sum(seq_lens)
    layer = Attention(0, HEADS, KV_HEADS, HEAD_DIM, scaling=1 / math.sqrt(HEAD_DIM), sliding_window=window,
                      v_head_dim=V_DIM, logit_cap=cap, kv_layout=layout)
    pool = TokenKVPool(total + 50, [layer.spec], kv_dtype or dtype, DEVICE)
    req_to_token, rows, owns = _scatter(rng, seq_lens)
    keys, values = [], []
    for own, n, p in zip(owns, seq_lens, prefix_lens):
        keys.append(torch.randn(n, KV_HEADS, HEAD_DIM, dtype=dtype))
        values.append(keys[-1][..., :V_DIM] if latent else torch.randn(n, KV_HEADS, V_DIM, dtype=dtype))
        pool.store(0, own[:p], keys[-1][:p], None if latent else values[-1][:p])  # the cached prefix
    for length, members in shared:  # members read the owner's slots (and so its keys) up to length
        owner = members[0]
        for m in members[1:]:
            req_to_token[rows[m], :length] = req_to_token[rows[owner], :length]
            keys[m][:length], values[m][:length] = keys[owner][:length], values[owner][:length]
    mode = ForwardMode.DECODE if all(e == 1 for e in extend_lens) and any(prefix_lens) else ForwardMode.EXTEND
    backend = backend_cls(AttentionSpec((layer.spec,), dtype, torch.device(DEVICE), cascade_decode=bool(shared),
                                        kv_dtype=kv_dtype), pool)
    layer.backend = backend
    if chunk_limit is None:
        batch = _batch(mode, prefix_lens, seq_lens, req_to_token, rows, owns, shared)
    else:
        batch = _rows_batch(prefix_lens, seq_lens, req_to_token, rows, owns, chunk_limit)
    backend.plan(batch)
    # Queries large enough that a soft-cap changes the logits by much more than the tolerance.
    q = [torch.randn(e, HEADS, HEAD_DIM, dtype=dtype) * (4 if cap else 1) for e in extend_lens]
    new_keys = torch.cat([k[p:] for k, p in zip(keys, prefix_lens)]).view(-1, KV_HEADS * HEAD_DIM)
    new_values = None if latent else torch.cat([v[p:] for v, p in zip(values, prefix_lens)]).view(-1, KV_HEADS * V_DIM)
    out = layer(torch.cat(q).view(-1, HEADS * HEAD_DIM), new_keys, new_values, batch)
    if kv_dtype is not None:  # attention sees K/V as stored: rounded to the pool's type
        for i, row in enumerate(rows):
            stored = req_to_token[row, :seq_lens[i]]
            for name, mine, buffer in (("keys", keys, pool.k_buffer(0)), ("values", values, pool.v_buffer(0))):
                # the pool holds each value rounded to the nearest representable one (half an ulp:
                # 2**-4 relative for e4m3's 3 mantissa bits, 2**-3 for e5m2's 2)
                half_ulp = torch.finfo(kv_dtype).eps / 2
                torch.testing.assert_close(buffer[stored].to(dtype), mine[i], rtol=half_ulp, atol=1e-2, msg=name)
                mine[i] = buffer[stored].to(dtype)
    expected = torch.cat([reference(qi, k, v, list(range(p, s)), window, layer.spec.scaling, cap)
                          for qi, k, v, p, s in zip(q, keys, values, prefix_lens, seq_lens)])
    tol = case.tolerance
    torch.testing.assert_close(out.view(-1, HEADS, V_DIM).double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("batch_size", [1, 5, 40, 97])
def test_decode_matches_reference(backend: str, batch_size: int, window: int | None) -> None:
    rng = random.Random(batch_size)
    prefix = [rng.randint(1, 60) for _ in range(batch_size)]
    run(backend, prefix, [1] * batch_size, window, seed=batch_size)


def test_decode_equal_lengths_needs_no_mask() -> None:
    run("torch_native", [23] * 35, [1] * 35, None, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 2000])
def test_long_context_decode_fills_every_split(backend: str, window: int | None) -> None:
    """Thousands of keys per request. Triton gives 2 requests of one KV head 16 splits: of 128
    keys for seq 1937 (the last split holds 17) and for seq 4001 in a 2000-key window (80), of 256
    for seq 4001 unwindowed (161), so every split holds keys and the last is ragged. One KV head
    and a small head dim keep the interpreter fast (FlashInfer, GPU only, compiles head dims 64 and up)."""
    if backend == "triton":  # the premise: as many splits as there can be
        from sglang_plugins.attention.triton.backend import MAX_SPLITS, decode_splits

        assert decode_splits(2, 1) == MAX_SPLITS == 16
    run(backend, [1936, 4000], [1, 1], window, seed=41, shape=(2, 1, 64 if backend == "flashinfer" else 16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 5])
def test_extend_with_cached_prefixes_matches_reference(backend: str, window: int | None) -> None:
    rng = random.Random(11)
    prefix = [0, 0, 9, 30, 1, 17]
    extend = [rng.randint(1, 25) for _ in prefix]
    run(backend, prefix, extend, window, seed=11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extend_without_prefix_matches_reference(backend: str) -> None:
    """Fresh prompts only: FlashInfer takes its ragged path (no gather from the pool)."""
    run(backend, [0, 0, 0, 0], [1, 33, 7, 64], None, seed=12)
    run(backend, [0, 0], [40, 9], 6, seed=13)


@pytest.mark.parametrize(("backend", "shape"), [(b, s) for b, case in BACKENDS.items() for s in case.shapes[1:]])
@pytest.mark.parametrize("seed", range(3))
def test_random_shapes(backend: str, shape: tuple[int, int, int], seed: int) -> None:
    """Ragged batches of random prefix and new-token lengths; decode, then extend, per seed."""
    rng = random.Random(100 + seed)
    size = rng.randint(1, 9)
    window = rng.choice([None, 3, 50])
    run(backend, [rng.randint(1, 150) for _ in range(size)], [1] * size, window, seed, shape)
    prefix = [rng.choice([0, rng.randint(1, 100)]) for _ in range(size)]
    run(backend, prefix, [rng.randint(1, 90) for _ in range(size)], window, seed, shape)


def test_flashinfer_slot_list_gather_matches_torch() -> None:
    """The slot list FlashInfer plans from: each request's row prefix of the request table, in
    batch order, rows out of order and lengths across the kernel's 512-slot blocks."""
    pytest.importorskip("triton")
    from sglang_plugins.attention.flashinfer.kv_indices import gather_kv_indices

    rng = random.Random(5)
    with torch.device(DEVICE):
        table = torch.randint(1, 10_000, (9, 1300), dtype=torch.int64)
        rows = rng.sample(range(9), 6)
        lens = [1, 512, 513, 1300, 7, 1024]
        indptr = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
        out = torch.full((sum(lens) + 3,), -1, dtype=torch.int32)
        gather_kv_indices(table, torch.tensor(rows), indptr, torch.tensor(lens), out)
        expected = torch.cat([table[r, :n] for r, n in zip(rows, lens)]).to(torch.int32)
    assert out[:sum(lens)].tolist() == expected.tolist()
    assert out[sum(lens):].tolist() == [-1, -1, -1]  # nothing written past the list


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("shape", [(6, 2, 8), (4, 4, 64)])
def test_cascade_decode_matches_reference(shape: tuple[int, int, int], window: int | None) -> None:
    """Triton's cascade decode: groups' shared prefixes read once per group (a group of 17 spans
    two member tiles, the second a lone row, which decodes plainly), the rest per request,
    ungrouped requests among them; windowed layers ignore the groups."""
    rng = random.Random(21)
    size = 40
    prefix = [rng.randint(150, 260) for _ in range(size)]
    big = list(range(0, 34, 2))  # 17 rows sharing 120 slots
    small = [1, 7, 9]  # 3 rows sharing 64
    run("triton", prefix, [1] * size, window, seed=21, shape=shape, shared=((120, big), (64, small)))


def test_rows_attend_their_chunks_as_extends() -> None:
    """Triton's rows of an extend step (``ForwardBatch.row_chunks``): the named chunks through the
    extend kernel (launch sized by all the rows, unused table entries), the other rows (decodes,
    one-token prompts, a chunk past the limit) through the decode kernel, which skips the chunks'
    rows (the extend kernel writes first: the decode kernel must leave them). Chunks with and
    without cached prefixes, over one and several query blocks (16 rows a block up to 32 rows,
    else 64), GQA, a window."""
    run("triton", [0, 9, 30, 0, 17, 3], [12, 1, 66, 1, 5, 4], None, seed=61, chunk_limit=3)
    run("triton", [0, 4, 2, 11], [9, 1, 16, 1], 5, seed=62, chunk_limit=8)


@pytest.mark.parametrize("kind", ["soft_cap", "head_192_v_128", "latent"])
def test_rows_chunks_of_each_layer_kind(kind: str) -> None:
    """The rows' chunks with soft-capped logits, values narrower than keys, a latent layout."""
    shape, cap, layout = LAYER_KINDS[kind]
    run("triton", [0, 4, 2, 11], [9, 1, 16, 3], None, seed=64, shape=shape, cap=cap, layout=layout, chunk_limit=2)


def test_rows_chunks_over_an_fp8_pool() -> None:
    run("triton", [0, 12, 40, 3], [5, 30, 1, 9], 6, seed=63, shape=(8, 2, 64), kv_dtype=torch.float8_e4m3fn,
        chunk_limit=8)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_fp8_kv_cache_matches_reference(backend: str, kv_dtype: torch.dtype) -> None:
    """``--kv-cache-dtype fp8_*``: K/V are stored in 8 bits and every key and value attended to is
    the stored one (fresh prompts too), with the arithmetic in the compute dtype: decode, extend
    over cached prefixes and fresh prompts, a window, GQA."""
    rng = random.Random(31)
    run(backend, [rng.randint(1, 70) for _ in range(9)], [1] * 9, None, seed=31, kv_dtype=kv_dtype)
    run(backend, [0, 0, 12, 40], [5, 30, 9, 17], 6, seed=32, shape=(8, 2, 64), kv_dtype=kv_dtype)
    run(backend, [0, 0], [33, 7], None, seed=33, kv_dtype=kv_dtype)


@pytest.mark.parametrize(("dtype", "kv_dtype", "head_dim"), [
    (torch.float32, None, 128), (torch.bfloat16, None, 80), (torch.bfloat16, torch.float8_e4m3fn, 128)])
def test_flashinfer_refuses_what_it_has_no_kernels_for(dtype, kv_dtype, head_dim) -> None:
    """FlashInfer steps aside (auto then takes Triton) for float32, odd head sizes and an FP8 pool."""
    pytest.importorskip("triton")  # its slot-list kernel module imports Triton
    from sglang_core.layers.attention import UnsupportedSpecError
    from sglang_plugins.attention.flashinfer.backend import FlashInferBackend

    layer = AttentionLayerSpec(8, 2, head_dim, head_dim, head_dim**-0.5)
    with pytest.raises(UnsupportedSpecError):
        FlashInferBackend(AttentionSpec((layer,), dtype, torch.device("cpu"), kv_dtype=kv_dtype),
                          TokenKVPool(16, [layer], kv_dtype or dtype, "cpu"))


# Layer kinds beyond today's models: (heads, kv_heads, head_dim[, v_head_dim]), soft-cap, layout.
LAYER_KINDS = {
    "v_narrower": ((6, 2, 24, 16), None, KVLayout.SEPARATE),
    "v_wider": ((4, 2, 16, 40), None, KVLayout.SEPARATE),
    "head_96": ((4, 2, 96), None, KVLayout.SEPARATE),
    "head_192_v_128": ((4, 1, 192, 128), None, KVLayout.SEPARATE),
    "soft_cap": ((6, 2, 8), 5.0, KVLayout.SEPARATE),
    "latent": ((8, 1, 40, 32), None, KVLayout.LATENT),
    "latent_soft_cap": ((4, 1, 24, 16), 3.0, KVLayout.LATENT),
}
# Which backends run which kinds; the others must refuse them (so ``auto`` falls back).
RUNS_KINDS = {"torch_native": set(LAYER_KINDS), "triton": set(LAYER_KINDS), "flashinfer": {"soft_cap"}}


@pytest.mark.parametrize(("backend", "kind"), [(b, k) for b in BACKENDS for k in LAYER_KINDS if k in RUNS_KINDS[b]])
def test_layer_kinds_match_reference(backend: str, kind: str) -> None:
    """Value heads of another width than key heads, wide and odd head sizes, soft-capped logits,
    a latent layout (the value is the first columns of the stored key): decode (two length
    groups), extend over cached prefixes, fresh prompts, with and without a window."""
    shape, cap, layout = LAYER_KINDS[kind]
    if backend == "flashinfer":  # a head size it has kernels for
        shape = (8, 2, 128)
    rng = random.Random(kind)
    kw = dict(shape=shape, cap=cap, layout=layout)
    run(backend, [rng.randint(1, 60) for _ in range(33)], [1] * 33, None, seed=1, **kw)
    run(backend, [rng.randint(1, 60) for _ in range(5)], [1] * 5, 4, seed=2, **kw)
    run(backend, [0, 9, 30, 1], [rng.randint(1, 20) for _ in range(4)], None, seed=3, **kw)
    run(backend, [0, 0, 14], [12, 5, 9], 6, seed=4, **kw)


@pytest.mark.parametrize(("backend", "kind"),
                         [(b, k) for b in BACKENDS for k in LAYER_KINDS if k not in RUNS_KINDS[b]])
def test_backends_refuse_layer_kinds_they_cannot_run(backend: str, kind: str) -> None:
    """A backend without kernels for one kind of layer of the model refuses the whole model."""
    pytest.importorskip("triton")  # both backends' modules import Triton
    from sglang_core.layers.attention import UnsupportedSpecError

    (heads, kv_heads, head_dim, *rest), cap, layout = LAYER_KINDS[kind]
    layer = AttentionLayerSpec(heads, kv_heads, head_dim, rest[0] if rest else head_dim, 0.1, None, cap, layout)
    plain = AttentionLayerSpec(8, 2, 128, 128, 0.1)  # a kind every backend runs, beside it
    dtype = BACKENDS[backend].dtype
    backend_cls = BACKENDS[backend].factory() if backend != "flashinfer" else _flashinfer_class()
    with pytest.raises(UnsupportedSpecError):
        backend_cls(AttentionSpec((plain, layer), dtype, torch.device(DEVICE)), TokenKVPool(16, [plain, layer], dtype, DEVICE))


def _flashinfer_class() -> type:
    """FlashInfer's backend class, importable without a GPU: it refuses before it loads FlashInfer."""
    from sglang_plugins.attention.flashinfer.backend import FlashInferBackend

    return FlashInferBackend


def run_given_kv(backend_name: str, prefix_lens: list[int], extend_lens: list[int], window: int | None,
                 seed: int) -> None:
    """A latent layer's pool (one 24-wide vector per token, values its first 16), read back as
    stored, then attention over K/V of other widths and heads given for every token of the
    batch's sequences (4 query heads over 2 KV heads, keys 40 wide, values 12), against the float64
    reference; the pool is not touched by it."""
    with torch.device(DEVICE):
        backend_cls = BACKENDS[backend_name].factory()
        rng = random.Random(seed)
        torch.manual_seed(seed)
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        layer = Attention(0, 4, 1, 24, 0.3, v_head_dim=16, kv_layout=KVLayout.LATENT)
        pool = TokenKVPool(sum(seq_lens) + 50, [layer.spec], torch.float32, DEVICE)
        req_to_token, rows, owns = _scatter(rng, seq_lens)
        latents = [torch.randn(n, 1, 24) for n in seq_lens]
        for own, p, latent in zip(owns, prefix_lens, latents):
            pool.store(0, own[:p], latent[:p], None)
        layer.backend = backend_cls(AttentionSpec((layer.spec,), torch.float32, torch.device(DEVICE)), pool)
        batch = _batch(ForwardMode.EXTEND, prefix_lens, seq_lens, req_to_token, rows, owns)
        layer.backend.plan(batch)
        new = torch.cat([latent[p:] for latent, p in zip(latents, prefix_lens)]).view(-1, 24)
        stored_k, stored_v = layer.store_and_read_kv(new, None, batch)
        assert torch.equal(stored_k, torch.cat(latents)) and torch.equal(stored_v, torch.cat(latents)[..., :16])

        given = AttentionLayerSpec(4, 2, 40, 12, 40**-0.5, sliding_window=window)
        keys, values = torch.randn(sum(seq_lens), 2, 40), torch.randn(sum(seq_lens), 2, 12)
        q = torch.randn(sum(extend_lens), 4, 40)
        before = pool.k_buffer(0).clone()
        assert layer.attends_given_kv
        out = layer.extend_given_kv(q.view(-1, 4 * 40), keys, values, given, batch)
        assert torch.equal(pool.k_buffer(0), before)
    firsts = list(itertools.accumulate(seq_lens, initial=0))
    news = list(itertools.accumulate(extend_lens, initial=0))
    expected = torch.cat([reference(q[news[i]:news[i + 1]], keys[firsts[i]:firsts[i + 1]],
                                    values[firsts[i]:firsts[i + 1]], list(range(prefix_lens[i], seq_lens[i])),
                                    window, given.scaling) for i in range(len(seq_lens))])
    torch.testing.assert_close(out.view(-1, 4, 12).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_extend_over_given_kv_matches_reference(backend: str) -> None:
    """Cached prefixes and fresh prompts in one batch, chunk-sized and longer extends, a window."""
    run_given_kv(backend, [0, 9, 30, 1, 17], [33, 7, 16, 1, 40], None, seed=51)
    run_given_kv(backend, [0, 12], [20, 9], 5, seed=52)


def test_flashinfer_does_not_attend_over_given_kv() -> None:
    """FlashInfer has no kernels wired for given K/V: it says so, and the layer asks before calling."""
    pytest.importorskip("triton")  # its slot-list kernel module imports Triton
    from sglang_plugins.attention.flashinfer.backend import FlashInferBackend

    assert not FlashInferBackend.attends_given_kv
    layer = AttentionLayerSpec(8, 2, 128, 128, 0.1)
    with pytest.raises(NotImplementedError, match="given K/V"):
        FlashInferBackend.forward_extend_given_kv(object.__new__(FlashInferBackend), None, None, None, layer, None)
