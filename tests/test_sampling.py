"""Sampling: parameters, logits processors, the sampler, detokenization and stop conditions.

Every numeric check compares against a reference written here in plain numpy / Python.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pluggy
import pytest
import torch

from sglang_core import hookspecs
from sglang_core.engine import OutputBuilder
from sglang_core.messages import GenerateRequest, TokenOutput
from sglang_core.plugins import CORE_PLUGINS
from sglang_core.request import Req
from sglang_core.sampling import processors
from sglang_core.sampling.logits_processor import LogitsProcessor, SamplingBatch
from sglang_core.sampling.params import SamplingParams
from sglang_core.sampling.sampler import Sampler, make_generator, token_logprobs
from sglang_core.sampling.stop import IncrementalDetokenizer, StopChecker

V = 16
EOS = 2
LOGITS = np.random.default_rng(0).normal(size=V) * 1.5


@pytest.fixture(scope="module")
def tokenizer(hf_tokenizer):
    """The embedded default model's tokenizer (a byte-level BPE with multi-token characters)."""
    return hf_tokenizer


def make_req(output_ids=(), prompt=(0, 1), return_logprob=False, top_logprobs_num=0, **params) -> Req:
    return Req(
        rid="r",
        origin_input_ids=list(prompt),
        sampling_params=SamplingParams(**params),
        return_logprob=return_logprob,
        top_logprobs_num=top_logprobs_num,
        output_ids=list(output_ids),
    )


def core_processors(vocab_size: int = V) -> list[LogitsProcessor]:
    """The core's processors, obtained through the plugin hook as the engine does."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(processors, name="core-sampling")
    found = []
    pm.hook.register_logits_processors(register=lambda name, cls: found.append((name, cls)))
    return [cls(vocab_size=vocab_size, device="cpu") for _, cls in found]


def sample(logits: np.ndarray, reqs: list[Req], eos=(EOS,)):
    batch = SamplingBatch.build(reqs, logits.shape[1], "cpu", eos)
    return Sampler(core_processors(logits.shape[1]))(torch.tensor(logits, dtype=torch.float32), batch)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference_distribution(logits, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0) -> np.ndarray:
    """top_k, then top_p over the renormalised top-k, then min_p, all in float64."""
    p = np_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    order = sorted(range(len(p)), key=lambda i: -p[i])
    allowed = order if top_k == -1 else order[:top_k]
    mass = sum(p[i] for i in allowed)
    kept, before = [], 0.0
    for i in allowed:
        if before < top_p * mass or top_p >= 1:
            kept.append(i)
        before += p[i]
    best = max(p[i] for i in kept)
    kept = [i for i in kept if p[i] >= min_p * best]
    q = np.zeros_like(p)
    q[kept] = p[kept]
    return q / q.sum()


# -- the hook -------------------------------------------------------------------------


def test_core_processors_register_in_order():
    assert CORE_PLUGINS["core-sampling"] == processors.__name__
    names = []
    processors.register_logits_processors(lambda name, cls: names.append((name, cls)))
    assert [n for n, _ in names] == ["repetition_penalty", "frequency_presence_penalty", "logit_bias", "min_new_tokens",
                                     "grammar_mask"]
    assert all(issubclass(cls, LogitsProcessor) for _, cls in names)


# -- greedy and sampling filters -------------------------------------------------------


def test_top_k_1_and_temperature_0_are_argmax():
    logits = np.random.default_rng(1).normal(size=(6, 40)).astype(np.float32)
    reqs = [make_req(top_k=1, temperature=0.7), make_req(temperature=0.0)] * 3
    result = sample(logits, reqs)
    assert result.next_ids.tolist() == logits.argmax(axis=1).tolist()
    assert result.logprobs is None and result.top_logprobs is None


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.8},
        {"top_k": 5},
        {"top_p": 0.7},
        {"min_p": 0.15},
        {"top_k": 8, "top_p": 0.8, "min_p": 0.05, "temperature": 1.3},
    ],
)
def test_filtered_sampling_matches_reference(params):
    draws = 20000
    expected = reference_distribution(LOGITS, **params)
    torch.manual_seed(0)
    result = sample(np.tile(LOGITS, (draws, 1)), [make_req(**params) for _ in range(draws)])
    observed = Counter(result.next_ids.tolist())
    allowed = set(np.flatnonzero(expected).tolist())
    assert set(observed) <= allowed
    # Pearson chi-square over the allowed tokens; a generous bound at df + 6 standard deviations.
    chi2 = sum((observed[t] - draws * expected[t]) ** 2 / (draws * expected[t]) for t in allowed)
    df = len(allowed) - 1
    assert chi2 < df + 6 * math.sqrt(2 * max(df, 1)) + 1


def test_filters_keep_a_single_token_when_asked():
    # top_p tiny keeps only the most likely token; min_p 1 keeps only the maximum.
    logits = np.tile(LOGITS, (50, 1))
    for params in ({"top_p": 1e-6}, {"min_p": 1.0}):
        assert set(sample(logits, [make_req(**params) for _ in range(50)]).next_ids.tolist()) == {int(LOGITS.argmax())}


def test_seeded_sampling_repeats_and_ignores_the_rest_of_the_batch():
    vocab = 50
    steps = [np.random.default_rng(10 + s).normal(size=vocab).astype(np.float32) for s in range(30)]

    def run(seed: int, with_others: bool) -> list[int]:
        target = make_req(seed=seed, temperature=1.0, repetition_penalty=1.1)
        reqs = [target]
        if with_others:
            reqs = [make_req(temperature=0.9), target, make_req(seed=99, top_p=0.9), make_req(temperature=0)]
        for logits in steps:
            ids = sample(np.tile(logits, (len(reqs), 1)), reqs).next_ids.tolist()
            for req, token in zip(reqs, ids):
                req.output_ids.append(token)
        return target.output_ids

    alone = run(1234, with_others=False)
    torch.manual_seed(7)  # the unseeded neighbours draw from the default RNG
    assert run(1234, with_others=True) == alone
    assert run(1234, with_others=False) == alone
    assert run(4321, with_others=False) != alone


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a, b = make_generator(5, "cpu"), make_generator(5 + 2**64, "cpu")
    assert torch.rand(4, generator=a).tolist() == torch.rand(4, generator=b).tolist()
    make_generator(-1, "cpu")  # any int is a valid seed


# -- processors -------------------------------------------------------------------------


def apply_processor(cls, reqs: list[Req], logits: np.ndarray, eos=(EOS,)) -> np.ndarray:
    batch = SamplingBatch.build(reqs, logits.shape[1], "cpu", eos)
    proc = cls(vocab_size=logits.shape[1], device="cpu")
    rows = torch.tensor([i for i, r in enumerate(reqs) if proc.wants(r.sampling_params)], dtype=torch.int64)
    out = torch.tensor(logits, dtype=torch.float32)
    proc(out, batch, rows)
    return out.numpy()


def mixed_logits(rows: int) -> np.ndarray:
    # Both signs, so the repetition penalty's two branches are exercised.
    return np.random.default_rng(3).normal(size=(rows, V)).astype(np.float32) * 3


def test_repetition_penalty():
    reqs = [
        make_req(prompt=[1, 3, 3, 5], output_ids=[7, 5, 9], repetition_penalty=1.5),
        make_req(prompt=[4], output_ids=[4, 6]),  # penalty 1: untouched
        make_req(prompt=[0, 11], output_ids=[], repetition_penalty=0.7),
    ]
    logits = mixed_logits(3)
    expected = logits.astype(np.float64).copy()
    for row, req in enumerate(reqs):
        r = req.sampling_params.repetition_penalty
        for token in set(req.origin_input_ids + req.output_ids):
            x = expected[row, token]
            expected[row, token] = x / r if x > 0 else x * r
        if r == 1.0:
            expected[row] = logits[row]
    assert (logits[:, [3, 7]] > 0).any() and (logits[:, [3, 7]] < 0).any()
    np.testing.assert_allclose(apply_processor(processors.RepetitionPenalty, reqs, logits), expected, rtol=1e-6)


def test_frequency_and_presence_penalties_count_output_only():
    reqs = [
        make_req(prompt=[8, 8, 8], output_ids=[3, 3, 3, 5, 8], frequency_penalty=0.5, presence_penalty=1.25),
        make_req(prompt=[1], output_ids=[1, 1], presence_penalty=-2.0),
        make_req(output_ids=[2, 2]),
    ]
    logits = mixed_logits(3)
    expected = logits.astype(np.float64).copy()
    for row, req in enumerate(reqs):
        p = req.sampling_params
        for token, count in Counter(req.output_ids).items():
            expected[row, token] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    np.testing.assert_allclose(apply_processor(processors.FrequencyPresencePenalty, reqs, logits), expected, rtol=1e-6)


def test_logit_bias():
    reqs = [make_req(logit_bias={"3": 5.0, 7: -2.5}), make_req(), make_req(logit_bias={0: 100.0, 15: -100})]
    logits = mixed_logits(3)
    expected = logits.astype(np.float64).copy()
    expected[0, 3] += 5.0
    expected[0, 7] -= 2.5
    expected[2, 0] += 100.0
    expected[2, 15] -= 100.0
    np.testing.assert_allclose(apply_processor(processors.LogitBias, reqs, logits), expected, rtol=1e-6)


def test_min_new_tokens_masks_eos_and_stop_tokens():
    reqs = [
        make_req(output_ids=[4], min_new_tokens=3, stop_token_ids=[5]),
        make_req(output_ids=[4, 4, 4], min_new_tokens=3, stop_token_ids=[5]),  # reached: untouched
        make_req(output_ids=[], stop_token_ids=[6]),  # no minimum: untouched
    ]
    logits = mixed_logits(3)
    expected = logits.copy()
    expected[0, [EOS, 5]] = -np.inf
    np.testing.assert_array_equal(apply_processor(processors.MinNewTokens, reqs, logits), expected)


def test_processors_run_before_greedy_choice():
    logits = np.zeros((3, V), dtype=np.float32)
    logits[:, EOS] = 5.0
    reqs = [
        make_req(temperature=0, min_new_tokens=2, output_ids=[1]),  # EOS forbidden: next best is 0
        make_req(temperature=0, min_new_tokens=2, output_ids=[1, 1]),  # EOS allowed again
        make_req(temperature=0, logit_bias={9: 6.0}),
    ]
    assert sample(logits, reqs).next_ids.tolist() == [0, EOS, 9]


def test_sampler_calls_a_processor_only_on_rows_that_want_it():
    calls = []

    class Ban(LogitsProcessor):
        def wants(self, params):
            return bool(params.custom_params and "ban" in params.custom_params)

        def __call__(self, logits, batch, rows):
            calls.append(rows.tolist())
            for i in rows.tolist():
                logits[i, batch.reqs[i].sampling_params.custom_params["ban"]] = -math.inf

    logits = np.tile(np.arange(V, dtype=np.float32), (3, 1))
    reqs = [make_req(temperature=0), make_req(temperature=0, custom_params={"ban": V - 1}), make_req(temperature=0)]
    sampler = Sampler([Ban(vocab_size=V)])
    assert sampler(torch.tensor(logits), SamplingBatch.build(reqs, V, "cpu")).next_ids.tolist() == [V - 1, V - 2, V - 1]
    plain = [make_req(temperature=0)]
    sampler(torch.tensor(logits[:1]), SamplingBatch.build(plain, V, "cpu"))
    assert calls == [[1]]


# -- logprobs ----------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_logits():
    logits = np.random.default_rng(5).normal(size=(3, V)).astype(np.float32) * 2
    reqs = [
        make_req(temperature=0, logit_bias={4: 50.0}, return_logprob=True, top_logprobs_num=3),
        make_req(temperature=0.5),
        make_req(seed=3, repetition_penalty=2.0, return_logprob=True),
    ]
    result = sample(logits, reqs)
    ids = result.next_ids.tolist()
    assert ids[0] == 4
    reference = np_log_softmax(logits)
    for row in (0, 2):
        assert result.logprobs[row].item() == pytest.approx(reference[row, ids[row]], abs=1e-5)
    top = sorted(range(V), key=lambda t: -reference[0, t])[:3]
    assert [t for _, t in result.top_logprobs[0]] == top
    np.testing.assert_allclose([lp for lp, _ in result.top_logprobs[0]], reference[0, top], atol=1e-5)
    assert result.top_logprobs[1] == [] and result.top_logprobs[2] == []


def test_token_logprobs():
    logits = np.random.default_rng(6).normal(size=(4, 20)).astype(np.float32)
    tokens = [3, 0, 19, 7]
    chosen, values, ids = token_logprobs(torch.tensor(logits), torch.tensor(tokens), top_k=5)
    reference = np_log_softmax(logits)
    np.testing.assert_allclose(chosen.numpy(), reference[range(4), tokens], atol=1e-5)
    np.testing.assert_array_equal(ids.numpy(), np.argsort(-reference, axis=1)[:, :5])
    np.testing.assert_allclose(values.numpy(), np.sort(reference, axis=1)[:, ::-1][:, :5], atol=1e-5)
    assert token_logprobs(torch.tensor(logits), torch.tensor(tokens), top_k=0)[1].shape == (4, 0)


# -- parameters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, field",
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"n": 0}, "n"),
        ({"stop": ["x", ""]}, "stop"),
        ({"stop_token_ids": [V]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logit_bias": {str(V): 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": math.nan}}, "logit_bias"),
        ({"constraint_after_ids": [V]}, "constraint_after_ids"),
        ({"constraint_after_ids": []}, "constraint_after_ids"),
        ({"ebnf": ""}, "ebnf"),
        ({"json_schema": "{}", "ebnf": 'root ::= "a"'}, "json_schema: give at most one of regex, json_schema and ebnf"),
    ],
)
def test_validate_rejects_out_of_range(params, field):
    p = SamplingParams.from_dict(params)
    with pytest.raises(ValueError) as err:
        p.validate(vocab_size=V)
    assert str(err.value).startswith(field)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"temprature": 1.0}, "temprature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"max_new_tokens": "10"}, "max_new_tokens"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 1]}, "stop"),
        ({"stop_token_ids": "1"}, "stop_token_ids"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"seed": 1.5}, "seed"),
        ({"custom_params": []}, "custom_params"),
        ({"constraint_after_ids": 5}, "constraint_after_ids"),
        ({"ebnf": 5}, "ebnf"),
    ],
)
def test_from_dict_rejects_unknown_and_ill_typed(params, field):
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict(params)
    assert str(err.value).startswith(field)


def test_from_dict_normalises():
    p = SamplingParams.from_dict({"stop": "###", "logit_bias": {"5": 1}, "temperature": 0, "top_k": None, "seed": None})
    p.validate(vocab_size=V)
    assert p.stop == ["###"] and p.logit_bias == {5: 1.0} and p.top_k == -1 and p.seed is None
    assert isinstance(p.temperature, float) and p.is_greedy
    assert SamplingParams.from_dict(None) == SamplingParams()
    assert SamplingParams().stop == [] and not SamplingParams().is_greedy and SamplingParams(top_k=1).is_greedy
    p.stop = "late"  # reassigned after construction: validate normalises again
    p.validate(vocab_size=V)
    assert p.stop == ["late"]


# -- extreme values: a masked token is never drawn ----------------------------------------

# Token logits of both signs, one exactly 0, with the model's favourites (0, 1, 5) masked by the
# grammar, so a draw outside ALLOWED is a masked token.
EXTREME_LOGITS = np.array([8.0, 7.5, -2.0, 0.0, 1.5, 6.0, 1.0, 2.5, -0.5, 0.3, -1.0, 3.0, 0.7, -3.0, 4.0, -6.0])
ALLOWED = (3, 6, 7, 10, 13, EOS)
PROMPT, OUTPUT = (3, 6, 0, 11), (6, 6, 10, 13, 1)


class FixedGrammar:
    """A grammar whose bitmask allows the same tokens at every step."""

    def __init__(self, allowed):
        self.allowed = allowed

    def fill_bitmask(self, words: torch.Tensor) -> None:
        bits = np.zeros(words.shape[0], dtype=np.uint32)
        for token in self.allowed:
            bits[token // 32] |= np.uint32(1 << (token % 32))
        words.copy_(torch.from_numpy(bits.view(np.int32)))


def reference_choices(p: SamplingParams, allowed) -> dict[int, float]:
    """Each token the sampler may draw, with its probability, in float64 plain Python: HF's
    repetition penalty, OpenAI's frequency / presence penalties and logit bias, min_new_tokens,
    the grammar, then temperature and top_k / top_p / min_p (a tie at a cut keeps every tied token)."""
    x = {t: float(v) for t, v in enumerate(EXTREME_LOGITS)}
    for t in set(PROMPT + OUTPUT):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, count in Counter(OUTPUT).items():
        x[t] -= p.frequency_penalty * count + p.presence_penalty
    for t, bias in (p.logit_bias or {}).items():
        x[t] += bias
    banned = {EOS, *(p.stop_token_ids or ())} if len(OUTPUT) < p.min_new_tokens else set()
    banned = banned if len(banned) < V else set()  # all banned: nothing would be left
    open_tokens = [t for t in allowed if t not in banned] or [EOS]  # the constraint wins
    if p.is_greedy:
        best = max(x[t] for t in open_tokens)
        return {t: 1.0 for t in open_tokens if x[t] == best}
    top = max(x[t] for t in open_tokens)
    weight = {t: math.exp((x[t] - top) / p.temperature) for t in open_tokens}
    ranked = sorted(weight.values(), reverse=True)
    cut_k = ranked[min(p.top_k, len(ranked)) - 1] if p.top_k > 0 else 0.0
    mass = sum(w for w in ranked if w >= cut_k)
    kept = {t: w for t, w in weight.items()
            if w >= cut_k and (p.top_p >= 1 or sum(v for v in ranked if v > w) < p.top_p * mass)
            and w >= p.min_p * ranked[0]}
    total = sum(kept.values())
    return {t: w / total for t, w in kept.items()}


HUGE, TINY = 1e306, 5e-324
EXTREMES = [
    {"temperature": HUGE}, {"temperature": 1e-6}, {"temperature": 9e-7},
    {"top_p": TINY}, {"top_p": 1.0}, {"top_k": 1}, {"top_k": 2**63 - 1}, {"top_k": 2},
    {"min_p": 1.0}, {"min_p": TINY},
    {"repetition_penalty": TINY}, {"repetition_penalty": HUGE},
    {"frequency_penalty": 2.0}, {"frequency_penalty": -2.0}, {"presence_penalty": 2.0}, {"presence_penalty": -2.0},
    {"logit_bias": {"0": HUGE, "13": HUGE}}, {"logit_bias": {"7": -HUGE, "6": -HUGE}},
    {"min_new_tokens": 2**63 - 1, "max_new_tokens": 2**63 - 1},
    {"min_new_tokens": 10, "stop_token_ids": list(range(V))}, {"min_new_tokens": 10, "stop_token_ids": [3, 6, 7]},
    {"temperature": HUGE, "repetition_penalty": HUGE, "logit_bias": {"3": HUGE}, "presence_penalty": -2.0},
    {"temperature": 1e-6, "repetition_penalty": TINY, "frequency_penalty": -2.0, "logit_bias": {"7": HUGE}},
    {"top_p": TINY, "min_p": TINY, "top_k": 3, "repetition_penalty": TINY, "temperature": 2.0},
    {"top_k": 4, "top_p": 0.8, "repetition_penalty": HUGE, "temperature": 50.0},
]


@pytest.mark.parametrize("extreme", EXTREMES)
@pytest.mark.parametrize("allowed", [ALLOWED, (EOS,), None])
def test_no_masked_token_is_drawn_at_any_extreme(extreme, allowed):
    """Values the engine accepts, at the ends of their ranges, with a grammar (or none) and the
    filters: every draw is a token the reference allows, and every likely one is drawn."""
    draws = 300
    constraint = {} if allowed is None else {"regex": "x"}
    params = SamplingParams(**constraint, **extreme)
    params.validate(vocab_size=V)
    grammar = None if allowed is None else FixedGrammar(allowed)
    reqs = [Req(rid=str(i), origin_input_ids=list(PROMPT), sampling_params=params, output_ids=list(OUTPUT),
                grammar=grammar) for i in range(draws)]
    expected = reference_choices(params, range(V) if allowed is None else allowed)
    torch.manual_seed(0)
    drawn = Counter(sample(np.tile(EXTREME_LOGITS, (draws, 1)).astype(np.float32), reqs).next_ids.tolist())
    assert set(drawn) <= set(expected), (drawn, expected)
    assert {t for t, q in expected.items() if q > 0.05} <= set(drawn), (drawn, expected)


# -- detokenization ----------------------------------------------------------------------

TEXTS = [
    "Hello world! This is a test of incremental detokenization, with punctuation .,;:!?",
    "def f(x):\n    return x  +  1\n\n\tindented\r\nline",
    "emoji 😀🎉👍🏽 and flags 🇫🇷 done 🧑‍🤝‍🧑",
    "中文测试：你好，世界！日本語もテスト。한국어 텍스트",
    "Ünïcödé àccents — “quotes” … ellipsis ½ ∑ ∫",
    "   leading and trailing spaces   ",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_detokenizer_deltas_concatenate_to_full_decode(tokenizer, text, chunk):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert detok.flush() == ""


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_special_tokens(tokenizer, skip):
    ids = tokenizer.encode("Hi") + [tokenizer.eos_token_id] + tokenizer.encode(" there 你好") + [EOS]
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    deltas = [detok.push([t]) for t in ids]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_detokenizer_holds_back_partial_characters_until_flush(tokenizer):
    ids = tokenizer.encode("ok 😀")
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push([t]) for t in ids[:-1]] == ["ok", ""]  # the emoji's first bytes are held back
    assert detok.flush() == " \ufffd"  # generation ended mid-character: emit what a full decode shows
    assert detok.text == tokenizer.decode(ids[:-1])


def test_detokenizer_decodes_a_bounded_window(tokenizer):
    class Spy:
        def __init__(self):
            self.lengths = []

        def decode(self, ids, **kwargs):
            self.lengths.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    spy = Spy()
    ids = tokenizer.encode(" ".join(TEXTS) * 5)
    detok = IncrementalDetokenizer(spy)
    for t in ids:
        detok.push([t])
    assert detok.text == tokenizer.decode(ids)
    assert len(ids) > 300 and max(spy.lengths) <= 8


# -- stop conditions ---------------------------------------------------------------------


def run_checker(tokenizer, text: str, eos=frozenset({EOS}), **params):
    """Feed ``text``'s tokens one at a time; return (index of the finishing token or None, reason, checker)."""
    ids = tokenizer.encode(text)
    checker = StopChecker(tokenizer, SamplingParams(**params), set(eos))
    for k in range(len(ids)):
        reason = checker.check(ids[: k + 1])
        if reason is not None:
            return k, reason, checker, ids
    return None, None, checker, ids


def test_stop_string_across_tokens(tokenizer):
    text = "The quick brown fox jumps over the lazy dog"
    for stop, visible in [("fox jumps", "The quick brown "), ("ck bro", "The qui")]:
        k, reason, checker, ids = run_checker(tokenizer, text, stop=[stop])
        assert reason == {"type": "stop", "matched": stop}
        assert stop in tokenizer.decode(ids[: k + 1]) and stop not in tokenizer.decode(ids[:k])
        assert not any(stop in tokenizer.decode([t]) for t in ids)  # really split over tokens
        assert checker.visible_text(tokenizer.decode(ids[: k + 1])) == visible


def test_earliest_stop_string_wins(tokenizer):
    k, reason, checker, ids = run_checker(tokenizer, "hello world again", stop=["world", "lo w"])
    assert reason == {"type": "stop", "matched": "lo w"}
    assert checker.visible_text(tokenizer.decode(ids[: k + 1])) == "hel"


def test_stop_strings_and_multibyte_characters(tokenizer):
    text = "Say 你好 now"
    ids = tokenizer.encode(text)
    first_complete = next(k for k in range(len(ids)) if "好" in tokenizer.decode(ids[: k + 1]))
    k, reason, checker, _ = run_checker(tokenizer, text, stop=["好"])
    assert reason == {"type": "stop", "matched": "好"} and k >= first_complete
    assert checker.visible_text(tokenizer.decode(ids[: k + 1])) == "Say 你"
    # A naive decode of the half-generated text ends in "你\ufffd"; that must never match.
    assert any("你\ufffd" in tokenizer.decode(ids[: j + 1]) for j in range(len(ids)))
    assert run_checker(tokenizer, text, stop=["你\ufffd", "\ufffd"])[0] is None


def test_stop_tokens_and_ignore_eos(tokenizer):
    eos = tokenizer.eos_token_id
    checker = StopChecker(tokenizer, SamplingParams(), {eos})
    assert checker.check([5, 6]) is None
    assert checker.check([5, 6, eos]) == {"type": "stop", "matched": eos}
    assert checker.check([5, 6, eos, 7]) == {"type": "stop", "matched": eos}  # stays finished

    ignoring = StopChecker(tokenizer, SamplingParams(ignore_eos=True, stop_token_ids=[9]), {eos})
    assert ignoring.check([5, eos]) is None
    assert ignoring.check([5, eos, 9]) == {"type": "stop", "matched": 9}


def test_min_new_tokens_delays_stops(tokenizer):
    eos = tokenizer.eos_token_id
    checker = StopChecker(tokenizer, SamplingParams(min_new_tokens=2), {eos})
    assert checker.check([eos]) is None and checker.check([eos, eos]) is None
    assert checker.check([eos, eos, eos]) == {"type": "stop", "matched": eos}

    text = "STOP and more STOP"
    first = len(tokenizer.encode("STOP"))
    k, reason, checker, ids = run_checker(tokenizer, text, stop=["STOP"], min_new_tokens=first)
    assert reason == {"type": "stop", "matched": "STOP"} and k == len(ids) - 1
    assert checker.visible_text(text) == "STOP and more "
    assert run_checker(tokenizer, text, stop=["STOP"])[0] == first - 1


def test_length_finish(tokenizer):
    checker = StopChecker(tokenizer, SamplingParams(max_new_tokens=3, stop=["zzz"]), {EOS})
    assert checker.check([10]) is None and checker.check([10, 11]) is None
    assert checker.check([10, 11, 12]) == {"type": "length", "length": 3}


def test_safe_prefix_len_holds_back_possible_stop_starts(tokenizer):
    checker = StopChecker(tokenizer, SamplingParams(stop=["STOP", "<end>"]), {EOS})
    assert checker.safe_prefix_len("abc") == 3
    assert checker.safe_prefix_len("abc S") == 4
    assert checker.safe_prefix_len("abc STO") == 4
    assert checker.safe_prefix_len("abc <en") == 4
    assert checker.safe_prefix_len("") == 0
    assert StopChecker(tokenizer, SamplingParams(), {EOS}).safe_prefix_len("abc S") == 5

    k, _, checker, ids = run_checker(tokenizer, "value: 42 STOP trailing", stop=["STOP"])
    assert checker.safe_prefix_len(tokenizer.decode(ids[: k + 1])) == len("value: 42 ")


# -- streaming near stop strings ---------------------------------------------------------------


def stream_text(tokenizer, text: str, stop: str, max_new_tokens: int = 64) -> tuple[list[str], str]:
    """``text``'s tokens through the engine's OutputBuilder one per step, as the core reports them:
    the step whose decoded text first contains ``stop`` finishes the request (found here by plain
    decoding, not by the checker under test), else the last step ends it by length. Returns the
    streamed deltas and the final result's text."""
    ids = tokenizer.encode(text)
    fields = {"stop": [stop], "max_new_tokens": max_new_tokens}
    builder = OutputBuilder(tokenizer, {EOS}, GenerateRequest("r", [0], fields), SamplingParams(**fields))
    deltas = []
    for k, token in enumerate(ids):
        if stop in tokenizer.decode(ids[: k + 1]):
            reason = {"type": "stop", "matched": stop}
        elif k == len(ids) - 1:
            reason = {"type": "length", "length": len(ids)}
        else:
            reason = None
        deltas.append(builder.update(TokenOutput("r", [token], reason, 0)))
        if reason is not None:
            break
    return deltas, builder.result()["text"]


@pytest.mark.parametrize("text, stop, expected", [
    (" with a quick brown fox jumps", "k brown", " with a quic"),  # the match spans tokens
    (" with a quick brown fox jumps", "fox", " with a quick brown "),
    (" with a quick bro", "k brown", " with a quick bro"),  # a possible start, then the end: all shown
], ids=["across-tokens", "at-a-token", "held-then-shown"])
def test_stream_never_shows_text_past_a_stop_string(tokenizer, text, stop, expected):
    deltas, final = stream_text(tokenizer, text, stop)
    assert final == expected
    shown = ""
    for delta in deltas:
        shown += delta
        assert expected.startswith(shown), (shown, expected)  # nothing streamed is taken back later
    assert shown == expected
    assert len([d for d in deltas if d]) > 1  # really streamed, not all at the end
