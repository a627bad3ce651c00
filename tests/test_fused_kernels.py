"""The fused Triton kernels against the PyTorch code of the layers they replace.

On CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py); with a GPU
the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from sglang_core.layers.activation import GeluAndMul, SiluAndMul
from sglang_core.kernels.rows_out import RowsOut
from sglang_core.layers.norm import LayerNorm, RMSNorm, norm_add_norm
from sglang_core.layers.rotary import RotaryEmbedding

pytest.importorskip("triton")  # in the test extra; absent only outside CI
from sglang_core.kernels import fused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bfloat16 in the interpreter goes through numpy float32 with rounding; one bf16 ulp of slack.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}


def torch_path(module: torch.nn.Module, *args):
    """The layer's PyTorch code (what runs on CPU), whatever device the tensors are on."""
    with mock.patch(f"{type(module).__module__}.use_fused", return_value=False):
        return module(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96, 576])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, hidden: int, with_residual: bool) -> None:
    torch.manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-5, dtype).to(DEVICE)
    norm.weight.data = torch.randn(hidden, dtype=dtype, device=DEVICE)
    x = torch.randn(7, hidden, dtype=dtype, device=DEVICE) * 3
    residual = torch.randn(7, hidden, dtype=dtype, device=DEVICE) if with_residual else None
    if residual is None:
        expected = torch_path(norm, x)
        got = fused.rms_norm(x, norm.weight, norm.eps)
    else:
        expected, expected_residual = torch_path(norm, x, residual.clone())
        got = fused.rms_norm(x, norm.weight, norm.eps, residual)
        torch.testing.assert_close(residual, expected_residual, **TOLERANCE[dtype])
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


def test_rms_norm_of_leading_columns() -> None:
    """The first columns of a wider projection normed in place of a copy (MLA's latent, the first
    ``kv_lora_rank`` of ``kv_a_proj_with_mqa``'s outputs): rows read by their stride."""
    torch.manual_seed(3)
    norm = RMSNorm(64, 1e-6).to(DEVICE)
    norm.weight.data = torch.randn(64, device=DEVICE)
    projected = torch.randn(5, 80, device=DEVICE) * 3
    got = fused.rms_norm(projected[:, :64], norm.weight, norm.eps)
    torch.testing.assert_close(got, torch_path(norm, projected[:, :64].contiguous()), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm_with_pre_norm(dtype: torch.dtype, hidden: int) -> None:
    """One launch for a sublayer's output norm, the residual add and the next norm (Gemma 2's
    sandwich) equals the two RMSNorm modules run one after the other."""
    torch.manual_seed(hidden)
    first, second = (RMSNorm(hidden, eps, dtype).to(DEVICE) for eps in (1e-6, 1e-5))
    for norm in (first, second):
        norm.weight.data = torch.randn(hidden, dtype=dtype, device=DEVICE)
    x = torch.randn(7, hidden, dtype=dtype, device=DEVICE) * 3
    residual = torch.randn(7, hidden, dtype=dtype, device=DEVICE)
    expected, expected_residual = torch_path(second, torch_path(first, x), residual.clone())
    got = fused.rms_norm(x, second.weight, second.eps, residual, pre_norm=(first.weight, first.eps))
    # The first norm's bfloat16 output may differ by an ulp (|values| < 8: 1/32) from rounding
    # float32 sums that differ in their last bits; the sum with the residual carries that ulp.
    tolerance = TOLERANCE[dtype] if dtype == torch.float32 else dict(atol=1 / 32, rtol=1.6e-2)
    torch.testing.assert_close(residual, expected_residual, **tolerance)
    torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("fused_path", [True, False])
def test_rms_norm_writes_over_its_input_in_a_wider_row(fused_path: bool) -> None:
    """``out=x`` where ``x`` is the first 512 columns of 576-wide rows (MLA's latent before its
    rotary key): the normed latent replaces it, the other columns stay, as a separate norm gives."""
    torch.manual_seed(5)
    norm = RMSNorm(512, 1e-6, torch.float32).to(DEVICE)
    norm.weight.data = torch.randn(512, device=DEVICE)
    rows = torch.randn(3, 576, device=DEVICE) * 2
    expected = torch.cat([torch_path(norm, rows[:, :512].clone()), rows[:, 512:]], dim=1)
    latent = rows[:, :512]
    with mock.patch("sglang_core.layers.norm.use_fused", return_value=fused_path):
        got = norm(latent, out=latent)
    assert got.data_ptr() == rows.data_ptr()
    torch.testing.assert_close(rows, expected, **TOLERANCE[torch.float32])
    with pytest.raises(ValueError, match="out"):
        fused.rms_norm(latent, norm.weight, norm.eps, out=rows[:, :511])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused_path", [True, False])
def test_rms_norm_also_writes_indexed_rows_with_a_tail(dtype: torch.dtype, fused_path: bool) -> None:
    """``rows_out`` (MLA's latent norm storing the cached row ``[normed latent, k_pe]`` into its
    pool slot): each result row and its tail land in the indexed buffer row, every other buffer row
    stays, and the result itself is the plain norm's."""
    torch.manual_seed(11)
    norm = RMSNorm(48, 1e-6, dtype).to(DEVICE)
    norm.weight.data = torch.randn(48, dtype=dtype, device=DEVICE)
    projected = torch.randn(3, 56, dtype=dtype, device=DEVICE) * 2
    latent, tail = projected.split([48, 8], dim=1)
    pool = torch.randn(10, 1, 56, dtype=dtype, device=DEVICE)
    slots = torch.tensor([7, 2, 5], device=DEVICE)
    expected_norm = torch_path(norm, latent.clone())
    expected_pool = pool.clone()
    expected_pool[slots, 0] = torch.cat([expected_norm, tail], dim=1)
    with mock.patch("sglang_core.layers.norm.use_fused", return_value=fused_path):
        got = norm(latent, out=latent, rows_out=RowsOut(pool[:, 0], slots, tail))
    torch.testing.assert_close(got, expected_norm, **TOLERANCE[dtype])
    torch.testing.assert_close(pool, expected_pool, **TOLERANCE[dtype])
    assert torch.equal(pool[slots, 0], torch.cat([got, tail], dim=1))  # the same rounding both places
    with pytest.raises(ValueError, match="rows_out"):
        fused.rms_norm(latent, norm.weight, norm.eps, rows_out=RowsOut(pool[:, 0].half(), slots, tail.half()))


@pytest.mark.parametrize("with_pre_norm", [False, True])
def test_rms_norm_scaled_in_float32(with_pre_norm: bool) -> None:
    """``scale_in_float32`` (OLMo 2's order: the weight multiplies in float32, one rounding), alone
    and as a pre-norm: bit-exact against the PyTorch path in float16, on rows of eighths whose squares
    add up exactly in any order (not bfloat16: the interpreter truncates float32 to it)."""
    torch.manual_seed(9)
    first, second = (RMSNorm(96, eps, torch.float16, scale_in_float32=True).to(DEVICE) for eps in (1e-6, 1e-5))
    for norm in (first, second):
        norm.weight.data = (torch.randn(96, device=DEVICE) * 0.5 + 1).half()
    x, residual = ((torch.randint(-24, 25, (7, 96), device=DEVICE) / 8).half() for _ in range(2))

    def outputs(fused: bool) -> tuple[torch.Tensor, ...]:
        with mock.patch("sglang_core.layers.norm.use_fused", return_value=fused):
            return norm_add_norm(first, second, x, residual.clone()) if with_pre_norm else (second(x),)

    assert all(torch.equal(got, expected) for got, expected in zip(outputs(True), outputs(False), strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm(dtype: torch.dtype, hidden: int, with_bias: bool, with_residual: bool) -> None:
    torch.manual_seed(hidden)
    norm = LayerNorm(hidden, 1e-5, with_bias, dtype).to(DEVICE)
    norm.weight.data = torch.randn(hidden, dtype=dtype, device=DEVICE)
    if with_bias:
        norm.bias.data = torch.randn(hidden, dtype=dtype, device=DEVICE)
    x = torch.randn(7, hidden, dtype=dtype, device=DEVICE) * 3 + 2  # a non-zero mean to remove
    residual = torch.randn(7, hidden, dtype=dtype, device=DEVICE) if with_residual else None
    if residual is None:
        expected = torch_path(norm, x)
        got = fused.layer_norm(x, norm.weight, norm.bias, norm.eps)
    else:
        expected, expected_residual = torch_path(norm, x, residual.clone())
        got = fused.layer_norm(x, norm.weight, norm.bias, norm.eps, residual)
        torch.testing.assert_close(residual, expected_residual, **TOLERANCE[dtype])
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 1100])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_mul(dtype: torch.dtype, width: int, approximate: str) -> None:
    torch.manual_seed(width)
    x = torch.randn(5, 2 * width, dtype=dtype, device=DEVICE) * 4
    expected = torch_path(GeluAndMul(approximate), x)
    torch.testing.assert_close(fused.gelu_and_mul(x, approximate), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 1536, 1100])
def test_silu_and_mul(dtype: torch.dtype, width: int) -> None:
    torch.manual_seed(width)
    x = torch.randn(5, 2 * width, dtype=dtype, device=DEVICE) * 4
    torch.testing.assert_close(fused.silu_and_mul(x), torch_path(SiluAndMul(), x), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, None), (128, None), (80, 40)])
def test_rotary(dtype: torch.dtype, head_dim: int, rotary_dim: int | None) -> None:
    torch.manual_seed(head_dim)
    rope = RotaryEmbedding(head_dim, 4096, 500000.0, {"rope_type": "llama3", "factor": 8.0,
                                                      "original_max_position_embeddings": 1024},
                           rotary_dim).to(DEVICE)
    tokens, heads, kv_heads = 9, 6, 2
    # q and k as views of one fused projection output, as the model passes them.
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 2, 17, 300, 1023, 1024, 2048, 4095], device=DEVICE)
    expected_q, expected_k = torch_path(rope, positions, q.clone(), k.clone())
    half = rope.rotary_dim // 2
    for x in (q, k):
        fused.rotary_inplace(x, positions, rope.cos_cache[:, :half], rope.sin_cache[:, :half], rope.rotary_dim)
    torch.testing.assert_close(q, expected_q, **TOLERANCE[dtype])
    torch.testing.assert_close(k, expected_k, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, None), (80, 32)])
def test_rotary_interleaved(dtype: torch.dtype, head_dim: int, rotary_dim: int | None) -> None:
    """GPT-J's layout (pairs of neighbouring dims), whole and partial, through the layer's fused path."""
    torch.manual_seed(head_dim)
    rope = RotaryEmbedding(head_dim, 2048, 10000.0, {"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 512},
                           rotary_dim, interleaved=True).to(DEVICE)
    tokens, heads, kv_heads = 6, 3, 1
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 511, 512, 1500, 2047], device=DEVICE)
    expected_q, expected_k = torch_path(rope, positions, q.clone(), k.clone())
    with mock.patch("sglang_core.layers.rotary.use_fused", return_value=True):
        got_q, got_k = rope(positions, q, k)
    torch.testing.assert_close(got_q, expected_q, **TOLERANCE[dtype])
    torch.testing.assert_close(got_k, expected_k, **TOLERANCE[dtype])


def test_rotary_of_q_and_k_from_separate_tensors_in_one_launch(monkeypatch) -> None:
    """MLA's layout: q's rotary part a slice of each head of the query projection, k's one head a
    slice of another tensor (so are Qwen3's normed heads). The layer rotates both in one launch,
    as the PyTorch path does, and leaves the columns around them alone."""
    rope = RotaryEmbedding(16, 512, 10000.0, interleaved=True).to(DEVICE)
    tokens, heads, nope, rank = 5, 4, 24, 32
    queries = torch.randn(tokens, heads, nope + 16, device=DEVICE)
    latents = torch.randn(tokens, rank + 16, device=DEVICE)
    q_pe, k_pe = queries[..., nope:], latents[:, rank:].view(tokens, 1, 16)
    positions = torch.tensor([3, 0, 511, 7, 100], device=DEVICE)
    expected_q, expected_k = torch_path(rope, positions, q_pe.clone(), k_pe.clone())
    untouched = queries[..., :nope].clone(), latents[:, :rank].clone()
    launches = []
    kernel = fused.rotary_inplace
    monkeypatch.setattr(fused, "rotary_inplace", lambda *args, **kwargs: launches.append(1) or kernel(*args, **kwargs))
    with mock.patch("sglang_core.layers.rotary.use_fused", return_value=True):
        rope(positions, q_pe, k_pe)
    assert len(launches) == 1
    torch.testing.assert_close(q_pe, expected_q, **TOLERANCE[torch.float32])
    torch.testing.assert_close(k_pe, expected_k, **TOLERANCE[torch.float32])
    assert torch.equal(queries[..., :nope], untouched[0]) and torch.equal(latents[:, :rank], untouched[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    tokens, kv_heads, head_dim = 6, 2, 80
    k_buf = torch.zeros(30, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_buf = torch.zeros_like(k_buf)
    qkv = torch.randn(tokens, 3 * kv_heads * head_dim, dtype=dtype, device=DEVICE)
    _, k, v = qkv.split(kv_heads * head_dim, dim=-1)  # strided views, as the model passes them
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    slots = torch.randperm(29, device=DEVICE)[:tokens] + 1
    fused.store_kv(k, v, k_buf, v_buf, slots)
    expected_k, expected_v = torch.zeros_like(k_buf), torch.zeros_like(v_buf)
    expected_k[slots], expected_v[slots] = k, v
    assert torch.equal(k_buf, expected_k) and torch.equal(v_buf, expected_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(64, 256), (50, 96), (24, 1000), (40, 3000)])  # ragged N and K tails; several K tiles
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv(dtype: torch.dtype, n: int, k: int, with_bias: bool) -> None:
    from sglang_core.kernels import gemv

    torch.manual_seed(n + k)
    weight = torch.randn(n, k, dtype=dtype, device=DEVICE)
    x = torch.randn(1, 1, k, dtype=dtype, device=DEVICE)
    bias = torch.randn(n, dtype=dtype, device=DEVICE) if with_bias else None
    assert gemv.fits(x, weight)
    expected = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    got = gemv.gemv(x, weight, bias)
    assert got.dtype == dtype and got.shape == (1, 1, n)
    # One rounding of a float32 sum to 16 bits: half an ulp of the result.
    torch.testing.assert_close(got.double(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(64, 2048), (6, 40)])  # DeepSeek-V2-Lite's router; a ragged one
def test_gemv_of_a_16_bit_row_and_a_float32_weight(dtype: torch.dtype, n: int, k: int) -> None:
    """A float32 router over 16-bit activations: the row read as it is, the result in float32
    as ``F.linear(x.float(), weight)`` (only the float32 sum's order differs)."""
    from sglang_core.kernels import gemv

    torch.manual_seed(k)
    weight = torch.randn(n, k, device=DEVICE)
    x = torch.randn(1, k, device=DEVICE).to(dtype)
    assert gemv.fits(x, weight)
    got = gemv.gemv(x, weight)
    assert got.dtype == torch.float32 and got.shape == (1, n)
    torch.testing.assert_close(got.double(), x.double() @ weight.double().T, atol=1e-4, rtol=1e-5)


def test_gemv_declines_what_it_does_not_serve() -> None:
    from sglang_core.kernels import gemv

    weight = torch.randn(32, 64, dtype=torch.bfloat16, device=DEVICE)
    assert not gemv.fits(torch.randn(2, 64, dtype=torch.bfloat16, device=DEVICE), weight)
    assert not gemv.fits(torch.randn(1, 64, dtype=torch.float32, device=DEVICE), weight.float())
    assert not gemv.fits(torch.randn(1, 64, dtype=torch.float16, device=DEVICE), weight)
    assert not gemv.fits(torch.randn(1, 64, dtype=torch.float32, device=DEVICE), weight)  # float32 row: cuBLAS
    assert not gemv.fits(torch.randn(1, 64, dtype=torch.bfloat16, device=DEVICE), weight.T.contiguous().T)
    assert not gemv.fits(torch.randn(0, 64, dtype=torch.bfloat16, device=DEVICE), weight)


@pytest.mark.parametrize("fused_path", [True, False])
def test_rotary_writes_q_into_another_tensor(fused_path: bool) -> None:
    """``q_out``: MLA's attention query assembled in place. The rotated q_pe lands in the last 16
    values of each head of a wider query (its other values untouched), q_pe itself stays as it
    was, and k turns in place (or, off CUDA, comes back rotated) as without ``q_out``."""
    rope = RotaryEmbedding(16, 512, 10000.0, interleaved=True).to(DEVICE)
    tokens, heads, nope, rank = 5, 4, 24, 32
    q_pe = torch.randn(tokens, heads, nope + 16, device=DEVICE)[..., nope:]
    k_pe = torch.randn(tokens, rank + 16, device=DEVICE)[:, rank:].view(tokens, 1, 16)
    query = torch.randn(tokens, heads, rank + 16, device=DEVICE)
    positions = torch.tensor([3, 0, 511, 7, 100], device=DEVICE)
    expected_q, expected_k = torch_path(rope, positions, q_pe.clone(), k_pe.clone())
    before_q, before_query = q_pe.clone(), query[..., :rank].clone()
    with mock.patch("sglang_core.layers.rotary.use_fused", return_value=fused_path):
        got_q, got_k = rope(positions, q_pe, k_pe, q_out=query[..., rank:])
    assert got_q.data_ptr() == query[..., rank:].data_ptr()
    torch.testing.assert_close(query[..., rank:], expected_q, **TOLERANCE[torch.float32])
    torch.testing.assert_close(got_k, expected_k, **TOLERANCE[torch.float32])
    assert torch.equal(q_pe, before_q) and torch.equal(query[..., :rank], before_query)
    with pytest.raises(ValueError, match="q_out"):
        rope(positions, q_pe, k_pe, q_out=query[..., rank + 1:])
