"""The Triton attention kernels called directly, against attention written out in float64.

What the backends' tests do not reach: logit soft-capping, keys wider than values (DeepSeek's
192/128, and 576/512 over latents where V is a view of the K buffer), head sizes that are not
powers of two, a V whose last dimension is strided, a softmax scale that is not 1/sqrt(Dk).
Requests' slots are scattered over the pool and their table rows out of order. On CPU the kernels
run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py), so sizes are small; with
a GPU the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")  # in the test extra; absent only outside CI
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sglang_plugins.attention.triton import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = dict(atol=1e-4, rtol=1e-4)  # float32 kernels against float64


@dataclass(frozen=True)
class Case:
    heads: int
    kv_heads: int
    dk: int
    dv: int
    cap: float = 0.0
    window: int = 0
    latent: bool = False  # V is the first dv values of each stored key: a view of the K buffer
    strided_v: bool = False  # V's last dimension has stride 2
    q_gain: float = 3.0  # large enough that the cap bites

    @property
    def scale(self) -> float:
        return 0.7 / math.sqrt(self.dk)  # deliberately not 1/sqrt(dk)


@dataclass
class Pool:
    k: torch.Tensor  # [slots, kv_heads, dk]
    v: torch.Tensor  # [slots, kv_heads, dv]
    req_to_token: torch.Tensor  # [table rows, max len]
    rows: list[int]  # request b's table row


def make_pool(case: Case, seq_lens: list[int], rng: random.Random) -> Pool:
    """Random K/V in a pool larger than needed; each request's slots drawn from a shuffled list."""
    slots = sum(seq_lens) + 20
    k = torch.randn(slots, case.kv_heads, case.dk)
    if case.latent:
        assert case.kv_heads == 1 and case.dv < case.dk
        v = k[..., :case.dv]
    elif case.strided_v:
        v = torch.randn(slots, case.kv_heads, 2 * case.dv)[..., ::2]
    else:
        v = torch.randn(slots, case.kv_heads, case.dv)
    free = list(range(1, slots))
    rng.shuffle(free)
    req_to_token = torch.zeros(len(seq_lens) + 2, max(seq_lens) + 3, dtype=torch.int64)
    rows = rng.sample(range(req_to_token.shape[0]), len(seq_lens))
    for row, n in zip(rows, seq_lens):
        req_to_token[row, :n] = torch.tensor(free[:n])
        del free[:n]
    return Pool(k, v, req_to_token, rows)


def reference(case: Case, q: torch.Tensor, pool: Pool, row: int, positions: range) -> torch.Tensor:
    """q: [n, heads, dk] of one request at ``positions``; each attends causally (and within the
    window) over the request's keys, gathered by its table row."""
    keys_len = positions[-1] + 1
    slots = pool.req_to_token[row, :keys_len]
    group = case.heads // case.kv_heads
    k = pool.k[slots].double().repeat_interleave(group, dim=1)  # [keys, heads, dk]
    v = pool.v[slots].double().repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.double(), k) * case.scale
    if case.cap:
        logits = case.cap * torch.tanh(logits / case.cap)
    pos = torch.tensor(list(positions))[:, None]
    key_pos = torch.arange(keys_len)[None, :]
    visible = key_pos <= pos
    if case.window:
        visible &= key_pos > pos - case.window
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(logits, dim=-1), v)


def cap_arguments(case: Case) -> dict:
    """logit_cap only when on: the tests without a cap call the kernels as today's callers do."""
    return {"logit_cap": case.cap} if case.cap else {}


def run_decode(case: Case, seq_lens: list[int], num_splits: int, seed: int,
               shared: tuple[tuple[int, tuple[int, ...]], ...] = ()) -> None:
    """``shared``: (length, batch rows) groups whose first ``length`` table entries are the first
    row's (cascade decode reads them once per group)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        pool = make_pool(case, seq_lens, rng)
        for length, members in shared:
            for m in members[1:]:
                pool.req_to_token[pool.rows[m], :length] = pool.req_to_token[pool.rows[members[0]], :length]
        batch = len(seq_lens)
        q = torch.randn(batch, case.heads, case.dk) * case.q_gain
        out = torch.full((batch, case.heads, case.dv), float("nan"))
        splits = num_splits + (kernels.SHARED_SPLITS if shared else 0)
        # Garbage where nothing is written: an empty split's partial must carry no weight.
        mid_o = torch.full((batch + 1, case.heads, splits, case.dv), float("nan"))
        mid_lse = torch.full((batch + 1, case.heads, splits), float("nan"))
        groups = None
        if shared:
            slots = len(shared) + 1  # one group slot unused, as in a fixed-size buffer
            groups = kernels.SharedPrefixes(torch.zeros(batch + 1, dtype=torch.int32),
                                            torch.zeros(slots, dtype=torch.int32),
                                            torch.full((slots, kernels.SHARED_MEMBERS), -1, dtype=torch.int32))
            for g, (length, members) in enumerate(shared):
                groups.lens[g] = length
                groups.members[g, :len(members)] = torch.tensor(members)
                groups.kv_start[list(members)] = length
        kernels.decode_attention(q, pool.k, pool.v, out, pool.req_to_token, torch.tensor(pool.rows),
                                 torch.tensor(seq_lens), case.scale, case.window, num_splits, mid_o, mid_lse, groups,
                                 **cap_arguments(case))
        expected = torch.cat([reference(case, q[b:b + 1], pool, pool.rows[b], range(n - 1, n))
                              for b, n in enumerate(seq_lens)])
    torch.testing.assert_close(out.double(), expected, **TOLERANCE)


def run_extend(case: Case, prefix_lens: list[int], extend_lens: list[int], seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    with torch.device(DEVICE):
        pool = make_pool(case, seq_lens, rng)
        total = sum(extend_lens)
        q = torch.randn(total, case.heads, case.dk) * case.q_gain
        out = torch.full((total, case.heads, case.dv), float("nan"))
        starts = [sum(extend_lens[:b]) for b in range(len(extend_lens))]
        kernels.extend_attention(q, pool.k, pool.v, out, pool.req_to_token, torch.tensor(pool.rows),
                                 torch.tensor(seq_lens), torch.tensor(prefix_lens), torch.tensor(starts),
                                 max(extend_lens), case.scale, case.window, **cap_arguments(case))
        expected = torch.cat([reference(case, q[s:s + e], pool, row, range(p, p + e))
                              for s, e, p, row in zip(starts, extend_lens, prefix_lens, pool.rows)])
    torch.testing.assert_close(out.double(), expected, **TOLERANCE)


# Each case has something today's callers never asked for; head sizes 80, 96, 192, 256, 576.
CASES = {
    "d80-gqa2-cap": Case(4, 2, 80, 80, cap=5.0),
    "d96-mqa-window-cap": Case(4, 1, 96, 96, cap=4.0, window=6),
    "dk192-dv128-cap": Case(2, 2, 192, 128, cap=8.0),
    "dk192-dv128": Case(4, 2, 192, 128),
    "d256-gqa2-window-cap-strided-v": Case(4, 2, 256, 256, cap=6.0, window=40, strided_v=True),
    "latent-dk576-dv512-16-heads": Case(16, 1, 576, 512, latent=True),
    "latent-dk576-dv512-32-heads-cap": Case(32, 1, 576, 512, cap=10.0, latent=True),
}


def test_the_cases_exercise_the_cap() -> None:
    """The premise of the cap cases: capping moves the reference far more than the tolerance."""
    case = CASES["d80-gqa2-cap"]
    with torch.device(DEVICE):
        pool = make_pool(case, [30], random.Random(0))
        q = torch.randn(1, case.heads, case.dk) * case.q_gain
        capped = reference(case, q, pool, pool.rows[0], range(29, 30))
        plain = reference(Case(4, 2, 80, 80), q, pool, pool.rows[0], range(29, 30))
    assert (capped - plain).abs().max() > 1000 * TOLERANCE["atol"]


@pytest.mark.parametrize("name", CASES)
def test_decode(name: str) -> None:
    """Three requests, one with keys enough for several splits, one with fewer keys than splits."""
    run_decode(CASES[name], [3, 61, 190], num_splits=3, seed=len(name))


@pytest.mark.parametrize("name", ["d96-mqa-window-cap", "latent-dk576-dv512-16-heads"])
def test_decode_in_one_split_is_one_launch(name: str, monkeypatch) -> None:
    """One split (large batches): the split kernel writes the output itself and no merge runs (a
    merge launch would fail here); the outputs start as NaN, so every one must be written."""
    monkeypatch.setattr(kernels, "_decode_merge_kernel", None)
    run_decode(CASES[name], [3, 61, 190], num_splits=1, seed=len(name))


@pytest.mark.parametrize("name", ["d80-gqa2-cap", "dk192-dv128", "latent-dk576-dv512-16-heads"])
def test_extend_with_cached_prefix(name: str) -> None:
    run_extend(CASES[name], [0, 21, 45], [17, 40, 2], seed=len(name))


@pytest.mark.parametrize("name", ["d96-mqa-window-cap", "dk192-dv128-cap", "d256-gqa2-window-cap-strided-v",
                                  "latent-dk576-dv512-32-heads-cap"])
def test_extend_without_prefix(name: str) -> None:
    run_extend(CASES[name], [0, 0], [37, 9], seed=len(name))


@pytest.mark.parametrize("name", ["dk192-dv128-cap", "latent-dk576-dv512-16-heads"])
def test_cascade_decode(name: str) -> None:
    """Shared prefixes read once per group (the latent case's 16 heads a KV head take several
    head tiles in the group kernel), the rest per request; request 5 is in no group."""
    run_decode(CASES[name], [50, 47, 70, 33, 52, 25], num_splits=2, seed=7, shared=((40, (0, 2, 4)), (20, (1, 3))))


def test_huge_logits_saturate_the_cap() -> None:
    """Logits of thousands: the capped ones are +-cap (a tanh from exp(2x) would overflow to
    inf / inf = NaN); many keys tie at the top."""
    case = Case(2, 1, 64, 64, cap=30.0, q_gain=1000.0)
    run_decode(case, [9, 140], num_splits=2, seed=3)
    run_extend(case, [0, 20], [24, 5], seed=4)


@triton.jit
def _soft_cap_kernel(X, Out, cap, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Out + offs, kernels._soft_cap(tl.load(X + offs), cap))


def test_soft_cap_is_cap_times_tanh() -> None:
    """Across magnitudes, zero and +-1e30 included: within float32 rounding of cap * tanh(x / cap)."""
    magnitudes = torch.tensor([0.0, 1e-7, 1e-3, 0.1, 0.5, 1.0, 3.0, 10.0, 44.0, 45.0, 88.0, 89.0, 1e3, 1e6, 1e30],
                              dtype=torch.float64)
    x64 = torch.cat([magnitudes, -magnitudes, torch.zeros(2)])  # 32 values
    cap = 5.0
    with torch.device(DEVICE):
        out = torch.empty(32)
        _soft_cap_kernel[(1,)](x64.float().to(DEVICE), out, cap, N=32)
    expected = cap * torch.tanh(x64.float().double() / cap)
    torch.testing.assert_close(out.cpu().double(), expected, atol=cap * 4e-7, rtol=0)


def test_widths_that_do_not_agree_are_refused() -> None:
    with torch.device(DEVICE):
        q, k, v = torch.zeros(1, 2, 192), torch.zeros(4, 2, 192), torch.zeros(4, 2, 128)
        one = torch.ones(1, dtype=torch.int64)
        table, zero = torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        with pytest.raises(ValueError, match="^out: head size 192"):
            kernels.extend_attention(q, k, v, torch.zeros(1, 2, 192), table, zero, one, zero, zero, 1, 0.1, 0)
        with pytest.raises(ValueError, match="^k_buffer: head size 128"):
            kernels.extend_attention(q, v, v, torch.zeros(1, 2, 128), table, zero, one, zero, zero, 1, 0.1, 0)
        with pytest.raises(ValueError, match="^mid_o: head size 192"):
            kernels.decode_attention(q, k, v, torch.zeros(1, 2, 128), table, zero, one, 0.1, 0, 1,
                                     torch.zeros(1, 2, 1, 192), torch.zeros(1, 2, 1))
